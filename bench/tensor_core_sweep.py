"""Sweep of the tensor-core kernel's tilings (model/tensor_core.py) on a GPU: µs and TFLOP/s of each Llama-1B matrix
times `rows` rows of x, for every tiling of a grid, best first, and the tiling `_tiling` picks. Timed as
projection_kernels.py times `linear` (a TinyJit chain past the L2 cache, the split-K sum and the residual included).
Session 15 chose tensor_core.py's options from a larger sweep of this kind on the H100 (gpu-notes.md §12).

    DEV=CUDA python bench/tensor_core_sweep.py [rows] [matrix,matrix,...]
"""
import itertools, math, sys
from tinygrad import Device, Tensor, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinyvllm.model import tensor_core
from projection_kernels import MATRICES, chain_seconds

Tiling = tuple[int, int, int, int, int]     # 16-row tiles, 8-column tiles, warps side by side, k-steps a loop, split


def options(row_tiles: int, col_tiles: int, warps: int, unroll: int) -> tuple[Opt, ...]:
  opts = [Opt(OptOps.TC, 0, (-1, 2, 1)), Opt(OptOps.UPCAST, 1, col_tiles)]
  if warps > 1: opts.append(Opt(OptOps.LOCAL, 1, warps))
  if unroll > 1: opts.append(Opt(OptOps.UNROLL, 0, unroll))
  if row_tiles > 1: opts.append(Opt(OptOps.UPCAST, 0, row_tiles))
  return tuple(opts)


def grid(M: int, N: int, K: int) -> list[Tiling]:
  return [t for t in itertools.product((2, 4), (4, 8), (1, 2, 4), (1, 2), (1, 2, 4, 8))
          if M % (16 * t[0]) == 0 and N % (8 * t[1] * t[2]) == 0 and K % (16 * t[3] * t[4]) == 0]


def seconds(tiling: Tiling, x: Tensor, weights: list[Tensor]) -> float:
  tensor_core._tiling = lambda M, N, K: (options(*tiling[:4]), tiling[4])
  return chain_seconds(x, weights, "tinyvllm")


if __name__ == "__main__":
  rows = int(sys.argv[1]) if len(sys.argv) > 1 else 256
  names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["qkv", "o", "gate_up", "down"]
  if not tensor_core.has_mma(Device.DEFAULT, dtypes.half): sys.exit(f"{Device.DEFAULT} has no m16n8k16 tensor cores")
  pick = tensor_core._tiling
  for name in names:
    (N, K), flops = MATRICES[name], 2 * rows * math.prod(MATRICES[name])
    weights = [Tensor.randn(N, K, dtype=dtypes.half).realize() for _ in range(max(2, math.ceil(300e6 / (N * K * 2))))]
    x = Tensor.randn(rows, K, dtype=dtypes.half).realize()
    timed = sorted((seconds(t, x, weights), t) for t in grid(rows, N, K))
    picked = pick(rows, N, K)
    print(f"{name} {N}x{K}, {rows} rows: {len(timed)} tilings (row tiles, col tiles, warps, unroll, split); "
          f"_tiling picks {picked and [(o.op.name, o.axis, o.arg) for o in picked[0][1:]]}, split {picked and picked[1]}")
    for s, t in timed[:5]: print(f"  {t}  {s * 1e6:8.1f} us  {flops / s / 1e12:6.1f} TFLOP/s")
    del weights
