"""Host <-> device copies that go straight through the device's allocator (`_copyin` / `_copyout`, what tinygrad's own
copy runs in the end), scheduling nothing.

`Tensor(np_array)`, `Buffer.copy_from` and `Tensor.numpy` each schedule, lower and (on tinygrad's HCQ2 runtime)
compile a small graph. Per step that cost 0.3 and 1.4 ms of Python on the H100 machine, longer than the whole step's
kernels take at batch 1 of a small model (docs/performance.md); at load time, ~400 weights made that way took
5 s of a CPU start. Here a tensor is allocated empty and its bytes are written in place.
"""
import numpy as np
from tinygrad import Device, Tensor
from tinygrad.device import Buffer, MultiBuffer
from tinygrad.dtype import DType, _from_np_dtype, _to_np_dtype


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
