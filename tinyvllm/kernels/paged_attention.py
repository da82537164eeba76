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
  - a CPU: a kernel streams the context once with an *online softmax*. It keeps the running maximum score m, the
    sum of exp(score − m) and the exp-weighted sum of values, and rescales both when m grows, so the scores never
    need to be stored. The host groups the step's tokens (`query_tiles`): a sequence's run of several tokens (a
    prompt chunk, a step checking drafts, a diffusion block) is cut into *tiles* of up to 8, and one thread per
    (tile, KV head) reads each key and value once for all of its tokens and query heads, its loops' innermost axes
    contiguous so that the C compiler makes them vector instructions; a decoding token, alone in its sequence, gets
    a thread per (token, head). A 256-token prompt chunk over a 512-token context: 6.9 ms a SmolLM2 layer against
    43 ms with a thread per token and head.

        step's tokens   A A A A A A A A A A | B | C C | D        (sequences A-D)
        tiles           [A A A A] [A A A A] [A A] [C C]          thread per (tile, KV head): 8 lanes × G heads
        lone                                 B          D        thread per (token, head)
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
import numpy as np
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


LOG2E = 1.4426950408889634   # scores are kept in log2 units, so the softmax's exponentials are exp2
TILE_TOKENS = 8              # query tokens of one sequence a CPU thread takes at most
LANES = 8                    # partial sums per dot product of a lone token's kernel
KEYS_PER_STEP = 4            # keys per step of its loop: their dot products run side by side


def _visible(key: UOp, limit: UOp, window: int | None) -> UOp:
  """Whether a query whose key limit is `limit` sees key position `key`: up to the limit, and within the last
  `window` positions where a sliding window applies."""
  return (key <= limit) if window is None else (key <= limit) & (key > limit - window)


def _tree_sum(terms: list[UOp]) -> UOp:
  """Pairwise sum: independent adds a CPU can overlap, where a running sum would wait on each one in turn."""
  while len(terms) > 1: terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) & ~1:]
  return terms[0]


