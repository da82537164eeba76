"""Batched, chunked and preempted runs give exactly the tokens each prompt gives alone (real SmolLM2, greedy)."""
from tinyvllm import LLM, SamplingParams
from conftest import near_tie_prefix

MAX_TOKENS = 12


def test_mixed_batch_with_tiny_budget_and_pool_equals_lone_runs(smollm2, reference):
  cases = [c for c in reference["greedy"] if c["name"] != "long"]
  long_prompt = reference["greedy"][-1]["prompt_ids"][:300]
  prompts = [c["prompt_ids"] for c in cases] + [long_prompt, cases[0]["prompt_ids"][:3]]
  params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
  alone = [smollm2.generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids for p in prompts]

  # 64-token steps chunk the 300-token prompt; 3 sequences at a time; 20 blocks of 16 cannot hold all six
  tight = LLM(max_model_len=320, max_num_batched_tokens=64, max_num_seqs=3, num_kv_blocks=21,
              enable_prefix_caching=False)
  outs = tight.generate([{"prompt_token_ids": p} for p in prompts], params)
  margins = {tuple(c["prompt_ids"]): c["top2_margins"] for c in cases}
  for prompt, want, out in zip(prompts, alone, outs):
    n = near_tie_prefix(margins.get(tuple(prompt), [1.0] * MAX_TOKENS)[:MAX_TOKENS])
    assert out.outputs[0].token_ids[:n] == want[:n]
  assert tight.engine.scheduler.num_preemptions > 0, "the pool should have been too small for everyone"
  assert tight.engine.block_manager.usage == 0
