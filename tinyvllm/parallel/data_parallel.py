"""Data parallelism: N copies of the engine, each in a process of its own, and every request given to one of them.

    add_request ──► the least-loaded rank's list of unsent requests
    step()      ──► each rank's unsent requests, in one message ──► its LLMEngine (its own model, KV pool, scheduler)
                ◄── the RequestOutputs that the ranks sent back since the last call

Each rank owns a whole model (times `tensor_parallel_size` devices) and runs the ordinary engine loop on the requests
it was given; nothing is shared between ranks, so N ranks decode N batches at once. That is vLLM's
`--data-parallel-size`. On GPUs rank r takes the devices after rank r-1's (CUDA:0, CUDA:1, ...). On a CPU it is how
tinyvllm uses more than one core: tinygrad runs a device's kernels on one worker thread, so one engine keeps one
core busy however many the machine has. Each rank is pinned to its share of the cores, and there its Python thread
must not spin while it waits for tinygrad's worker (see `wait_without_spinning`), or the two would share one core.

A request stays on its rank from start to end; the routing knows only how many sequences each rank holds, so prompts
that share a prefix only hit the prefix cache of the rank they land on. Requests reach their rank together, at the
next `step`, so a rank schedules what one engine given the same requests would: sent one at a time, a rank started
to prefill the first before the others arrived, every run met prefill shapes that the previous runs had not
compiled, and throughput swung between 112 and 179 output tok/s from run to run.
"""
from __future__ import annotations
import itertools
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from tinyvllm.tinygrad_internals import wait_without_spinning
from tinyvllm.engine_args import EngineArgs
from tinyvllm.async_engine import request_stats
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine.protocol import EngineStats, Request, RequestOutput

STEP_WAIT_SECONDS = 0.01   # longest `step` waits for the ranks: new requests get in at least this often


@dataclass
class _Rank:
  index: int
  process: subprocess.Popen
  conn: Connection
  live: dict[str, int] = field(default_factory=dict)     # request id → its number of sequences
  unsent: list[Request] = field(default_factory=list)      # admitted since the last step
  aborts_unanswered: int = 0                               # each abort is answered with the rank's stats after it
  stats: EngineStats = field(default_factory=EngineStats)

  @property
  def busy(self) -> bool: return bool(self.live or self.aborts_unanswered)

  def receive(self) -> tuple:
    try: message = self.conn.recv()
    except EOFError: raise RuntimeError(f"data-parallel rank {self.index} stopped (exit code "
                                        f"{self.process.poll()})") from None
    if message[0] == "error": raise RuntimeError(f"data-parallel rank {self.index} failed: {message[1]}")
    return message


