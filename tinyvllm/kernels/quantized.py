"""Quantized weights that stay quantized: a GGUF Q4_0 / Q4_1 / Q8_0 matrix is kept in its packed blocks on the device
and dequantized inside the matmul kernel, so decoding reads 4.5–8.5 bits per weight instead of 32.

At batch 1 every weight is read once per token and used for one multiply-add: decode speed is the speed at which
weight bytes can be read. SmolLM2-135M is 98 MB as Q4_1 and 540 MB in float32, so reading the packed form is the
largest single lever on a CPU or a laptop. A GGUF block holds 32 consecutive weights of one row:

    Q4_0  d (fp16) | 16 bytes, two 4-bit q per byte      w = d·(q − 8)
    Q4_1  d (fp16) | m (fp16) | 16 bytes of 4-bit q      w = d·q + m
    Q8_0  d (fp16) | 32 int8 q                           w = d·q

so one block's contribution to a dot product with x is  d·Σ q_j·x_j + m·Σ x_j.  `PackedWeight` splits the blocks into
three device tensors (the quants untouched, the scales and minimums as float32: converting fp16 inside the kernel
was slower on CPU than the 4 extra bytes per block cost), Q4_0 becoming Q4_1 with m = −8d.

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
from dataclasses import dataclass, field
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.uop.ops import AxisType, KernelInfo
from tinyvllm.model.config import ModelConfig
from tinyvllm.kernels.matvec import has_thread_blocks
from tinyvllm.parallel.tensor_parallel import allocate_split
from tinyvllm.tinygrad_internals import to_device

PACKED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}   # the GGUF types that stay packed, and their quants' width
PACKED_TYPES = tuple(PACKED_BITS)
BLOCK = 32
GROUP = 16              # output features stored side by side: 16 float32 lanes, one AVX-512 register
TILE_ROWS = (8, 4, 2, 1)  # rows of x per thread, the largest that divides the batch (two sets of 16 × 16 sums would
                          # not fit in AVX-512's 32 registers)


@dataclass
class PackedWeight:
  """An (N, K) weight as groups of 16 rows (output features) × K/32 blocks, a block's bytes interleaved across its
  group's 16 rows. A matrix whose N is not a multiple of 16 is padded with zero rows, which the matmul drops."""
  bits: int               # 4 or 8
  features: int           # N, without the padding
  qs: Tensor              # 4-bit: uint8 (N/16, K/32, 16, 16), byte j holds q_j | q_{j+16} << 4
                          # 8-bit: int8 (N/16, K/32, 32, 16)
  d: Tensor               # float32 (N/16, K/32, 16)
  m: Tensor | None        # float32 (N/16, K/32, 16), 4-bit only
  # the kernel's form for the device the weight is on, looked up here: tinygrad opens no device while it traces
  features_in_threads: bool = field(init=False)

  def __post_init__(self): self.features_in_threads = _features_in_threads(self.qs.device)

  @property
  def shape(self) -> tuple[int, int]: return (self.features, self.qs.shape[1] * BLOCK)
  @property
  def nbytes(self) -> int: return sum(t.nbytes() for t in (self.qs, self.d, self.m) if t is not None)

  @staticmethod
  def from_blocks(*parts: tuple[str, np.ndarray]) -> PackedWeight:
    """GGUF blocks, (type name, uint8 (N, K/32, bytes per block)) straight from the file, of one matrix or of
    several stacked by rows (q, k and v into one projection), uploaded as one packed weight."""
    split = [_split_blocks(type_name, blocks) for type_name, blocks in parts]
    if len({bits for bits, *_ in split}) != 1: raise ValueError("only weights of one packed width can be stacked")
    stack = lambda arrays: None if arrays[0] is None else to_device(_grouped(np.concatenate(arrays)))
    features = sum(len(quants) for _, quants, *_ in split)
    return PackedWeight(split[0][0], features, *(stack([s[i] for s in split]) for i in (1, 2, 3)))

  @staticmethod
  def cat(*weights: PackedWeight) -> PackedWeight:
    """Weights already on the device stacked by rows (random ones: a checkpoint's are stacked on the host)."""
    if len({w.bits for w in weights}) != 1: raise ValueError("only weights of one packed width can be stacked")
    if any(w.features % GROUP for w in weights[:-1]): raise ValueError("only whole groups of 16 rows can be stacked")
    stack = lambda ts: Tensor.cat(*ts).contiguous()
    return PackedWeight(weights[0].bits, sum(w.features for w in weights), stack(w.qs for w in weights),
                        stack(w.d for w in weights), None if weights[0].m is None else stack(w.m for w in weights))

  def rows(self, ids: Tensor) -> Tensor:
    """The float32 rows `ids` (an embedding lookup): only those rows are dequantized."""
    row_major = lambda t: t.permute(0, -1, *range(1, t.ndim - 1)).reshape(-1, *t.shape[1:-1])   # (N, K/32[, bytes])
    m = None if self.m is None else row_major(self.m)[ids]
    return _dequantize(row_major(self.qs)[ids], row_major(self.d)[ids], m).reshape(*ids.shape, self.shape[1])


