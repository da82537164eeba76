"""Projections of many rows of x on a GPU's tensor cores: y = x @ W.T as one tiled kernel (or two, when K is split).

A batch of 256 decoding sequences, or a prefill chunk of thousands of tokens, turns each projection into a real
matrix product: there is arithmetic to do with every weight read, and the GPU's tensor cores do it. On CUDA each
`mma.sync` instruction has a warp of 32 threads multiply a 16×16 block of x by a 16×8 block of W.T. How fast the
kernel runs is decided by how those instructions are tiled:

    a warp computes a 64 × 64 tile of y       4 × 8 mma tiles: each 16-row slice of x it loads is used 8 times and
                                              each 8-row slice of W 4 times (fewer loads per flop)
    2 warps per thread block, side by side    they share the rows of x through the L1 cache
    split-K when there are too few tiles      y = 256 × 2048 is only 128 such tiles for an H100's 132 SMs: K is
                                              split into up to 8 slices, each warp sums one slice of its tile into
                                              a float32 partial product, and a small second kernel adds the slices
                                              (with the residual, when there is one)

tinygrad's default heuristic picks a tensor-core tiling too, but a smaller one and never a split. These options come
from sweeps of ~1,650 tilings on the H100 and H200 (bench/tensor_core_sweep.py, bench/results/gpu-notes.md §12).
TFLOP/s on Llama-1B's matrices, tinygrad's default kernel and this one (H200, `bench/projection_kernels.py`, the
split-K sum and the residual add included):

                 M = 256 (a decode step at batch 256)     M = 8192 (a prefill chunk)
                 q/k/v    o     gate/up  down             q/k/v   gate/up  down
    default      31       22    69       18               74      77       68
    this         67       58    93       85               110     113      113

tinygrad loads the mma operands straight from global memory (no shared-memory staging), which is what caps these at
~120 TFLOP/s, a fifth of what cuBLAS reaches on this GPU.

The options are written for CUDA's m16n8k16 instruction; other backends (Metal's 8×8 simdgroup matrices, AMD's
WMMA) keep tinygrad's own choice, as does any shape the tiles do not divide.
"""
from __future__ import annotations
import functools
from tinygrad import Context, Device, Tensor, UOp, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.dtype import DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

MMA_SHAPE = (8, 16, 16)       # tinygrad's (N, M, K) of the instruction the tiling below was measured with
WARPS_TO_FILL_GPU = 1024      # about 8 warps per SM of an H100: with fewer tiles than this, K is split
MAX_SPLIT = 8


@functools.cache
def has_mma(device: str, dtype: DType) -> bool:
  """Whether `device` multiplies `dtype` matrices with the m16n8k16 instruction, accumulating in float32."""
  with Context(ALLOW_DEVICE_USAGE=1): tensor_cores = Device[device].renderer.tensor_cores
  return any(tc.dims == MMA_SHAPE and tc.dtype_in == dtype and tc.dtype_out == dtypes.float for tc in tensor_cores)


def uses_tensor_cores(x: Tensor, weight: Tensor) -> bool:
  """Whether the tensor-core kernel serves these operands (a single-device weight on a GPU with the instruction, a
  shape the tiles divide)."""
  rows = x.numel() // x.shape[-1]
  return isinstance(weight.device, str) and weight.dtype == x.dtype and has_mma(weight.device, weight.dtype) \
    and _tiling(rows, *weight.shape) is not None


def matmul(x: Tensor, weight: Tensor) -> Tensor:
  """x @ weight.T, x (..., K) -> (..., N), on the tensor cores; the caller checked `uses_tensor_cores`."""
  (N, K), lead = weight.shape, x.shape[:-1]
  rows = x.reshape(-1, K)
  opts, split = _tiling(rows.shape[0], N, K)
  out = Tensor.empty(*((split,) if split > 1 else ()), rows.shape[0], N, dtype=dtypes.float if split > 1 else x.dtype,
                     device=x.device)
  y = out.custom_kernel(rows, weight, fxn=lambda *bufs: _kernel(*bufs, opts=opts, split=split))[0]
  return (y.sum(0).cast(x.dtype) if split > 1 else y).reshape(*lead, N)


def _tiling(M: int, N: int, K: int) -> tuple[tuple[Opt, ...], int] | None:
  """The optimizer options of the layout above for y[M, N] = x[M, K] @ W[N, K].T, and into how many slices K is
  split (None: the tiles do not divide the shape)."""
  if M <= 16: return None               # one row of mma tiles: the m axis would vanish under the options below
  row_tiles = next((t for t in (4, 2, 1) if M % (16 * t) == 0), 1)   # 16-row mma tiles per warp
  col_tiles = 8 if N % 128 == 0 else 4 if N % 64 == 0 else 0          # 8-column mma tiles per warp, 2 warps a block
  if not col_tiles or K % 16: return None
  warps = -(-M // (16 * row_tiles)) * (N // (8 * col_tiles))
  split = 1
  while split < MAX_SPLIT and warps * split * 2 <= WARPS_TO_FILL_GPU and K % (16 * split * 2) == 0: split *= 2
  # axis 0 is m, axis 1 is n; m's upcast goes last, as it can use up the m axis and renumber the ones after it
  opts = [Opt(OptOps.TC, 0, (-1, 2, 1)), Opt(OptOps.UPCAST, 1, col_tiles), Opt(OptOps.LOCAL, 1, 2)]
  if row_tiles > 1: opts.append(Opt(OptOps.UPCAST, 0, row_tiles))
  return tuple(opts), split


def _kernel(out: UOp, x: UOp, w: UOp, opts: tuple[Opt, ...], split: int) -> UOp:
  """out[m, n] = Σ_k x[m, k]·w[n, k]; split into slices, out[s, m, n] = the sum over slice s of K (float32)."""
  (M, K), N = x.shape, w.shape[0]
  m, n, kk = UOp.range(M, 0), UOp.range(N, 1), UOp.range(K // split, 3, AxisType.REDUCE)
  s = UOp.range(split, 2) if split > 1 else None
  k = kk if s is None else s * (K // split) + kk
  # the product of two fp16 loads, summed in float32: the pattern tinygrad maps onto the mma instruction
  acc = (x[m, k] * w[n, k]).cast(dtypes.float).reduce(kk, arg=Ops.ADD)
  info = KernelInfo(name=f"mma_{N}_{K}" + (f"_split{split}" if split > 1 else ""), opts_to_apply=opts)
  if s is not None: return out[s, m, n].store(acc).end(m, n, s).sink(arg=info)
  return out[m, n].store(acc.cast(out.dtype)).end(m, n).sink(arg=info)
