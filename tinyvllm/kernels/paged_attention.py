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
that *slot mapping* on the host for the tokens it feeds in a step. A layer makes three calls here:

    q, k = rope(q, cos, sin), rope(k, cos, sin)    RoPE, as `Rotated` values: the kernel that reads one rotates it
                                                   as it loads it, so no kernel runs just for that
    kv = store_kv(kv, k, v, slot_mapping)          the step's new K (rotated) and V into their slots
    o = attend(q, kv, batch)                       each token over its context, read back through the table

`attend` reads the context in one of two ways:

- paged (the default): the kernels read the pool through the table and never make a copy (`paged_attention`).
  Every token of a step is one query, whether it decodes or belongs to a prompt chunk: a chunk's own K/V are
  written first, so each of its tokens sees the ones before it through the same table and the causal mask is just
  "keys up to my position". A block of a diffusion LM, which attends to itself both ways, is the same mask with
  another bound, "keys up to the block's end": each token brings its *key limit*. Which kernel depends on the device:
  - a CPU: one kernel streams the context once with an *online softmax*. It keeps the running maximum score m, the
    sum of exp(score − m) and the exp-weighted sum of values, and rescales both when m grows, so the scores never
    need to be stored. One thread per (token, head) is plenty for a CPU's few cores.
  - a GPU: a thread per (token, head) is far too few, so one *thread block* of 4 warps takes each (token, KV
    head) and reads that head's context once for all the query heads that share it. Each warp walks its own
    32-token chunks of the context with the same online softmax, and at the end the block merges its 4 warps'
    results with the same rescaling (flash decoding, split inside one block). Scores, probabilities and slots pass
    between a warp's lanes through shared memory, so no score ever goes to global memory. On an H200, at 256-token
    contexts, a Llama-1B layer takes 84–92 µs at batch 256 (~1.5 TB/s of K and V) against 152 µs for two passes
    (scores, tinygrad's softmax, values) and 254–268 µs gathered; at batch 1, 14–17 µs against 32–36
    (docs/performance.md).
- gather (the readable reference, `--attention-backend gather`; `--kernels reference` uses it too, with q and K
  rotated by tinygrad's operations, `apply_rope`): copy each token's context into a dense [tokens, context, heads,
  dim] tensor, then tinygrad's matmuls and softmax (`attention`).

A step's context length is not a shape: the kernels loop over `context_blocks`, a variable the step binds (see
`BlockTables`), so one captured graph serves every context length.
"""
from __future__ import annotations
import functools, math
from dataclasses import dataclass
from typing import TYPE_CHECKING
from tinygrad import Tensor, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.uop.ops import AxisType, Ops, UOp, KernelInfo
from tinyvllm.kernels.linear import reference_kernels
from tinyvllm.kernels.matvec import has_thread_blocks
from tinyvllm.parallel.tensor_parallel import allocate_split
if TYPE_CHECKING: from tinyvllm.model.llama import ForwardBatch


def _bounded(index: UOp, size: int) -> UOp:
  """An index read from memory, clamped to [0, size): a no-op for the engine's slots and block numbers, but with its
  range known tinygrad drops the 64-bit wrap-around maths (a modulo per element) it otherwise puts in every load."""
  return index.cast(dtypes.weakint).maximum(0).minimum(size - 1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """RoPE in tinygrad's operations: x [T, heads, head_dim], each head's pairs (j, j + head_dim/2) rotated by its
  token's angles, cos/sin [T, head_dim/2]."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


@dataclass
class Rotated:
  """rope(x), not computed yet: x [T, heads·head_dim] and each token's cos/sin [T, head_dim/2]. The kernel that reads
  it rotates each pair as it loads it (the KV write for K, paged attention for q); `tensor()` computes it with
  tinygrad's operations."""
  x: Tensor
  cos: Tensor
  sin: Tensor

  def tensor(self) -> Tensor:
    T, head_dim = self.x.shape[0], 2 * self.cos.shape[-1]
    return apply_rope(self.x.reshape(T, -1, head_dim), self.cos, self.sin).reshape(T, -1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Rotated:
  """x [T, heads·head_dim] rotated by each token's position (RoPE), left to the kernel that reads it."""
  return Rotated(x, cos, sin)


@dataclass
class NewKV:
  """This step's keys and values as the projection left them: columns of 2-D outputs [T, width], K from column
  `k_col` of `k` and V from `v_col` of `v` (one fused q|k|v output passed twice, or k and v alone). With cos/sin,
  K is not rotated yet and the write kernel applies RoPE as it stores it, so neither needs a kernel of its own
  first; without, K is stored as it is."""
  k: Tensor
  v: Tensor
  k_col: int
  v_col: int
  cos: Tensor | None = None     # [T, head_dim / 2], this step's rotation of each token
  sin: Tensor | None = None


def _write_kernel(k_cache: UOp, v_cache: UOp, k: UOp, v: UOp, *rotation_and_slots: UOp, k_col: int, v_col: int) -> UOp:
  """k_cache[slots[t], h] = rope(k[t, head h]), v_cache[slots[t], h] = v[t, head h] -- a scatter that touches only
  the written rows, not the whole pool. RoPE rotates the pairs (j, j + half) of each head, so each thread writes
  both. `rotation_and_slots`: cos, sin, slots, or slots alone for a K that is stored as it is."""
  *rotation, slots = rotation_and_slots
  T, (_, KVH, D) = slots.shape[0], k_cache.shape
  half = D // 2
  t, h, j = UOp.range(T, 0), UOp.range(KVH, 1), UOp.range(half, 2)
  slot = _bounded(slots[t], k_cache.shape[0])
  k1, k2 = k[t, k_col + h * D + j], k[t, k_col + h * D + j + half]
  if rotation:
    c, s = rotation[0][t, j], rotation[1][t, j]
    k1, k2 = k1 * c - k2 * s, k2 * c + k1 * s
  return UOp.group(k_cache[slot, h, j].store(k1), k_cache[slot, h, j + half].store(k2),
                   v_cache[slot, h, j].store(v[t, v_col + h * D + j]),
                   v_cache[slot, h, j + half].store(v[t, v_col + h * D + j + half])) \
    .end(t, h, j).sink(arg=KernelInfo(name="kv_write"))


def _table_start(rows: UOp, t: UOp, blocks: UOp) -> UOp:
  """Where token t's block table starts in the flat tables: its row times the step's width, `blocks[0]`. The width
  is read from memory (it is also the bound variable that sets the kernels' loop lengths), so that every buffer a
  kernel is given is one it reads: CUDA graphs refuse a kernel whose parameters include one it does not."""
  return rows[t].cast(dtypes.weakint) * blocks[0].cast(dtypes.weakint)


def _gather_kernel(k_out: UOp, v_out: UOp, k_blocks: UOp, v_blocks: UOp, tables: UOp, rows: UOp, blocks: UOp,
                   max_blocks: int) -> UOp:
  """k_out[t, n, b, h, j] = k_blocks[block n of token t's table, b, h, j], and the same for V -- copy the blocks of
  each token's sequence, in table order, into one dense run (blocks past the step's `context_blocks`: the null
  block, hidden by the causal mask)."""
  t, n, b, h, j = (UOp.range(k_out.shape[i], i) for i in range(5))
  NB = context_blocks(max_blocks, kernel=True)
  block = (n < NB).where(_bounded(tables[_table_start(rows, t, blocks) + n], k_blocks.shape[0]), 0)
  return UOp.group(k_out[t, n, b, h, j].store(k_blocks[block, b, h, j]),
                   v_out[t, n, b, h, j].store(v_blocks[block, b, h, j])) \
    .end(t, n, b, h, j).sink(arg=KernelInfo(name="kv_gather"))


LANES = 8   # partial sums per dot product
TOKENS_PER_STEP = 4   # context tokens per step of the decode kernel's loop: their dot products run side by side
LOG2E = 1.4426950408889634   # scores are kept in log2 units, so the softmax's exponentials are exp2


def _visible(key: UOp, limit: UOp, window: int | None) -> UOp:
  """Whether a query whose key limit is `limit` sees key position `key`: up to the limit, and within the last
  `window` positions where a sliding window applies."""
  return (key <= limit) if window is None else (key <= limit) & (key > limit - window)


def _tree_sum(terms: list[UOp]) -> UOp:
  """Pairwise sum: independent adds a CPU can overlap, where a running sum would wait on each one in turn."""
  while len(terms) > 1: terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) & ~1:]
  return terms[0]


