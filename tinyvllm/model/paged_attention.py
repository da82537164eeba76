"""Paged attention: the KV cache is a pool of fixed-size blocks, and each sequence reads its own through a block table.

A contiguous cache per sequence must reserve `max_model_len` slots up front. A paged cache reserves nothing: the pool
is one tensor per layer, split into blocks of `block_size` token slots, and a sequence owns a list of block numbers,
its *block table*, that grows by one block each time its last block fills up.

    pool (one layer's K; V is the same)          block tables
    block 0 [reserved: padding writes land here]   seq A: [3, 1]      -> A's tokens 0..15 in block 3, 16..20 in block 1
    block 1 [A16 A17 A18 A19 A20 .  .  . ]         seq B: [2]         -> B's tokens 0..6 in block 2
    block 2 [B0  B1 ... B6  .  .  .  .  . ]
    block 3 [A0  A1  A2 ...             A15]

Token `p` of a sequence lives in slot `table[p // block_size] * block_size + p % block_size`. The engine computes
that *slot mapping* on the host for the tokens it feeds in a step; the model writes their new K/V there (rotating K
by RoPE on the way, so no kernel runs just for that) and then reads the whole context back through the table. Both
moves are a few lines of tinygrad UOps (`custom_kernel`), so they compile for every backend (CPU, CUDA, Metal) and
run inside a TinyJit graph.
"""
from __future__ import annotations
import functools
from dataclasses import dataclass
from tinygrad import Tensor, dtypes
from tinygrad.uop.ops import UOp, KernelInfo
from tinyvllm.model.tensor_parallel import allocate_split


def _bounded(index: UOp, size: int) -> UOp:
  """An index read from memory, clamped to [0, size): a no-op for the engine's slots and block numbers, but with its
  range known tinygrad drops the 64-bit wrap-around maths (a modulo per element) it otherwise puts in every load."""
  return index.cast(dtypes.weakint).maximum(0).minimum(size - 1)


@dataclass
class NewKV:
  """This step's keys and values as the projection left them: columns of 2-D outputs [T, width], K from column
  `k_col` of `k` and V from `v_col` of `v` (one fused q|k|v output passed twice, or k and v alone), K not yet
  rotated. The write kernel applies RoPE to K as it stores it, so neither needs a kernel of its own first."""
  k: Tensor
  v: Tensor
  k_col: int
  v_col: int
  cos: Tensor     # [T, head_dim / 2], this step's rotation of each token
  sin: Tensor


def _write_kernel(k_cache: UOp, v_cache: UOp, k: UOp, v: UOp, cos: UOp, sin: UOp, slots: UOp, k_col: int,
                  v_col: int) -> UOp:
  """k_cache[slots[t], h] = rope(k[t, head h]), v_cache[slots[t], h] = v[t, head h] -- a scatter that touches only
  the written rows, not the whole pool. RoPE rotates the pairs (j, j + half) of each head, so each thread writes
  both."""
  T, (_, KVH, D) = slots.shape[0], k_cache.shape
  half = D // 2
  t, h, j = UOp.range(T, 0), UOp.range(KVH, 1), UOp.range(half, 2)
  slot = _bounded(slots[t], k_cache.shape[0])
  k1, k2 = k[t, k_col + h * D + j], k[t, k_col + h * D + j + half]
  c, s = cos[t, j], sin[t, j]
  return UOp.group(k_cache[slot, h, j].store(k1 * c - k2 * s), k_cache[slot, h, j + half].store(k2 * c + k1 * s),
                   v_cache[slot, h, j].store(v[t, v_col + h * D + j]),
                   v_cache[slot, h, j + half].store(v[t, v_col + h * D + j + half])) \
    .end(t, h, j).sink(arg=KernelInfo(name="kv_write"))


def _gather_kernel(k_out: UOp, v_out: UOp, k_blocks: UOp, v_blocks: UOp, tables: UOp) -> UOp:
  """k_out[s, n, b, h, j] = k_blocks[tables[s, n], b, h, j], and the same for V -- copy each sequence's blocks, in
  table order, into one dense run."""
  s, n, b, h, j = (UOp.range(k_out.shape[i], i) for i in range(5))
  block = _bounded(tables[s, n], k_blocks.shape[0])
  return UOp.group(k_out[s, n, b, h, j].store(k_blocks[block, b, h, j]),
                   v_out[s, n, b, h, j].store(v_blocks[block, b, h, j])) \
    .end(s, n, b, h, j).sink(arg=KernelInfo(name="kv_gather"))


def new_pool(num_slots: int, kv_heads: int, head_dim: int, dtype, devices: tuple[str, ...]) -> Tensor:
  """One layer's K (or V) pool, zeroed: [num_slots, kv_heads, head_dim], split by KV head across `devices`."""
  return allocate_split(Tensor.zeros, (num_slots, kv_heads, head_dim), 1, devices, dtype).contiguous().realize()


def write_and_gather(cache: tuple[Tensor, Tensor], new: NewKV, slot_mapping: Tensor, block_tables: Tensor,
                     block_size: int) -> tuple[Tensor, Tensor]:
  """Store the new K (rotated) and V of T tokens at `slot_mapping` ([T]) in their pools (each [num_slots, kv_heads,
  head_dim]), then return every sequence's K and V context, each [S, num_table_blocks * block_size, kv_heads,
  head_dim].

  Both kernels keep the KV heads as an axis of their own, so under tensor parallelism each device runs them on its
  own heads' slice of the pools, of `new` and of the output."""
  k_cache, v_cache = cache
  num_slots, kv_heads, head_dim = k_cache.shape
  write = functools.partial(_write_kernel, k_col=new.k_col, v_col=new.v_col)
  k_cache, v_cache = k_cache.custom_kernel(v_cache, new.k, new.v, new.cos, new.sin, slot_mapping, fxn=write)[:2]
  S, NB = block_tables.shape
  dense = lambda: allocate_split(Tensor.empty, (S, NB, block_size, kv_heads, head_dim), 3, k_cache.device, k_cache.dtype)
  as_blocks = lambda pool: pool.reshape(num_slots // block_size, block_size, kv_heads, head_dim)
  k, v = dense().custom_kernel(dense(), as_blocks(k_cache), as_blocks(v_cache), block_tables, fxn=_gather_kernel)[:2]
  return k.reshape(S, NB * block_size, kv_heads, head_dim), v.reshape(S, NB * block_size, kv_heads, head_dim)


def attention(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor) -> Tensor:
  """Grouped-query attention of queries [S, Q, H, D] over contexts [S, C, KVH, D]; key c is visible to a query at
  position p when c <= p (causal, and it hides the unwritten tail of the last block and the padding blocks)."""
  S, Q, H, D = q.shape
  KVH = k.shape[2]
  q = q.reshape(S, Q, KVH, H // KVH, D).permute(0, 2, 3, 1, 4)            # [S, KVH, G, Q, D]
  k, v = k.permute(0, 2, 1, 3).unsqueeze(2), v.permute(0, 2, 1, 3).unsqueeze(2)  # [S, KVH, 1, C, D]
  scores = (q @ k.transpose(-1, -2)) * (D ** -0.5)                          # [S, KVH, G, Q, C]
  visible = Tensor.arange(k.shape[3]).reshape(1, 1, 1, 1, -1) <= q_positions.reshape(S, 1, 1, Q, 1)
  # materialize probs: fused into the next matmul, softmax's exp would be recomputed for each of the D outputs
  probs = visible.where(scores, -float("inf")).softmax(-1).contiguous()
  return (probs @ v).permute(0, 3, 1, 2, 4).reshape(S, Q, H * D)
