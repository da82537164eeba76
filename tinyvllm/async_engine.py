"""The engine loop on a thread of its own, for the server: `AsyncLLMEngine.generate` is an async iterator of a
request's RequestOutputs, while one thread steps any `Engine` (engine/protocol.py) and nothing else touches it."""
from __future__ import annotations
import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from dataclasses import replace
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine.protocol import Engine, EngineStats
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.tinygrad_internals import share_kernel_cache_between_threads

log = logging.getLogger("tinyvllm.engine")


def request_stats(engine: Engine) -> EngineStats:
  """`engine.stats()` with requests counted instead of sequences, as vLLM's gauges count them: a request with n=4
  runs as four sequences but is one request. DataParallelEngine's ranks count this way themselves."""
  stats = engine.stats()
  if not isinstance(engine, LLMEngine): return stats
  running = {seq.request_id for seq in engine.scheduler.running}
  waiting = {seq.request_id for seq in engine.scheduler.waiting} - running
  return replace(stats, running=len(running), waiting=len(waiting))


T = TypeVar("T")


class AsyncLLMEngine:
  """The engine loop on a background thread; `generate` is an async iterator of a request's RequestOutputs.

  One rule keeps the two threads apart: only the engine thread touches the engine. The event loop posts work to its
  inbox and reads what it publishes:

      event loop ──inbox: add, abort, call──► engine thread: publish, apply the inbox, step(), publish, ...
                 ◄──each request's outputs, on that request's asyncio queue──┘
                 ◄──stats and step_started, replaced as the thread goes──┘

  New requests and aborts are applied between two steps, so the event loop never waits for a step to finish, and
  `call` runs anything else there (the server's warmup). Before each turn of the loop, that is after every step and
  before the thread waits for work when idle, it publishes `stats`: an EngineStats, replaced and never changed in
  place, that /metrics reads. While a step runs, `step_started` says since when, for a watchdog.

  Two exceptions: the engine's fixed attributes (tokenizer, model_config, max_model_len), copied here, may be read
  from any thread; and `generate` calls `make_request` on the event loop, which only reads the engine, so that
  tokenizing a prompt takes no time from the steps."""
  def __init__(self, engine: Engine):
    share_kernel_cache_between_threads()
    self.engine = engine
    self.tokenizer, self.model_config, self.max_model_len = engine.tokenizer, engine.model_config, engine.max_model_len
    # written by the engine thread only, read by any
    self.stats = EngineStats()                       # request_stats(engine) after the latest step
    self.step_started: float | None = None           # time.monotonic() when the running step began; None when idle
    self.error: BaseException | None = None          # set if the engine loop died; every request then fails
    self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
    self._outboxes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
    self._lock = threading.Lock()      # work is posted either before the loop dies (then failed by it) or refused
    self._thread = threading.Thread(target=self._loop, daemon=True, name="tinyvllm-engine")
    self._thread.start()

  # ---- the engine thread --------------------------------------------------------------------------------------
  def _loop(self) -> None:
    try:
      while True:
        self.stats = request_stats(self.engine)       # publish: the state after the last step
        self._apply_inbox(wait=not self.engine.has_unfinished_requests())
        self.step_started = time.monotonic()          # a watchdog reads it: a step that never returns shows here
        for out in self.engine.step(): self._deliver(out.request_id, out)
        self.step_started = None
    except BaseException as e:  # noqa: BLE001 -- hand the failure to every waiting client instead of hanging them
      with self._lock: self.error = e
      for request_id in list(self._outboxes): self._deliver(request_id, e)
      while not self._inbox.empty():                 # calls posted before it died: their callers are waiting
        kind, item = self._inbox.get()
        if kind != "call": continue
        _, done = item
        if done.set_running_or_notify_cancel(): done.set_exception(e)

  def _apply_inbox(self, wait: bool) -> None:
    """Apply what the event loop posted; with `wait` (nothing to step), block until something comes."""
    while wait or not self._inbox.empty():
      kind, item = self._inbox.get()
      if kind == "add": self.engine.admit(item)
      elif kind == "abort": self.engine.abort_request(item)
      else:                                           # "call": (fn, the future its caller awaits)
        fn, done = item
        if not done.set_running_or_notify_cancel(): continue     # the caller went away
        try: done.set_result(fn(self.engine))
        except Exception as e: done.set_exception(e)  # noqa: BLE001 -- the caller's error, not the engine's
      wait = False

  def _deliver(self, request_id: str, item) -> None:
    loop, outbox = self._outboxes.get(request_id, (None, None))
    if outbox is not None: loop.call_soon_threadsafe(outbox.put_nowait, item)

  # ---- the event loop -----------------------------------------------------------------------------------------
  def _post(self, kind: str, item: object) -> None:
    with self._lock:
      if self.error is not None: raise RuntimeError(f"the engine stopped: {self.error!r}")
      self._inbox.put((kind, item))

  async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str):
    request = self.engine.make_request(prompt, params, request_id)      # ValueError here: the caller's 400
    outbox: asyncio.Queue = asyncio.Queue()
    self._outboxes[request_id] = (asyncio.get_running_loop(), outbox)
    try:
      self._post("add", request)
      while True:
        out = await outbox.get()
        if isinstance(out, BaseException): raise RuntimeError(f"the engine stopped: {out!r}") from out
        yield out
        if out.finished: return
    finally:
      del self._outboxes[request_id]
      self.abort(request_id)      # a no-op when it finished; frees everything when the client went away

  def abort(self, request_id: str) -> None: self._inbox.put(("abort", request_id))

  async def call(self, fn: Callable[[Engine], T]) -> T:
    """`fn(engine)` on the engine thread, between two steps; returns its result or raises its exception here."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()
    self._post("call", (fn, done))
    return await asyncio.wrap_future(done)

  @property
  def alive(self) -> bool: return self._thread.is_alive()

  def fail_all(self, error: Exception) -> None:
    """End every request in flight: its `generate` raises RuntimeError from `error`. The engine thread is untouched
    (a stuck step cannot be interrupted); the requests are aborted as their generators close."""
    for request_id in list(self._outboxes): self._deliver(request_id, error)
