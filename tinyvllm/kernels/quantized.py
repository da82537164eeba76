"""Quantized weights that stay quantized: a GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K matrix is kept in
packed blocks on the device and dequantized inside the matmul kernel, so decoding reads 6–10 bits per weight instead
of 32.

At batch 1 every weight is read once per token and used for one multiply-add: decode speed is the speed at which
weight bytes can be read. SmolLM2-135M is 98 MB as Q4_1 and 540 MB in float32, so reading the packed form is the
largest single lever on a CPU or a laptop. A GGUF block holds 32 consecutive weights of one row:

    Q4_0  d (fp16) | 16 bytes, two 4-bit q per byte                          w = d·(q − 8)
    Q4_1  d (fp16) | m (fp16) | 16 bytes of 4-bit q                          w = d·q + m
    Q5_0  d (fp16) | 4 bytes, the 5th bit of each q | 16 bytes of 4-bit q    w = d·(q − 16)
    Q5_1  d (fp16) | m (fp16) | 4 bytes of 5th bits | 16 bytes of 4-bit q    w = d·q + m
    Q8_0  d (fp16) | 32 int8 q                                               w = d·q

and a "K" type's super-block 256, in sub-blocks of 32 (16 for Q6_K) with scales of their own, quantized to 6 or 8
bits and scaled by the super-block's fp16 d (and dmin):

    Q4_K  d | dmin | 12 bytes, 8 × 6-bit (sc, mn) | 128 bytes of 4-bit q     w = d·sc·q − dmin·mn
    Q5_K  d | dmin | 12 bytes of (sc, mn) | 32 bytes of 5th bits | 128 bytes of 4-bit q       w likewise
    Q6_K  128 bytes of low 4 bits | 64 bytes of high 2 bits | 16 int8 sc | d  w = d·sc·(q − 32)

At load, on the host, each matrix is repacked into one of two device forms: blocks of 4-bit or of 8-bit quants, each
block with a float32 scale d and, optionally, a float32 minimum m: w = d·q + m. A K type's sub-block becomes a block
of its own, its d·sc and −dmin·mn multiplied out once (exact in float32: an fp16 number times an integer of 6 or 8
bits), so every weight is bit for bit what formats/gguf.py's float dequantizer makes of it:

    GGUF    device form            q        d        m           bytes per 32 weights, file → device
    Q4_0    4-bit, blocks of 32    q        d        −8d         18    → 24
    Q4_1    4-bit, blocks of 32    q        d        m           20    → 24
    Q4_K    4-bit, blocks of 32    q        d·sc     −dmin·mn    18    → 24
    Q8_0    8-bit, blocks of 32    q        d                    34    → 36
    Q5_0    8-bit, blocks of 32    q − 16   d                    22    → 36
    Q5_1    8-bit, blocks of 32    q        d        m           24    → 40
    Q5_K    8-bit, blocks of 32    q        d·sc     −dmin·mn    22    → 40
    Q6_K    8-bit, blocks of 16    q − 32   d·sc                 26.25 → 40

The 5- and 6-bit quants take a byte each: it costs memory (Q5_0 grows by 64 %), but no kernel of their own. Gemma-3
270M's Q4_K_M file, a Q8_0 embedding (180 MB of it) and Q5_0, Q8_0, Q4_K and Q6_K projections, grows from 246 MB of
matrices to 294 MB (1.19×).

So one block's contribution to a dot product with x is  d·Σ q_j·x_j + m·Σ x_j.  `PackedWeight` holds three device
tensors: the quants, and the scales and minimums as float32 (converting fp16 inside the kernel was slower on CPU than
the 4 extra bytes per block cost).

The blocks are regrouped at load, 16 output features at a time (llama.cpp's CPU backend repacks its blocks for the
same reason): within a group, byte j of a block is stored for the 16 features side by side,

    qs[group, block, j, feature]    d[group, block, feature]    m[group, block, feature]

so one kernel thread, which computes a tile of a few rows of x × one group, reads its weights as one contiguous
stream, and its innermost loop runs over the 16 features: the loop a C compiler turns into vector instructions that
unpack, convert and multiply 16 weights at once (tinygrad 0.14 writes vector operations out as scalars, so a kernel
is fast on CPU only where clang re-forms the vectors: this loop shape is one it does). Each weight is unpacked once
per tile and used for each of its rows; each x value is loaded once and used for 16 features. Per block the q·x
products are summed first, and only that sum is multiplied by d (and m by the block's sum of x, taken once per row
by a small kernel before), not each weight. SmolLM2's gate/up projection (Q4_1 3072×576) on one core, GFLOP/s
(`tinyvllm/benchmarks/scripts/packed_kernel.py`), against the row-by-row layout this replaced (one output feature per thread below 16 rows
of x, 64 rows × 4 features per thread from 16 on):

    rows of x        1      4      16     64     256
    grouped         17     51      85    100    104
    before          15     27      52     84     86

It is written with tinygrad's UOp API (`Tensor.custom_kernel`), so it compiles for every backend. On a GPU (a
renderer with thread blocks) the same kernel gives each of a group's 16 features a thread of its own instead of a
loop, so that a group's threads read 16 adjacent bytes. GPUs keep fp16 weights by default all the same: on the H100
the packed kernel decodes SmolLM2 at 162 tok/s against fp16's 398 (docs/performance.md).
"""
from __future__ import annotations
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.uop.ops import AxisType, KernelInfo
from tinyvllm.formats.gguf import _k_scales_mins
from tinyvllm.model.config import ModelConfig
from tinyvllm.kernels.matvec import has_thread_blocks
from tinyvllm.parallel.tensor_parallel import allocate_split
from tinyvllm.tinygrad_internals import to_device

