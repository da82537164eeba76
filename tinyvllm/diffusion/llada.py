"""Masked diffusion language models: LLaDA and Dream. Llama blocks whose attention sees every position.

    tokens (some are [MASK]) ─ embed ─ [RMSNorm ─ attention, no causal mask ─ (+) ─ RMSNorm ─ SwiGLU ─ (+)] × L
                                     ─ norm ─ lm_head ─ logits for every position, the masked ones included

The network is llama.py's with one change: no causal mask, so position i reads positions after it too, and a masked
position is predicted from both sides. Two checkpoint families:

- LLaDA (GSAI-ML/LLaDA-8B-Instruct; config `architectures: ["LLaDAModelLM"]`, OLMo field names `d_model`, `n_layers`,
  ...): the logits at position i predict token i. Its tensors are named `model.transformer.blocks.N.q_proj`,
  `attn_out`, `ff_proj` (gate), `up_proj`, `ff_out` (down), `attn_norm`, `ff_norm`, `wte`, `ln_f`, and `ff_out` for
  the output head; `llada_names` maps them to the Hugging Face Llama names used inside.
- Dream (Dream-org/Dream-v0-Instruct-7B; `architectures: ["DreamModel"]`): a Qwen2 initialised from an
  autoregressive model, so it kept the habit of predicting the *next* token: logits for position i come from the
  hidden state at i - 1 (`shift = 1`). Its tensors already carry the Llama names.

A forward pass may reuse the keys and values of a prefix computed earlier (Fast-dLLM's prefix cache): `past` holds
them per layer and the query tokens are the suffix only. Rows of a batch are padded; `key_valid` says which of the
past + query slots are real, so padding is never attended to.
"""
from __future__ import annotations
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.nn import Embedding, Linear, RMSNorm
from tinygrad.nn.state import get_state_dict
from tinyvllm.model.config import ModelConfig
from tinyvllm.model.loader import DIFFUSION_ALIASES, read_safetensors, weight_tensor
from tinyvllm.model.llama import MLP, Attention, apply_rope, rope_frequencies
from tinyvllm.formats.tokenizer import Tokenizer

DIFFUSION_ARCHITECTURES = ("LLaDAModelLM", "DreamModel")
KV = tuple[Tensor, Tensor]                       # keys, values: [B, T, kv_heads, head_dim]

# LLaDA's per-layer tensor names -> the Llama names of this module
LLADA_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight", "ff_norm.weight": "post_attention_layernorm.weight",
  "q_proj.weight": "self_attn.q_proj.weight", "k_proj.weight": "self_attn.k_proj.weight",
  "v_proj.weight": "self_attn.v_proj.weight", "attn_out.weight": "self_attn.o_proj.weight",
  "q_proj.bias": "self_attn.q_proj.bias", "k_proj.bias": "self_attn.k_proj.bias", "v_proj.bias": "self_attn.v_proj.bias",
  "ff_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight", "ff_out.weight": "mlp.down_proj.weight",
}


@dataclass(frozen=True)
class DiffusionConfig:
  model: ModelConfig
  mask_token_id: int
  shift: int                                     # 1: logits at i come from position i - 1 (Dream)

  @classmethod
  def from_hf(cls, cfg: dict) -> DiffusionConfig:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch == "LLaDAModelLM":
      llama = dict(architectures=["LlamaForCausalLM"], hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layers"],
                   intermediate_size=cfg["mlp_hidden_size"], num_attention_heads=cfg["n_heads"],
                   num_key_value_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
                   vocab_size=cfg.get("embedding_size") or cfg["vocab_size"], rope_theta=cfg.get("rope_theta", 10000.0),
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), max_position_embeddings=cfg["max_sequence_length"],
                   tie_word_embeddings=cfg.get("weight_tying", False),
                   attention_bias=cfg.get("include_qkv_bias", False) or cfg.get("include_bias", False),
                   eos_token_id=cfg.get("eos_token_id"))
      return cls(dataclasses.replace(ModelConfig.from_hf(llama), architecture=arch), cfg["mask_token_id"], 0)
    if arch == "DreamModel":
      qwen2 = ModelConfig.from_hf({**cfg, "architectures": ["Qwen2ForCausalLM"]})
      return cls(dataclasses.replace(qwen2, architecture=arch), cfg["mask_token_id"], 1)
    raise ValueError(f"not a diffusion LM: {arch!r}; expected one of {', '.join(DIFFUSION_ARCHITECTURES)}")


