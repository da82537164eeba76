"""Every use of tinygrad's internals, in one place, each with why. The rest of tinyvllm uses tinygrad's public API
(Tensor, TinyJit, Variable, custom kernels written as UOps).

    host <-> device copies    upload / download / allocated / to_device: straight through the device's allocator
    the kernel cache          shared between threads; lowered kernels kept on disk too
    graph capture             SameBody (each decoder layer traced once); tinygrad's `function` and cost estimates
                              made linear instead of quadratic; trace_and_compile: many graphs' kernels compiled
                              in one batch before their captures
    data-parallel ranks       wait_without_spinning: tinygrad's device thread gets the core it waits for
    device memory             device_memory: a GPU's free and total bytes, which size the KV pool;
                              release_device_memory: freed buffers back to the driver (for a benchmark's peer)
    captured graphs on disk   keep_graphs_loadable, dump_graph / load_graph: a later start loads what an earlier
                              one captured

## Host <-> device copies

Host <-> device copies that go straight through the device's allocator (`_copyin` / `_copyout`, what tinygrad's own
copy runs in the end), scheduling nothing.

`Tensor(np_array)`, `Buffer.copy_from` and `Tensor.numpy` each schedule, lower and (on tinygrad's HCQ2 runtime)
compile a small graph. Per step that cost 0.3 and 1.4 ms of Python on the H100 machine, longer than the whole step's
kernels take at batch 1 of a small model (docs/performance.md); at load time, ~400 weights made that way took
5 s of a CPU start. Here a tensor is allocated empty and its bytes are written in place.

## The kernel cache

Two adjustments to tinygrad's on-disk kernel cache (SQLite, through one process-wide connection).

Every thread may use it. Python's SQLite connections refuse, by default, to be used by any thread but the one that
opened them. The server loads the model on one thread and AsyncLLMEngine steps it on another, so the first kernel
compiled on the engine thread failed with `sqlite3.ProgrammingError: SQLite objects created in a thread can only be
used in that same thread`, and the engine thread died. Reopening the connection with check_same_thread=False fixes
that; SQLite serializes the access.

Lowered kernels are kept too. tinygrad's disk cache keeps each kernel's machine code, keyed by its source, but the
lowering that produces the source (the code generator's rewrites, ~100 ms a kernel on CPU) is cached in memory only,
so every new process lowers every kernel again: 32 kernels, 1–2 s of the 10 s a warm CPU start took to its first
token. Here tinygrad's in-memory table of lowered kernels falls back to its disk cache.

## Graph capture

A server captures all of its TinyJit graphs before it says it is ready (runner/graphs.py), so the seconds a
capture
takes are seconds of every start. Most of them are Python: tracing the model's layers into tinygrad's graph and
rewriting what was traced. Each layer runs as a tinygrad `function` (a CALL of a body whose inputs are parameters),
so the scheduler and code generator see one body, not num_layers bodies; but tracing the body, running the layer's
Python to build it, still happened once per layer (~0.3 s each on a 2-core CPU for SmolLM2's 30 layers, a third of
a capture).

    layer 0:  trace fxn(layer 0, x, ...)  ──►  body(p0, p1, ..., pn)  ──►  CALL(body, layer 0's weights, x, ...)
    layer 1:  trace once more, check that the body is the same one (tinygrad's graphs are hash-consed: same
              structure, same object), else trace every layer
    layer k:                                   body                   ──►  CALL(body, layer k's weights, x, ...)

The layer object is an argument, so its weights are explicit parameters in a fixed order (tinygrad's state-dict
walk of the arguments); whatever else the body reads (a buffer shared by every layer) stays an implicit input, and
the check on layer 1 confirms that it is the same for both.

One other change, to tinygrad's own `function`: after tracing, it renumbers the scratch buffers a body writes
before reading ("invalid outputs") and, for each node of the body, recomputed that whole set to test whether the
node is in it: quadratic in the body's size (~40 % of a capture on SmolLM2). Computed once, the result is the same
set, numbered in the same order.

And a kernel's cost estimate is simplified in the compile worker, before the kernel is pickled back to the parent
(`_with_simplified_estimates` below: the parent did it on arrival). Unsimplified, the estimate of an attention kernel
over Gemma-3's 256-wide heads is a chain of additions too deep for pickle (a RecursionError at 10,000 levels): the
worker died reporting it, and the parent waited for its result forever.

## Captured graphs on disk

Even with every kernel in tinygrad's disk cache, capturing a graph traces, schedules and lowers it again: ~80 s for
a 2-core CPU's 23 graphs of SmolLM2. A captured TinyJit can be pickled (its linear program of compiled kernels), but
pickling copies every buffer it reads, weights and KV pool included. Here the buffers that outlive the graph are
pickled by name and looked up again when the graph is loaded; of the rest, the graph's scratch arena is made anew
and any other buffer travels with its contents.

    capture ──► program ──schedule──► batches ──encode──► submitter     stored: the batches, buffers by name
    start   ──► stored batches ──encode──► submitter                     the submitter is built here, for this process

On tinygrad's queue runtime (HCQ2: the CPU here) a capture compiles the program in two halves: it schedules the
kernels into queues and batches, then encodes the batches as command buffers and one submitter, which hold the
capturing process's kernel addresses. What is stored is what the first half made, and a loading process runs only
the second. Buffers and placeholders in the stored batches are told apart by tinygrad's unique numbers; a loaded
program's are shifted past every number the loading process has used, and each compiled kernel keeps the hash
(UOp.key) its capture computed. SmolLM2's 23 graphs load in ~25 s where they take ~85 s to capture (~54 s on the
same machine if the store kept the program unscheduled);
tests/runner/test_stored_graphs.py checks that a second process loads every graph and samples the first one's tokens.
"""
from __future__ import annotations
import collections
import ctypes
import functools
import gc
import hashlib
import importlib
import io
import itertools
import logging
import pickle
import sqlite3
import time
from dataclasses import replace
from typing import Callable
import numpy as np
from tinygrad import Device, Tensor, TinyJit, codegen, helpers
from tinygrad.device import Buffer, MultiBuffer
from tinygrad.dtype import AddrSpace, DType, _from_np_dtype, _to_np_dtype, dtypes
from tinygrad.engine import realize
from tinygrad.engine import jit
from tinygrad.engine.jit import _TinyJit
from tinygrad.engine.worker import get_worker_pool
from tinygrad.helpers import Context, dedup, from_mv
from tinygrad.nn.state import get_state_dict
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import Ops, UOp, graph_rewrite, ssimplify