# the GGUF types that stay packed -> their device form: (quants' width, weights per block), the docstring's table
FORMS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q8_0": (8, 32), "Q5_0": (8, 32), "Q5_1": (8, 32),
         "Q5_K": (8, 32), "Q6_K": (8, 16)}
PACKED_BITS = {type_name: bits for type_name, (bits, _) in FORMS.items()}
PACKED_TYPES = tuple(FORMS)
BLOCK = 32              # weights per block, but for Q6_K's 16
GROUP = 16              # output features stored side by side: 16 float32 lanes, one AVX-512 register
TILE_ROWS = (8, 4, 2, 1)  # rows of x per thread, the largest that divides the batch (two sets of 16 × 16 sums would
                          # not fit in AVX-512's 32 registers)


@dataclass
class PackedWeight:
  """An (N, K) weight as groups of 16 rows (output features) × K/block blocks, a block's bytes interleaved across its
  group's 16 rows. A matrix whose N is not a multiple of 16 is padded with zero rows, which the matmul drops. A block
  is 32 weights (16 for Q6_K): `block`, read off the quants' shape."""
  bits: int               # 4 or 8
  features: int           # N, without the padding
  qs: Tensor              # 4-bit: uint8 (N/16, K/block, block/2, 16), byte j holds q_j | q_{j+block/2} << 4
                          # 8-bit: int8 (N/16, K/block, block, 16)
  d: Tensor               # float32 (N/16, K/block, 16)
  m: Tensor | None        # float32 (N/16, K/block, 16), or None where w = d·q
  # the kernel's form for the device the weight is on, looked up here: tinygrad opens no device while it traces
  features_in_threads: bool = field(init=False)

  def __post_init__(self): self.features_in_threads = _features_in_threads(self.qs.device)

  @property
  def block(self) -> int: return _block_length(self.bits, self.qs.shape[2])
  @property
  def shape(self) -> tuple[int, int]: return (self.features, self.qs.shape[1] * self.block)
  @property
  def nbytes(self) -> int: return sum(t.nbytes() for t in (self.qs, self.d, self.m) if t is not None)

  @staticmethod
  def from_blocks(*parts: tuple[str, np.ndarray]) -> PackedWeight:
    """GGUF blocks, (type name, uint8 (N, blocks per row, bytes per block)) straight from the file, of one matrix or
    of several stacked by rows (q, k and v into one projection: they must be `stackable`), repacked into their device
    form and uploaded as one packed weight. Beside parts with minimums, a part without gets zero ones."""
    split = [_split_blocks(type_name, blocks) for type_name, blocks in parts]
    if not stackable(type_name for type_name, _ in parts):
      raise ValueError(f"only weights of one packed form can be stacked, not {', '.join(t for t, _ in parts)}")
    if any(m is not None for *_, m in split):
      split = [(q, d, np.zeros_like(d) if m is None else m) for q, d, m in split]
    stack = lambda arrays: None if arrays[0] is None else to_device(_grouped(np.concatenate(arrays)))
    (bits, _), features = FORMS[parts[0][0]], sum(len(quants) for quants, *_ in split)
    return PackedWeight(bits, features, *(stack([s[i] for s in split]) for i in range(3)))

  @staticmethod
  def cat(*weights: PackedWeight) -> PackedWeight:
    """Weights already on the device stacked by rows (random ones: a checkpoint's are stacked on the host); as in
    `from_blocks`, a weight without minimums gets zero ones beside weights with them."""
    if len({(w.bits, w.block) for w in weights}) != 1:
      raise ValueError("only weights of one packed form can be stacked")
    if any(w.features % GROUP for w in weights[:-1]): raise ValueError("only whole groups of 16 rows can be stacked")
    stack = lambda ts: Tensor.cat(*ts).contiguous()
    m = None if all(w.m is None for w in weights) else stack(w.d.zeros_like() if w.m is None else w.m for w in weights)
    return PackedWeight(weights[0].bits, sum(w.features for w in weights), stack(w.qs for w in weights),
                        stack(w.d for w in weights), m)

  def rows(self, ids: Tensor) -> Tensor:
    """The float32 rows `ids` (an embedding lookup): only those rows are dequantized."""
    row_major = lambda t: t.permute(0, -1, *range(1, t.ndim - 1)).reshape(-1, *t.shape[1:-1])   # (N, K/block[, bytes])
    m = None if self.m is None else row_major(self.m)[ids]
    return _dequantize(row_major(self.qs)[ids], row_major(self.d)[ids], m).reshape(*ids.shape, self.shape[1])


