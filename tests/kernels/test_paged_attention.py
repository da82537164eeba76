"""Paged attention against numpy: each token's query, rotated, attends over its sequence's context up to its own
position (or a block's tokens up to the block's end: both ways, as a diffusion LM's block attends), read through the sequence's block table (blocks out of order, tables narrower than the buffer that holds
them, a padding token pointing at the null block): grouped-query heads, contexts of different lengths ending
mid-block, several tokens of one sequence (a prompt chunk, causal), and a lone token. Three ways: the CPU's kernel
(a thread per token and head), the GPU's (a thread block per token and KV head), and the readable reference (a
dense copy of each token's context, then tinygrad's attention). A CPU has no thread blocks, so there the GPU's
runs on tinygrad's CUDA and Metal emulators (`PYTHON::sm_80`, `PYTHON::METAL`: an Apple laptop's GPU), every thread
and barrier as a GPU would run them; a GPU runs it natively as well."""
import numpy as np
import pytest
from tinygrad import Context, Device, Tensor
from tinygrad import dtypes
from tinyvllm.model.llama import apply_rope
from tinyvllm.kernels.paged_attention import BlockTables, NewKV, attention, context_blocks, paged_attention, write_and_gather

ON_GPU = Device[Device.DEFAULT].renderer.has_local


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


EMULATED = {"gpu_kernel_emulated": "sm_80", "gpu_kernel_metal_emulated": "METAL"}    # tinygrad's CUDA and Metal


@pytest.fixture(params=["cpu_kernel", *EMULATED, "reference"] + (["gpu_kernel"] if ON_GPU else []))
def kernel(request):
  """(device, which way: the thread-block kernel True, the CPU's False, the dense reference None)"""
  if request.param in EMULATED:
    with Context(DEV=f"{Device.DEFAULT};PYTHON::{EMULATED[request.param]}"): yield "PYTHON", True
  else: yield Device.DEFAULT, {"gpu_kernel": True, "cpu_kernel": False, "reference": None}[request.param]


