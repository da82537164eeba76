"""The matvec kernel (GPUs' one-row projections, kernels/matvec.py) against numpy: the plain product, with the RMSNorm
taken inside, with the residual added, with a bias; and a whole model decoding through it. On a CPU it is run
untiled (the tiling needs thread blocks); a GPU runs it tiled (`DEV=CUDA pytest tests/kernels/test_matvec.py`)."""
import numpy as np
import pytest
from tinygrad import Device, Tensor, dtypes
from tinygrad.nn import RMSNorm
from tinyvllm import LLM, SamplingParams
from tinyvllm.kernels import matvec
from tinyvllm.kernels.linear import linear


@pytest.fixture
def kernel_everywhere(monkeypatch):
  """On a CPU, take the kernel anyway, with no tiling; elsewhere, as it is."""
  if not Device[Device.DEFAULT].renderer.has_local:
    monkeypatch.setattr(matvec, "has_thread_blocks", lambda device: True)
    monkeypatch.setattr(matvec, "_tiling", lambda rows, N, K: ())


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("N,K", [(64, 1024), (96, 576), (48, 64)])   # the tilings' sizes down to the smallest
@pytest.mark.parametrize("with_norm,with_residual,with_bias", [(False, False, False), (True, False, False),
                                                              (False, True, False), (True, True, True)])
def test_matvec_equals_numpy(kernel_everywhere, rows, N, K, with_norm, with_residual, with_bias):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((rows, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32) / 16
  gain, residual = rng.uniform(0.5, 1.5, K).astype(np.float32), rng.standard_normal((rows, N)).astype(np.float32)
  bias = rng.standard_normal(N).astype(np.float32)
  dtype = dtypes.half if Device[Device.DEFAULT].renderer.has_local else dtypes.float
  as_t = lambda a: Tensor(a).cast(dtype).realize()
  norm = None
  if with_norm:
    norm = RMSNorm(K, eps=1e-5)
    norm.weight = as_t(gain)
  assert matvec.uses_matvec(as_t(x), as_t(w)) == (matvec._tiling(rows, N, K) is not None)
  got = linear(as_t(x), as_t(w), as_t(bias) if with_bias else None, norm,
               as_t(residual) if with_residual else None)
  normed = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * gain if with_norm else x
  want = normed @ w.T + (residual if with_residual else 0) + (bias if with_bias else 0)
  tol = 2e-2 if dtype == dtypes.half else 1e-4
  np.testing.assert_allclose(got.float().numpy(), want, atol=tol * np.abs(want).max(), rtol=0)


def test_many_rows_keep_the_plain_matmul():
  x, w = Tensor.ones(matvec.MAX_ROWS + 1, 64), Tensor.ones(32, 64)
  assert not matvec.uses_matvec(x, w)


def test_a_model_decodes_the_same_tokens_through_the_kernel(monkeypatch):
  """The norms and residuals llama.py hands to its projections (q/k/v, o, gate/up, down, lm_head) end up where the
  plain path puts them: greedy tokens of the tiny model alone and in a batch, with the kernel and without."""
  prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(12 + 5 * i)]} for i in range(3)]
  params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  def tokens() -> list[list[int]]:
    llm = LLM(load_format="dummy", shape="tiny", packed_weights=False, max_model_len=64)
    return [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params) + llm.generate(prompts, params)]
  plain = tokens()
  if not Device[Device.DEFAULT].renderer.has_local:
    monkeypatch.setattr(matvec, "has_thread_blocks", lambda device: True)
    monkeypatch.setattr(matvec, "_tiling", lambda rows, N, K: ())
  else: monkeypatch.setattr(matvec, "MAX_ROWS", 0)        # on a GPU, "plain" was the kernel: compare with tinygrad's
  assert tokens() == plain
