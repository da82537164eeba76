"""GFLOP/s of the packed matmul kernel (kernels/quantized.py) for SmolLM2's matrix shapes and several numbers of rows
of x: random GGUF blocks, a TinyJit-captured matmul, the median of 15 calls. Run it on a quiet machine, unpinned: the
queue runtime's device thread runs the kernels, and pinned to one core it takes turns with the Python thread.

    python tinyvllm/benchmarks/scripts/packed_kernel.py [rows of x, default 1,4,16,64,256]
"""
import sys, time
import numpy as np
import tinyvllm  # noqa: F401  (first: it turns tinygrad's queue runtime on)
from tinygrad import Device, Tensor, TinyJit
from tinyvllm.tinygrad_internals import wait_without_spinning
from tinyvllm.kernels.quantized import PackedWeight, packed_matmul

SHAPES = [("Q4_1", 960, 576, "qkv_proj"), ("Q4_1", 576, 576, "o_proj"), ("Q4_1", 3072, 576, "gate_up_proj"),
          ("Q4_1", 576, 1536, "down_proj"), ("Q8_0", 49152, 576, "lm_head")]
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


def random_weight(type_name: str, n: int, k: int, rng: np.random.Generator) -> PackedWeight:
  blocks = rng.integers(0, 256, (n, k // 32, BLOCK_BYTES[type_name]), dtype=np.uint8)
  scales = rng.uniform(0.001, 0.05, (n, k // 32, 2)).astype(np.float16).view(np.uint8)
  blocks[..., :4] = scales.reshape(n, k // 32, 4)     # d (and Q4_1's m) plausible fp16 numbers
  return PackedWeight.from_blocks((type_name, blocks))


def seconds_per_call(w: PackedWeight, x: Tensor) -> float:
  matmul = TinyJit(lambda x: packed_matmul(x, w).realize())
  for _ in range(3): matmul(x)
  device, times = Device[Device.DEFAULT], []
  for _ in range(15):
    device.synchronize()
    start = time.perf_counter()
    matmul(x)
    device.synchronize()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


if __name__ == "__main__":
  wait_without_spinning()      # the timing thread must not take the core from tinygrad's worker
  rows = [int(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "1,4,16,64,256").split(",")]
  rng = np.random.default_rng(0)
  print(f"{'matrix':>24} " + " ".join(f"{r:>7}" for r in rows) + "   rows of x: GFLOP/s")
  for type_name, n, k, name in SHAPES:
    w = random_weight(type_name, n, k, rng)
    rates = [2 * r * n * k / seconds_per_call(w, Tensor(rng.standard_normal((r, k), dtype=np.float32)).realize()) / 1e9
             for r in rows]
    print(f"{f'{name} {type_name} {n}×{k}':>24} " + " ".join(f"{g:7.1f}" for g in rates))