def check_split(cfg: ModelConfig, n: int) -> None:
  """ValueError unless packed weights split `n` ways (parallel/tensor_parallel.py): a row-parallel layer by blocks of 32
  inputs, a column-parallel one by groups of 16 rows (q has as many rows per KV head as k, so k and v decide)."""
  advice = "load float weights (packed_weights=False) to split it"
  for layer, width in (("o_proj", cfg.num_heads * cfg.head_dim), ("down_proj", cfg.intermediate_size)):
    if width // BLOCK % n:
      raise ValueError(f"tensor_parallel_size={n} does not divide the {width // BLOCK} packed blocks of a {layer} row: "
                       f"{advice}")
  for layer, rows in (("k_proj/v_proj", cfg.num_kv_heads * cfg.head_dim), ("gate_proj/up_proj", cfg.intermediate_size)):
    if rows // n % GROUP:
      raise ValueError(f"tensor_parallel_size={n} leaves {rows // n} rows of {layer} on a device, not whole groups of "
                       f"{GROUP}: {advice}")


def _split_blocks(type_name: str, blocks: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
  """One matrix's GGUF blocks -> (bits, quants, d, m) host arrays, Q4_0 as Q4_1 with m = −8d."""
  blocks = np.asarray(blocks, dtype=np.uint8)
  scale = lambda at: np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)
  if type_name == "Q8_0": return 8, blocks[..., 2:].view(np.int8), scale(0), None
  if type_name == "Q4_1": return 4, blocks[..., 4:], scale(0), scale(2)
  if type_name == "Q4_0": return 4, blocks[..., 2:], scale(0), scale(0) * -8
  raise ValueError(f"{type_name} weights cannot stay packed (packed types: {', '.join(PACKED_TYPES)})")


def _grouped(rows: np.ndarray) -> np.ndarray:
  """(N, K/32[, bytes]) per-row arrays -> (N/16, K/32[, bytes], 16): each group's 16 rows side by side, N padded
  with zeros to a multiple of 16."""
  rows = np.concatenate([rows, np.zeros((-len(rows) % GROUP, *rows.shape[1:]), rows.dtype)])
  return np.ascontiguousarray(np.moveaxis(rows.reshape(-1, GROUP, *rows.shape[1:]), 1, -1))


def _dequantize(qs: Tensor, d: Tensor, m: Tensor | None) -> Tensor:
  """(..., K/32, 16 or 32) quants and (..., K/32) scales -> (..., K/32, 32) float32 weights."""
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
  """out[b, n] = Σ_blocks d[n, blk]·Σ_j q[n, blk, j]·x[b, 32·blk + j] (+ m[n, blk]·x_sums[b, blk]), a thread for each
  tile of `tile_rows` rows of x × one group of 16 features (a loop over them, the vector lanes), or, with
  `features_in_threads` (GPUs), × one feature: a group's 16 threads then read 16 adjacent bytes."""
  (B, N), R = out.shape, tile_rows
  tile, group = UOp.range(B // R, 0), UOp.range(N // GROUP, 1)
  thread_feature = UOp.range(GROUP, 7) if features_in_threads else None
  feature_loop = lambda axis: UOp.range(GROUP, axis) if thread_feature is None else thread_feature
  lanes = 1 if features_in_threads else GROUP
  reg = lambda r, f: r * lanes + (0 if features_in_threads else f)       # the register of row r, feature f
  end_loop = lambda u, f: u if features_in_threads else u.end(f)
  row = lambda r: tile * R + r
  threads = (tile, group) if thread_feature is None else (tile, group, thread_feature)
  sums = _zeroed_registers(R * lanes, 0, *threads)
  blk = UOp.range(qs.shape[1], 2, AxisType.REDUCE)
  # the block's Σ q·x for each row and feature (zeroed inside the tile's loops too: one block, K = 32, has no loop)
  block_sums = _zeroed_registers(R * lanes, 1, *threads, blk)
  j, f = UOp.range(qs.shape[2], 3, AxisType.REDUCE), feature_loop(4)   # on a CPU f is innermost: the vector lanes
  byte, prev = qs[group, blk, j, f], block_sums.after(j) if features_in_threads else block_sums.after(j, f)
  # (quant, its position in the block): a 4-bit byte holds weights j and j + 16, an 8-bit one weight j
  quants = [(byte & 15, j), (byte >> 4, j + 16)] if bits == 4 else [(byte, j)]
  products = lambda r: [q.cast(dtypes.float) * x[row(r), blk * BLOCK + at] for q, at in quants]
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
  name = f"q{bits}_matmul_{N}_{qs.shape[1] * BLOCK}_{R}rows"
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
  # Q4_1's minimums multiply each block's sum of x: summed here once for all output features
  minimums = () if w.m is None else (w.m, rows.reshape(B, -1, BLOCK).sum(-1))
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
