"""Tiny random LLaDA and Dream checkpoints in the Hugging Face layout (each model's own tensor names), for the diffusion
tests."""
import json
import shutil
from pathlib import Path
import numpy as np
from tinyvllm.model.loader import DJANGO_DIFFUSION_MODEL

VOCAB, MASK = 4096, 3                      # the shipped tokenizer's size and its <|mdm_mask|> id
TINY = dict(architectures=["LLaDAModelLM"], model_type="llada", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
            mlp_hidden_size=48, vocab_size=VOCAB, embedding_size=VOCAB, max_sequence_length=64, rope_theta=10000.0,
            rms_norm_eps=1e-5, weight_tying=False, include_bias=False, mask_token_id=MASK, eos_token_id=2)


def llada_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights named exactly as in GSAI-ML/LLaDA-8B-Instruct's model.safetensors."""
  rng = np.random.default_rng(seed)
  d, f, hd = cfg["d_model"], cfg["mlp_hidden_size"], cfg["d_model"] // cfg["n_heads"]
  kv = cfg["n_kv_heads"] * hd
  w = {"model.transformer.wte.weight": rng.normal(0, 1, (VOCAB, d)),
       "model.transformer.ln_f.weight": 1 + 0.1 * rng.normal(size=d),
       "model.transformer.ff_out.weight": rng.normal(0, 0.5, (VOCAB, d))}
  for i in range(cfg["n_layers"]):
    shapes = {"attn_norm.weight": (d,), "ff_norm.weight": (d,), "q_proj.weight": (d, d), "k_proj.weight": (kv, d),
              "v_proj.weight": (kv, d), "attn_out.weight": (d, d), "ff_proj.weight": (f, d), "up_proj.weight": (f, d),
              "ff_out.weight": (d, f)}
    for name, shape in shapes.items():
      w[f"model.transformer.blocks.{i}.{name}"] = 1 + 0.1 * rng.normal(size=shape) if "norm" in name else \
        rng.normal(0, 1 / np.sqrt(shape[-1]), shape)
  return {k: v.astype(np.float32) for k, v in w.items()}


TINY_DREAM = dict(architectures=["DreamModel"], model_type="Dream", hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  mask_token_id=MASK, eos_token_id=2)


def dream_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights named as in Dream-org/Dream-v0-Instruct-7B (Qwen2's names: q/k/v with biases)."""
  rng = np.random.default_rng(seed)
  d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
  kv = cfg["num_key_value_heads"] * hd
  w = {"model.embed_tokens.weight": rng.normal(0, 1, (VOCAB, d)), "model.norm.weight": 1 + 0.1 * rng.normal(size=d),
       "lm_head.weight": rng.normal(0, 0.5, (VOCAB, d))}
  for i in range(cfg["num_hidden_layers"]):
    shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
              "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
              "self_attn.q_proj.bias": (d,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.weight": (d, d), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
              "mlp.down_proj.weight": (d, f)}
    for name, shape in shapes.items():
      w[f"model.layers.{i}.{name}"] = 1 + 0.1 * rng.normal(size=shape) if "norm" in name else \
        rng.normal(0, 0.3, shape) if "bias" in name else rng.normal(0, 1 / np.sqrt(shape[-1]), shape)
  return {k: v.astype(np.float32) for k, v in w.items()}


def write_tiny_llada(path: Path, dream: bool = False) -> Path:
  """The tiny LLaDA (or Dream) checkpoint, with the shipped model's tokenizer, written to `path`."""
  from safetensors.numpy import save_file
  cfg = TINY_DREAM if dream else TINY
  (path / "config.json").write_text(json.dumps(cfg))
  save_file((dream_tensors if dream else llada_tensors)(cfg), str(path / "model.safetensors"))
  for name in ("tokenizer.model", "tokenizer_config.json"): shutil.copy(DJANGO_DIFFUSION_MODEL / name, path / name)
  return path
