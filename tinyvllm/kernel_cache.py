"""Two adjustments to tinygrad's on-disk kernel cache (SQLite, through one process-wide connection).

Every thread may use it. Python's SQLite connections refuse, by default, to be used by any thread but the one that
opened them. The server loads the model on one thread and AsyncLLMEngine steps it on another, so the first kernel
compiled on the engine thread failed with `sqlite3.ProgrammingError: SQLite objects created in a thread can only be
used in that same thread`, and the engine thread died. Reopening the connection with check_same_thread=False fixes
that; SQLite serializes the access.

Lowered kernels are kept too. tinygrad's disk cache keeps each kernel's machine code, keyed by its source, but the
lowering that produces the source (the code generator's rewrites, ~100 ms a kernel on CPU) is cached in memory only,
so every new process lowers every kernel again: 32 kernels, 1–2 s of the 10 s a warm CPU start took to its first
token. Here tinygrad's in-memory table of lowered kernels falls back to its disk cache.
"""
from __future__ import annotations
import functools
import hashlib
import sqlite3
from tinygrad import codegen, helpers
from tinygrad.engine import realize
from tinygrad.uop.ops import UOp


def share_kernel_cache_between_threads() -> None:
  """Reopen tinygrad's cache connection (with tinygrad's own settings) so that any thread may use it."""
  connect = sqlite3.connect
  sqlite3.connect = functools.partial(connect, check_same_thread=False)
  try:
    helpers._db_connection = None
    helpers.db_connection()
  finally: sqlite3.connect = connect


class _LoweredKernels(dict):
  """tinygrad's `to_program_cache` (its key: the kernel's AST hash, the renderer, the code generator's settings),
  backed by its disk cache. HCQ's submitters, which embed this process's buffer addresses, stay in memory only."""
  TABLE = "tinyvllm_lowered_kernels"

  def __contains__(self, key) -> bool: return super().__contains__(key) or self._load(key) is not None
  def get(self, key, default=None): return self[key] if key in self else default

  def __setitem__(self, key, program: UOp) -> None:
    super().__setitem__(key, program)
    if not program.src[0].arg.name.startswith("hcq"): helpers.diskcache_put(self.TABLE, self._disk_key(key), program)

  def _load(self, key) -> UOp | None:
    if (program := helpers.diskcache_get(self.TABLE, self._disk_key(key))) is not None: super().__setitem__(key, program)
    return program

  @staticmethod
  def _disk_key(key: tuple) -> str:
    ast_key, renderer, *settings = key
    return hashlib.sha256(repr((ast_key, renderer.__module__, renderer.__qualname__, *settings)).encode()).hexdigest()


def keep_lowered_kernels_on_disk() -> None:
  """Swap tinygrad's in-memory table of lowered kernels for one backed by its disk cache (once per process)."""
  if isinstance(codegen.to_program_cache, _LoweredKernels): return
  codegen.to_program_cache = realize.to_program_cache = _LoweredKernels(codegen.to_program_cache)
