"""Architectures beyond Llama's, against Hugging Face transformers: small random-weight checkpoints and the outputs
transformers gave for them (made once by tests/data/make_model_references.py). Qwen3 normalizes each head of q and
k before RoPE and has a head_dim that is not hidden/heads; Mistral's sliding window is shorter than the prompt; Gemma 3
has a sliding and a global layer (their own RoPE bases), sandwich norms with random gains, GeGLU, a scaled embedding
and a query scale that is not 1/sqrt(head_dim), in the Hugging Face layout (norms stored as w for 1 + w)."""
import json
import shutil
from pathlib import Path
import numpy as np
import pytest
from tinyvllm import LLM, SamplingParams
from tinyvllm.model.loader import DJANGO_DIFFUSION_MODEL

DATA = Path(__file__).parents[1] / "data" / "tiny_models"


@pytest.mark.parametrize("name", ["qwen3", "mistral", "gemma3"])
def test_greedy_tokens_and_logprobs_equal_transformers(name, tmp_path):
  shutil.copytree(DATA / name, tmp_path / name)
  shutil.copy(DJANGO_DIFFUSION_MODEL / "tokenizer.model", tmp_path / name)    # a 4096-token SentencePiece model
  (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
  ref = json.loads((DATA / name / "reference.json").read_text())
  llm = LLM(model=str(tmp_path / name), dtype="float32", max_model_len=128)
  out = llm.generate([{"prompt_token_ids": ref["prompt"]}],
                     SamplingParams(temperature=0, max_tokens=len(ref["output"]), ignore_eos=True, logprobs=20))[0]
  decided = next((i for i, m in enumerate(ref["top2_margins"]) if m < 0.02), len(ref["output"]))   # until a near-tie
  assert out.outputs[0].token_ids[:decided + 1] == ref["output"][:decided + 1]
  logits = np.array(ref["last_logits"], np.float64)
  expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())     # log-softmax
  first = out.outputs[0].logprobs[0]
  for token, logprob in first.items(): assert logprob == pytest.approx(expected[token], abs=1e-3), token