def stackable(type_names: Iterable[str]) -> bool:
  """Whether matrices of these GGUF types stacked by rows (q, k and v into one projection) stay one packed weight:
  they must repack into the same form, quants' width and block length (Q5_0 beside Q8_0: int8 blocks of 32).
  Minimums may differ: `PackedWeight.from_blocks` gives a part without them zero ones."""
  forms = {FORMS.get(type_name) for type_name in type_names}
  return len(forms) == 1 and None not in forms


def check_split(cfg: ModelConfig, n: int) -> None:
  """ValueError unless packed weights split `n` ways (parallel/tensor_parallel.py): a row-parallel layer by blocks of 32
  inputs (a split of Q6_K's blocks of 16 too), a column-parallel one by groups of 16 rows (q has as many rows per KV
  head as k, so k and v decide)."""
  advice = "load float weights (packed_weights=False) to split it"
  for layer, width in (("o_proj", cfg.num_heads * cfg.head_dim), ("down_proj", cfg.intermediate_size)):
    if width // BLOCK % n:
      raise ValueError(f"tensor_parallel_size={n} does not divide the {width // BLOCK} packed blocks of a {layer} row: "
                       f"{advice}")
  for layer, rows in (("k_proj/v_proj", cfg.num_kv_heads * cfg.head_dim), ("gate_proj/up_proj", cfg.intermediate_size)):
    if rows // n % GROUP:
      raise ValueError(f"tensor_parallel_size={n} leaves {rows // n} rows of {layer} on a device, not whole groups of "
                       f"{GROUP}: {advice}")


def _block_length(bits: int, bytes_per_block: int) -> int:
  """Weights per block of a form: a byte holds two 4-bit quants, or one 8-bit quant."""
  return bytes_per_block * 8 // bits


