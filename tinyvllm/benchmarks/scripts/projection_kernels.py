"""One-row projections on a GPU: µs and GB/s of each Llama-1B / SmolLM2 matrix through tinygrad's matmul (default
and BEAM=2) and through tinyvllm's matvec kernel (kernels/matvec.py), fp16. Each is timed as a TinyJit chain in which
every product adds to the previous one (so the kernels run one after another, as in a decode step) over enough
copies of the weight to miss the L2 cache. (On a CPU `matvec.linear` is tinygrad's matmul: the last column repeats
the first.) The H100 figures: docs/performance.md (taken with the same chains).

    DEV=CUDA python tinyvllm/benchmarks/scripts/projection_kernels.py [rows] [matrix,matrix,...] [default,beam2,tinyvllm]
"""
import math, sys, time
import numpy as np
import tinyvllm  # noqa: F401  (first: it turns tinygrad's queue runtime on)
from tinygrad import Context, Device, Tensor, TinyJit, dtypes
from tinyvllm.kernels.linear import linear

MATRICES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
            "lm_head": (128256, 2048), "smollm2_qkv": (960, 576), "smollm2_gate_up": (3072, 576),
            "smollm2_down": (576, 1536), "smollm2_lm_head": (49152, 576)}


def median_seconds(fn, runs: int = 20) -> float:
  for _ in range(3): fn()
  times = []
  for _ in range(runs):
    Device[Device.DEFAULT].synchronize()
    t = time.perf_counter(); fn(); Device[Device.DEFAULT].synchronize()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def chain_seconds(x: Tensor, weights: list[Tensor], how: str) -> float:
  start = Tensor.zeros(x.shape[0], weights[0].shape[0], dtype=x.dtype).contiguous().realize()
  @TinyJit
  def chain(x: Tensor) -> Tensor:
    y = start
    for w in weights: y = linear(x, w, residual=y) if how == "tinyvllm" else (y + x @ w.T).contiguous()
    return y.realize()
  with Context(BEAM=2 if how == "beam2" else 0): return median_seconds(lambda: chain(x)) / len(weights)


if __name__ == "__main__":
  rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1
  names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(MATRICES)
  columns = sys.argv[3].split(",") if len(sys.argv) > 3 else ["default", "beam2", "tinyvllm"]
  print(f"{'matrix':16s} {'N x K':>12s}  " + "  ".join(f"{h:>28s}" for h in columns))
  for name in names:
    N, K = MATRICES[name]
    copies = max(2, math.ceil(300e6 / (N * K * 2)))       # 300 MB of weights: far past any L2
    weights = [Tensor.randn(N, K, dtype=dtypes.half).realize() for _ in range(copies)]
    x = Tensor.randn(rows, K, dtype=dtypes.half).realize()
    cells = [chain_seconds(x, weights, how) for how in columns]
    print(f"{name:16s} {f'{N}x{K}':>12s}  " + "  ".join(f"{s * 1e6:8.1f} us {N * K * 2 / s / 1e9:5.0f} GB/s {2 * rows * N * K / s / 1e12:5.1f} TF" for s in cells))
    del weights
