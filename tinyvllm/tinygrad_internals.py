"""Every use of tinygrad's internals, in one place, each with why. The rest of tinyvllm uses tinygrad's public API
(Tensor, TinyJit, Variable, custom kernels written as UOps).

    host <-> device copies    upload / download / allocated / to_device: straight through the device's allocator
    the kernel cache          shared between threads; lowered kernels kept on disk too
    graph capture             SameBody (each decoder layer traced once); tinygrad's `function` and cost estimates
                              made linear instead of quadratic
    data-parallel ranks       wait_without_spinning: tinygrad's device thread gets the core it waits for
    device memory             device_memory: a GPU's free and total bytes, which size the KV pool

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

A server captures all of its TinyJit graphs before it says it is ready (runner/model_runner.py), so the seconds a
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
"""
from __future__ import annotations
import collections
import ctypes
import functools
import hashlib
import importlib
import logging
import sqlite3
import time
from dataclasses import replace
from typing import Callable
import numpy as np
from tinygrad import Device, Tensor, codegen, helpers
from tinygrad.device import Buffer, MultiBuffer
from tinygrad.dtype import DType, _from_np_dtype, _to_np_dtype
from tinygrad.engine import realize
from tinygrad.helpers import Context, dedup
from tinygrad.nn.state import get_state_dict
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import Ops, UOp, graph_rewrite, ssimplify

function = importlib.import_module("tinygrad.function")     # the module: `tinygrad.function` names the decorator


# ---- host <-> device copies ----------------------------------------------------------------------------------------

def upload(buf: Buffer | MultiBuffer, src: np.ndarray) -> None:
  """Host array -> the start of a device buffer of the same dtype (each device's copy of a replicated one); a shorter
  array fills the buffer's first bytes only."""
  if not src.nbytes: return
  data = memoryview(np.ascontiguousarray(src)).cast("B")
  for b in buf.bufs if isinstance(buf, MultiBuffer) else [buf]:
    assert src.nbytes <= b.nbytes and src.dtype == _to_np_dtype(b.dtype), (src.dtype, src.nbytes, b)
    b.allocator._copyin(b._buf, data)


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

# ---- graph capture -------------------------------------------------------------------------------------------------

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
