"""Greedy decoding of the real SmolLM2 equals Hugging Face transformers token for token (until a near-tie).

The reference ids were made by tests/data/make_reference.py: transformers + torch on CPU, the same GGUF dequantized
to float32. After the first step whose top-2 logits differ by < 0.02, float rounding may pick either token, so the
comparison stops there."""
import pytest
from tinyvllm import SamplingParams
from conftest import near_tie_prefix


def test_greedy_matches_transformers(smollm2, reference):
  cases = reference["greedy"]
  outs = smollm2.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases],
                          [SamplingParams(temperature=0, max_tokens=len(c["output_ids"]), ignore_eos=True) for c in cases])
  for case, out in zip(cases, outs):
    n = near_tie_prefix(case["top2_margins"])
    assert n >= 8 or case["name"] == "multilingual", f"{case['name']}: reference has an early near-tie"
    assert out.outputs[0].token_ids[:n] == case["output_ids"][:n], case["name"]


def test_text_prompt_uses_the_reference_tokenization(smollm2, reference):
  case = next(c for c in reference["greedy"] if c["name"] == "short_en")
  out = smollm2.generate(case["prompt_text"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
  assert out.prompt_token_ids == case["prompt_ids"]
  assert out.outputs[0].token_ids == case["output_ids"][:4]


def test_chat_applies_the_template(smollm2, reference):
  chat = reference["chat"][0]
  out = smollm2.chat(chat["messages"], SamplingParams(temperature=0, max_tokens=2))[0]
  assert out.prompt_token_ids == chat["ids"]


def test_prompt_longer_than_context_is_rejected(smollm2):
  with pytest.raises(ValueError, match="max_model_len"):
    smollm2.generate({"prompt_token_ids": [1] * 5000}, SamplingParams(max_tokens=1))