def _lone_kernel(out: UOp, q: UOp, cos: UOp, sin: UOp, k_blocks: UOp, v_blocks: UOp, tables: UOp, rows: UOp,
                 limits: UOp, blocks: UOp, tokens: UOp, count: UOp, max_blocks: int, q_col: int,
                 lone: UOp | int, first_at: int = 0, window: int | None = None) -> UOp:
  """out[s, head h] = softmax(rope(q[s, h]) · K_s) · V_s for each token s = tokens[first_at + r] that is alone in
  its sequence this step (a decoding one), over its context read from the pool through its block table: one thread
  per (token, head) streams the context once, keeping a running max m, the sum l of exp(score − m) and the
  weighted sum of values, all rescaled when m grows (the online softmax). Each step of the loop takes a few keys at
  once, so their dot products overlap and the rescaling is paid once per step; a dot product is LANES partial sums.
  `lone`: how many of `tokens` are in use, a variable bound per step (`count` holds its value)."""
  (S, width), (num_blocks, block_size, KVH, D), NB = out.shape, k_blocks.shape, context_blocks(max_blocks, kernel=True)
  H, half, n = width // D, D // 2, min(KEYS_PER_STEP, block_size)
  r, h = UOp.range(lone, 0), UOp.range(H, 1)
  s = _bounded(tokens[first_at + r.minimum(count[0].cast(dtypes.weakint) - 1)], S)   # (r < count: reads count)
  x = [q[s, q_col + h * D + j].cast(dtypes.float) for j in range(D)]
  c, sn = [cos[s, j] for j in range(half)], [sin[s, j] for j in range(half)]
  scale = D ** -0.5 * LOG2E
  rq = [(x[j] * c[j] - x[j + half] * sn[j]) * scale for j in range(half)] + \
       [(x[j + half] * c[j] + x[j] * sn[j]) * scale for j in range(half)]
  M, L = D, D + 1                                  # the state: D value sums, then m and l
  state = UOp.placeholder((D + 2,), dtypes.float, slot=0, addrspace=AddrSpace.REG).after(r, h)
  state = state.after(UOp.group(*[state[i].store(-1e30 if i == M else 0.0) for i in range(D + 2)]))
  step = UOp.range(NB * (block_size // n), 2, AxisType.REDUCE)
  keys = [step * n + i for i in range(n)]
  kvh, pos, table = h // (H // KVH), limits[s].cast(dtypes.weakint), _table_start(rows, s, blocks)
  where = [(_bounded(tables[table + t // block_size], num_blocks), t % block_size) for t in keys]
  # each dot product as LANES partial sums stored in registers: as one expression tinygrad renders it as a single
  # chain of D dependent adds
  part = UOp.placeholder((n, LANES), dtypes.float, slot=1, addrspace=AddrSpace.REG).after(step)
  part = part.after(UOp.group(*[part[i, l].store(_tree_sum([rq[j] * k_blocks[blk, b, kvh, j].cast(dtypes.float)
                                                            for j in range(l, D, LANES)]))
                                for i, (blk, b) in enumerate(where) for l in range(LANES)]))
  scores = [_visible(t, pos, window).where(_tree_sum([part[i, l] for l in range(LANES)]), -1e30)
            for i, t in enumerate(keys)]
  cur = state.after(step)
  m = functools.reduce(UOp.maximum, scores, cur[M])
  rescale, p = (cur[M] - m).exp2(), [(score - m).exp2() for score in scores]
  values = [_tree_sum([p[i] * v_blocks[blk, b, kvh, j].cast(dtypes.float) for i, (blk, b) in enumerate(where)])
            for j in range(D)]
  state = state.after(UOp.group(*[state[j].store(cur[j] * rescale + values[j]) for j in range(D)], state[M].store(m),
                                state[L].store(cur[L] * rescale + _tree_sum(p))).end(step))
  inv = state[L].reciprocal()
  return UOp.group(*[out[s, h * D + d].store((state[d] * inv).cast(out.dtype)) for d in range(D)]) \
    .end(r, h).sink(arg=KernelInfo(name="paged_attention", opts_to_apply=()))


def _registers(size: int, slot: int, *ranges: UOp, value: float | None = None) -> UOp:
  """`size` float32 registers (a small array on a CPU) of the thread `ranges` name, set to `value` by a loop."""
  regs = UOp.placeholder((size,), dtypes.float, slot=slot, addrspace=AddrSpace.REG).after(*ranges)
  if value is None: return regs
  i = UOp.range(size, 10 + slot)
  return regs.after(regs[i].store(value).end(i))


def _tile_kernel(out: UOp, q: UOp, cos: UOp, sin: UOp, k_blocks: UOp, v_blocks: UOp, tables: UOp, rows: UOp,
                 limits: UOp, blocks: UOp, firsts: UOp, count: UOp, max_blocks: int, q_col: int, tokens: int,
                 tiles: UOp | int, first_at: int = 0, window: int | None = None) -> UOp:
  """The CPU's attention: a thread per (tile, KV head), a tile being up to `tokens` consecutive query tokens of one
  sequence from `firsts[j]` on, and the G query heads of the KV head for each: Q = tokens·G queries, its *lanes*.
  The thread streams the sequence's context once, a pool block at a time, for all of its lanes:

      scores S[c, lane] = Σ_d K[c, d] · q[lane, d]      c: the block's 16 keys; lanes innermost, in registers
      m' = max(m, max_c S)   p = 2^(S − m')   l = l·2^(m − m') + Σ_c p   acc = acc·2^(m − m') + Σ_c p·V[c]

  (the online softmax: the running max m, the sum l of exponentials and the weighted values acc, rescaled when m
  grows, so no score is stored past its block). Every loop's innermost axis is contiguous in memory (lanes, or a
  value row's dimensions), which is what a C compiler turns into vector instructions. Sharing each key and value
  among the lanes is what makes a prompt chunk or a step checking drafts cheap: a token of a tile costs a fraction
  of what it costs alone. A tile's lanes past its sequence's last token repeat its first and store nothing.
  `firsts[first_at:]`: each tile's first token; `tiles`: how many are in use, a variable bound per step (`count`
  holds its value), so the tiles a step does not use are not run."""
  (T, width), (num_blocks, bs, KVH, D), NB = out.shape, k_blocks.shape, context_blocks(max_blocks, kernel=True)
  H, half, n = width // D, D // 2, tokens
  G = H // KVH
  Q = n * G                                                # lane i·G + g: token i of the tile, query head g
  j, kvh = UOp.range(tiles, 0), UOp.range(KVH, 1)
  # (j < count always: the clamp reads count, as every input of a kernel must be read)
  first = _bounded(firsts[first_at + j.minimum(count[0].cast(dtypes.weakint) - 1)], T)
  row = rows[first]
  member = [None] + [((first + i) < T) & rows[(first + i).minimum(T - 1)].eq(row) for i in range(1, n)]
  token = [first] + [member[i].where(first + i, first) for i in range(1, n)]
  scale = D ** -0.5 * LOG2E

  # the lanes' queries, rotated and scaled, transposed: qt[d·Q + lane]
  qt, p = _registers(D * Q, 0, j, kvh), UOp.range(half, 20)
  rotated = []
  for i in range(n):
    c, s = cos[token[i], p].cast(dtypes.float), sin[token[i], p].cast(dtypes.float)
    for g in range(G):
      at, lane = q_col + (kvh * G + g) * D + p, i * G + g
      x1, x2 = q[token[i], at].cast(dtypes.float), q[token[i], at + half].cast(dtypes.float)
      rotated += [qt[p * Q + lane].store((x1 * c - x2 * s) * scale), qt[(p + half) * Q + lane].store((x2 * c + x1 * s) * scale)]
  qt = qt.after(UOp.group(*rotated).end(p))
  acc = _registers(Q * D, 1, j, kvh, value=0.0)
  m = _registers(Q, 2, j, kvh, value=-1e30)
  l = _registers(Q, 3, j, kvh, value=0.0)

  blk = UOp.range(NB, 2, AxisType.REDUCE)
  pool_block = _bounded(tables[_table_start(rows, first, blocks) + blk], num_blocks)
  # the block's scores, lanes innermost: each key element is read once for all of them
  scores = _registers(bs * Q, 4, blk, value=0.0)
  c, d, lane = UOp.range(bs, 21), UOp.range(D, 22, AxisType.REDUCE), UOp.range(Q, 23)
  prev = scores.after(d)
  key = k_blocks[pool_block, c, kvh, d].cast(dtypes.float)
  scores = scores.after(scores[c * Q + lane].store(prev[c * Q + lane] + key * qt[d * Q + lane]).end(lane).end(d).end(c))
  # per lane: its token's limit masks the block's keys; the new max, the exponentials, the rescaling
  lane = UOp.range(Q, 24)
  limit = limits[token[0]].cast(dtypes.weakint)
  for i in range(1, n): limit = (lane >= i * G).where(limits[token[i]].cast(dtypes.weakint), limit)
  masked = [_visible(blk * bs + c, limit, window).where(scores[c * Q + lane], -1e30) for c in range(bs)]
  cur_m, cur_l = m.after(blk), l.after(blk)
  new_m = functools.reduce(UOp.maximum, masked, cur_m[lane])
  rescale, weights = (cur_m[lane] - new_m).exp2(), [(x - new_m).exp2() for x in masked]
  probs = _registers(bs * Q + Q, 5, blk)                  # the exponentials, then each lane's rescaling
  probs = probs.after(UOp.group(*[probs[c * Q + lane].store(w) for c, w in enumerate(weights)],
                                probs[bs * Q + lane].store(rescale), m[lane].store(new_m),
                                l[lane].store(cur_l[lane] * rescale + _tree_sum(weights))).end(lane))
  # the weighted values, a value row's dimensions innermost
  lane, d = UOp.range(Q, 25), UOp.range(D, 26)
  prev = acc.after(blk)
  values = _tree_sum([probs[c * Q + lane] * v_blocks[pool_block, c, kvh, d].cast(dtypes.float) for c in range(bs)])
  acc = acc.after(acc[lane * D + d].store(prev[lane * D + d] * probs[bs * Q + lane] + values).end(d).end(lane).end(blk))
  l = l.after(acc)

  # out[token, head, d] = acc / l, for the tile's own tokens (`out` is flat: a gated store needs one index)
  d, stores, flat = UOp.range(D, 27), [], out.reshape((T * width,))
  for i in range(n):
    for g in range(G):
      at, lane = (first + i).minimum(T - 1) * width + (kvh * G + g) * D + d, i * G + g
      stores.append(flat.index(at if i == 0 else at.valid(member[i])).store((acc[lane * D + d] / l[lane]).cast(out.dtype)))
  return UOp.group(*stores).end(d).end(j, kvh).sink(arg=KernelInfo(name=f"paged_attention_tiles{n}", opts_to_apply=()))


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
  tiles: QueryTiles | None = None     # how the CPU's kernel groups the tokens (None: each token alone)


@dataclass
class QueryTiles:
  """The step's tokens grouped for the CPU's kernel (`query_tiles` makes them on the host): `firsts` [T // 2 + T]
  holds the first token of each tile of 2 to `tokens` consecutive tokens of one sequence (up to T // 2 of them),
  then, from T // 2 on, each token that is alone (a decoding sequence's, or what is left of a run). The [1] tensors
  `multi` and `lone` carry how many of each are in use, variables bound per step (`tile_count`)."""
  firsts: Tensor
  multi: Tensor
  lone: Tensor
  tokens: int


def tile_tokens(T: int) -> int:
  """Tokens a tile of a T-token step takes: 4 in small steps (a sequence checking 3 drafts), 8 in big ones."""
  return 4 if T <= 16 else TILE_TOKENS


def tile_count(name: str, most: int, kernel: bool = False) -> UOp:
  """The variable a step binds to how many tiles of a kind it uses ("multi" or "lone"; inside a kernel, as an index)."""
  var = UOp.variable(f"{name}_tiles", 0, most, dtype=dtypes.int32, param=kernel)
  return var.cast(dtypes.weakint) if kernel else var


def query_tiles(rows: list[int], T: int) -> tuple[list[int], int, int]:
  """Group a step's tokens for the CPU's kernel: `rows[t]` the sequence of token t (a sequence's tokens are
  consecutive). Returns (firsts, as `QueryTiles` lays them out [T // 2 + T], tiles in use, lone tokens in use):

      rows   0 0 0 0 0 0 0 0 0 0 | 1 | 2 2 | 3      (tokens = 4)
      tiles  [0 1 2 3] [4 5 6 7] [8 9] [11 12]       multi: 4 tiles
      lone   10, 13                                  lone: 2 tokens"""
  n, half = tile_tokens(T), T // 2
  changes = np.flatnonzero(np.diff(rows)) + 1 if len(rows) > 1 else np.zeros(0, np.int64)
  starts = [0, *changes.tolist()]
  multi, lone = [], []
  for start, end in zip(starts, starts[1:] + [len(rows)]):      # each sequence's run of tokens
    for first in range(start, end, n): (multi if min(n, end - first) > 1 else lone).append(first)
  return multi + [0] * (half - len(multi)) + lone + [0] * (T - len(lone)), len(multi), len(lone)


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
  blocks, which is what a GPU is to tinygrad, for head dims its lanes divide); else the CPU's, a thread per tile
  of a sequence's tokens and KV head (`tables.tiles`)."""
  (num_slots, kv_heads, head_dim), T, bs = cache[0].shape, q.shape[0], tables.block_size
  if thread_blocks is None: thread_blocks = has_thread_blocks(q.device) and head_dim % WARP == 0
  out = allocate_split(Tensor.invalids, (T, heads * head_dim), 1, q.device, q.dtype)
  inputs = (tables.tables, tables.rows, limits.reshape(T), tables.blocks_var)
  if thread_blocks:
    kernel = functools.partial(_block_kernel, block_size=bs, max_blocks=tables.max_blocks, q_col=q_col, window=window)
    return out.custom_kernel(q, cos, sin, *cache, *inputs, fxn=kernel)[0]
  k_blocks, v_blocks = (pool.reshape(num_slots // bs, bs, kv_heads, head_dim) for pool in cache)
  kernel = functools.partial(_tile_kernel, max_blocks=tables.max_blocks, q_col=q_col, window=window)
  alone = functools.partial(_lone_kernel, max_blocks=tables.max_blocks, q_col=q_col, window=window)
  tiles = tables.tiles
  if tiles is None:                  # each token alone
    firsts = Tensor(list(range(T)), dtype=dtypes.int32, device=q.device)
    count = Tensor.full((1,), T, dtype=dtypes.int32, device=q.device).contiguous()
    return out.custom_kernel(q, cos, sin, k_blocks, v_blocks, *inputs, firsts, count,
                             fxn=functools.partial(alone, lone=T))[0]
  # a padding token (a step of T > 1 tokens may have some) is in no tile: its output is zeros, so that the K and V the next layer writes for it (into the
  # null block, read by masked keys, whose weight 0 times a NaN would still be NaN) are finite
  if T > 1:                          # the tiles of several tokens, then the lone tokens
    out = allocate_split(Tensor.zeros, (T, heads * head_dim), 1, q.device, q.dtype).contiguous()
    out = out.custom_kernel(q, cos, sin, k_blocks, v_blocks, *inputs, tiles.firsts, tiles.multi,
                            fxn=functools.partial(kernel, tokens=tiles.tokens, tiles=tile_count("multi", T // 2, True)))[0]
  return out.custom_kernel(q, cos, sin, k_blocks, v_blocks, *inputs, tiles.firsts, tiles.lone,
                           fxn=functools.partial(alone, lone=tile_count("lone", T, True), first_at=T // 2))[0]


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
