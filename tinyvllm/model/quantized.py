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

Two kernels, both written with tinygrad's UOp API (`Tensor.custom_kernel`), so they compile for every backend:

- Few rows of x (decoding a small batch): one output feature per thread, the block loop as the reduction, and 16
  independent partial sums, the lanes a C compiler turns into vector FMAs. It computes that formula as written: q·x
  products summed before d multiplies them, and Σ x_j taken once per row and block by a small kernel before it,
  rather than dequantizing every weight first: 1.3× faster at one row, 2.5× at 32 (Q4_1 3072×576: 149 → 113 µs,
  8.0 → 3.2 ms). tinygrad's own `(x * dequant(w)).sum()` has a single scalar accumulator, ~10× slower on CPU.
- Many rows (a prefill chunk, a large batch): each thread computes a tile of up to 64 rows × 4 output features, so
  each weight is dequantized once for 64 rows and each value of x loaded once for 4 features. x comes transposed,
  (K, B), so that a tile's rows sit side by side and the innermost loop, over them, is what the C compiler turns
  into vector FMAs with the 4 × 64 sums held in registers. Q4_1 1536×576 on one core: ~78 GFLOP/s at 64–256 rows,
  where the first kernel reaches 21–30 (tinygrad 0.14 writes vector operations out as scalars, so a kernel is fast
  on CPU only where clang re-forms the vectors: this loop shape is one it does).