class DataParallelEngine:
  """The engine interface (`Engine` in engine/protocol.py, and add_request) over `data_parallel_size` engine
  processes."""
  def __init__(self, args: EngineArgs):
    self.args, self.ranks = args, []
    try:
      for rank, cores in enumerate(_share_cores(args.data_parallel_size)):
        self.ranks.append(_start_rank(rank, args.for_rank(rank), cores))
      ready = [rank.receive() for rank in self.ranks]
    except BaseException:
      self.shutdown()
      raise
    _, self.model_config, self.tokenizer, self.max_model_len = ready[0][:4]
    self.load_time = max(message[4] for message in ready)
    self.requests: dict[str, _Rank] = {}          # request id → the rank that holds it
    self._ids = itertools.count()

  # ---- requests in -------------------------------------------------------------------------------------------
  # The same intake as one engine: prompts are tokenized and validated here, so a bad request fails in the caller and
  # never reaches a rank. It reads self.requests (ids in use: a dict, so that the check is one atomic lookup from
  # whichever thread calls it), tokenizer, model_config and max_model_len.
  add_request, make_request = LLMEngine.add_request, LLMEngine.make_request

  def admit(self, request: Request) -> str:
    rank = min(self.ranks, key=lambda r: sum(r.live.values()))
    self.requests[request.request_id] = rank
    rank.live[request.request_id] = len(request.seqs)
    rank.unsent.append(request)
    return request.request_id

  def abort_request(self, request_id: str) -> None:
    rank = self.requests.pop(request_id, None)
    if rank is None: return
    del rank.live[request_id]
    unsent = [request for request in rank.unsent if request.request_id != request_id]
    if len(unsent) < len(rank.unsent): rank.unsent = unsent            # the rank never heard of it
    else:
      rank.conn.send(("abort", request_id))
      rank.aborts_unanswered += 1

  def has_unfinished_requests(self) -> bool: return any(rank.busy for rank in self.ranks)

  def warmup(self) -> float:
    """Every rank warms up at once (see LLMEngine.warmup); returns the slowest rank's seconds."""
    for rank in self.ranks: rank.conn.send(("warmup", None))
    return max(rank.receive()[1] for rank in self.ranks)

  def stats(self) -> EngineStats:
    """The ranks' stats as of the messages they last sent, summed; each counts requests (async_engine.py: request_stats)."""
    return EngineStats.total([rank.stats for rank in self.ranks])

  # ---- the loop ---------------------------------------------------------------------------------------------
  def step(self) -> list[RequestOutput]:
    """Sends the requests admitted since the last call, then returns what the ranks produced since the last call,
    waiting up to STEP_WAIT_SECONDS for the first of it."""
    for rank in [rank for rank in self.ranks if rank.unsent]:
      rank.conn.send(("add", rank.unsent))
      rank.unsent = []
    busy = {rank.conn: rank for rank in self.ranks if rank.busy}
    outputs = []
    for conn in wait(list(busy), timeout=STEP_WAIT_SECONDS):
      rank = busy[conn]
      while conn.poll():
        kind, produced, rank.stats = rank.receive()
        rank.aborts_unanswered -= kind == "aborted"
        for out in produced:
          if out.request_id not in rank.live: continue                   # aborted after the rank produced it
          if out.finished: del rank.live[out.request_id], self.requests[out.request_id]
          outputs.append(out)
    return outputs

  def shutdown(self) -> None:
    for rank in self.ranks:
      try: rank.conn.send(("stop", None))
      except OSError: pass                    # it is gone already
      try: rank.process.wait(timeout=5)
      except subprocess.TimeoutExpired: rank.process.kill()
    self.ranks = []

  def __del__(self) -> None: self.shutdown()


def _start_rank(index: int, args: EngineArgs, cores: set[int] | None) -> _Rank:
  """A fresh interpreter (no tinygrad state or threads inherited, and unlike multiprocessing's spawn it does not
  re-run the caller's script) talking over a socket pair."""
  ours, theirs = socket.socketpair()
  code = f"from tinyvllm.parallel.data_parallel import serve_rank; serve_rank({theirs.fileno()})"
  process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),))
  theirs.close()
  conn = Connection(ours.detach())
  conn.send((args, cores))
  return _Rank(index, process, conn)


def _share_cores(n: int) -> list[set[int] | None]:
  """The cores this process may use, split into n contiguous shares; None (no pinning) where there are fewer cores
  than ranks or the OS has no affinity call (macOS)."""
  if not hasattr(os, "sched_getaffinity") or len(cores := sorted(os.sched_getaffinity(0))) < n: return [None] * n
  return [set(cores[len(cores) * r // n:len(cores) * (r + 1) // n]) for r in range(n)]


def serve_rank(fd: int) -> None:
  """One rank, in its own process (`fd`: its end of the socket pair): build the engine, then apply
  commands between steps and send back what each step made."""
  conn = Connection(fd)
  args, cores = conn.recv()
  if cores is not None: os.sched_setaffinity(0, cores)
  wait_without_spinning()
  try:
    engine = LLMEngine(args)         # a server warms it up (`warmup`) before it says it is ready
    conn.send(("ready", engine.model_config, engine.tokenizer, engine.max_model_len, engine.load_time))
    while True:
      while not engine.has_unfinished_requests() or conn.poll():      # idle: block until told something
        command, arg = conn.recv()
        if command == "add":
          for request in arg: engine.admit(request)
        elif command == "abort":
          engine.abort_request(arg)
          conn.send(("aborted", [], request_stats(engine)))
        elif command == "warmup": conn.send(("warmed", engine.warmup()))
        else: return                                                  # "stop"
      conn.send(("outputs", engine.step(), request_stats(engine)))
  except (EOFError, ConnectionError): return                          # the front process went away
  except BaseException as e:  # noqa: BLE001 -- the front raises it for every request instead of hanging
    conn.send(("error", repr(e)))

