"""The tensor-core kernel (GPUs' many-row projections, model/tensor_core.py): its sums against numpy, whole and split
along K; the tilings it picks; and a whole model's greedy tokens through it. A CPU has no mma instruction, so there
the kernel is forced on without its tiling; a GPU runs it tiled (`DEV=CUDA pytest tests/test_tensor_core.py`)."""
import numpy as np
import pytest
from tinygrad import Device, Tensor, dtypes
from tinyvllm import LLM, SamplingParams
from tinyvllm.model import tensor_core
from tinyvllm.model.linear import linear

ON_GPU = Device[Device.DEFAULT].renderer.has_local


def force_kernel(monkeypatch, split: int | None = None) -> None:
  """On a CPU, take the kernel anyway: no options, K split `split` ways (or as the tiling would split it)."""
  if ON_GPU: return
  monkeypatch.setattr(tensor_core, "has_mma", lambda device, dtype: True)
  tiling = tensor_core._tiling
  monkeypatch.setattr(tensor_core, "_tiling", lambda M, N, K: None if (t := tiling(M, N, K)) is None
                      else ((), t[1] if split is None else split))


@pytest.mark.parametrize("M,N,K", [(256, 3072, 2048), (64, 128, 64), (48, 960, 576)])
@pytest.mark.parametrize("split", [1, 2, 8])
def test_matmul_equals_numpy(monkeypatch, M, N, K, split):
  force_kernel(monkeypatch, split)
  if ON_GPU and split > 1: pytest.skip("a GPU splits K as its tiling says")
  rng = np.random.default_rng(M + split)
  x, w = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32) / 16
  dtype = dtypes.half if ON_GPU else dtypes.float
  xt, wt = Tensor(x).cast(dtype).realize(), Tensor(w).cast(dtype).realize()
  assert tensor_core.uses_tensor_cores(xt, wt) or (ON_GPU and not tensor_core.has_mma(wt.device, dtype))
  got = tensor_core.matmul(xt, wt).float().numpy()
  want = x @ w.T
  tol = 1e-2 if ON_GPU else 1e-5
  np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


def test_linear_adds_bias_and_residual_after_the_kernel(monkeypatch):
  force_kernel(monkeypatch)
  rng = np.random.default_rng(1)
  x, w = rng.standard_normal((64, 128)).astype(np.float32), rng.standard_normal((256, 128)).astype(np.float32) / 16
  bias, residual = rng.standard_normal(256).astype(np.float32), rng.standard_normal((64, 256)).astype(np.float32)
  dtype = dtypes.half if ON_GPU else dtypes.float
  as_t = lambda a: Tensor(a).cast(dtype).realize()
  got = linear(as_t(x), as_t(w), as_t(bias), residual=as_t(residual)).float().numpy()
  want = x @ w.T + bias + residual
  np.testing.assert_allclose(got, want, atol=(1e-2 if ON_GPU else 1e-5) * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("M,N,K", [(256, 3072, 2048), (256, 2048, 8192), (256, 16384, 2048), (256, 128256, 2048),
                                   (8192, 2048, 8192), (32, 576, 1536), (64, 960, 576), (17, 2048, 2048)])
def test_tiling_fills_the_gpu_and_divides_the_shape(M, N, K):
  opts, split = tensor_core._tiling(M, N, K)
  sizes = {o.op.name + str(o.axis): o.arg for o in opts[1:]}
  rows, cols = sizes.get("UPCAST0", 1), sizes["UPCAST1"]
  assert M % (16 * rows) == 0 or rows == 1                       # row tiles divide M (a ragged M is padded)
  assert N % (8 * cols * sizes["LOCAL1"]) == 0 and K % (16 * split) == 0
  warps = -(-M // (16 * rows)) * (N // (8 * cols))
  assert warps * split <= max(warps, tensor_core.WARPS_TO_FILL_GPU)      # split only to fill the GPU, no further
  assert split == tensor_core.MAX_SPLIT or warps * split * 2 > tensor_core.WARPS_TO_FILL_GPU or K % (32 * split)


def test_shapes_the_tiles_do_not_fit_keep_tinygrads_matmul():
  assert tensor_core._tiling(16, 2048, 2048) is None          # one row of mma tiles
  assert tensor_core._tiling(256, 100, 2048) is None          # N not a multiple of 64
  assert tensor_core._tiling(256, 2048, 40) is None           # K not a multiple of 16


def test_a_model_computes_the_same_logprobs_through_the_kernel(monkeypatch):
  """Prefill chunks of more than 16 rows go through the kernel: the tiny model's greedy tokens and the logprobs of
  every prompt token (random weights make greedy tokens repeat, so the logprobs are what can tell), with the kernel
  and without it."""
  prompts = [{"prompt_token_ids": [(5 * i + 11 * j) % 500 + 1 for j in range(20 + 7 * i)]} for i in range(3)]
  params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
  def run() -> tuple[list[list[int]], np.ndarray]:
    llm = LLM(load_format="dummy", shape="tiny", packed_weights=False, max_model_len=64)
    outs = llm.generate(prompts, params)
    logprobs = [lp for o in outs for position in o.prompt_logprobs[1:] for lp in position.values()]
    return [o.outputs[0].token_ids for o in outs], np.array(logprobs)
  with_kernel_on_gpu = run()
  if ON_GPU: monkeypatch.setattr(tensor_core, "has_mma", lambda device, dtype: False)
  else: force_kernel(monkeypatch)
  tokens, logprobs = run()
  assert tokens == with_kernel_on_gpu[0]
  np.testing.assert_allclose(logprobs, with_kernel_on_gpu[1], atol=5e-2 if ON_GPU else 1e-4)
