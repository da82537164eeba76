"""Sweep of the tensor-core kernel's tilings (kernels/tensor_core.py) on a GPU: µs and TFLOP/s of each Llama-1B matrix
times `rows` rows of x, for every tiling of a grid, best first, and the one `tiling` picks. Timed as
projection_kernels.py times `linear` (a TinyJit chain past the L2 cache, the split-K sum and the residual included).
kernels/tensor_core.py's rule comes from this sweep (docs/performance.md).

    DEV=CUDA python tinyvllm/benchmarks/scripts/tensor_core_sweep.py [rows] [matrix,matrix,...]
"""
import itertools, math, sys
import tinyvllm  # noqa: F401  (first: it turns tinygrad's queue runtime on)
from tinygrad import Device, Tensor, dtypes
from tinyvllm.kernels import tensor_core
from tinyvllm.kernels.tensor_core import Tiling, VECTOR, PAD
from projection_kernels import MATRICES, chain_seconds

SHARED_BYTES = 48 * 1024      # what a thread block may use without opting in to more
MAX_BLOCKS = 4 * 132          # splits past four blocks an SM only add partial sums


def grid(M: int, N: int, K: int) -> list[Tiling]:
  tilings = []
  for bm, bn, bk, wm, wn, split in itertools.product((64, 128, 256), (64, 128, 256), (64,), (1, 2, 4), (2, 4),
                                                      (1, 4, 8)):
    threads, pieces = 32 * wm * wn, (bm // wm // 16) * (bn // wn // 8)
    fits = M % bm == 0 and N % bn == 0 and K % (bk * split) == 0 and bm % (16 * wm) == 0 and bn % (8 * wn) == 0
    fits &= 16 <= pieces <= 32 and 128 <= threads <= 256 and (bm + bn) * (bk + PAD) * 2 <= SHARED_BYTES
    fits &= (bm * bk // VECTOR) % threads == 0 and (bn * bk // VECTOR) % threads == 0
    fits &= split == 1 or (M // bm) * (N // bn) * split <= MAX_BLOCKS
    if fits: tilings.append(Tiling(bm, bn, bk, wm, wn, split))
  return tilings


def seconds(t: Tiling, x: Tensor, weights: list[Tensor]) -> float:
  tensor_core.tiling = lambda M, N, K: t
  return chain_seconds(x, weights, "tinyvllm")


if __name__ == "__main__":
  rows = int(sys.argv[1]) if len(sys.argv) > 1 else 256
  names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["qkv", "o", "gate_up", "down"]
  if not tensor_core.has_mma(Device.DEFAULT, dtypes.half): sys.exit(f"{Device.DEFAULT} has no m16n8k16 tensor cores")
  pick = tensor_core.tiling
  for name in names:
    (N, K), flops = MATRICES[name], 2 * rows * math.prod(MATRICES[name])
    weights = [Tensor.randn(N, K, dtype=dtypes.half).realize() for _ in range(max(2, math.ceil(300e6 / (N * K * 2))))]
    x = Tensor.randn(rows, K, dtype=dtypes.half).realize()
    picked = pick(rows, N, K)
    timed = sorted((seconds(t, x, weights), t) for t in dict.fromkeys(grid(rows, N, K) + [picked]))
    print(f"{name} {N}x{K}, {rows} rows: {len(timed)} tilings; `tiling` picks {picked}", flush=True)
    for s, t in timed[:6] + [st for st in timed if st[1] == picked]:
      print(f"  {t}  {s * 1e6:8.1f} us  {flops / s / 1e12:6.1f} TFLOP/s", flush=True)
    del weights
