"""The tensor-core kernel (GPUs' many-row projections, kernels/tensor_core.py): its sums against numpy, whole and split
along K, one step of K and many; the tilings it picks; and on a GPU, a whole model's logprobs through it.

A CPU has no mma instruction: there the kernel runs on tinygrad's CUDA emulator (the PYTHON device as an sm_80,
bfloat16, since the emulator has no half on this Python), which executes the kernel's every thread, barrier and mma
fragment as a GPU would. A GPU runs it natively as well (`DEV=CUDA pytest tests/kernels/test_tensor_core.py`)."""
import numpy as np
import pytest
from tinygrad import Context, Device, Tensor, dtypes
from tinyvllm import LLM, SamplingParams
from tinyvllm.kernels import tensor_core
from tinyvllm.kernels.linear import linear
from tinyvllm.kernels.tensor_core import Tiling

ON_GPU = Device[Device.DEFAULT].renderer.has_local


@pytest.fixture(params=["emulated"] + (["native"] if ON_GPU else []))
def device_and_dtype(request):
  """(device, dtype) to run the kernel on: the CUDA emulator, and the GPU itself when there is one."""
  if request.param == "native":
    yield Device.DEFAULT, dtypes.half
    return
  with Context(DEV=f"{Device.DEFAULT};PYTHON::sm_80"): yield "PYTHON", dtypes.bfloat16


def operands(M: int, N: int, K: int, device: str, dtype) -> tuple[Tensor, Tensor, np.ndarray]:
  """Random x (M, K) and W (N, K) on `device`, and x @ W.T of their rounded values in float32."""
  rng = np.random.default_rng(M * N + K)
  x, w = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32) / 16
  xt, wt = Tensor(x, device=device).cast(dtype).realize(), Tensor(w, device=device).cast(dtype).realize()
  return xt, wt, xt.float().numpy() @ wt.float().numpy().T


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
  # the output is rounded to the inputs' dtype: bfloat16 keeps 8 bits of mantissa, so ~0.4 % of the largest value
  np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("M,N,K,t", [
  (32, 64, 32, Tiling(32, 64, 32, warps_m=1, warps_n=2)),              # one step of K: no prefetch to speak of
  (32, 64, 128, Tiling(32, 64, 32, warps_m=1, warps_n=2)),             # four steps, each prefetching the next
  (32, 64, 64, Tiling(32, 64, 16, warps_m=1, warps_n=2)),             # one mma along K a step, one vector a thread
  (48, 64, 64, Tiling(16, 64, 64, warps_m=1, warps_n=2)),             # one mma piece of rows a warp, 3 row tiles
  (64, 128, 96, Tiling(64, 64, 32, warps_m=2, warps_n=2)),             # 2 × 2 tiles of 2 × 2 warps
  (32, 128, 256, Tiling(32, 128, 32, warps_m=1, warps_n=2, split=4)),  # K in four slices, then their sum
  (128, 64, 64, Tiling(128, 64, 32, warps_m=2, warps_n=2, split=2))])
def test_matmul_equals_numpy(monkeypatch, device_and_dtype, M, N, K, t):
  monkeypatch.setattr(tensor_core, "tiling", lambda *shape: t)
  x, w, want = operands(M, N, K, *device_and_dtype)
  assert tensor_core.uses_tensor_cores(x, w)
  assert_close(tensor_core.matmul(x, w).float().numpy(), want)


def test_the_chosen_tiling_computes_it_too(device_and_dtype):
  x, w, want = operands(64, 256, 512, *device_and_dtype)
  assert tensor_core.tiling(64, 256, 512).split > 1
  assert_close(tensor_core.matmul(x.reshape(2, 32, 512), w).reshape(64, 256).float().numpy(), want)


