"""Decode attention alone: µs a layer of each way a decoding row can read its context, at batch S and context C.
`gather` copies each context out of the pool and runs tinygrad's matmuls and softmax (the readable reference);
`cpu_kernel` and `gpu_kernel` are paged_attention.paged_attention's kernels (a thread per token and head; a thread
block per token and KV head). Timed as a TinyJit chain over `layers` pools, each layer's output feeding
the next layer's query, as in a decode step.

    DEV=CUDA python tinyvllm/benchmarks/scripts/decode_attention.py [S] [C] [heads,kv_heads,head_dim] [ways] [layers]
    e.g. DEV=CUDA python tinyvllm/benchmarks/scripts/decode_attention.py 256 256 32,8,64 gather,gpu_kernel
"""
import sys
import numpy as np
import tinyvllm  # noqa: F401  (first: it turns tinygrad's queue runtime on)
from tinygrad import Tensor, TinyJit, dtypes
from tinyvllm.model.llama import apply_rope
from tinyvllm.kernels.paged_attention import BlockTables, NewKV, attention, context_blocks, paged_attention, write_and_gather
from projection_kernels import median_seconds

S, C = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (256, 256)
H, KVH, D = (int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "32,8,64").split(","))
ways = sys.argv[4].split(",") if len(sys.argv) > 4 else ["gather", "cpu_kernel", "gpu_kernel"]
L, BLOCK = int(sys.argv[5]) if len(sys.argv) > 5 else 16, 16
dtype = dtypes.float if Tensor.empty(1).device.startswith("CPU") else dtypes.half
NB = C // BLOCK
pools = [tuple(Tensor.randn(S * NB * BLOCK + BLOCK, KVH, D, dtype=dtype).realize() for _ in range(2)) for _ in range(L)]
# each sequence's blocks scattered over the pool, block 0 left as the null block
flat_tables = Tensor((np.random.default_rng(0).permutation(S * NB) + 1).astype(np.int32)).realize()
rows = Tensor.arange(S, dtype=dtypes.int32).realize()
# the context length in blocks is a variable bound per call (as a step binds it): the chain takes it as an argument
bound = context_blocks(NB).bind(NB)
tables = lambda blocks: BlockTables(flat_tables, rows, Tensor.full((1,), blocks, dtype=dtypes.int32), BLOCK, NB)
positions = Tensor(np.full(S, C - 1, np.int32)).realize()
cos, sin = (Tensor.randn(S, D // 2, dtype=dtype).realize() for _ in range(2))
q0 = Tensor.randn(S, H * D, dtype=dtype).realize()


def gathered(q: Tensor, cache: tuple[Tensor, Tensor], blocks) -> Tensor:
  # the step's own K/V write is left out of all three ways: write only the null slot
  none = Tensor.zeros(1, KVH * D, dtype=dtype).contiguous()
  new = NewKV(none, none, 0, 0, cos[:1], sin[:1])
  k, v = write_and_gather(cache, new, Tensor.zeros(1, dtype=dtypes.int32).contiguous(), tables(blocks))
  rotated = apply_rope(q.reshape(S, H, D), cos, sin)
  return attention(rotated.reshape(S, 1, H, D), k, v, positions.reshape(S, 1)).reshape(S, H * D)


def way(name: str):
  if name == "gather": return gathered
  return lambda q, cache, blocks: paged_attention(q, cos, sin, cache, tables(blocks), positions, H, name == "gpu_kernel")


if __name__ == "__main__":
  print(f"decode attention, batch {S}, context {C}, heads {H}/{KVH}x{D}, {dtype}, {L} layers")
  first = None
  for name in ways:
    attend = way(name)
    @TinyJit
    def chain(q: Tensor, blocks) -> Tensor:
      for cache in pools: q = (q + attend(q, cache, blocks) * 0.01).contiguous()
      return q.realize()
    seconds = median_seconds(lambda: chain(q0, bound), runs=10) / L
    out = chain(q0, bound).float().numpy()
    first = out if first is None else first
    print(f"{name:10s} {seconds * 1e6:8.1f} us a layer   {2 * S * C * KVH * D * dtype.itemsize / seconds / 1e9:6.0f} GB/s of K and V"
          f"   max |difference| from {ways[0]}: {np.abs(out - first).max():.2g}")
