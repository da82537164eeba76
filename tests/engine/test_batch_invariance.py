"""Batched, chunked, preempted and prefix-cached runs give exactly the tokens each prompt gives alone
(real SmolLM2, greedy). Comparisons stop at the first near-tie of the Hugging Face reference, where float rounding
may legitimately pick either token."""
import pytest
from tinyvllm import LLM, SamplingParams
from conftest import near_tie_prefix

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# 64-token steps chunk long prompts; 3 sequences at a time; 20 blocks of 16 tokens cannot hold them all
TIGHT = dict(max_model_len=320, max_num_batched_tokens=64, max_num_seqs=3, num_kv_blocks=21)


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
  short = [c["prompt_ids"] for c in reference["greedy"] if c["name"] != "long"]
  return short + [reference["greedy"][-1]["prompt_ids"][:300], short[0][:3]]


@pytest.fixture(scope="module")
def alone(smollm2, prompts) -> dict[tuple, list[int]]:
  """Each prompt run by itself, unchunked (the session engine's 256-token budget covers every prompt here)."""
  return {tuple(p): smollm2.generate({"prompt_token_ids": p}, PARAMS)[0].outputs[0].token_ids for p in prompts}


def assert_same_as_alone(outs, prompts, alone, reference):
  margins = {tuple(c["prompt_ids"]): c["top2_margins"] for c in reference["greedy"]}
  for prompt, out in zip(prompts, outs):
    n = near_tie_prefix(margins.get(tuple(prompt), [1.0] * 12)[:12])
    assert out.outputs[0].token_ids[:n] == alone[tuple(prompt)][:n]


def test_mixed_batch_with_tiny_budget_and_pool_equals_lone_runs(prompts, alone, reference):
  tight = LLM(**TIGHT, enable_prefix_caching=False)
  outs = tight.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
  assert_same_as_alone(outs, prompts, alone, reference)
  assert tight.engine.scheduler.num_preemptions > 0, "the pool should have been too small for everyone"
  assert tight.engine.block_manager.usage == 0


def test_prefix_cache_under_eviction_and_preemption_equals_lone_runs(smollm2, reference, alone):
  chat = smollm2.get_tokenizer()
  system = [{"role": "system", "content": "You are a terse assistant who answers geography questions."}]
  questions = ["What is the capital of France?", "Name a river in Egypt.", "Where is Mount Fuji?",
               "Which ocean is the largest?"]
  shared = [chat.encode(chat.apply_chat_template(system + [{"role": "user", "content": q}]), add_special_tokens=False)
            for q in questions]
  for p in shared: alone[tuple(p)] = smollm2.generate({"prompt_token_ids": p}, PARAMS)[0].outputs[0].token_ids
  long = reference["greedy"][-1]["prompt_ids"][:300]
  cached = LLM(**TIGHT, enable_prefix_caching=True)
  waves = [shared[:2], shared + [long], shared[2:]]     # the long prompt forces evictions and preemptions
  for wave in waves:
    outs = cached.generate([{"prompt_token_ids": p} for p in wave], PARAMS)
    assert_same_as_alone(outs, wave, alone, reference)
  cache = cached.engine.block_manager.prefix_cache
  assert cache.num_hit_tokens >= 2 * 16 * len(shared), "later waves should reuse the shared system prompt"
  assert cached.engine.scheduler.num_preemptions > 0
  assert cached.engine.block_manager.usage == 0