function = importlib.import_module("tinygrad.function")     # the module: `tinygrad.function` names the decorator
_compile_tinygrad_kernel = realize._compile_kernel


# ---- host <-> device copies ----------------------------------------------------------------------------------------

def upload(buf: Buffer | MultiBuffer, src: np.ndarray, wait: bool = True) -> None:
  """Host array -> the start of a device buffer of the same dtype (each device's copy of a replicated one); a shorter
  array fills the buffer's first bytes only. A CPU's copy waits for all work queued on the device first (tinygrad's
  CPU allocator synchronizes), whether or not that work reads the buffer: `wait=False`, for a buffer no queued work
  reads, writes it at once, so that a step's sampler inputs go in while its forward pass runs."""
  if not src.nbytes: return
  data = memoryview(np.ascontiguousarray(src)).cast("B")
  for b in buf.bufs if isinstance(buf, MultiBuffer) else [buf]:
    assert src.nbytes <= b.nbytes and src.dtype == _to_np_dtype(b.dtype), (src.dtype, src.nbytes, b)
    if not wait and b.device.split(":")[0] == "CPU": ctypes.memmove(b._buf.va_addr, from_mv(data), len(data))
    elif isinstance(b._buf, memoryview): b._buf[:len(data)] = data      # the emulator's (PYTHON) memory: host bytes
    else: b.allocator._copyin(b._buf, data)


