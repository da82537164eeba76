"""A CPU's attention for several tokens of one sequence (a prompt chunk, a step checking drafts): µs a layer with the
tokens in tiles (`paged_attention.query_tiles`, as the engine runs them) and with each token alone (the kernel a
decoding token gets: a thread per token and head), T query tokens at the end of a C-token context. Timed as a TinyJit
chain over `layers` pools, each layer's output feeding the next layer's query, as in a step.

    python tinyvllm/benchmarks/scripts/chunk_attention.py [T=256] [C=512] [heads,kv_heads,head_dim=9,3,64] [layers=30]
"""
import sys
import numpy as np
import tinyvllm  # noqa: F401  (first: it turns tinygrad's queue runtime on)
from tinygrad import Tensor, TinyJit, dtypes
from tinyvllm.kernels.paged_attention import BlockTables, QueryTiles, context_blocks, paged_attention, query_tiles, \
  tile_count, tile_tokens
from projection_kernels import median_seconds

T, C = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (256, 512)
H, KVH, D = (int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "9,3,64").split(","))
L, BLOCK = int(sys.argv[4]) if len(sys.argv) > 4 else 30, 16
NB = C // BLOCK
rng = np.random.default_rng(0)
pools = [tuple(Tensor(rng.normal(0, 1, (NB * BLOCK + BLOCK, KVH, D)).astype(np.float32)).realize() for _ in range(2))
         for _ in range(L)]
flat_tables = Tensor((rng.permutation(NB) + 1).astype(np.int32)).realize()    # block 0: the null block
rows = Tensor.zeros(T, dtype=dtypes.int32).contiguous().realize()
limits = Tensor(np.arange(C - T, C, dtype=np.int32)).realize()                 # causal: each token up to itself
cos, sin = (Tensor(rng.normal(0, 1, (T, D // 2)).astype(np.float32)).realize() for _ in range(2))
q0 = Tensor(rng.normal(0, 1, (T, H * D)).astype(np.float32)).realize()
firsts, multi, lone = query_tiles([0] * T, T)
firsts = Tensor(np.array(firsts, np.int32)).realize()


def tables(blocks, counts, tiled: bool) -> BlockTables:
  count = lambda bound: Tensor.full((1,), bound, dtype=dtypes.int32)
  tiles = QueryTiles(firsts, count(counts[0]), count(counts[1]), tile_tokens(T)) if tiled else None
  return BlockTables(flat_tables, rows, Tensor.full((1,), blocks, dtype=dtypes.int32), BLOCK, NB, tiles)


if __name__ == "__main__":
  print(f"{T} query tokens of one sequence over a {C}-token context, heads {H}/{KVH}x{D}, {L} layers")
  outputs = []
  for name, tiled in (("alone", False), (f"tiles of {tile_tokens(T)}", True)):
    @TinyJit
    def chain(q: Tensor, blocks, multi_tiles, lone_tiles) -> Tensor:   # bound variables: the jit's arguments
      bt = tables(blocks, (multi_tiles, lone_tiles), tiled)
      for cache in pools: q = (q + paged_attention(q, cos, sin, cache, bt, limits, H, False) * 0.01).contiguous()
      return q.realize()
    bound = (context_blocks(NB).bind(NB), tile_count("multi", T // 2).bind(multi), tile_count("lone", T).bind(lone))
    seconds = median_seconds(lambda: chain(q0, *bound), runs=5) / L
    outputs.append(chain(q0, *bound).numpy())
    print(f"{name:12s} {seconds * 1e6:9.1f} us a layer   max |difference| from alone: {np.abs(outputs[-1] - outputs[0]).max():.2g}")
