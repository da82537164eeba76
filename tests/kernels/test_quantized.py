"""Packed GGUF weights: the in-kernel dequantizing matmul equals dequantize-then-matmul, for every packed type and on
the real SmolLM2 matrices. (Greedy tokens of the packed model against Hugging Face: test_model_reference.py, whose
`smollm2` fixture keeps the weights packed on CPU; the dequantized path is its safetensors-directory test.)"""
import numpy as np
import pytest
from tinygrad import Tensor
from tinyvllm.formats.gguf import GGUFTensor, read_gguf
from tinyvllm.model.loader import default_model_path, stack_checkpoint
from tinyvllm.kernels import quantized
from tinyvllm.kernels.quantized import PackedWeight, packed_matmul

TYPES = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34)}   # GGML type id, bytes per block of 32


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> GGUFTensor:
  """A GGUF tensor of random quants with plausible fp16 scales (and minimums)."""
  type_id, block_bytes = TYPES[type_name]
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (rows, cols // 32, block_bytes), dtype=np.uint8)
  scales = rng.uniform(0.001, 0.05, (rows, cols // 32, 2)).astype(np.float16)
  scales[..., 1] *= -4                                          # Q4_1's minimum is negative, like real ones
  n_scales = 2 if type_name == "Q4_1" else 1
  blocks[..., :2 * n_scales] = scales[..., :n_scales].view(np.uint8).reshape(rows, cols // 32, -1)
  return GGUFTensor("w", type_id, type_name, (rows, cols), blocks.ravel())      # raw bytes, as read from a file


def packed(t: GGUFTensor) -> PackedWeight:
  return PackedWeight.from_blocks((t.type_name, t.raw.reshape(t.shape[0], -1, TYPES[t.type_name][1])))


def check(t: GGUFTensor, rows_of_x: int, rtol: float = 1e-4) -> None:
  x = np.random.default_rng(1).standard_normal((rows_of_x, t.shape[1])).astype(np.float32)
  got, want = packed_matmul(Tensor(x), packed(t)), x @ t.dequantize().T
  assert np.abs(got.numpy() - want).max() <= rtol * np.abs(want).max()


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows_of_x", [1, 2, 3, 4, 24])    # tiles of 1, 2, 1, 4 and 8 rows of x
@pytest.mark.parametrize("shape", [(48, 96), (40, 32)])   # 3 groups of 16 rows × 3 blocks; padded rows, one block
def test_packed_matmul_equals_dequantize_then_matmul(type_name, rows_of_x, shape):
  check(random_blocks(type_name, *shape), rows_of_x)


@pytest.mark.parametrize("rows_of_x", [1, 24])
def test_the_gpu_form_of_the_kernel_computes_the_same(rows_of_x, monkeypatch):
  """A feature per thread, as on GPUs (quantized._features_in_threads); compiled and run here on the CPU."""
  monkeypatch.setattr(quantized, "_features_in_threads", lambda device: True)
  for type_name in TYPES: check(random_blocks(type_name, 40, 96), rows_of_x)


@pytest.mark.parametrize("type_name", TYPES)
def test_embedding_rows_are_the_dequantized_rows(type_name):
  t = random_blocks(type_name, 50, 64)
  ids = np.array([[3, 49], [0, 3]], np.int32)
  assert np.allclose(packed(t).rows(Tensor(ids)).numpy(), t.dequantize()[ids], atol=1e-6)


@pytest.mark.parametrize("rows_of_x", [2, 64])
def test_every_smollm2_matrix_of_two_layers_and_the_embedding(rows_of_x):
  """Per-layer agreement on the real weights, within fp16 tolerance (the kernels sum in a different order)."""
  _, tensors = read_gguf(default_model_path())
  names = [n for n in tensors if n.startswith(("blk.0.", "blk.29.")) and len(tensors[n].shape) == 2]
  assert len(names) == 14
  for name in names + ["token_embd.weight"]: check(tensors[name], rows_of_x, rtol=1e-3)


def test_stacked_projections_are_their_parts_row_after_row():
  """loader.stack_checkpoint stacks q/k/v and gate/up on the host: Q4_0 beside Q4_1 stays packed (both 4-bit), a
  group mixing widths (Q4_1 beside Q8_0) is stacked as float."""
  def as_loaded(type_name: str, rows: int, seed: int) -> GGUFTensor:      # blocks as (rows, blocks, bytes), as loaded
    t = random_blocks(type_name, rows, 64, seed)
    return GGUFTensor(t.name, t.ggml_type, t.type_name, t.shape, t.raw.reshape(rows, -1, TYPES[type_name][1]))
  attn = {"q": as_loaded("Q4_0", 64, 0), "k": as_loaded("Q4_1", 32, 1), "v": as_loaded("Q4_1", 32, 2)}
  mlp = {"gate": as_loaded("Q4_1", 96, 3), "up": as_loaded("Q8_0", 96, 4)}
  stacked = stack_checkpoint({**{f"model.layers.0.self_attn.{p}_proj.weight": w for p, w in attn.items()},
                              **{f"model.layers.0.mlp.{p}_proj.weight": w for p, w in mlp.items()}})
  assert sorted(stacked) == ["model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"]
  qkv = stacked["model.layers.0.self_attn.qkv_proj.weight"]
  assert isinstance(qkv, tuple)
  stacked_qkv = PackedWeight.from_blocks(*((t.type_name, t.raw) for t in qkv))
  got = stacked_qkv.rows(Tensor.arange(stacked_qkv.shape[0])).numpy()       # every row, through the embedding path
  np.testing.assert_allclose(got, np.concatenate([w.dequantize() for w in attn.values()]), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(stacked["model.layers.0.mlp.gate_up_proj.weight"],
                                np.concatenate([w.dequantize() for w in mlp.values()]))