def _decode_kernel(out: UOp, q: UOp, cos: UOp, sin: UOp, k_blocks: UOp, v_blocks: UOp, tables: UOp, rows: UOp,
                   limits: UOp, blocks: UOp, max_blocks: int, q_col: int, window: int | None = None) -> UOp:
  """out[s, head h] = softmax(rope(q[s, h]) · K_s) · V_s over the context of sequence s, read from the pool through
  its block table: one thread per (sequence, head) streams the context once, keeping a running max m, the sum l of
  exp(score − m) and the weighted sum of values, all rescaled when m grows (the "online softmax"). Each step of the
  loop takes a few tokens at once, so their dot products overlap and the rescaling is paid once per step."""
  S, (num_blocks, block_size, KVH, D), NB = out.shape[0], k_blocks.shape, context_blocks(max_blocks, kernel=True)
  H, half, n = out.shape[1] // D, D // 2, min(TOKENS_PER_STEP, block_size)
  s, h = UOp.range(S, 0), UOp.range(H, 1)
  x = [q[s, q_col + h * D + j].cast(dtypes.float) for j in range(D)]
  c, sn = [cos[s, j] for j in range(half)], [sin[s, j] for j in range(half)]
  scale = D ** -0.5 * LOG2E
  rq = [(x[j] * c[j] - x[j + half] * sn[j]) * scale for j in range(half)] + \
       [(x[j + half] * c[j] + x[j] * sn[j]) * scale for j in range(half)]
  M, L = D, D + 1                                  # the state: D value sums, then m and l
  state = UOp.placeholder((D + 2,), dtypes.float, slot=0, addrspace=AddrSpace.REG).after(s, h)
  state = state.after(UOp.group(*[state[i].store(-1e30 if i == M else 0.0) for i in range(D + 2)]))
  step = UOp.range(NB * (block_size // n), 2, AxisType.REDUCE)
  tokens = [step * n + i for i in range(n)]
  kvh, pos, table = h // (H // KVH), limits[s].cast(dtypes.weakint), _table_start(rows, s, blocks)
  where = [(_bounded(tables[table + t // block_size], num_blocks), t % block_size) for t in tokens]
  # each dot product as LANES partial sums stored in registers: as one expression tinygrad renders it as a single
  # chain of D dependent adds
  part = UOp.placeholder((n, LANES), dtypes.float, slot=1, addrspace=AddrSpace.REG).after(step)
  part = part.after(UOp.group(*[part[i, l].store(_tree_sum([rq[j] * k_blocks[blk, b, kvh, j].cast(dtypes.float)
                                                            for j in range(l, D, LANES)]))
                                for i, (blk, b) in enumerate(where) for l in range(LANES)]))
  scores = [_visible(t, pos, window).where(_tree_sum([part[i, l] for l in range(LANES)]), -1e30)
            for i, t in enumerate(tokens)]
  cur = state.after(step)
  m = functools.reduce(UOp.maximum, scores, cur[M])
  rescale, p = (cur[M] - m).exp2(), [(score - m).exp2() for score in scores]
  values = [_tree_sum([p[i] * v_blocks[blk, b, kvh, j].cast(dtypes.float) for i, (blk, b) in enumerate(where)])
            for j in range(D)]
  state = state.after(UOp.group(*[state[j].store(cur[j] * rescale + values[j]) for j in range(D)], state[M].store(m),
                                state[L].store(cur[L] * rescale + _tree_sum(p))).end(step))
  inv = state[L].reciprocal()
  return UOp.group(*[out[s, h * D + j].store((state[j] * inv).cast(out.dtype)) for j in range(D)]) \
    .end(s, h).sink(arg=KernelInfo(name="paged_attention", opts_to_apply=()))


WARP = 32                  # threads of a warp (a SIMD group on Metal): a chunk of the context is one token a lane
WARPS = 4                  # warps of the GPU kernel's thread block, each walking its own chunks


def _block_kernel(out: UOp, q: UOp, cos: UOp, sin: UOp, k_pool: UOp, v_pool: UOp, tables: UOp, rows: UOp,
                  limits: UOp, blocks: UOp, block_size: int, max_blocks: int, q_col: int,
                  window: int | None = None) -> UOp:
  """out[s, head kvh·G + g] = softmax(rope(q[s, that head]) · K_s) · V_s for the G query heads of KV head kvh, one
  thread block per (s, kvh): the GPU's decode attention. Warp w takes the chunks of 32 tokens w, w + WARPS, ... In
  each chunk, first lane i is token i: it reads the token's key and scores it against the G queries; then lane i
  owns D / 32 dimensions: it reads those of the chunk's 32 values (a warp reads a value row as one coalesced
  load) and adds them, weighted, to its running sums, rescaled when the running max grows. The scores, their
  exponentials and the tokens' pool slots pass from one role to the other through shared memory."""
  NB = context_blocks(max_blocks, kernel=True)
  S, (num_slots, KVH, D), C = q.shape[0], k_pool.shape, NB * block_size
  G, half, dims = out.shape[1] // D // KVH, D // 2, D // WARP     # dims: the value dimensions a lane owns
  threads = WARP * WARPS
  kvh, s, thread = UOp.special(KVH, "gidx0"), UOp.special(S, "gidx1"), UOp.special(threads, "lidx0")
  warp, lane = thread // WARP, thread % WARP
  pos, table = limits[s].cast(dtypes.weakint), _table_start(rows, s, blocks)

  def spread(n: int, axis: int) -> tuple[UOp, UOp]:
    """Thread j takes items j, j + threads, ... of n; past the end it repeats item n - 1, so its stores write what
    another thread writes too and need no condition: (the range, the item)."""
    i = UOp.range(-(-n // threads), axis, AxisType.UPCAST)
    return i, (thread + i * threads).minimum(n - 1)

  # the G queries, rotated and scaled (in log2 units: the exponentials are exp2), into shared memory
  i, item = spread(G * half, 10)
  g, j = item // half, item % half                        # RoPE rotates the dimensions (j, j + half) together
  at = q_col + (kvh * G + g) * D + j
  x1, x2 = q[s, at].cast(dtypes.float), q[s, at + half].cast(dtypes.float)
  c, sn, scale = cos[s, j].cast(dtypes.float), sin[s, j].cast(dtypes.float), D ** -0.5 * LOG2E
  queries = UOp.placeholder((G * D,), dtypes.float, slot=0, addrspace=AddrSpace.LOCAL)
  queries = queries.after(UOp.barrier(UOp.group(queries[g * D + j].store((x1 * c - x2 * sn) * scale),
                                                queries[g * D + j + half].store((x2 * c + x1 * sn) * scale)).end(i)))

  # each lane's running state: the max score m[g], the sum l[g] of 2^(score − m), and its dims' weighted values
  M, L, A = 0, G, 2 * G
  state = UOp.placeholder((G * (2 + dims),), dtypes.float, slot=0, addrspace=AddrSpace.REG)
  state = state.after(UOp.group(*[state[k].store(-1e30 if k < L else 0.0) for k in range(G * (2 + dims))]))
  rnd = UOp.range((C + threads - 1) // threads, 0, AxisType.REDUCE)
  chunk = rnd * WARPS + warp
  cur = state.after(rnd)

  # lane = token: its slot, its key, its G scores (−inf after the query's position)
  token = chunk * WARP + lane
  slot = _bounded(tables[table + token.minimum(C - 1) // block_size], num_slots // block_size) * block_size \
    + token % block_size
  key = [k_pool[slot, kvh, j].cast(dtypes.float) for j in range(D)]
  query = queries.after(rnd)
  scores = [_visible(token, pos, window).where(_tree_sum([query[g * D + j] * key[j] for j in range(D)]), -math.inf)
            for g in range(G)]
  shared_scores = UOp.placeholder((WARPS, G, WARP), dtypes.float, slot=1, addrspace=AddrSpace.LOCAL).after(rnd)
  shared_slots = UOp.placeholder((WARPS, WARP), dtypes.int32, slot=2, addrspace=AddrSpace.LOCAL).after(rnd)
  scored = UOp.barrier(UOp.group(*[shared_scores[warp, g, lane].store(scores[g]) for g in range(G)],
                                 shared_slots[warp, lane].store(slot.cast(dtypes.int32))))
  shared_scores, shared_slots = shared_scores.after(scored), shared_slots.after(scored)
  m = [functools.reduce(UOp.maximum, [shared_scores[warp, g, t] for t in range(WARP)], cur[M + g]) for g in range(G)]
  weights = UOp.placeholder((WARPS, G, WARP), dtypes.float, slot=3, addrspace=AddrSpace.LOCAL).after(rnd)
  weights = weights.after(UOp.barrier(UOp.group(*[weights[warp, g, lane].store((scores[g] - m[g]).exp2())
                                                  for g in range(G)])))

  # lane = dims: the chunk's values, weighted, added to the running sums
  values = [[v_pool[_bounded(shared_slots[warp, t], num_slots), kvh, lane * dims + e].cast(dtypes.float)
             for e in range(dims)] for t in range(WARP)]
  updates = []
  for g in range(G):
    rescale = (cur[M + g] - m[g]).exp2()
    updates += [state[M + g].store(m[g]),
                state[L + g].store(cur[L + g] * rescale + _tree_sum([weights[warp, g, t] for t in range(WARP)]))]
    updates += [state[A + g * dims + e].store(cur[A + g * dims + e] * rescale +
                                              _tree_sum([weights[warp, g, t] * values[t][e] for t in range(WARP)]))
                for e in range(dims)]
  state = state.after(UOp.barrier(UOp.group(*updates)).end(rnd))

  # the warps' results merged: out = Σ_w values_w · 2^(m_w − top) / Σ_w l_w · 2^(m_w − top)
  merged = UOp.placeholder((WARPS, G, D + 2), dtypes.float, slot=4, addrspace=AddrSpace.LOCAL)
  merged = merged.after(UOp.barrier(UOp.group(
    *[merged[warp, g, lane * dims + e].store(state[A + g * dims + e]) for g in range(G) for e in range(dims)],
    *[merged[warp, g, D].store(state[M + g]) for g in range(G)],
    *[merged[warp, g, D + 1].store(state[L + g]) for g in range(G)])))
  i, item = spread(G * D, 20)
  g, d = item // D, item % D
  top = functools.reduce(UOp.maximum, [merged[w, g, D] for w in range(WARPS)])
  scale_w = [(merged[w, g, D] - top).exp2() for w in range(WARPS)]
  total = _tree_sum([merged[w, g, d] * scale_w[w] for w in range(WARPS)])
  norm = _tree_sum([merged[w, g, D + 1] * scale_w[w] for w in range(WARPS)])
  return out[s, (kvh * G + g) * D + d].store((total / norm).cast(out.dtype)).end(i) \
    .sink(arg=KernelInfo(name="paged_attention_blocks", opts_to_apply=()))


def new_pool(num_slots: int, kv_heads: int, head_dim: int, dtype, devices: tuple[str, ...]) -> Tensor:
  """One layer's K (or V) pool, zeroed once realized: [num_slots, kv_heads, head_dim], split by KV head across
  `devices`. The caller realizes all the pools in one call, one graph for all of them."""
  return allocate_split(Tensor.zeros, (num_slots, kv_heads, head_dim), 1, devices, dtype).contiguous()


@dataclass
class BlockTables:
  """Where each of a step's T tokens reads its context: `tables` holds the block tables of the step's sequences, row
  r at [r * blocks, (r + 1) * blocks) (flat, so that only the columns in use travel to the device), and `rows[t]`
  is the row of token t's sequence. `blocks`, the step's context length in blocks, is not a shape but a variable
  bound per step (`context_blocks`): the kernels loop over that many blocks, so one captured graph serves every
  context length up to `max_blocks`. The [1] tensor `blocks_var` carries the bound variable into the graph."""
  tables: Tensor         # [R * max_blocks] int32, the first R * blocks in use
  rows: Tensor           # [T] int32
  blocks_var: Tensor     # [1] int32: Tensor.full((1,), context_blocks(max_blocks).bind(blocks))
  block_size: int
  max_blocks: int


def context_blocks(max_blocks: int, kernel: bool = False) -> UOp:
  """The variable a step binds to its context length in blocks (inside a kernel, its kernel-side form, as an index).
  It is an int32: CUDA graphs take a kernel's variables as 32-bit parameters."""
  var = UOp.variable("context_blocks", 1, max_blocks, dtype=dtypes.int32, param=kernel)
  return var.cast(dtypes.weakint) if kernel else var


def store_kv(cache: tuple[Tensor, Tensor], k: Tensor | Rotated, v: Tensor, slot_mapping: Tensor) \
    -> tuple[Tensor, Tensor]:
  """Store this step's keys and values (each [T, kv_heads·head_dim]; k usually `rope(k)`) at `slot_mapping` ([T]) in
  their pools (each [num_slots, kv_heads, head_dim]); returns the pools, written. The write kernel rotates K as it
  stores it (the reference kernels rotate it with tinygrad's operations first), and reads k and v where the
  projection left them, columns of one q|k|v output."""
  if isinstance(k, Rotated) and reference_kernels(): k = k.tensor()      # rotated here, then stored as it is
  k, rotation = (k.x, (k.cos, k.sin)) if isinstance(k, Rotated) else (k, ())
  (k, k_col), (v, v_col) = _columns(k), _columns(v)
  return write(cache, NewKV(k, v, k_col, v_col, *rotation), slot_mapping)


def attend(q: Rotated, cache: tuple[Tensor, Tensor], batch: ForwardBatch, window: int | None = None) -> Tensor:
  """Each of the step's T tokens, its query `rope(q)` ([T, heads·head_dim]), attending over its sequence's context
  up to its key limit (`batch.key_limits`: its own position, or a block's end), read from the pools through `batch.tables`: [T, heads·head_dim]. With `batch.paged` the
  kernels read the pools in place and rotate q as they load it (`paged_attention`); otherwise, and with the
  reference kernels, the readable way: q rotated by tinygrad, a dense copy of each token's context (`gather`),
  tinygrad's `attention`. With a sliding `window`, only the last `window` keys up to the limit are seen."""
  T, head_dim = q.x.shape[0], cache[0].shape[-1]
  heads = q.x.shape[1] // head_dim
  if batch.paged and not reference_kernels():
    q_src, q_col = _columns(q.x)
    return paged_attention(q_src, q.cos, q.sin, cache, batch.tables, batch.key_limits, heads, q_col=q_col,
                           window=window)
  k, v = gather(cache, batch.tables)
  return attention(q.tensor().reshape(T, 1, heads, head_dim), k, v, batch.key_limits.reshape(T, 1), window) \
    .reshape(T, -1)


def _columns(t: Tensor) -> tuple[Tensor, int]:
  """A column slice of a 2-D tensor (q, k or v split from one q|k|v output) as the whole tensor and the slice's
  first column: a kernel given those reads the slice in place, where given the slice tinygrad first copies it out
  with a kernel of its own. Any other tensor is its own whole, from column 0."""
  u = t.uop
  if u.op is Ops.SHRINK and len(u.src[0].shape) == 2:
    (first_row, _), (first_column, _) = u.marg          # (start, size) on each axis
    if first_row == 0: return Tensor(u.src[0]), first_column
  return t, 0


def write(cache: tuple[Tensor, Tensor], new: NewKV, slot_mapping: Tensor) -> tuple[Tensor, Tensor]:
  """Store the new K (rotated on the way when `new` has cos/sin) and V of T tokens at `slot_mapping` ([T]) in their
  pools; returns the pools."""
  k_cache, v_cache = cache
  rotation = () if new.cos is None else (new.cos, new.sin)
  write = functools.partial(_write_kernel, k_col=new.k_col, v_col=new.v_col)
  return tuple(k_cache.custom_kernel(v_cache, new.k, new.v, *rotation, slot_mapping, fxn=write)[:2])


def gather(cache: tuple[Tensor, Tensor], tables: BlockTables) -> tuple[Tensor, Tensor]:
  """Each of the step's T tokens' K and V context, copied out of the pools (each [num_slots, kv_heads, head_dim])
  through its block table: each [T, max_blocks * block_size, kv_heads, head_dim], the readable reference's one
  dense copy per token.

  The kernel keeps the KV heads as an axis of their own, so under tensor parallelism each device runs it on its own
  heads' slice of the pools and of the output."""
  k_cache, v_cache = cache
  num_slots, kv_heads, head_dim = k_cache.shape
  T, NB, bs = tables.rows.shape[0], tables.max_blocks, tables.block_size
  dense = lambda: allocate_split(Tensor.invalids, (T, NB, bs, kv_heads, head_dim), 3, k_cache.device, k_cache.dtype)
  as_blocks = lambda pool: pool.reshape(num_slots // bs, bs, kv_heads, head_dim)
  kernel = functools.partial(_gather_kernel, max_blocks=NB)
  k, v = dense().custom_kernel(dense(), as_blocks(k_cache), as_blocks(v_cache), tables.tables, tables.rows,
                               tables.blocks_var, fxn=kernel)[:2]
  return k.reshape(T, NB * bs, kv_heads, head_dim), v.reshape(T, NB * bs, kv_heads, head_dim)


def write_and_gather(cache: tuple[Tensor, Tensor], new: NewKV, slot_mapping: Tensor, tables: BlockTables) \
    -> tuple[Tensor, Tensor]:
  """`write`, then `gather`."""
  return gather(write(cache, new, slot_mapping), tables)


def paged_attention(q: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor], tables: BlockTables,
                    limits: Tensor, heads: int, thread_blocks: bool | None = None, q_col: int = 0,
                    window: int | None = None) -> Tensor:
  """Each query token (q: [T, width], heads·head_dim columns from `q_col` on, un-rotated) attending over its
  sequence's context up to its key limit (`limits` [T]: its own position, or a block's end), straight from the
  pools, no dense copy: [T, heads·head_dim]. A prompt chunk's tokens are written to the pool first, so the chunk
  attends to itself causally (or both ways) through the same table. With a sliding `window`, keys before the last
  `window` up to the limit are masked too.
  `thread_blocks`: the GPU kernel, a thread block per (token, KV head) (None: on devices that run threads in
  blocks, which is what a GPU is to tinygrad, for head dims its lanes divide); else the CPU's, a thread per
  (token, head)."""
  (num_slots, kv_heads, head_dim), T, bs = cache[0].shape, q.shape[0], tables.block_size
  if thread_blocks is None: thread_blocks = has_thread_blocks(q.device) and head_dim % WARP == 0
  out = allocate_split(Tensor.invalids, (T, heads * head_dim), 1, q.device, q.dtype)
  inputs = (tables.tables, tables.rows, limits.reshape(T), tables.blocks_var)
  if thread_blocks:
    kernel = functools.partial(_block_kernel, block_size=bs, max_blocks=tables.max_blocks, q_col=q_col, window=window)
    return out.custom_kernel(q, cos, sin, *cache, *inputs, fxn=kernel)[0]
  k_blocks, v_blocks = (pool.reshape(num_slots // bs, bs, kv_heads, head_dim) for pool in cache)
  kernel = functools.partial(_decode_kernel, max_blocks=tables.max_blocks, q_col=q_col, window=window)
  return out.custom_kernel(q, cos, sin, k_blocks, v_blocks, *inputs, fxn=kernel)[0]


def attention(q: Tensor, k: Tensor, v: Tensor, key_limits: Tensor, window: int | None = None) -> Tensor:
  """Grouped-query attention of queries [S, Q, H, D] over contexts [S, C, KVH, D]; key c is visible to a query
  whose key limit is p when c <= p (causal where p is its position; it hides the unwritten tail of the last block
  and the padding blocks), and with a sliding window when c > p - window."""
  S, Q, H, D = q.shape
  KVH = k.shape[2]
  q = q.reshape(S, Q, KVH, H // KVH, D).permute(0, 2, 3, 1, 4)            # [S, KVH, G, Q, D]
  k, v = k.permute(0, 2, 1, 3).unsqueeze(2), v.permute(0, 2, 1, 3).unsqueeze(2)  # [S, KVH, 1, C, D]
  scores = (q @ k.transpose(-1, -2)) * (D ** -0.5)                          # [S, KVH, G, Q, C]
  keys, limits = Tensor.arange(k.shape[3]).reshape(1, 1, 1, 1, -1), key_limits.reshape(S, 1, 1, Q, 1)
  visible = (keys <= limits) if window is None else (keys <= limits) & (keys > limits - window)
  # materialize probs: fused into the next matmul, softmax's exp would be recomputed for each of the D outputs
  probs = visible.where(scores, -float("inf")).softmax(-1).contiguous()
  return (probs @ v).permute(0, 3, 1, 2, 4).reshape(S, Q, H * D)