def download(buf: Buffer) -> np.ndarray:
  """Device buffer -> new host array; waits for the work that writes it (every backend's _copyout synchronizes)."""
  out = np.empty(buf.size, _to_np_dtype(buf.dtype))
  buf.allocator._copyout(memoryview(out).cast("B"), buf._buf)
  return out


def allocated(shape: tuple[int, ...], dtype: DType, device: str | tuple[str, ...] | None = None) -> Tensor:
  """A realized tensor of unspecified contents on `device` (a tuple: replicated on each; None: the default device)."""
  t = Tensor.empty(*shape, dtype=dtype, device=device or Device.DEFAULT)
  buf = t.uop.buffer
  for b in buf.bufs if isinstance(buf, MultiBuffer) else [buf]: b.ensure_allocated()
  return t


def to_device(array: np.ndarray, device: str | None = None) -> Tensor:
  """A realized tensor on `device` (the default one if None) holding a copy of `array`."""
  t = allocated(array.shape, _from_np_dtype(array.dtype), device)
  upload(t.uop.buffer, array)
  return t

# ---- the kernel cache ----------------------------------------------------------------------------------------------

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
  backed by its disk cache. HCQ's submitters are kept too: their addresses are read from tables filled when a graph
  is linked, so a submitter's program is the same in every process that builds the same graph (a loading process
  finds those an earlier load lowered: for SmolLM2's 23 graphs on a 2-core CPU, ~11 s)."""
  TABLE = "tinyvllm_lowered_kernels"

  def __contains__(self, key) -> bool: return super().__contains__(key) or self._load(key) is not None
  def get(self, key, default=None): return self[key] if key in self else default

  def __setitem__(self, key, program: UOp) -> None:
    program = _with_simplified_estimates(program)
    super().__setitem__(key, program)
    helpers.diskcache_put(self.TABLE, self._disk_key(key), program)

  def _load(self, key) -> UOp | None:
    if (program := helpers.diskcache_get(self.TABLE, self._disk_key(key))) is not None:
      super().__setitem__(key, program := _with_simplified_estimates(program))
    return program

  @staticmethod
  def _disk_key(key: tuple) -> str:
    ast_key, renderer, *settings = key
    return hashlib.sha256(repr((ast_key, renderer.__module__, renderer.__qualname__, *settings)).encode()).hexdigest()


def _with_simplified_estimates(program: UOp) -> UOp:
  """A lowered kernel whose cost estimate (in its KernelInfo) is simplified. tinygrad's worker processes leave it a sum
  of one term per operation times the loop's trip count, which for a kernel looping over the context's blocks is
  symbolic: thousands of terms, and UOp.key hashes the KernelInfo through its pretty-printed repr (megabytes for an
  attention kernel: ~0.7 s of each SmolLM2 graph's capture on a 2-core CPU)."""
  sink = program.src[0]
  if sink.op is not Ops.SINK or not isinstance(estimates := getattr(sink.arg, "estimates", None), Estimates): return program
  simplified = Estimates(*(_sum_of_terms(x) for x in (estimates.ops, estimates.lds, estimates.mem)))
  return program.replace(src=(sink.replace(arg=replace(sink.arg, estimates=simplified)), *program.src[1:]))


def keep_lowered_kernels_on_disk() -> None:
  """Swap tinygrad's in-memory table of lowered kernels for one backed by its disk cache (once per process)."""
  if isinstance(codegen.to_program_cache, _LoweredKernels): return
  codegen.to_program_cache = realize.to_program_cache = _LoweredKernels(codegen.to_program_cache)

# ---- graph capture -------------------------------------------------------------------------------------------------

def _compile_kernel(task: tuple) -> tuple[int, UOp]:
  """tinygrad's compile task (run in its worker processes), its kernel's cost estimate simplified before the kernel
  is pickled back to the parent."""
  i, program = _compile_tinygrad_kernel(task)
  return i, _with_simplified_estimates(program)


def _renumber_invalid_outputs(uret: UOp) -> UOp:
  """tinygrad.function.renumber_invalid_outputs, with `invalid_outputs` computed once instead of once per node."""
  invalid = function.invalid_outputs(uret)
  return uret.substitute({b: b.replace(arg=replace(b.arg, slot=i))
                          for i, b in enumerate(x for x in uret.toposort(enter_calls=False) if x in invalid)})


