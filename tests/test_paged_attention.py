"""Paged decode attention against numpy: each row's query, rotated, attends over its context read through its block
table (blocks out of order, a padding row pointing at the null block), grouped-query heads, contexts of different
lengths ending mid-block. Both kernels: the CPU's one pass and the GPU's two passes, which compile for the CPU too."""
import numpy as np
import pytest
from tinygrad import Tensor
from tinyvllm.model.paged_attention import decode_attention


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("two_pass", [False, True], ids=["one_pass", "two_pass"])
def test_decode_attention_matches_numpy(two_pass: bool):
  rng = np.random.default_rng(0)
  H, KVH, D, block_size, num_blocks = 6, 2, 16, 4, 12
  k_pool, v_pool = (rng.normal(0, 1, (num_blocks * block_size, KVH, D)).astype(np.float32) for _ in range(2))
  tables = np.array([[3, 7, 1, 0], [5, 0, 0, 0], [9, 2, 11, 4], [0, 0, 0, 0]], dtype=np.int32)   # last: padding
  positions = np.array([9, 2, 15, 0], dtype=np.int32)            # the query's position: keys 0..p are visible
  S = len(tables)
  q = rng.normal(0, 2, (S, (H + 2 * KVH) * D)).astype(np.float32)   # a fused q|k|v row: q is the first H·D
  angles = rng.uniform(0, 6.3, (S, D // 2)).astype(np.float32)
  out = decode_attention(Tensor(q), Tensor(np.cos(angles)), Tensor(np.sin(angles)), (Tensor(k_pool), Tensor(v_pool)),
                         Tensor(tables), Tensor(positions.reshape(S, 1)), block_size, H, two_pass).numpy()
  for s in range(S - 1):
    slots = (tables[s, :, None] * block_size + np.arange(block_size)).reshape(-1)[:positions[s] + 1]
    qs = rope(q[s, :H * D].reshape(H, D), np.cos(angles[s]), np.sin(angles[s]))
    k, v = k_pool[slots][:, np.arange(H) // (H // KVH)], v_pool[slots][:, np.arange(H) // (H // KVH)]  # [C, H, D]
    scores = np.einsum("hd,chd->hc", qs, k) / np.sqrt(D)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("hc,chd->hd", probs / probs.sum(-1, keepdims=True), v).reshape(-1)
    np.testing.assert_allclose(out[s], expected, rtol=1e-4, atol=1e-5)
  assert np.isfinite(out[S - 1]).all()