@pytest.mark.parametrize("H,KVH,D,block_size,lengths,queries,padding,both_ways,window", [
  (6, 2, 32, 4, [10, 3, 16], [1, 1, 1], 1, False, None),  # 3 query heads a KV head, contexts ending mid-block and at its end
  (4, 1, 64, 16, [150, 1, 129], [1, 1, 3], 1, False, None),  # past 4 warps × 32 tokens (a second chunk a warp); a 3-token chunk
  (8, 8, 32, 16, [37], [1], 0, False, None),       # a lone token (batch-1 decode), one query head a KV head
  (4, 2, 32, 4, [9, 20], [9, 5], 2, False, None),   # a whole prompt and a chunk of another: each token sees up to itself
  (4, 2, 32, 4, [20, 9], [6, 1], 1, True, None),    # a block that sees itself both ways (diffusion), beside a decode
  (4, 1, 64, 16, [150, 7], [3, 1], 1, False, 37),   # a sliding window: past a warp's chunk, and longer than a context
])
def test_paged_attention_matches_numpy(kernel, H, KVH, D, block_size, lengths, queries, padding, both_ways, window):
  """Each token sees the keys up to its limit: its own position (causal), or with `both_ways` the last position of
  its sequence's chunk, the keys after it included; with a sliding window, only the last `window` of those."""
  device, thread_blocks = kernel
  rng = np.random.default_rng(0)
  blocks = -(-max(lengths) // block_size)
  max_blocks, R = blocks + 3, len(lengths)                    # the buffer is wider than the step's tables
  num_blocks = R * blocks + 1                                 # block 0: the null block
  k_pool, v_pool = (rng.normal(0, 1, (num_blocks * block_size, KVH, D)).astype(np.float32) for _ in range(2))
  tables = (1 + rng.permutation(num_blocks - 1)).reshape(R, blocks).astype(np.int32)
  rows = np.array([r for r, n in enumerate(queries) for _ in range(n)] + [0] * padding, np.int32)
  positions = np.array([p for L, n in zip(lengths, queries) for p in range(L - n, L)] + [0] * padding, np.int32)
  limits = np.array([L - 1 if both_ways else p for L, n in zip(lengths, queries) for p in range(L - n, L)]
                    + [0] * padding, np.int32)
  T = len(rows)
  q = rng.normal(0, 2, (T, (H + 2 * KVH) * D)).astype(np.float32)        # a fused q|k|v row: q is the first H·D
  angles = rng.uniform(0, 6.3, (T, D // 2)).astype(np.float32)
  on = lambda a: Tensor(a, device=device)
  flat = np.zeros(R * max_blocks, np.int32)
  flat[:R * blocks] = tables.reshape(-1)
  bound = Tensor.full((1,), context_blocks(max_blocks).bind(blocks), dtype=dtypes.int32, device=device)
  bt = BlockTables(on(flat), on(rows), bound, block_size, max_blocks)
  cos, sin, pools = on(np.cos(angles)), on(np.sin(angles)), (on(k_pool), on(v_pool))
  if thread_blocks is None:       # the reference: write nothing (the null slot), gather, tinygrad's attention
    none = Tensor.zeros(1, KVH * D, device=device).contiguous()
    k, v = write_and_gather(pools, NewKV(none, none, 0, 0, cos[:1], sin[:1]), on(np.zeros(1, np.int32)), bt)
    rotated = apply_rope(on(q)[:, :H * D].reshape(T, H, D), cos, sin)
    out = attention(rotated.reshape(T, 1, H, D), k, v, on(limits).reshape(T, 1), window).reshape(T, H * D).numpy()
  else: out = paged_attention(on(q), cos, sin, pools, bt, on(limits), H, thread_blocks, window=window).numpy()
  for t in range(T - padding):
    table = tables[rows[t]]
    slots = (table[:, None] * block_size + np.arange(block_size)).reshape(-1)[:limits[t] + 1]
    if window is not None: slots = slots[-window:]
    qs = rope(q[t, :H * D].reshape(H, D), np.cos(angles[t]), np.sin(angles[t]))
    k, v = k_pool[slots][:, np.arange(H) // (H // KVH)], v_pool[slots][:, np.arange(H) // (H // KVH)]  # [C, H, D]
    scores = np.einsum("hd,chd->hc", qs, k) / np.sqrt(D)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("hc,chd->hd", probs / probs.sum(-1, keepdims=True), v).reshape(-1)
    np.testing.assert_allclose(out[t], expected, rtol=1e-4, atol=1e-5)
  assert np.isfinite(out[T - padding:]).all()


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_store_kv_rotates_k_and_reads_it_in_place_from_a_fused_projection(kernels):
  """`store_kv(kv, rope(k), v, slots)` with k and v split from one q|k|v output puts rotated K and V at their slots
  and nothing anywhere else. The fast way is one kernel, reading k and v where they are and rotating K on the way;
  the reference rotates K with tinygrad's operations first, a kernel of its own."""
  from tinygrad import GlobalCounters
  from tinyvllm.kernels.linear import use_kernels
  from tinyvllm.kernels.paged_attention import rope as rotated, store_kv
  rng = np.random.default_rng(1)
  T, H, KVH, D, num_slots = 3, 4, 2, 16, 10
  qkv = rng.normal(0, 1, (T, (H + 2 * KVH) * D)).astype(np.float32)
  angles = rng.uniform(0, 6.3, (T, D // 2)).astype(np.float32)
  slots = np.array([7, 2, 5], np.int32)
  fused, cos, sin, on_device = (Tensor(a).realize() for a in (qkv, np.cos(angles), np.sin(angles), slots))
  pools = tuple(Tensor.zeros(num_slots, KVH, D).contiguous().realize() for _ in range(2))
  q, k, v = fused.split([H * D, KVH * D, KVH * D], dim=-1)
  GlobalCounters.reset()
  with use_kernels(kernels): k_pool, v_pool = store_kv(pools, rotated(k, cos, sin), v, on_device)
  Tensor.realize(k_pool, v_pool)
  assert GlobalCounters.kernel_count == (1 if kernels == "fast" else 2)
  k_pool, v_pool = k_pool.numpy(), v_pool.numpy()
  want_k, want_v = np.zeros((num_slots, KVH, D), np.float32), np.zeros((num_slots, KVH, D), np.float32)
  want_k[slots] = rope(qkv[:, H * D:(H + KVH) * D].reshape(T, KVH, D), np.cos(angles)[:, None], np.sin(angles)[:, None])
  want_v[slots] = qkv[:, (H + KVH) * D:].reshape(T, KVH, D)
  np.testing.assert_allclose(k_pool, want_k, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(v_pool, want_v)
