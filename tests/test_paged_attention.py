"""Paged decode attention against numpy: each row's query, rotated, attends over its context read through its block
table (blocks out of order, a padding row pointing at the null block), grouped-query heads, contexts of different
lengths ending mid-block, and a lone sequence with no padding row. Both kernels: the CPU's (a thread per sequence
and head) and the GPU's (a thread block per sequence and KV head). A CPU has no thread blocks, so there the GPU's
runs on tinygrad's CUDA emulator (`PYTHON::sm_80`), every thread and barrier as a GPU would run them; a GPU runs it
natively as well."""
import numpy as np
import pytest
from tinygrad import Context, Device, Tensor
from tinyvllm.model.paged_attention import decode_attention

ON_GPU = Device[Device.DEFAULT].renderer.has_local


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.fixture(params=["cpu_kernel", "gpu_kernel_emulated"] + (["gpu_kernel"] if ON_GPU else []))
def kernel(request):
  """(device, whether to run the thread-block kernel)"""
  if request.param == "gpu_kernel_emulated":
    with Context(DEV=f"{Device.DEFAULT};PYTHON::sm_80"): yield "PYTHON", True
  else: yield Device.DEFAULT, request.param == "gpu_kernel"


@pytest.mark.parametrize("H,KVH,D,block_size,lengths,padding_rows", [
  (6, 2, 32, 4, [10, 3, 16], 1),       # 3 query heads a KV head, contexts ending mid-block and at a block's end
  (4, 1, 64, 16, [150, 1, 129], 1),    # one KV head; past 4 warps × 32 tokens, so each warp takes a second chunk
  (8, 8, 32, 16, [37], 0),             # a lone sequence (batch-1 decode), one query head a KV head
])
def test_decode_attention_matches_numpy(kernel, H, KVH, D, block_size, lengths, padding_rows):
  device, thread_blocks = kernel
  rng = np.random.default_rng(0)
  blocks_per_row = -(-max(lengths) // block_size)
  S, num_blocks = len(lengths) + padding_rows, len(lengths) * blocks_per_row + 1   # block 0: the null block
  k_pool, v_pool = (rng.normal(0, 1, (num_blocks * block_size, KVH, D)).astype(np.float32) for _ in range(2))
  tables = np.zeros((S, blocks_per_row), np.int32)                           # padding rows: the null block
  tables[:len(lengths)] = (1 + rng.permutation(num_blocks - 1)).reshape(len(lengths), blocks_per_row)
  positions = np.array([n - 1 for n in lengths] + [0] * padding_rows, dtype=np.int32)  # keys 0..p visible
  q = rng.normal(0, 2, (S, (H + 2 * KVH) * D)).astype(np.float32)        # a fused q|k|v row: q is the first H·D
  angles = rng.uniform(0, 6.3, (S, D // 2)).astype(np.float32)
  on = lambda a: Tensor(a, device=device)
  out = decode_attention(on(q), on(np.cos(angles)), on(np.sin(angles)), (on(k_pool), on(v_pool)), on(tables),
                         on(positions.reshape(S, 1)), block_size, H, thread_blocks).numpy()
  for s in range(len(lengths)):
    slots = (tables[s, :, None] * block_size + np.arange(block_size)).reshape(-1)[:positions[s] + 1]
    qs = rope(q[s, :H * D].reshape(H, D), np.cos(angles[s]), np.sin(angles[s]))
    k, v = k_pool[slots][:, np.arange(H) // (H // KVH)], v_pool[slots][:, np.arange(H) // (H // KVH)]  # [C, H, D]
    scores = np.einsum("hd,chd->hc", qs, k) / np.sqrt(D)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("hc,chd->hd", probs / probs.sum(-1, keepdims=True), v).reshape(-1)
    np.testing.assert_allclose(out[s], expected, rtol=1e-4, atol=1e-5)
  assert np.isfinite(out[len(lengths):]).all()