def _sum_of_terms(x):
  """ssimplify of a sum, its terms gathered first: a graph's cost estimate adds up every kernel's (symbolic in the
  context length), hundreds of terms, most of them one of a few that each layer repeats; simplified whole, the sum
  took a quarter of a capture."""
  if not isinstance(x, UOp): return x
  const, counts, stack = 0, collections.Counter(), [x]
  while stack:
    u = stack.pop()
    if u.op is Ops.ADD: stack.extend(u.src)
    elif u.op is Ops.CONST: const += u.arg
    else: counts[u] += 1
  return ssimplify(sum((u * n for u, n in counts.items()), start=x.const_like(const)))


def speed_up_capture() -> None:
  function.renumber_invalid_outputs = _renumber_invalid_outputs
  realize._compile_kernel = _compile_kernel
  Estimates.simplify = lambda self: Estimates(_sum_of_terms(self.ops), _sum_of_terms(self.lds), _sum_of_terms(self.mem))


class SameBody:
  """`fxn(*args)` as a tinygrad `function` (precompile=True, implicit inputs allowed) whose body is traced on the
  first two calls and reused for the next ones whose inputs have the same shapes. Make one per traced forward pass:
  within it every call shares the Python state the body reads besides its arguments."""
  def __init__(self, fxn: Callable[..., Tensor]):
    self.fxn, self.name = fxn, fxn.__qualname__
    self.bodies: dict[tuple, tuple[UOp, list[UOp]]] = {}    # input shapes -> (body, implicit inputs)
    self.traced: dict[tuple, int] = {}                      # input shapes -> times traced
    self.reuse = True

  def __call__(self, *args) -> Tensor:
    tensors = get_state_dict(args, tensor_type=(Tensor, UOp)).values()
    inputs = dedup([u for t in tensors if (u := t._uop).device is not None])
    key = tuple((u.shape, u.dtype, u.device) for u in inputs)
    if self.reuse and self.traced.get(key, 0) >= 2: body, implicit = self.bodies[key]
    else:
      body, implicit = self._trace(args, inputs)
      if self.traced.get(key, 0) == 1 and not _same(self.bodies[key], (body, implicit)): self.reuse = False
      self.bodies.setdefault(key, (body, implicit))
      self.traced[key] = self.traced.get(key, 0) + 1
    return Tensor(body.call(*inputs, *implicit, name=self.name, precompile=True).gettuple(0))

  def _trace(self, args: tuple, inputs: list[UOp]) -> tuple[UOp, list[UOp]]:
    """tinygrad.function's tracing: run fxn with device work off, turn its inputs into parameters, collect what
    else it reads as implicit inputs."""
    with Context(ALLOW_DEVICE_USAGE=0):
      function._function.depth += 1
      try: out = self.fxn(*args)
      finally: function._function.depth -= 1
    body = out.uop.substitute({u: u.param_like(i) for i, u in enumerate(inputs)})
    found = list(inputs)
    body = graph_rewrite(body, function.pm_ctx, (found, function.invalid_outputs(body)), bottom_up=True,
                         name="get_implicit_inputs")
    return _renumber_invalid_outputs(body), found[len(inputs):]


def _same(a: tuple[UOp, list[UOp]], b: tuple[UOp, list[UOp]]) -> bool:
  return a[0] is b[0] and len(a[1]) == len(b[1]) and all(x is y for x, y in zip(a[1], b[1]))


class Traced:
  """What a function scheduled when it ran the way TinyJit captures it (tinygrad's `capturing` hook: scheduled,
  never run): its linear programs and its result. `replay` hands them to a TinyJit capture instead of the function."""
  def __init__(self, fxn: Callable[[], Tensor]):
    self.linears: list[UOp] = []
    realize.capturing.append(self)
    try: self.ret = fxn()
    finally: realize.capturing.clear()

  def add_linear(self, linear: UOp, var_vals) -> None: self.linears.append(linear)

  def replay(self, *args, **kwargs) -> Tensor:
    for linear in self.linears: realize.capturing[0].add_linear(linear, {})
    return self.ret


