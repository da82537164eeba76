"""Projections for a few rows of x on a GPU: y = norm(x) @ W.T (+ residual), as one kernel that streams W.

A decode step at batch 1 reads every weight once and does two flops with it, so its speed is the speed at which the
weights come out of memory. tinygrad's own kernel for `x @ W.T` with one row of x gives each thread whole dot products
and reads W at 120-460 GB/s on the H100 (1.4 TB/s for the 128k-row lm_head); its BEAM search finds 0.6-2.0 TB/s
after minutes of search. This kernel is laid out the way a memory-bound matrix-vector product wants to be:

    a warp of 32 threads per output feature   each thread loads 8 consecutive fp16 weights (16 bytes) at a time, so
                                              a warp reads 512 contiguous bytes of one row per load
    4 such loads in flight per thread         (an unrolled loop): enough bytes in flight to cover memory latency
    partial sums reduced in shared memory     then one thread adds the residual and stores the feature
    4 features per thread block

and it takes the RMSNorm with it: Σ_k x_k·g_k·W_nk times the row's 1/rms, whose sum of squares is reduced in the
same loop (each warp reads all of x for its feature anyway), so neither the norm nor the normalized x is a kernel.
The tiling is given as tinygrad's own optimizer options (`Opt`), applied to a kernel written with the UOp API, so it
compiles for every backend with thread blocks (CUDA, Metal, AMD, ...); linear.py sends a CPU to tinygrad's matmul,
which fuses the norm and the residual by itself.

H100, Llama-1B's matrices, one row of x, fp16, GB/s of weights read (docs/performance.md):

                    q/k/v     o    gate/up   down   lm_head
    tinygrad          119   207       456    217     1390
    tinygrad BEAM=2   632   689      1510    899     2060
    this kernel       940   880      1520   1180     2300

so batch-1 decode of that shape went from 121 to 471–497 tok/s without BEAM (625–687 with BEAM on the other
kernels).
"""
from __future__ import annotations
import functools
from tinygrad import Context, Device, Tensor, UOp, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.nn import RMSNorm
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

MAX_ROWS = 4            # rows of x up to which the kernel is used (each thread computes all of them)
WARP = 32
VECTOR = 8              # fp16 weights per 16-byte load
IN_FLIGHT = 4           # loads of a thread unrolled into one loop iteration
FEATURES_PER_BLOCK = 4


def uses_matvec(x: Tensor, weight: Tensor) -> bool:
  """Whether the matvec kernel serves these operands (a single-device GPU weight, a few rows)."""
  rows = x.numel() // x.shape[-1]
  return isinstance(weight.device, str) and rows <= MAX_ROWS and has_thread_blocks(weight.device) \
    and _tiling(rows, *weight.shape) is not None


def matvec(x: Tensor, weight: Tensor, bias: Tensor | None = None, norm: RMSNorm | None = None,
           residual: Tensor | None = None) -> Tensor:
  """norm(x) @ weight.T + bias (+ residual), x (..., K) -> (..., N); the caller checked `uses_matvec`."""
  (N, K), lead = weight.shape, x.shape[:-1]
  rows = x.reshape(-1, K)
  extras = ([] if norm is None else [norm.weight]) + ([] if residual is None else [residual.reshape(-1, N)])
  out = Tensor.invalids(rows.shape[0], N, dtype=x.dtype, device=x.device)
  norm_eps = None if norm is None else norm.eps
  kernel = lambda *bufs: _matvec_kernel(*bufs, norm_eps=norm_eps, residual=residual is not None)
  y = out.custom_kernel(rows, weight, *extras, fxn=kernel)[0].reshape(*lead, N)
  return y if bias is None else y + bias


@functools.cache
def has_thread_blocks(device: str | tuple[str, ...]) -> bool:
  """Whether a device runs kernels as blocks of threads with shared memory: a GPU, to tinygrad."""
  # asked while tinygrad traces a layer, where it refuses to open a device; this one is open (the weight is on it)
  with Context(ALLOW_DEVICE_USAGE=1): renderer = Device[device if isinstance(device, str) else device[0]].renderer
  return renderer.has_local and renderer.has_shared


def _tiling(rows: int, N: int, K: int) -> tuple[Opt, ...] | None:
  """The optimizer options of the layout above, shrunk to what divides K and N (None: none fits)."""
  for vector, warp, in_flight in ((VECTOR, WARP, IN_FLIGHT), (VECTOR, WARP, 2), (VECTOR, WARP, 1), (4, WARP, 1),
                                  (VECTOR, 16, 1), (4, 16, 1)):
    if K % (vector * warp * in_flight) == 0 and N % FEATURES_PER_BLOCK == 0: break
  else: return None
  feature_axis = 0 if rows == 1 else 1                    # a one-row x has no row axis
  opts = [Opt(OptOps.UNROLL, 0, vector), Opt(OptOps.GROUP, 0, warp)]
  if in_flight > 1: opts.append(Opt(OptOps.UNROLL, 1, in_flight))   # axis 1: the loop left after the group's split
  opts.append(Opt(OptOps.LOCAL, feature_axis, FEATURES_PER_BLOCK))
  if rows > 1: opts.append(Opt(OptOps.UPCAST, 0, rows))
  return tuple(opts)


def _matvec_kernel(out: UOp, x: UOp, w: UOp, *extras: UOp, norm_eps: float | None, residual: bool) -> UOp:
  """out[b, n] = Σ_k x[b, k]·w[n, k] (with a norm: ·g[k] in the sum, times 1/rms(x[b])) (+ residual[b, n])."""
  (B, N), K = out.shape, w.shape[1]
  b, n, k = UOp.range(B, 0), UOp.range(N, 1), UOp.range(K, 2, AxisType.REDUCE)
  xk = x[b, k].cast(dtypes.float)
  scaled = xk if norm_eps is None else xk * extras[0][k].cast(dtypes.float)
  acc = (scaled * w[n, k].cast(dtypes.float)).reduce(k, arg=Ops.ADD)
  if norm_eps is not None:   # the row's sum of squares rides along: a warp reads all of x[b] for its feature anyway
    acc = acc * ((xk * xk).reduce(k, arg=Ops.ADD) / K + norm_eps).rsqrt()
  if residual: acc = acc + extras[-1][b, n].cast(dtypes.float)
  info = KernelInfo(name=f"matvec_{N}_{K}", opts_to_apply=_tiling(B, N, K))
  return out[b, n].store(acc.cast(out.dtype)).end(b, n).sink(arg=info)
