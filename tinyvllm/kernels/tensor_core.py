"""Projections of many rows of x on a GPU's tensor cores: y = x @ W.T as one tiled kernel (or two, when K is split).

A batch of 256 decoding sequences, or a prefill chunk of thousands of tokens, turns each projection into a real
matrix product: there is arithmetic to do with every weight read, and the GPU's tensor cores do it. On CUDA one
`mma.sync` instruction has a warp of 32 threads multiply a 16×16 block of x by a 16×8 block of W.T, each lane
holding a few elements of each (its *fragments*). The kernel is the classic shared-memory GEMM:

    a thread block computes a block_m × block_n tile of y, walking K in steps of block_k:
      1. its threads copy the block_m × block_k slice of x and the block_n × block_k slice of W from global memory
         into shared memory, 8 consecutive halves per thread per vector, every byte fetched once for the block
      2. each warp computes a (block_m / warps_m) × (block_n / warps_n) part of the tile: it reads its fragments
         out of shared memory (rows padded by 8 halves, so the 32 lanes hit 32 different banks) and issues
         one mma per 16×8 piece of its part, accumulating in float32 registers
      3. while the mma run, the next step's slices are already loading into registers (*prefetch*): they go to
         shared memory after a barrier, so the tensor cores never wait on a global load
    split-K when there are too few tiles: y = 256 × 2048 is 32 tiles of 128 × 128 for an H100's 132 SMs, so K is
    split into slices, each block sums one slice of its tile into a float32 partial product, and a small second
    kernel adds the slices

tinygrad's own tensor-core kernels load the fragments straight from global memory, which caps them at ~120 TFLOP/s
on an H100 (docs/performance.md); this one is written out with the UOp API (thread indices, shared and
register buffers, barriers, the mma op), so tinygrad only renders it. H200, 256 rows of x (a decode step at batch
256), TFLOP/s with the split-K sum (docs/performance.md, where the tiling below comes from):

                      q/k/v    gate/up   down   lm_head
    tinygrad's mma,     66        94       83       96
    tiled by hand
    this kernel        113       185      169      229

The kernel is written for CUDA's m16n8k16 instruction and its fragment layout; other backends (Metal's 8×8
simdgroup matrices, AMD's WMMA, a CPU) keep tinygrad's matmul, as does any shape the tiles do not divide.
tinygrad's CUDA emulator (`DEV=PYTHON::sm_80`) runs it on a CPU, which is how the tests check it.
"""
from __future__ import annotations
import functools
from dataclasses import dataclass
from tinygrad import Context, Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace, DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

MMA_SHAPE = (8, 16, 16)     # tinygrad's (N, M, K) of the instruction the kernel is written for
WARP = 32
VECTOR = 8                  # fp16/bf16 elements per 16-byte load
PAD = 8                     # halves of padding per shared-memory row: fragment loads free of bank conflicts
BLOCKS_TO_FILL_GPU = 264    # two thread blocks per SM of an H100: with fewer tiles than this, K is split
MAX_SPLIT = 8


@dataclass(frozen=True)
class Tiling:
  """A block_m × block_n tile of y per thread block of warps_m × warps_n warps, K in steps of block_k, split in
  `split` slices."""
  block_m: int
  block_n: int
  block_k: int
  warps_m: int
  warps_n: int
  split: int = 1


@functools.cache
def has_mma(device: str, dtype: DType) -> bool:
  """Whether `device` multiplies `dtype` matrices with the m16n8k16 instruction, accumulating in float32."""
  with Context(ALLOW_DEVICE_USAGE=1): tensor_cores = Device[device].renderer.tensor_cores
  return any(tc.dims == MMA_SHAPE and tc.dtype_in == dtype and tc.dtype_out == dtypes.float for tc in tensor_cores)


def uses_tensor_cores(x: Tensor, weight: Tensor) -> bool:
  """Whether the tensor-core kernel serves these operands (a single-device weight on a GPU with the instruction, a
  shape the tiles divide)."""
  rows = x.numel() // x.shape[-1]
  return isinstance(weight.device, str) and weight.dtype == x.dtype and has_mma(weight.device, weight.dtype) \
    and tiling(rows, *weight.shape) is not None


