"""Apple laptops: the GPU kernels on tinygrad's Metal emulator (`PYTHON::METAL`: Metal's renderer and tensor-core
shapes, every thread run in Python), and Metal's limit on a thread group's shared memory (32 KB). The paged-attention
kernel's Metal run is in test_paged_attention.py; what the emulator does not show (speed, the real compiler's
limits) is in the ROADMAP."""
import numpy as np
import pytest
from tinygrad import Context, Device, Tensor, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.codegen.opt import OptOps
from tinygrad.uop.ops import Ops, UOp
from tinyvllm import LLM, SamplingParams
from tinyvllm.engine_args import SHAPES
from tinyvllm.kernels import matvec, paged_attention
from tinyvllm.kernels.linear import linear
from test_quantized import SUPER_BLOCK_TYPES, TYPES, check, random_blocks

METAL_THREAD_GROUP_BYTES = 32 * 1024
# (query heads, KV heads, head dim) of the shipped models, the benchmark shapes and common checkpoints
ATTENTION_SHAPES = {"smollm2-135m": (9, 3, 64), "llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128),
                    "qwen2.5-7b": (28, 4, 128), "qwen2.5-1.5b": (12, 2, 128), "gemma-3-270m": (4, 1, 256),
                    "mistral-7b": (32, 8, 128), "llama-70b": (64, 8, 128)}


@pytest.fixture
def metal():
  with Context(DEV=f"{Device.DEFAULT};PYTHON::METAL"): yield "PYTHON"


def shared_bytes(kernel: UOp) -> int:
  """The thread-group (shared) memory a kernel written with tinygrad's UOps declares."""
  local = {u for u in kernel.toposort() if u.op is Ops.BUFFER and getattr(u.arg, "addrspace", None) == AddrSpace.LOCAL}
  return sum(u.src[0].arg * u.dtype.itemsize for u in local)


@pytest.mark.parametrize("model", ATTENTION_SHAPES)
def test_paged_attention_fits_a_metal_thread_group(model):
  H, KVH, D = ATTENTION_SHAPES[model]
  buffer = iter(range(100))
  g = lambda shape, dtype=dtypes.half: UOp.placeholder(shape, dtype, slot=next(buffer))
  out, q, cos, sin = g((4, H * D)), g((4, (H + 2 * KVH) * D)), g((4, D // 2)), g((4, D // 2))
  pools, ints = (g((1024, KVH, D)), g((1024, KVH, D))), [g((n,), dtypes.int32) for n in (64, 4, 4, 1)]
  kernel = paged_attention._block_kernel(out, q, cos, sin, *pools, *ints, block_size=16, max_blocks=8, q_col=0)
  assert 0 < shared_bytes(kernel) <= METAL_THREAD_GROUP_BYTES, (model, shared_bytes(kernel))


@pytest.mark.parametrize("shape", ["smollm2-135m", "llama-1b", "llama-8b"])
def test_matvec_fits_a_metal_thread_group(shape):
  """The one-row kernel's shared memory is its reduction's: a float (two with the norm's sum of squares) for each
  thread of a group, for each row of x."""
  cfg = SHAPES[shape]
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  for rows in (1, 2, 4):
    for N, K in ((d, d), (2 * f, d), (d, f)):
      opts = matvec._tiling(rows, N, K)
      if opts is None: continue
      threads = np.prod([o.arg for o in opts if o.op in (OptOps.GROUP, OptOps.LOCAL)])
      assert threads * rows * 2 * 4 <= METAL_THREAD_GROUP_BYTES, (shape, rows, N, K, opts)


@pytest.mark.parametrize("rows, N, K", [(1, 48, 64), (4, 96, 576)])
def test_the_tiled_matvec_on_metal(metal, rows, N, K):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((rows, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32) / 16
  residual = rng.standard_normal((rows, N)).astype(np.float32)
  as_t = lambda a: Tensor(a, device=metal).cast(dtypes.half).realize()
  assert matvec.uses_matvec(as_t(x), as_t(w)) and matvec._tiling(rows, N, K) is not None
  got = linear(as_t(x), as_t(w), residual=as_t(residual)).float().numpy()
  want = x @ w.T + residual
  np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=0)


def test_the_packed_matmul_on_metal():
  """A feature per thread, as on every GPU, for each packed type (the emulator as the default device: the weights
  are uploaded there)."""
  with Context(DEV="PYTHON::METAL"):
    for type_name in TYPES: check(random_blocks(type_name, 40, 64), 2)
    for type_name in SUPER_BLOCK_TYPES: check(random_blocks(type_name, 16, 256), 1)     # Q6_K: blocks of 16


def test_a_tiny_model_decodes_the_same_tokens_on_metal(metal):
  """The whole engine on the emulated Metal GPU (its attention and projection kernels the GPU's) against the CPU:
  two prompts batched, greedy. (Minutes: every thread of every kernel runs in Python.)"""
  prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(6 + 3 * i)]} for i in range(2)]
  params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
  tokens = lambda device: [o.outputs[0].token_ids for o in LLM(load_format="dummy", shape="tiny", max_model_len=32,
                                                              device=device, async_scheduling=False)
                           .generate(prompts, params)]
  assert tokens(metal) == tokens(Device.DEFAULT)