"""
from __future__ import annotations
import functools
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.uop.ops import AxisType, KernelInfo
from tinyvllm.model.tensor_parallel import allocate_split
from tinyvllm.transfer import to_device

PACKED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}   # the GGUF types that stay packed, and their quants' width
PACKED_TYPES = tuple(PACKED_BITS)
BLOCK = 32
LANES = 16              # partial sums per output in the row kernel: two AVX2 registers; 8 and 32 measured slower
MIN_TILE_ROWS = 16      # from this many rows of x on, the tiled kernel (fewer: the row kernel)
TILE_ROWS = 64          # rows of x per tile (a smaller batch is one tile); 16, 32 measured slower at 64+ rows
TILE_FEATURES = 4       # output features per tile: each x value loaded is used this many times (1: 1.6× slower)


@dataclass
class PackedWeight:
  """An (N, K) weight as N rows of K/32 blocks: quants (uint8 nibble pairs for 4-bit, int8 for 8-bit) and scales."""
  bits: int               # 4 or 8
  qs: Tensor              # 4-bit: uint8 (N, K/32, 16), byte j holds q_j | q_{j+16} << 4; 8-bit: int8 (N, K/32, 32)
  d: Tensor               # float32 (N, K/32)
  m: Tensor | None        # float32 (N, K/32), 4-bit only

  @property
  def shape(self) -> tuple[int, int]: return (self.qs.shape[0], self.qs.shape[1] * BLOCK)
  @property
  def nbytes(self) -> int: return sum(t.nbytes() for t in (self.qs, self.d, self.m) if t is not None)

  @staticmethod
  def from_blocks(*parts: tuple[str, np.ndarray]) -> PackedWeight:
    """GGUF blocks, (type name, uint8 (N, K/32, bytes per block)) straight from the file, of one matrix or of
    several stacked by rows (q, k and v into one projection), uploaded as one packed weight."""
    split = [_split_blocks(type_name, blocks) for type_name, blocks in parts]
    if len({bits for bits, *_ in split}) != 1: raise ValueError("only weights of one packed width can be stacked")
    stack = lambda arrays: None if arrays[0] is None else to_device(np.concatenate(arrays))
    return PackedWeight(split[0][0], *(stack([s[i] for s in split]) for i in (1, 2, 3)))

  @staticmethod
  def cat(*weights: PackedWeight) -> PackedWeight:
    """Weights already on the device stacked by rows (random ones: a checkpoint's are stacked on the host)."""
    if len({w.bits for w in weights}) != 1: raise ValueError("only weights of one packed width can be stacked")
    stack = lambda ts: Tensor.cat(*ts).contiguous()
    return PackedWeight(weights[0].bits, stack(w.qs for w in weights), stack(w.d for w in weights),
                        None if weights[0].m is None else stack(w.m for w in weights))

  def rows(self, ids: Tensor) -> Tensor:
    """The float32 rows `ids` (an embedding lookup): only those rows are dequantized."""
    m = None if self.m is None else self.m[ids]
    return _dequantize(self.qs[ids], self.d[ids], m).reshape(*ids.shape, self.shape[1])


def _split_blocks(type_name: str, blocks: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
  """One matrix's GGUF blocks -> (bits, quants, d, m) host arrays, Q4_0 as Q4_1 with m = −8d."""
  blocks = np.asarray(blocks, dtype=np.uint8)
  scale = lambda at: np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)
  if type_name == "Q8_0": return 8, blocks[..., 2:].view(np.int8), scale(0), None
  if type_name == "Q4_1": return 4, blocks[..., 4:], scale(0), scale(2)
  if type_name == "Q4_0": return 4, blocks[..., 2:], scale(0), scale(0) * -8
  raise ValueError(f"{type_name} weights cannot stay packed (packed types: {', '.join(PACKED_TYPES)})")


def _dequantize(qs: Tensor, d: Tensor, m: Tensor | None) -> Tensor:
  """(..., K/32, 16 or 32) quants and (..., K/32) scales -> (..., K/32, 32) float32 weights."""
  q = (qs & 15).cat(qs >> 4, dim=-1) if qs.dtype == dtypes.uint8 else qs
  return q.cast(dtypes.float32) * d.unsqueeze(-1) + (0 if m is None else m.unsqueeze(-1))


def _matmul_kernel(out: UOp, x: UOp, qs: UOp, d: UOp, *m_and_x_sums: UOp, bits: int) -> UOp:
  """out[b, n] = Σ_blocks d[n, blk]·Σ_j q[n, blk, j]·x[b, 32·blk + j] (+ m[n, blk]·x_sums[b, blk]): the scale
  multiplies partial sums and the minimum a block's sum of x, not each weight."""
  B, N = out.shape
  n, b = UOp.range(N, 0), UOp.range(B, 1)
  # LANES running sums for the quants' term, the lanes a C compiler turns into vector FMAs, then one for the minimums'
  acc = UOp.placeholder((LANES + 1,), dtypes.float, slot=0, addrspace=AddrSpace.REG).after(n, b)
  acc = acc.after(UOp.group(*[acc[i].store(0.0) for i in range(LANES + 1)]))
  blk = UOp.range(qs.shape[1], 2, AxisType.REDUCE)
  if bits == 4:      # low nibbles are weights 0..15 of the block, high nibbles 16..31
    q = [qs[n, blk, j] & 15 for j in range(16)] + [qs[n, blk, j] >> 4 for j in range(16)]
  else: q = [qs[n, blk, j] for j in range(BLOCK)]
  products = [q[j].cast(dtypes.float) * x[b, blk * BLOCK + j] for j in range(BLOCK)]
  prev = acc.after(blk)
  sums = [prev[i] + (products[i] + products[i + LANES]) * d[n, blk] for i in range(LANES)]
  if m_and_x_sums:
    m, x_sums = m_and_x_sums
    sums.append(prev[LANES] + m[n, blk] * x_sums[b, blk])
  acc = acc.after(UOp.group(*[acc[i].store(v) for i, v in enumerate(sums)]).end(blk))
  total = functools.reduce(lambda s, i: s + acc[i], range(1, len(sums)), acc[0])
  return out[b, n].store(total).end(b, n).sink(arg=KernelInfo(name=f"q{bits}_matmul_{N}_{qs.shape[1] * BLOCK}",
                                                               opts_to_apply=()))


def _tiled_matmul_kernel(out: UOp, xt: UOp, qs: UOp, d: UOp, *m: UOp, bits: int, tile_rows: int) -> UOp:
  """out[b, n] by tiles of `tile_rows` rows × TILE_FEATURES features; xt is x transposed, (K, B)."""
  B, N = out.shape
  bt, nt = UOp.range(B // tile_rows, 0), UOp.range(N // TILE_FEATURES, 1)
  sums = UOp.placeholder((TILE_FEATURES * tile_rows,), dtypes.float, slot=0, addrspace=AddrSpace.REG).after(bt, nt)
  sums = sums.after(UOp.group(*[sums[i].store(0.0) for i in range(TILE_FEATURES * tile_rows)]))
  blk, j = UOp.range(qs.shape[1], 2, AxisType.REDUCE), UOp.range(qs.shape[2], 3, AxisType.REDUCE)
  i = UOp.range(tile_rows, 4)        # innermost, over the tile's rows: the loop that becomes vector FMAs
  prev = sums.after(blk, j, i)
  updates = []
  for f in range(TILE_FEATURES):
    n, byte = nt * TILE_FEATURES + f, qs[nt * TILE_FEATURES + f, blk, j]
    # (quant, its position in the block): a 4-bit byte holds weights j and j + 16, an 8-bit one weight j
    quants = [(byte & 15, j), (byte >> 4, j + 16)] if bits == 4 else [(byte, j)]
    terms = [(q.cast(dtypes.float) * d[n, blk] + (m[0][n, blk] if m else 0)) * xt[blk * BLOCK + at, bt * tile_rows + i]
             for q, at in quants]
    updates.append(sums[f * tile_rows + i].store(functools.reduce(UOp.__add__, terms, prev[f * tile_rows + i])))
  sums = sums.after(UOp.group(*updates).end(i).end(j, blk))
  stores = [out[bt * tile_rows + r, nt * TILE_FEATURES + f].store(sums[f * tile_rows + r])
            for f in range(TILE_FEATURES) for r in range(tile_rows)]
  name = f"q{bits}_tiled_matmul_{N}_{qs.shape[1] * BLOCK}"
  return UOp.group(*stores).end(bt, nt).sink(arg=KernelInfo(name=name, opts_to_apply=()))


def packed_matmul(x: Tensor, w: PackedWeight) -> Tensor:
  """x (..., K) @ w.T -> (..., N), in x's dtype (accumulated in float32)."""
  (N, K), lead = w.shape, x.shape[:-1]
  rows = x.reshape(-1, K).float().contiguous()
  return _kernel_matmul(rows, w).reshape(*lead, N).cast(x.dtype)


def _kernel_matmul(rows: Tensor, w: PackedWeight) -> Tensor:
  """rows (B, K) @ w.T through one of the two kernels, on every device a weight split by tensor parallelism lives on.
  Split by output rows (axis 0), each device writes its columns of the output. Split by input blocks (axis 1, rows
  split the same way), each device's dot products cover its share of K: the n partial outputs are stacked and
  summed, and tinygrad turns that sum across devices into an all-reduce."""
  B, N = rows.shape[0], w.shape[0]
  split = w.qs.uop.axis if isinstance(w.qs.device, tuple) else None
  partials = len(w.qs.device) if split == 1 else 1
  out_axis = {0: 1, 1: 0}.get(split)     # rows split: the output's columns; blocks split: the stacked partials
  out = allocate_split(Tensor.empty, (partials * B, N), out_axis, w.qs.device, dtypes.float32)
  minimums, features_here = () if w.m is None else (w.m,), N // len(w.qs.device) if split == 0 else N
  if B >= MIN_TILE_ROWS and B % min(B, TILE_ROWS) == 0 and features_here % TILE_FEATURES == 0:
    kernel = functools.partial(_tiled_matmul_kernel, bits=w.bits, tile_rows=min(B, TILE_ROWS))
    y = out.custom_kernel(rows.T.contiguous(), w.qs, w.d, *minimums, fxn=kernel)[0]
  else:    # Q4_1's minimums multiply each block's sum of x: summed here once for all output features
    x_sums = () if w.m is None else (rows.reshape(B, -1, BLOCK).sum(-1),)
    y = out.custom_kernel(rows, w.qs, w.d, *minimums, *x_sums, fxn=functools.partial(_matmul_kernel, bits=w.bits))[0]
  return y if partials == 1 else y.reshape(partials, B, N).sum(0)


def matmul_t(x: Tensor, weight: Tensor | PackedWeight) -> Tensor:
  """x @ weight.T for a plain or a packed weight."""
  return packed_matmul(x, weight) if isinstance(weight, PackedWeight) else x @ weight.T


class PackedLinear:
  """nn.Linear's interface over a packed weight."""
  def __init__(self, weight: PackedWeight, bias: Tensor | None = None): self.weight, self.bias = weight, bias
  def __call__(self, x: Tensor) -> Tensor:
    y = packed_matmul(x, self.weight)
    return y if self.bias is None else y + self.bias


class PackedEmbedding:
  """nn.Embedding's interface over a packed table; with tied embeddings the same table is the output projection."""
  def __init__(self, weight: PackedWeight, dtype): self.weight, self.dtype = weight, dtype
  def __call__(self, ids: Tensor) -> Tensor: return self.weight.rows(ids).cast(self.dtype)