def matmul(x: Tensor, weight: Tensor) -> Tensor:
  """x @ weight.T, x (..., K) -> (..., N), on the tensor cores; the caller checked `uses_tensor_cores`."""
  (N, K), lead = weight.shape, x.shape[:-1]
  rows = x.reshape(-1, K)
  t = tiling(rows.shape[0], N, K)
  out = Tensor.invalids(*((t.split,) if t.split > 1 else ()), rows.shape[0], N,
                     dtype=dtypes.float if t.split > 1 else x.dtype, device=x.device)
  y = out.custom_kernel(rows, weight, fxn=lambda *bufs: _kernel(*bufs, t=t))[0]
  return (y.sum(0).cast(x.dtype) if t.split > 1 else y).reshape(*lead, N)


def tiling(M: int, N: int, K: int) -> Tiling | None:
  """The tiling for y[M, N] = x[M, K] @ W[N, K].T (None: no tile divides the shape)."""
  block_m = next((b for b in (128, 64, 32, 16) if M % b == 0), None)   # any prefill bucket (16 rows)
  block_n = next((b for b in (128, 64) if N % b == 0), None)
  block_k = next((b for b in (64, 32) if K % b == 0), None)
  if block_m is None or block_n is None or block_k is None: return None
  blocks, split = (M // block_m) * (N // block_n), 1
  while split < MAX_SPLIT and blocks * split * 2 <= BLOCKS_TO_FILL_GPU and K % (block_k * split * 2) == 0: split *= 2
  return Tiling(block_m, block_n, block_k, warps_m=2 if block_m >= 64 else 1, warps_n=2, split=split)


def _kernel(out: UOp, x: UOp, w: UOp, t: Tiling) -> UOp:
  """out[m, n] = Σ_k x[m, k]·w[n, k] as described above; split, out[s, m, n] = the sum over slice s of K (float32)."""
  (M, K), N = x.shape, w.shape[0]
  threads = WARP * t.warps_m * t.warps_n
  part_m, part_n = t.block_m // t.warps_m, t.block_n // t.warps_n     # the part of the tile one warp computes
  mmas_m, mmas_n = part_m // 16, part_n // 8                           # ... in this many 16 × 8 pieces
  tile_n, tile_m = UOp.special(N // t.block_n, "gidx0"), UOp.special(M // t.block_m, "gidx1")
  piece = UOp.special(t.split, "gidx2") if t.split > 1 else None     # which slice of K, when it is split
  thread = UOp.special(threads, "lidx0")
  warp, lane = thread // WARP, thread % WARP
  warp_m, warp_n = warp // t.warps_n, warp % t.warps_n
  group, pair = lane // 4, lane % 4        # the mma fragment layout: lanes in 8 groups of 4
  steps = K // t.split // t.block_k
  step = UOp.range(steps, 0, AxisType.REDUCE)
  k_at = lambda s: s * t.block_k + (0 if piece is None else piece * (K // t.split))   # the first k of step s

  # a rows × block_k slice as 16-byte vectors: thread j owns vectors j, j + threads, ...; (i, e) is element e of its
  # i-th vector, (r, c) where that element sits in the slice
  def vectors(rows: int, axis: int) -> tuple[UOp, UOp, UOp, UOp]:
    per_row = t.block_k // VECTOR
    i, e = UOp.range(rows * per_row // threads, axis, AxisType.UPCAST), UOp.range(VECTOR, axis + 1, AxisType.UPCAST)
    v = thread + i * threads
    return i, e, v // per_row, v % per_row * VECTOR + e
  def load(src: UOp, row0: UOp, rows: int, s: UOp, dst: UOp, axis: int, into_registers: bool) -> UOp:
    i, e, r, c = vectors(rows, axis)
    return (dst[i, e] if into_registers else dst[r, c]).store(src[row0 + r, k_at(s) + c]).end(i, e)
  def to_shared(held: UOp, rows: int, dst: UOp, axis: int) -> UOp:
    i, e, r, c = vectors(rows, axis)
    return dst[r, c].store(held[i, e]).end(i, e)

  x0, w0 = tile_m * t.block_m, tile_n * t.block_n          # the first rows of x and of W this block reads
  xs = UOp.placeholder((t.block_m, t.block_k + PAD), x.dtype, slot=0, addrspace=AddrSpace.LOCAL)
  ws = UOp.placeholder((t.block_n, t.block_k + PAD), w.dtype, slot=1, addrspace=AddrSpace.LOCAL)
  held = lambda rows, dtype, slot: UOp.placeholder((rows * t.block_k // VECTOR // threads, VECTOR), dtype, slot=slot,
                                                   addrspace=AddrSpace.REG)
  x_next, w_next = held(t.block_m, x.dtype, 1), held(t.block_n, w.dtype, 2)
  acc = UOp.placeholder((mmas_m, mmas_n, 4), dtypes.float, slot=0, addrspace=AddrSpace.REG)
  j = UOp.range(mmas_m * mmas_n * 4, 100)
  acc = acc.after(acc.reshape(-1)[j].store(0.0).end(j))

  # step 0's slices go straight to shared memory; inside the loop, step s reads shared memory (written by step
  # s - 1, or before the loop) while step s + 1's slices load into registers
  first = UOp.barrier(UOp.group(load(x, x0, t.block_m, 0, xs, 10, False), load(w, w0, t.block_n, 0, ws, 20, False)))
  xs, ws = xs.after(first, step), ws.after(first, step)
  following = (step + 1).minimum(steps - 1)
  prefetch = UOp.group(load(x, x0, t.block_m, following, x_next.after(step), 30, True),
                       load(w, w0, t.block_n, following, w_next.after(step), 40, True))

  # the warp's fragments (PTX's m16n8k16 layout): lane (group, pair) holds x at rows group and group + 8 of each
  # 16-row piece, columns 2·pair, 2·pair + 1 and those + 8; W at row group of each 8-row piece, the same columns
  kk = UOp.range(t.block_k // 16, 1, AxisType.REDUCE)
  x_frag = [UOp.stack(*[xs[warp_m * part_m + a * 16 + group + (e // 2 % 2) * 8, kk * 16 + pair * 2 + e % 2 + e // 4 * 8]
                        for e in range(8)]) for a in range(mmas_m)]
  w_frag = [UOp.stack(*[ws[warp_n * part_n + b * 8 + group, kk * 16 + pair * 2 + e % 2 + e // 2 * 8] for e in range(4)])
            for b in range(mmas_n)]
  before = acc.after(step, prefetch, kk)
  sums = []
  for a in range(mmas_m):
    for b in range(mmas_n):
      c = UOp.stack(*[before[a, b, q] for q in range(4)])
      d = UOp(Ops.WMMA, src=(x_frag[a], w_frag[b], c), arg=(MMA_SHAPE, x.dtype, "CUDA", WARP, None))
      sums += [acc[a, b, q].store(d[q]) for q in range(4)]
  computed = UOp.barrier(UOp.group(*sums).end(kk))
  stored = UOp.barrier(UOp.group(to_shared(x_next.after(prefetch).after(computed), t.block_m, xs, 50),
                                 to_shared(w_next.after(prefetch).after(computed), t.block_n, ws, 60)))
  acc = acc.after(stored.end(step))

  # lane (group, pair) holds y at rows group, group + 8 and columns 2·pair, 2·pair + 1 of each mma piece
  results = []
  for a in range(mmas_m):
    for b in range(mmas_n):
      for q in range(4):
        row = x0 + warp_m * part_m + a * 16 + group + q // 2 * 8
        col = w0 + warp_n * part_n + b * 8 + pair * 2 + q % 2
        results.append((out[row, col] if piece is None else out[piece, row, col]).store(acc[a, b, q].cast(out.dtype)))
  name = f"mma_{N}_{K}_{t.block_m}x{t.block_n}x{t.block_k}" + (f"_split{t.split}" if t.split > 1 else "")
  return UOp.group(*results).sink(arg=KernelInfo(name=name, opts_to_apply=()))
