"""What a checkpoint says about its network: one dataclass, read from a Hugging Face `config.json` dict.

Every shape in `llama.py` comes from here, never from a constant. A GGUF file carries the same facts as metadata
(`llama.embedding_length`, ...); `gguf.gguf_to_hf_config` turns those into the `config.json` form first, so there is
exactly one reader of hyper-parameters.
"""
from __future__ import annotations
from dataclasses import dataclass

# architectures whose decoder is "Llama blocks" and that this package runs; value: has q/k/v bias
ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True,
                 "Qwen3ForCausalLM": False, "Gemma3ForCausalLM": False}
QK_NORM = ("Qwen3ForCausalLM", "Gemma3ForCausalLM")   # architectures that RMS-normalize each head of q and k before RoPE


@dataclass(frozen=True)
class ModelConfig:
  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  tie_word_embeddings: bool
  attention_bias: bool
  rope_scaling: dict | None = None    # Llama-3 style {"rope_type": "llama3", "factor", "low_freq_factor", ...}
  sliding_window: int | None = None   # Mistral's: a token attends to the last `sliding_window` positions only
  qk_norm: bool = False               # Qwen3's: each head of q and k RMS-normalized (its own gain) before RoPE
  layer_types: tuple[str, ...] | None = None   # Gemma 3's: "sliding_attention" or "full_attention" per layer
  rope_local_base_freq: float | None = None    # Gemma 3's: the RoPE base of its sliding-window layers
  query_pre_attn_scalar: float | None = None   # Gemma 3's: scores are q·k / sqrt(this) (None: head_dim)
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  mask_token_id: int | None = None    # a masked diffusion LM's [MASK] (diffusion/llada.py); None: autoregressive
  logits_shift: int = 0               # a diffusion LM whose logits at i predict token i + 1 (Dream): 1
  block_causal: bool = False          # a diffusion LM trained to see the prefix causally and its block both ways
                                      # (BD3-LM, SDAR); LLaDA and Dream see the whole sequence (engine/denoising.py)

  @classmethod
  def from_hf(cls, cfg: dict) -> ModelConfig:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
      raise ValueError(f"unsupported architecture {arch!r}; tinyvllm runs {', '.join(ARCHITECTURES)}")
    heads = cfg["num_attention_heads"]
    fields = dict(architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                  intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
                  num_kv_heads=cfg.get("num_key_value_heads") or heads,
                  head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                  rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=_rope(cfg).get("rope_theta", 10000.0),
                  max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                  tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                  attention_bias=cfg.get("attention_bias", ARCHITECTURES[arch]),
                  rope_scaling=_rope_scaling(_rope(cfg)), sliding_window=_sliding_window(cfg), qk_norm=arch in QK_NORM,
                  bos_token_id=cfg.get("bos_token_id"),
                  eos_token_id=cfg.get("eos_token_id"))
    return cls(**fields | (_gemma3(cfg) if arch == "Gemma3ForCausalLM" else {}))


def _rope(cfg: dict, layer_type: str = "full_attention") -> dict:
  """The RoPE fields: top-level (`rope_theta`, `rope_scaling`) as transformers 4 writes them, or transformers 5's
  `rope_parameters`, one dict or one per layer type (Gemma 3's local and global layers)."""
  params = cfg.get("rope_parameters") or {}
  if {"full_attention", "sliding_attention"} & params.keys(): params = params.get(layer_type, {})   # one per type
  legacy = {"rope_theta": cfg["rope_theta"]} if "rope_theta" in cfg else {}
  return legacy | (cfg.get("rope_scaling") or {}) | params


def _rope_scaling(rope: dict) -> dict | None:
  """A scaling's fields (llama3's factor and bands, linear's factor), or None for plain RoPE."""
  kind = rope.get("rope_type", rope.get("type", "default"))
  return None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}


def _sliding_window(cfg: dict) -> int | None:
  """The window every layer attends within, if the checkpoint has one (Qwen2 names one but leaves it off unless
  `use_sliding_window`); None: full attention."""
  window = cfg.get("sliding_window")
  if "use_sliding_window" in cfg and not cfg["use_sliding_window"]: return None
  return window if isinstance(window, int) and window > 0 else None


def _gemma3(cfg: dict) -> dict:
  """Gemma 3's fields: which layers slide (configs before `layer_types` give every `sliding_window_pattern`-th layer
  full attention), the local RoPE base, the query scale. Its checkpoints leave out fields the Llama defaults get
  wrong (tied embeddings, the window itself)."""
  n, pattern = cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6)
  types = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
  if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
    raise ValueError("Gemma 3 with logit soft-capping (final_logit_softcapping / attn_logit_softcapping) is not supported")
  local_base = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")   # transformers 5
  return dict(layer_types=tuple(types), rope_local_base_freq=local_base or cfg.get("rope_local_base_freq", 10000.0),
              query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"), tie_word_embeddings=cfg.get("tie_word_embeddings", True),
              sliding_window=cfg.get("sliding_window", 4096))