def test_linear_adds_bias_and_residual_after_the_kernel(device_and_dtype):
  device, dtype = device_and_dtype
  x, w, product = operands(32, 64, 64, device, dtype)
  rng = np.random.default_rng(1)
  bias, residual = rng.standard_normal(64).astype(np.float32), rng.standard_normal((32, 64)).astype(np.float32)
  as_t = lambda a: Tensor(a, device=device).cast(dtype).realize()
  assert tensor_core.uses_tensor_cores(x, w)
  got = linear(x, w, as_t(bias), residual=as_t(residual)).float().numpy()
  assert_close(got, product + as_t(bias).float().numpy() + as_t(residual).float().numpy())


@pytest.mark.parametrize("M,N,K", [(256, 3072, 2048), (256, 2048, 8192), (256, 16384, 2048), (256, 128256, 2048),
                                   (8192, 2048, 8192), (32, 576, 1536), (64, 960, 576), (96, 2048, 2048), (48, 960, 576)])
def test_tiling_fills_the_gpu_and_divides_the_shape(M, N, K):
  t = tensor_core.tiling(M, N, K)
  assert M % t.block_m == 0 and N % t.block_n == 0 and K % (t.block_k * t.split) == 0
  assert t.block_m % (16 * t.warps_m) == 0 and t.block_n % (8 * t.warps_n) == 0     # whole mma pieces per warp
  threads, vectors_per_row = 32 * t.warps_m * t.warps_n, t.block_k // tensor_core.VECTOR
  assert (t.block_m * vectors_per_row) % threads == 0 and (t.block_n * vectors_per_row) % threads == 0
  blocks = (M // t.block_m) * (N // t.block_n)
  assert blocks * t.split <= max(blocks, tensor_core.BLOCKS_TO_FILL_GPU)   # split only to fill the GPU, no further
  assert t.split == tensor_core.MAX_SPLIT or blocks * t.split * 2 > tensor_core.BLOCKS_TO_FILL_GPU \
    or K % (t.block_k * t.split * 2)


def test_shapes_the_tiles_do_not_fit_keep_tinygrads_matmul():
  assert tensor_core.tiling(8, 2048, 2048) is None           # fewer rows than one mma piece
  assert tensor_core.tiling(40, 2048, 2048) is None          # rows not a multiple of 16
  assert tensor_core.tiling(256, 100, 2048) is None          # N not a multiple of 64
  assert tensor_core.tiling(256, 2048, 48) is None           # K not a multiple of 32
  with Context(DEV=f"{Device.DEFAULT};PYTHON::sm_80"):      # the instruction takes half and bfloat16, not float32
    x, w, _ = operands(32, 64, 64, "PYTHON", dtypes.float)
    assert not tensor_core.uses_tensor_cores(x, w)


@pytest.mark.skipif(not ON_GPU, reason="the emulator would take minutes over a whole model")
def test_a_model_computes_the_same_logprobs_through_the_kernel(monkeypatch):
  """Prefill chunks (multiples of 16 rows) go through the kernel: the tiny model's greedy tokens and the logprobs of
  every prompt token (random weights make greedy tokens repeat, so the logprobs are what can tell), with the kernel
  and without it."""
  prompts = [{"prompt_token_ids": [(5 * i + 11 * j) % 500 + 1 for j in range(32 + 7 * i)]} for i in range(3)]
  params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
  def run() -> tuple[list[list[int]], np.ndarray]:
    llm = LLM(load_format="dummy", shape="tiny", packed_weights=False, max_model_len=64)
    outs = llm.generate(prompts, params)
    logprobs = [lp for o in outs for position in o.prompt_logprobs[1:] for lp in position.values()]
    return [o.outputs[0].token_ids for o in outs], np.array(logprobs)
  with_kernel = run()
  monkeypatch.setattr(tensor_core, "has_mma", lambda device, dtype: False)
  tokens, logprobs = run()
  assert tokens == with_kernel[0]
  np.testing.assert_allclose(logprobs, with_kernel[1], atol=5e-2)
