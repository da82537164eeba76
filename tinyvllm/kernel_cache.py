"""Let every thread use tinygrad's compiled-kernel cache (AsyncLLMEngine steps the model on its own thread).

tinygrad caches compiled kernels in SQLite through one process-wide connection, and Python's SQLite connections
refuse, by default, to be used by any thread but the one that opened them. The server loads the model on one
thread and AsyncLLMEngine steps it on another, so the first kernel compiled on the engine thread fails with
`sqlite3.ProgrammingError: SQLite objects created in a thread can only be used in that same thread`, and the engine
thread dies. Reopening the connection with check_same_thread=False fixes that; SQLite serializes the access.
"""
from __future__ import annotations
import functools
import sqlite3
from tinygrad import helpers


def share_kernel_cache_between_threads() -> None:
  """Reopen tinygrad's cache connection (with tinygrad's own settings) so that any thread may use it."""
  connect = sqlite3.connect
  sqlite3.connect = functools.partial(connect, check_same_thread=False)
  try:
    helpers._db_connection = None
    helpers.db_connection()
  finally: sqlite3.connect = connect