def wants_diffusion(model: str | None) -> bool:
  """Whether `model` names a diffusion LM: the shipped one's alias, or a LLaDA/Dream checkpoint directory."""
  if model in DIFFUSION_ALIASES: return True
  return model is not None and Path(model).expanduser().is_dir() and is_diffusion_checkpoint(Path(model).expanduser())


def is_diffusion_checkpoint(path: str | Path) -> bool:
  """Whether `path` is a Hugging Face directory whose config.json names a diffusion architecture (or an adapter that
  makes its base one: loader.read_adapted_checkpoint)."""
  config = Path(path) / "config.json"
  if not config.is_file(): return False
  cfg = json.loads(config.read_text())
  return (cfg.get("architectures") or ["?"])[0] in DIFFUSION_ARCHITECTURES or cfg.get("mask_token_id") is not None


class BidirectionalAttention(Attention):
  """llama.py's projections; every query attends to every valid key (past and present), no causal mask."""
  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, key_valid: Tensor, past: KV | None) -> tuple[Tensor, KV]:
    B, T, _ = x.shape
    # materialized: fused into the attention kernel, RoPE made clang a 362 KB function for 4 rows × 64 positions on
    # CPU, which did not finish compiling in 30 minutes
    q = apply_rope(self.q_proj(x).reshape(B * T, self.num_heads, self.head_dim), cos, sin).contiguous()
    k = apply_rope(self.k_proj(x).reshape(B * T, self.num_kv_heads, self.head_dim), cos, sin).contiguous()
    k, v = k.reshape(B, T, self.num_kv_heads, self.head_dim), self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    keys, values = (k, v) if past is None else (past[0].cat(k, dim=1), past[1].cat(v, dim=1))
    out = q.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2).scaled_dot_product_attention(
      keys.transpose(1, 2), values.transpose(1, 2), attn_mask=key_valid.reshape(B, 1, 1, -1),
      enable_gqa=self.num_heads != self.num_kv_heads)
    return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (k, v)


class Block:
  def __init__(self, cfg: ModelConfig):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = BidirectionalAttention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg)

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, key_valid: Tensor, past: KV | None) -> tuple[Tensor, KV]:
    attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, key_valid, past)
    h = x + attn
    return self.mlp(h, self.post_attention_layernorm), kv    # h + mlp(norm(h))