def trace_and_compile(fxns: list[Callable[[], Tensor]]) -> tuple[list[Traced], int]:
  """Trace each function as TinyJit would capture it and compile the kernels of all of them in one batch of tinygrad's
  worker pool, each function's sent off as soon as it is traced. Returns the traces and how many kernels compiled.

  A TinyJit capture compiles its graph's new kernels in parallel, but one graph after another, each waiting for its
  slowest kernel: on an H100 machine's 16 cores most of a start's 29 captures. Here the pool compiles while the next
  function traces, and each capture that follows finds every kernel compiled and its linear program traced."""
  pool, context = get_worker_pool(), {v.key: v.value for v in codegen.to_program_context}
  pending: dict[tuple, object] = {}
  traces = []
  for fxn in fxns:
    traces.append(traced := Traced(fxn))
    for call in (c for linear in traced.linears for c in linear.toposort() if c.op is Ops.CALL):
      if (found := realize._get_call_to_compile(call)) is None: continue
      if (key := codegen.to_program_key(*found)) in pending or key in codegen.to_program_cache: continue
      task = (0, found, context)
      pending[key] = realize._compile_kernel(task)[1] if pool is None else pool.apply_async(realize._compile_kernel, (task,))
  for key, result in pending.items(): codegen.to_program_cache[key] = result if pool is None else result.get()[1]
  return traces, len(pending)

# ---- data-parallel ranks -------------------------------------------------------------------------------------------

POLL_SECONDS = 0.0001      # how often a pinned rank's Python thread looks whether tinygrad's worker has finished


def wait_without_spinning() -> None:
  """tinygrad's queue runtime (HCQ2) waits for its device thread in a busy loop. On a data-parallel rank pinned to
  one core that loop takes turns with the very thread it waits for; polling with short sleeps leaves the core to the
  worker (two ranks × 16 requests, one core each: 46.8 + 47.0 output tok/s). Backends without HCQ2 are not touched."""
  from tinygrad.runtime.support.hcq2 import HCQ2Compiled

  def wait_sleeping(self, signal, value: int, timeout: int | None = None) -> None:
    while signal[0] < value: time.sleep(POLL_SECONDS)
  HCQ2Compiled._wait_signal = wait_sleeping


# ---- device memory -------------------------------------------------------------------------------------------------

def release_device_memory(device: str) -> None:
  """Hand the memory of dropped tensors back to the driver: tinygrad keeps freed buffers for reuse (its LRU
  allocator), so a process started after an engine is dropped (a benchmark's peer) would find the GPU still full."""
  gc.collect()
  free_cache = getattr(Device[device].allocator, "free_cache", None)
  if free_cache is not None: free_cache()


def device_memory(device: str) -> tuple[int, int] | None:
  """(free, total) bytes of a GPU's memory, asked of its driver (tinygrad has no public call for it); None where the
  backend does not say (a CPU: its KV pool has a fixed budget, RAM is shared with everything else)."""
  kind = device.split(":")[0]
  if kind not in ("CUDA", "METAL"): return None
  try:
    dev = Device[device]
    if kind == "CUDA":
      from tinygrad.runtime.autogen import cuda
      free, total = ctypes.c_size_t(), ctypes.c_size_t()
      cuda.cuCtxSetCurrent(dev.context)
      return (free.value, total.value) if cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0 else None
    total = dev.sysdevice.recommendedMaxWorkingSetSize()     # Metal, unified memory: what the GPU may keep resident
    return total - dev.sysdevice.currentAllocatedSize(), total
  except Exception as e:   # a driver binding that differs: the engine falls back to a fixed pool, and says so
    logging.getLogger("tinyvllm").warning("%s: free device memory unknown (%s): a 1 GB KV pool unless "
                                          "--kv-cache-memory-gb is set", device, e)
    return None