def _split_blocks(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """One matrix's GGUF blocks, uint8 (N, blocks per row, bytes per block) -> its device form's per-row host arrays:
  quants (N, K/block, bytes per block), d (N, K/block) and m (N, K/block) or None, as the docstring's table says
  (the bit layouts: formats/gguf.py's dequantizers)."""
  if type_name not in FORMS:
    raise ValueError(f"{type_name} weights cannot stay packed (packed types: {', '.join(PACKED_TYPES)})")
  b, N = np.asarray(blocks, dtype=np.uint8), len(blocks)
  fp16 = lambda at: np.ascontiguousarray(b[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)  # (N, blocks)
  nibbles = lambda qs: np.concatenate([qs & 15, qs >> 4], axis=-1)     # all the low nibbles, then all the high ones
  fifth_bits = lambda mask: np.unpackbits(mask, axis=-1, bitorder="little")   # bit j of a 4-byte mask: weight j's
  if type_name == "Q8_0": return b[..., 2:].view(np.int8), fp16(0), None
  if type_name == "Q4_1": return b[..., 4:], fp16(0), fp16(2)
  if type_name == "Q4_0": return b[..., 2:], fp16(0), fp16(0) * -8
  if type_name == "Q5_0": return (nibbles(b[..., 6:]) | fifth_bits(b[..., 2:6]) << 4).view(np.int8) - 16, fp16(0), None
  if type_name == "Q5_1": return (nibbles(b[..., 8:]) | fifth_bits(b[..., 4:8]) << 4).view(np.int8), fp16(0), fp16(2)
  if type_name == "Q6_K":
    # two halves of 128 weights, each four runs of 32: run k takes the low (k < 2) or high nibble of byte
    # 32·(k % 2) + l of the half's 64 bytes of ql, and bits 2k, 2k + 1 of byte l of its 32 bytes of qh
    low = nibbles(b[..., :128].reshape(N, -1, 2, 64)).reshape(N, -1, 2, 4, 32)
    high = b[..., 128:192].reshape(N, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None] & 3
    quants = ((low | high << 4).view(np.int8) - 32).reshape(N, -1, 16)          # 16 sub-blocks of 16 per super-block
    return quants, (fp16(208)[..., None] * b[..., 192:208].view(np.int8)).reshape(N, -1), None
  # Q4_K, Q5_K: 8 sub-blocks of 32; the 128 bytes of qs are 4 chunks of 32, chunk c's low nibbles sub-block 2c's
  # quants and its high nibbles sub-block 2c + 1's
  sc, mn = (a.reshape(N, -1, 8) for a in _k_scales_mins(b[..., 4:16].reshape(-1, 12)))
  d, m = (fp16(0)[..., None] * sc).reshape(N, -1), -(fp16(2)[..., None] * mn).reshape(N, -1)
  low = nibbles(b[..., -128:].reshape(N, -1, 4, 32)).reshape(N, -1, 32)
  if type_name == "Q4_K": return low[..., :16] | low[..., 16:] << 4, d, m          # Q4_1's bytes: q_j | q_{j+16} << 4
  high = b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None] & 1     # bit s of qh[l]: sub-block s, weight l
  return (low | high.reshape(N, -1, 32) << 4).view(np.int8), d, m


def _grouped(rows: np.ndarray) -> np.ndarray:
  """(N, K/block[, bytes]) per-row arrays -> (N/16, K/block[, bytes], 16): each group's 16 rows side by side, N padded
  with zeros to a multiple of 16."""
  rows = np.concatenate([rows, np.zeros((-len(rows) % GROUP, *rows.shape[1:]), rows.dtype)])
  return np.ascontiguousarray(np.moveaxis(rows.reshape(-1, GROUP, *rows.shape[1:]), 1, -1))


def _dequantize(qs: Tensor, d: Tensor, m: Tensor | None) -> Tensor:
  """(..., K/block, block/2 (4-bit) or block (8-bit)) quants and (..., K/block) scales -> (..., K/block, block) float32
  weights."""
  q = (qs & 15).cat(qs >> 4, dim=-1) if qs.dtype == dtypes.uint8 else qs
  return q.cast(dtypes.float32) * d.unsqueeze(-1) + (0 if m is None else m.unsqueeze(-1))


def _zeroed_registers(count: int, slot: int, *ranges: UOp) -> UOp:
  """`count` float32 registers, set to zero inside `ranges` (by a loop: written out, a tile's stores made the graph
  of every layer hundreds of UOps larger, and tinygrad's tracing time grows faster than that)."""
  registers = UOp.placeholder((count,), dtypes.float, slot=slot, addrspace=AddrSpace.REG).after(*ranges)
  i = UOp.range(count, 10 + slot)
  return registers.after(registers[i].store(0.0).end(i))


def _matmul_kernel(out: UOp, x: UOp, qs: UOp, d: UOp, *m_and_x_sums: UOp, bits: int, tile_rows: int,
                   features_in_threads: bool) -> UOp:
  """out[b, n] = Σ_blocks d[n, blk]·Σ_j q[n, blk, j]·x[b, block·blk + j] (+ m[n, blk]·x_sums[b, blk]), a thread
  for each tile of `tile_rows` rows of x × one group of 16 features (a loop over them, the vector lanes), or, with
  `features_in_threads` (GPUs), × one feature: a group's 16 threads then read 16 adjacent bytes."""
  (B, N), R, block = out.shape, tile_rows, _block_length(bits, qs.shape[2])
  # groups outermost: a group's weights stay in cache while every tile of x reads them (tiles outermost streamed the
  # whole matrix once per tile: Gemma-3's 168 MB output projection at 32 rows, 133 ms against 110)
  group, tile = UOp.range(N // GROUP, 0), UOp.range(B // R, 1)
  thread_feature = UOp.range(GROUP, 7) if features_in_threads else None
  feature_loop = lambda axis: UOp.range(GROUP, axis) if thread_feature is None else thread_feature
  lanes = 1 if features_in_threads else GROUP
  reg = lambda r, f: r * lanes + (0 if features_in_threads else f)       # the register of row r, feature f
  end_loop = lambda u, f: u if features_in_threads else u.end(f)
  row = lambda r: tile * R + r
  threads = (group, tile) if thread_feature is None else (group, tile, thread_feature)
  sums = _zeroed_registers(R * lanes, 0, *threads)
  blk = UOp.range(qs.shape[1], 2, AxisType.REDUCE)
  # the block's Σ q·x for each row and feature (zeroed inside the tile's loops too: K of one block has no loop)
  block_sums = _zeroed_registers(R * lanes, 1, *threads, blk)
  j, f = UOp.range(qs.shape[2], 3, AxisType.REDUCE), feature_loop(4)   # on a CPU f is innermost: the vector lanes
  byte, prev = qs[group, blk, j, f], block_sums.after(j) if features_in_threads else block_sums.after(j, f)
  # (quant, its position in the block): a 4-bit byte holds weights j and j + block/2, an 8-bit one weight j
  quants = [(byte & 15, j), (byte >> 4, j + qs.shape[2])] if bits == 4 else [(byte, j)]
  products = lambda r: [q.cast(dtypes.float) * x[row(r), blk * block + at] for q, at in quants]
  updates = [block_sums[reg(r, f)].store(functools.reduce(UOp.__add__, products(r), prev[reg(r, f)])) for r in range(R)]
  block_sums = block_sums.after(end_loop(UOp.group(*updates), f).end(j))
  # scaled once per block: d times the sum, plus m times the block's sum of x
  f = feature_loop(5)
  prev = sums.after(blk) if features_in_threads else sums.after(f)
  scaled = [block_sums[reg(r, f)] * d[group, blk, f] for r in range(R)]
  if m_and_x_sums:
    m, x_sums = m_and_x_sums
    scaled = [s + m[group, blk, f] * x_sums[row(r), blk] for r, s in enumerate(scaled)]
  sums = sums.after(end_loop(UOp.group(*[sums[reg(r, f)].store(prev[reg(r, f)] + s) for r, s in enumerate(scaled)]),
                             f).end(blk))
  f = feature_loop(6)
  stores = end_loop(UOp.group(*[out[row(r), group * GROUP + f].store(sums[reg(r, f)]) for r in range(R)]), f)
  name = f"q{bits}_matmul_{N}_{qs.shape[1] * block}_{R}rows"
  return stores.end(*threads).sink(arg=KernelInfo(name=name, opts_to_apply=()))


def packed_matmul(x: Tensor, w: PackedWeight) -> Tensor:
  """x (..., K) @ w.T -> (..., N), in x's dtype (accumulated in float32)."""
  (N, K), lead = w.shape, x.shape[:-1]
  rows = x.reshape(-1, K).float().contiguous()
  y = _kernel_matmul(rows, w)
  return (y if y.shape[1] == N else y[:, :N]).reshape(*lead, N).cast(x.dtype)


def _kernel_matmul(rows: Tensor, w: PackedWeight) -> Tensor:
  """rows (B, K) @ w.T (with the padding features), on every device a weight split by tensor parallelism lives on.
  Split by output groups (axis 0), each device writes its columns of the output. Split by input blocks (axis 1,
  rows split the same way), each device's dot products cover its share of K: the n partial outputs are stacked and
  summed, and tinygrad turns that sum across devices into an all-reduce."""
  B, N = rows.shape[0], w.qs.shape[0] * GROUP
  split = w.qs.uop.axis if isinstance(w.qs.device, tuple) else None
  partials = len(w.qs.device) if split == 1 else 1
  out_axis = {0: 1, 1: 0}.get(split)     # rows split: the output's columns; blocks split: the stacked partials
  out = allocate_split(Tensor.invalids, (partials * B, N), out_axis, w.qs.device, dtypes.float32)
  # the minimums multiply each block's sum of x: summed here once for all output features
  minimums = () if w.m is None else (w.m, rows.reshape(B, -1, w.block).sum(-1))
  tile_rows = next(r for r in TILE_ROWS if B % r == 0)
  kernel = functools.partial(_matmul_kernel, bits=w.bits, tile_rows=tile_rows, features_in_threads=w.features_in_threads)
  y = out.custom_kernel(rows, w.qs, w.d, *minimums, fxn=kernel)[0]
  return y if partials == 1 else y.reshape(partials, B, N).sum(0)


def _features_in_threads(device: str | tuple[str, ...]) -> bool:
  """GPUs (renderers with thread blocks) compute one feature per thread; a CPU core loops over a group's features."""
  return has_thread_blocks(device)


class PackedEmbedding:
  """nn.Embedding's interface over a packed table; with tied embeddings the same table is the output projection."""
  def __init__(self, weight: PackedWeight, dtype): self.weight, self.dtype = weight, dtype
  def __call__(self, ids: Tensor) -> Tensor: return self.weight.rows(ids).cast(self.dtype)
