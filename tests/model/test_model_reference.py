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


def test_hugging_face_directory_of_the_same_weights_gives_the_same_tokens(tmp_path_factory, reference):
  """The safetensors loading path, on the real weights: convert the GGUF, load the directory, decode greedily."""
  from tinyvllm import LLM
  from tinyvllm.formats.convert import convert
  from tinyvllm.model.loader import default_model_path
  out = tmp_path_factory.mktemp("smollm2-hf")
  convert(default_model_path(), out, max_shard_size=200 * 2**20)   # two shards + index
  case = next(c for c in reference["greedy"] if c["name"] == "code")
  llm = LLM(str(out), max_model_len=256, enable_prefix_caching=False)
  got = llm.generate(case["prompt_text"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
  assert got.prompt_token_ids == case["prompt_ids"]
  assert got.outputs[0].token_ids == case["output_ids"][:8]


@pytest.mark.parametrize("model, message", [("/no/such/model.gguf", "not found"), ("no-such-dir", "not found")])
def test_missing_model_is_a_clear_error(model, message):
  from tinyvllm import LLM
  with pytest.raises(FileNotFoundError, match=message): LLM(model)


def test_hub_repo_id_offline_is_a_clear_error(tmp_path, monkeypatch):
  from tinyvllm.model.loader import download_hf_repo
  monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path))
  monkeypatch.setattr("urllib.request.urlretrieve", lambda *a: (_ for _ in ()).throw(OSError("no route to host")))
  with pytest.raises(ConnectionError, match="offline"): download_hf_repo("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unknown_architecture_is_a_clear_error(tmp_path):
  import json
  from tinyvllm import LLM
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"): LLM(str(tmp_path))


def test_fast_kernels_equal_the_reference_kernels(smollm2, reference):
  """The real SmolLM2 through the fast kernels (the session's engine: packed weights on a CPU, attention straight
  from the pool, RoPE inside the KV write and the attention kernel, norms and residuals inside a GPU's matvec) and
  through `kernels="reference"` (tinygrad's plain operations on the unpacked weights): the same greedy tokens, and
  the same logprobs up to float rounding, on a 42-token prompt whose first 8 tokens are far from any near-tie."""
  from tinyvllm import LLM
  case = next(c for c in reference["greedy"] if c["name"] == "chat")
  n = 8
  assert near_tie_prefix(case["top2_margins"], threshold=0.5) >= n
  prompt, params = {"prompt_token_ids": case["prompt_ids"]}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                                            logprobs=5)
  fast = smollm2.generate(prompt, params)[0].outputs[0]
  plain = LLM(kernels="reference", max_model_len=128, max_num_seqs=1, max_num_batched_tokens=64,
              enable_prefix_caching=False).generate(prompt, params)[0].outputs[0]
  assert fast.token_ids == plain.token_ids == case["output_ids"][:n]
  tolerance = 1e-3 if smollm2.engine.args.compute_dtype().itemsize == 4 else 5e-2
  for step, (a, b) in enumerate(zip(fast.logprobs, plain.logprobs)):
    assert a.keys() == b.keys(), step
    assert all(abs(a[t] - b[t]) < tolerance for t in a), (step, a, b)