# ---- captured graphs on disk ---------------------------------------------------------------------------------------

GRAPH_TABLE = "tinyvllm_graph_sets"
_scheduled: dict[bytes, tuple[UOp, bool]] = {}     # a JIT's compiled program → its form before encoding


def _hcq_scheduled(linear: UOp, profile: bool) -> UOp:
  """The first half of tinygrad's `hcq_compile` for a TinyJit capture (no input buffers to replace): the program
  split into queues and batches. Nothing in it belongs to this process yet."""
  from tinygrad.runtime.support import hcq2
  linear = graph_rewrite(linear, hcq2.pm_insert_copy_staging + hcq2.pm_flatten_linear, name="insert copy staging")
  return graph_rewrite(linear, hcq2.pm_schedule_and_merge, ctx=({}, profile), walk=True, name="schedule and merge hcq")


def _hcq_encoded(scheduled: UOp) -> UOp:
  """The second half: the batches encoded as command buffers, which hold this process's kernel addresses, and on a
  CPU-run submitter packed into one C program."""
  from tinygrad.runtime.support import hcq2
  linear = hcq2.hcq_lower(scheduled, hcq2.pm_encode_cmdbufs + hcq2.pm_pack_placeholders)
  return hcq2.hcq_lower(hcq2.merge_submitters(linear), hcq2.pm_encode_cmdbufs) \
    if hcq2.HCQ_RUNTIME_DEV.value == "CPU" else linear


def keep_graphs_loadable() -> None:
  """Compile each graph TinyJit captures in tinygrad's queue runtime (HCQ2) in two halves, remembering the first:
  the second half's command buffers hold this process's addresses, so a graph stored for another process is stored
  as the first half left it, and a loading process runs only the second (on a 2-core CPU, SmolLM2's 23 graphs:
  the halves take ~18 s and ~24 s). Once per process."""
  if not hasattr(realize, "hcq_compile") or getattr(realize.hcq_compile, "remembers", False): return
  hcq_compile = realize.hcq_compile

  def remembering(linear: UOp, input_uops, profile: bool) -> UOp:
    if input_uops is not None: return hcq_compile(linear, input_uops, profile)     # not a TinyJit capture
    scheduled = _hcq_scheduled(linear, profile)
    out = _hcq_encoded(scheduled)
    _scheduled[out.key] = (scheduled, profile)
    return out
  remembering.remembers = True
  realize.hcq_compile = remembering


def dump_graph(jit: TinyJit, names: dict[int, str]) -> bytes | None:
  """A captured TinyJit as bytes (None if it cannot be loaded elsewhere); `names`: id(Buffer) → name, for every
  buffer that is not the graph's own."""
  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, UOp) and obj.op is Ops.PROGRAM: return ("program", obj.key, obj.__reduce__()[1])
      if not isinstance(obj, Buffer): return None
      if id(obj) in names: return ("named", names[id(obj)])
      if obj._base is not None: return None                 # a view: pickled with its base, which is looked up
      if obj.dtype == dtypes.int8: return ("scratch", id(obj), obj.device, obj.size, obj.dtype)    # the memory arena
      return ("data", id(obj), obj.device, obj.size, obj.dtype, download(obj).tobytes())
  c = jit.captured
  scheduled = _scheduled.pop(_unsplit(c._linear).key, None)
  if scheduled is None and hasattr(realize, "hcq_compile"): return None   # its submitter only runs in this process
  graph = ("scheduled", *scheduled) if scheduled is not None else ("linked", c._linear, None)
  out = io.BytesIO()
  Pickler(out).dump((next(UOp.unique_num), graph, c.ret, c.expected_names, c.expected_input_info))
  return out.getvalue()                                 # every unique number in the graph is below the first


def _unsplit(linear: UOp) -> UOp:
  """A captured program as `hcq_compile` returned it, before TinyJit grouped its kernels into the device's own graphs
  (CUDA graphs, Metal's command buffers; a CPU's queue runtime has none, so there it is the program as captured)."""
  def calls(call: UOp) -> tuple[UOp, ...]:
    function = call.src[0]
    return function.src[0].src if function.op is Ops.CUSTOM_FUNCTION and function.arg == "graph" else (call,)
  return linear.replace(src=tuple(c for call in linear.src for c in calls(call)))


