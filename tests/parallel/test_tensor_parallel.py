"""Tensor parallelism (parallel/tensor_parallel.py) on several CPU devices ("CPU", "CPU:1", ...): a model split N ways
computes what the unsplit model computes, so it decodes the same greedy tokens with the same logprobs."""
import pytest
from tinyvllm import LLM, EngineArgs, SamplingParams
from conftest import near_tie_prefix

# 16 tokens per step: the 21-token prompt is prefilled in two chunks, the first batched with the 3-token prompt
TINY = dict(load_format="dummy", shape="tiny", block_size=4, max_model_len=64, max_num_batched_tokens=16,
            max_num_seqs=4, enable_prefix_caching=False)
# K and V × 2 layers × 4 tokens × 2 KV heads × head_dim 16 × the compute dtype's bytes (float32 on CPU, fp16 on GPUs)
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * EngineArgs(**TINY).compute_dtype().itemsize


@pytest.mark.parametrize("packed", [False, True], ids=["float", "packed-q4_1"])
def test_two_way_split_of_the_tiny_model_gives_the_same_tokens_and_logprobs(packed):
  """Float weights, and packed ones (kernels/quantized.py: each device runs the packed matmul kernel on its share of the
  rows, or of the blocks, summing the partial outputs across devices)."""
  prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(n)]} for i, n in enumerate((3, 21))]
  params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2) for n in (7, 5)]
  runs = {}
  for n in (1, 2):
    llm = LLM(tensor_parallel_size=n, kv_cache_memory_gb=16 * BLOCK_BYTES / 2**30, packed_weights=packed, **TINY)
    # the KV budget is per device, as in vLLM: each device holds half of every block, so twice as many fit
    assert llm.engine.block_manager.num_blocks == 1 + 16 * n
    runs[n] = [out.outputs[0] for out in llm.generate(prompts, params)]
  for one, two in zip(runs[1], runs[2]):
    assert two.token_ids == one.token_ids
    for a, b in zip(one.logprobs, two.logprobs):
      assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-5 for t in a)


def test_three_way_split_of_smollm2_gives_the_one_device_tokens(smollm2, reference):
  """SmolLM2's 9 heads and 3 KV heads split 3 ways, its Q4_1/Q8_0 weights packed on both sides. The split sums
  add up in another order, so the comparison stops at the reference's first near-tie."""
  case = next(c for c in reference["greedy"] if c["name"] == "short_en")
  params = SamplingParams(temperature=0, max_tokens=min(12, near_tie_prefix(case["top2_margins"])), ignore_eos=True)
  split = LLM(tensor_parallel_size=3, max_model_len=64, max_num_seqs=1, enable_prefix_caching=False)
  got = split.generate({"prompt_token_ids": case["prompt_ids"]}, params)[0].outputs[0].token_ids
  assert got == smollm2.generate({"prompt_token_ids": case["prompt_ids"]}, params)[0].outputs[0].token_ids


def test_a_model_that_cannot_be_split_evenly_is_a_clear_error():
  with pytest.raises(ValueError, match="num_attention_heads=9"): LLM(tensor_parallel_size=2)
  with pytest.raises(ValueError, match="tensor_parallel_size"): EngineArgs(tensor_parallel_size=0).devices()