class Backbone:
  def __init__(self, cfg: ModelConfig):
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
    self.layers = [Block(cfg) for _ in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MaskedDiffusionLM:
  def __init__(self, cfg: DiffusionConfig):
    self.config, mc = cfg, cfg.model
    self.model = Backbone(mc)
    if not mc.tie_word_embeddings: self.lm_head = Linear(mc.hidden_size, mc.vocab_size, bias=False)
    angles = np.outer(np.arange(mc.max_position_embeddings), rope_frequencies(mc))
    self.rope_cos, self.rope_sin = Tensor(np.cos(angles).astype(np.float32)), Tensor(np.sin(angles).astype(np.float32))

  def output_weight(self) -> Tensor:
    return self.model.embed_tokens.weight if self.config.model.tie_word_embeddings else self.lm_head.weight

  def hidden(self, tokens: Tensor, positions: Tensor, key_valid: Tensor,
             past: list[KV] | None = None) -> tuple[Tensor, list[KV]]:
    """tokens, positions: [B, T]; key_valid: [B, P + T] bool; past: per layer K/V of P earlier positions.
    Returns the final hidden states [B, T, hidden] (before the last norm) and each layer's K/V of the T tokens."""
    B, T = tokens.shape
    x = self.model.embed_tokens(tokens)
    flat = positions.reshape(B * T)
    cos, sin = self.rope_cos[flat].cast(x.dtype), self.rope_sin[flat].cast(x.dtype)
    new_kv: list[KV] = []
    for i, layer in enumerate(self.model.layers):
      x, kv = layer(x, cos, sin, key_valid, None if past is None else past[i])
      new_kv.append(kv)
    return x, new_kv

  def logits(self, h: Tensor) -> Tensor: return (self.model.norm(h) @ self.output_weight().T).cast(dtypes.float32)

  def __call__(self, tokens: Tensor) -> Tensor:
    """Logits at every position of unpadded rows [B, T] (training, tests): [B, T, vocab], shifted for Dream."""
    B, T = tokens.shape
    h, _ = self.hidden(tokens, Tensor.arange(T).reshape(1, T).expand(B, T), Tensor.ones(B, T, dtype=dtypes.bool))
    if self.config.shift: h = h[:, :1].cat(h[:, :-1], dim=1)
    return self.logits(h)


# ---- checkpoints ------------------------------------------------------------------------------------------------
def llada_names(cfg: ModelConfig) -> dict[str, str]:
  """Llama name in this module -> LLaDA's name in its checkpoint."""
  names = {"model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight": "model.transformer.ln_f.weight"}
  if not cfg.tie_word_embeddings: names["lm_head.weight"] = "model.transformer.ff_out.weight"
  for i in range(cfg.num_layers):
    for theirs, ours in LLADA_LAYER_NAMES.items():
      if ours.endswith("bias") and not cfg.attention_bias: continue
      names[f"model.layers.{i}.{ours}"] = f"model.transformer.blocks.{i}.{theirs}"
  return names


def from_llada_layout(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  names = llada_names(cfg)
  unexpected = sorted(set(weights) - set(names.values()))
  if unexpected: raise ValueError(f"unexpected tensors in a LLaDA checkpoint, e.g. {unexpected[:3]}")
  return {ours: weights[theirs] for ours, theirs in names.items() if theirs in weights}


def to_llada_layout(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  return {theirs: weights[ours] for ours, theirs in llada_names(cfg).items()}


def load_state(model: MaskedDiffusionLM, weights: dict[str, np.ndarray], dtype) -> None:
  params = {k: v for k, v in get_state_dict(model).items() if not k.startswith("rope_")}
  missing = sorted(set(params) - set(weights))
  if missing: raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  for name, param in params.items():
    w = weights[name]
    if w.shape != param.shape: raise ValueError(f"{name}: checkpoint shape {w.shape} != model shape {param.shape}")
    param.replace(weight_tensor(w, dtype)).realize()


def read_diffusion_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """A LLaDA or Dream directory as llama.py's network loads it (engine/denoising.py runs it): the Llama config with
  the [MASK] id and the logits' shift, and the weights under Llama's names."""
  cfg = DiffusionConfig.from_hf(json.loads((path / "config.json").read_text()))
  weights = read_safetensors(path)
  if cfg.model.architecture == "LLaDAModelLM": weights = from_llada_layout(weights, cfg.model)
  return dataclasses.replace(cfg.model, mask_token_id=cfg.mask_token_id, logits_shift=cfg.shift), weights


def load_diffusion_model(path: str | Path, dtype=dtypes.float32) -> tuple[MaskedDiffusionLM, Tokenizer]:
  """A LLaDA or Dream Hugging Face directory -> (network with weights, tokenizer)."""
  path = Path(path)
  cfg = DiffusionConfig.from_hf(json.loads((path / "config.json").read_text()))
  weights = read_safetensors(path)
  if cfg.model.architecture == "LLaDAModelLM": weights = from_llada_layout(weights, cfg.model)
  net = MaskedDiffusionLM(cfg)
  load_state(net, weights, dtype)
  return net, Tokenizer.from_hf_dir(path)
