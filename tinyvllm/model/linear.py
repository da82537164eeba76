"""y = norm(x) @ W.T + bias (+ residual): which kernel computes a projection.

The right kernel depends on how many rows of x the projection multiplies:

    a few rows (≤ 4) on a GPU     decoding a few sequences: reading W is all the work there is, so one kernel
                                  streams W at memory speed, the norm and the residual inside it (matvec.py)
    more rows, on a GPU with      a prefill chunk or a large decode batch: real arithmetic with every weight, tiled
    CUDA's mma instruction        onto the tensor cores, K split when there are too few tiles (tensor_core.py)
    anything else                 a CPU, other GPUs, shapes those tiles do not divide: tinygrad's matmul, whose
                                  scheduler fuses the norm and the residual by itself
"""
from __future__ import annotations
from tinygrad import Tensor
from tinygrad.nn import RMSNorm
from tinyvllm.model.matvec import matvec, uses_matvec
from tinyvllm.model.tensor_core import matmul, uses_tensor_cores


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, norm: RMSNorm | None = None,
           residual: Tensor | None = None) -> Tensor:
  """norm(x) @ weight.T + bias (+ residual), x (..., K) -> (..., N)."""
  if uses_matvec(x, weight): return matvec(x, weight, bias, norm, residual)
  x = x if norm is None else norm(x)
  y = matmul(x, weight) if uses_tensor_cores(x, weight) else x @ weight.T
  y = y if bias is None else y + bias
  return y if residual is None else residual + y
