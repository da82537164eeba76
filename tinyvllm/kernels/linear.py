"""y = norm(x) @ W.T + bias (+ residual): which kernel computes a projection.

The right kernel depends on how many rows of x the projection multiplies:

    a few rows (≤ 4) on a GPU     decoding a few sequences: reading W is all the work there is, so one kernel
                                  streams W at memory speed, the norm and the residual inside it (matvec.py)
    more rows, on a GPU with      a prefill chunk or a large decode batch: real arithmetic with every weight, tiled
    CUDA's mma instruction        onto the tensor cores, K split when there are too few tiles (tensor_core.py)
    a packed (quantized) weight   dequantized inside its own matmul kernel (quantized.py)
    anything else                 a CPU, other GPUs, shapes those tiles do not divide: tinygrad's matmul, whose
                                  scheduler fuses the norm and the residual by itself

The model writes a projection the way it reads, `qkv_proj(norm(x))` and `o_proj(o, residual=x)`: `RMSNorm` below
returns its input and gain as a `Normed` value instead of computing it, so that whichever kernel the projection
picks can take the norm inside (the matvec kernel does; the others compute norm(x) first, as tinygrad would).

The reference: inside `use_kernels("reference")` every projection is tinygrad's `norm(x) @ W.T + bias`, then
`residual + y`, and the attention of paged_attention.py is tinygrad's too (RoPE, a dense copy of the context,
matmuls and softmax). The engine's `--kernels reference` runs a whole model that way, the readable forward pass the
fast kernels are tested against.
"""
from __future__ import annotations
import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from tinygrad import Tensor, nn
from tinyvllm.kernels.matvec import matvec, uses_matvec
from tinyvllm.kernels.quantized import PackedWeight, packed_matmul
from tinyvllm.kernels.tensor_core import matmul, uses_tensor_cores

KERNELS = ("fast", "reference")
_reference = contextvars.ContextVar("reference_kernels", default=False)


@contextlib.contextmanager
def use_kernels(kernels: str) -> Iterator[None]:
  """Within it, the model traced (in this thread) uses `kernels`: "fast", chosen by device and shape as above, or
  "reference", tinygrad's plain operations."""
  if kernels not in KERNELS: raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
  token = _reference.set(kernels == "reference")
  try: yield
  finally: _reference.reset(token)


def reference_kernels() -> bool:
  """Whether the model being traced runs tinygrad's plain operations (`use_kernels("reference")`)."""
  return _reference.get()


@dataclass
class Normed:
  """norm(x), not computed yet: what `RMSNorm` returns. A projection that reads it computes the norm inside its own
  kernel where it can (`linear`); `tensor()` computes it with tinygrad's operations."""
  x: Tensor
  norm: nn.RMSNorm

  def tensor(self) -> Tensor: return nn.RMSNorm.__call__(self.norm, self.x)


class RMSNorm(nn.RMSNorm):
  """tinygrad's RMSNorm (x / rms(x) · gain), left for the projection that reads it: `norm(x)` is a `Normed`."""
  def __call__(self, x: Tensor) -> Normed: return Normed(x, self)


def linear(x: Tensor | Normed, weight: Tensor | PackedWeight, bias: Tensor | None = None,
           norm: nn.RMSNorm | None = None, residual: Tensor | None = None) -> Tensor:
  """norm(x) @ weight.T + bias (+ residual), x (..., K) -> (..., N); x may be a `Normed`, which brings its norm."""
  if isinstance(x, Normed): x, norm = x.x, x.norm
  fast = not reference_kernels()
  if fast and isinstance(weight, Tensor) and uses_matvec(x, weight): return matvec(x, weight, bias, norm, residual)
  x = x if norm is None else Normed(x, norm).tensor()
  if isinstance(weight, PackedWeight): y = packed_matmul(x, weight)
  elif fast and uses_tensor_cores(x, weight): y = matmul(x, weight)
  else: y = x @ weight.T
  y = y if bias is None else y + bias
  return y if residual is None else residual + y


class PackedLinear:
  """The model's Linear (llama.py) over a packed weight (quantized.py): `proj(x)`, `proj(norm(x))`,
  `proj(x, residual=r)`."""
  def __init__(self, weight: PackedWeight, bias: Tensor | None = None): self.weight, self.bias = weight, bias
  def __call__(self, x, residual: Tensor | None = None) -> Tensor:
    return linear(x, self.weight, self.bias, residual=residual)
