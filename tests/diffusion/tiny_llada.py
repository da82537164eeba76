"""A tiny random LLaDA checkpoint in the Hugging Face layout (LLaDA's own tensor names), for the diffusion tests."""
import json
import shutil
from pathlib import Path
import numpy as np
from tinyvllm.model.loader import DEFAULT_DIFFUSION_MODEL

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


def write_tiny_llada(path: Path) -> Path:
  """The tiny checkpoint, with the shipped model's tokenizer, written to `path`."""
  from safetensors.numpy import save_file
  (path / "config.json").write_text(json.dumps(TINY))
  save_file(llada_tensors(TINY), str(path / "model.safetensors"))
  for name in ("tokenizer.model", "tokenizer_config.json"): shutil.copy(DEFAULT_DIFFUSION_MODEL / name, path / name)
  return path