def load_graph(data: bytes, buffers: dict[str, Buffer]) -> TinyJit:
  """`dump_graph`'s bytes as a TinyJit that replays at once; `buffers`: name → this process's buffer."""
  made: dict[int, Buffer] = {}

  class Unpickler(pickle.Unpickler):
    def persistent_load(self, pid):
      if pid[0] == "program": return _program_with_key(*pid[1:])
      if pid[0] == "named": return buffers[pid[1]]
      if pid[1] not in made:
        made[pid[1]] = buf = Buffer(*pid[2:5])        # allocated when the graph is linked, as it would be here
        if pid[0] == "data": upload(buf.ensure_allocated(), np.frombuffer(bytearray(pid[5]), _to_np_dtype(buf.dtype)))
      return made[pid[1]]

    def find_class(self, module, name):
      return _renumbered_uop if (module, name) == ("tinygrad.uop.ops", "UOp") else super().find_class(module, name)

  # The graph's buffers and placeholders are told apart by unique numbers, counted in the capturing process; shifted
  # past every number this process has used, in their order, they meet none of its own (else two buffers would be
  # taken for one, and two graphs would share command buffers once linked). A kernel's registers and local memory
  # are numbered within the kernel: they stay as they are, and a loaded kernel is the one that was captured.
  offset = next(UOp.unique_num)
  def _renumbered_uop(op, dtype=None, src=(), arg=None, tag=None, metadata=None, *buffer):
    if (op is Ops.BUFFER and arg.addrspace not in (AddrSpace.LOCAL, AddrSpace.REG)) or \
       (op is Ops.PARAM and tag is not None and arg.slot != 0):                   # slot 0: the device's own
      arg = replace(arg, slot=arg.slot + offset)
    return UOp(op, dtype, src, arg, tag, metadata, *buffer)
  numbers, (form, linear, profile), ret, expected_names, expected_input_info = Unpickler(io.BytesIO(data)).load()
  UOp.unique_num = itertools.count(offset + numbers)
  if form == "scheduled":            # the submitter built here, as jit_lower does after compile_linear
    linear = _hcq_encoded(linear)
    if helpers.JIT < 2: linear = jit.graph_split_rewrite(linear, max_batch_size=helpers.JIT_BATCH_SIZE.value)
  return _TinyJit(None, jit.CapturedJit(ret, linear, expected_names, expected_input_info))


def _program_with_key(key: bytes, args: tuple) -> UOp:
  """A compiled kernel as UOp(*args), its hash (UOp.key) the one the capturing process computed: computed here it
  would hash the kernel's whole tree, source and binary included (SmolLM2's 23 graphs: ~900 kernels, ~7.5 s on a
  2-core CPU). A kernel holds no buffer of the graph, so its hash is the same in every process."""
  program = UOp(*args)
  program.__dict__.setdefault("_RECURSIVE_PROPERTY_key", key)      # tinygrad's cached-property slot for `key`
  return program


def forget_captures() -> None:
  """Drop the programs kept for graphs captured so far (once stored, or never to be)."""
  _scheduled.clear()


def stored_graph(code: str, key: str) -> bytes | None:
  return helpers.diskcache_get(GRAPH_TABLE, {"code": code, "key": key})


def store_graph(code: str, key: str, data: bytes) -> None:
  """Keep a graph captured by this `code` (a digest of tinyvllm's source), and drop every graph another version of
  the code stored: none of them can load here (SmolLM2's 23 graphs take 11 MB; a cache db that kept every version
  a developer ran grew past 600 MB of them)."""
  helpers.diskcache_put(GRAPH_TABLE, {"code": code, "key": key}, data)
  connection = helpers.db_connection()
  connection.execute(f"DELETE FROM '{GRAPH_TABLE}_{helpers.VERSION}' WHERE code != ?", (code,))
  connection.commit()
