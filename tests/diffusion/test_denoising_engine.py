"""A diffusion LM through the one engine (engine/denoising.py): its blocks as multi-token steps of LLMEngine, on the
paged KV pool, scheduled, chunked and preempted like any sequence. A tiny random LLaDA checkpoint throughout."""
import dataclasses
import pytest
from tinyvllm.diffusion.llada import load_diffusion_model
from tinyvllm.diffusion.sampler import DiffusionParams, generate
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine_args import EngineArgs
from tinyvllm.sampling_params import SamplingParams
from tiny_llada import write_tiny_llada    # tests/diffusion: a tiny random LLaDA checkpoint

PROMPTS = [[5, 9, 13, 200, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [1000], [7, 7, 7, 8, 9, 10, 11, 12]]
MIXED = [SamplingParams(max_tokens=16, block_length=4, temperature=0, ignore_eos=True),
         SamplingParams(max_tokens=12, block_length=6, diffusion_steps=4, temperature=0, ignore_eos=True),
         SamplingParams(max_tokens=16, block_length=8, threshold=0.05, temperature=0, ignore_eos=True),
         SamplingParams(max_tokens=8, block_length=4, remasking="random", temperature=0, seed=3, ignore_eos=True),
         SamplingParams(max_tokens=16, block_length=4, temperature=0.8, seed=11, ignore_eos=True)]
GREEDY = MIXED[:3]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory): return write_tiny_llada(tmp_path_factory.mktemp("tiny-llada"))


def engine(tiny_dir, block_causal: bool = False, shift: int | None = None, **kwargs) -> LLMEngine:
  """The tiny LLaDA in LLMEngine; `block_causal` makes the engine treat it as trained block-causal, `shift` as
  predicting each token from the position before (the flags only change what each position attends to and which
  position's logits are read, which is what is tested)."""
  args = dict(model=str(tiny_dir), async_scheduling=False, block_size=4, num_kv_blocks=128, max_num_batched_tokens=64)
  e = LLMEngine(EngineArgs(**{**args, **kwargs}))
  shift = e.model_config.logits_shift if shift is None else shift
  e.model_config = dataclasses.replace(e.model_config, block_causal=block_causal, logits_shift=shift)
  return e


def run(e: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
  ids = [e.add_request(prompt, params) for prompt, params in requests]
  done = {}
  while e.has_unfinished_requests():
    done.update({out.request_id: out.outputs[0].token_ids for out in e.step() if out.finished})
  return [done[i] for i in ids]


def test_recompute_mode_is_llada_reference(tiny_dir):
  """diffusion_recompute=True computes the whole sequence every step, each position seeing all of it: the tokens
  diffusion/sampler.py's `generate` (LLaDA's loop, dense, no cache) gives."""
  e, (tiny, _) = engine(tiny_dir, diffusion_recompute=True), load_diffusion_model(tiny_dir)
  requests = [(prompt, params) for prompt in PROMPTS[:2] for params in GREEDY]
  for (prompt, params), ours in zip(requests, run(e, requests)):
    reference = generate(tiny, prompt, DiffusionParams.from_sampling_params(params)).x[len(prompt):].tolist()
    assert ours == reference


def test_the_cached_mode_is_fast_dllms_prefix_cache(tiny_dir):
  """Cached (the default): a block's first step computes everything and keeps the prefix's K/V, its other steps
  compute the block and the masks after it: what `generate(use_cache=True)` (Fast-dLLM's loop, dense) gives."""
  e, (tiny, _) = engine(tiny_dir), load_diffusion_model(tiny_dir)
  requests = [(prompt, params) for prompt in PROMPTS[:2] for params in GREEDY]
  for (prompt, params), ours in zip(requests, run(e, requests)):
    dp = DiffusionParams.from_sampling_params(params)
    assert ours == generate(tiny, prompt, dp, use_cache=True).x[len(prompt):].tolist()


def test_a_dream_checkpoint_runs_the_dense_loops_in_both_modes(tmp_path):
  """Dream: Qwen2's tensors (q/k/v biases), and the logits at position i read from position i - 1 (it was trained
  from an autoregressive model): recompute and cached modes give what the dense loops give."""
  path = write_tiny_llada(tmp_path, dream=True)
  tiny, _ = load_diffusion_model(path)
  assert tiny.config.shift == 1
  requests = [(prompt, params) for prompt in PROMPTS[:2] for params in GREEDY]
  for recompute in (True, False):
    for (prompt, params), ours in zip(requests, run(engine(path, diffusion_recompute=recompute), requests)):
      dp = DiffusionParams.from_sampling_params(params)
      assert ours == generate(tiny, prompt, dp, use_cache=not recompute).x[len(prompt):].tolist()


@pytest.mark.parametrize("shift", [0, 1])
def test_a_block_causal_cache_computes_what_a_recompute_does(tiny_dir, shift):
  """Block-causal: the prompt (in chunks) and finished blocks keep their K/V, a step computes one block (and, with
  shifted logits, the position before it); a full recompute with the same attention gives the same tokens."""
  requests = [(prompt, params) for prompt in PROMPTS for params in GREEDY]
  cached = run(engine(tiny_dir, block_causal=True, shift=shift, max_num_batched_tokens=17), requests)
  assert cached == run(engine(tiny_dir, block_causal=True, shift=shift, diffusion_recompute=True), requests)


@pytest.mark.parametrize("block_causal,shift", [(False, 0), (True, 0), (True, 1)])
def test_batched_chunked_and_preempted_requests_give_what_each_gives_alone(tiny_dir, block_causal, shift):
  requests = [(prompt, params) for prompt, params in zip(PROMPTS + PROMPTS[::-1], MIXED + MIXED[::-1])]
  alone = [run(engine(tiny_dir, block_causal, shift), [r])[0] for r in requests]
  tight = engine(tiny_dir, block_causal, shift, max_num_batched_tokens=40, num_kv_blocks=12)
  assert run(tight, requests) == alone
  assert tight.scheduler.num_preemptions > 0 or not block_causal    # bidirectional: each takes its blocks at once


GUIDED = [SamplingParams(max_tokens=8, block_length=4, cfg_scale=1.5, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=12, block_length=6, diffusion_steps=4, cfg_scale=0.5, temperature=0, ignore_eos=True)]


@pytest.mark.parametrize("recompute", [True, False])
def test_classifier_free_guidance_is_the_dense_guided_loop(tiny_dir, recompute):
  """cfg_scale > 0: each guided sequence brings a twin with its prompt masked into the same steps, and the sampler
  reads uncond + (scale + 1) · (cond - uncond) for its block (LLaDA's formula); an unguided request in the same
  batch is untouched. Both modes against diffusion/sampler.py's dense loops."""
  tiny, _ = load_diffusion_model(tiny_dir)
  requests = [(PROMPTS[0], GUIDED[0]), (PROMPTS[2], MIXED[0]), (PROMPTS[1], GUIDED[1])]
  for (prompt, params), ours in zip(requests, run(engine(tiny_dir, diffusion_recompute=recompute), requests)):
    dp = DiffusionParams.from_sampling_params(params)
    assert ours == generate(tiny, prompt, dp, use_cache=not recompute).x[len(prompt):].tolist()


@pytest.mark.parametrize("block_causal", [False, True])
def test_guided_requests_batched_and_preempted_give_what_each_gives_alone(tiny_dir, block_causal):
  """A twin takes a seat, budget and blocks beside its sequence, and is preempted and freed with it."""
  requests = [(PROMPTS[0], GUIDED[0]), (PROMPTS[3], MIXED[1]), (PROMPTS[2], GUIDED[1]), (PROMPTS[1], MIXED[0]),
              (PROMPTS[3], GUIDED[0])]
  alone = [run(engine(tiny_dir, block_causal), [r])[0] for r in requests]
  tight = engine(tiny_dir, block_causal, max_num_batched_tokens=48, num_kv_blocks=14, max_num_seqs=4)
  assert run(tight, requests) == alone and tight.block_manager.usage == 0
  assert tight.scheduler.num_preemptions > 0 or not block_causal    # bidirectional: each takes its blocks at once


@pytest.mark.parametrize("shift", [0, 1])
def test_a_block_causal_prompt_is_shared_through_the_prefix_cache(tiny_dir, shift):
  prompt = list(range(100, 124 + shift))
  e = engine(tiny_dir, block_causal=True, shift=shift)
  first = run(e, [(prompt, MIXED[0])])[0]
  e.add_request(prompt, MIXED[0])
  second = None
  while e.has_unfinished_requests():
    for out in e.step(): second, cached = out.outputs[0].token_ids, out.num_cached_tokens
  assert second == first and cached == 20          # the prompt's full blocks of 4 (shifted: but its last token)


def test_aborting_mid_block_leaks_no_kv_block(tiny_dir):
  e = engine(tiny_dir)
  ids = [e.add_request(prompt, params) for prompt, params in zip(PROMPTS, MIXED)]
  for _ in range(3): e.step()
  assert e.block_manager.usage > 0 and any(s.denoising.block_index == 0 and s.denoising.step > 0
                                           for s in e.scheduler.running)
  for request_id in ids: e.abort_request(request_id)
  assert not e.has_unfinished_requests() and e.block_manager.usage == 0


def test_logits_rows_are_bounded_by_the_longest_block_and_give_the_same_tokens(tiny_dir):
  """A step samples a row per block position, so its logits need max_num_seqs × the longest block rows, not a row
  per token: 64-token graphs with 8 rows, and the tokens of an engine whose rows are not bounded."""
  requests = [(prompt, params) for prompt, params in zip(PROMPTS, [MIXED[0], MIXED[3], MIXED[4], MIXED[0]])]
  bounded = engine(tiny_dir, max_num_seqs=2, diffusion_max_block_length=4)
  assert {shape.R for shape in bounded.runner.graphs.graph_set()[0]} == {1, 2, 4, 8}
  assert run(bounded, requests) == run(engine(tiny_dir, max_num_seqs=2), requests)


def test_requests_a_diffusion_lm_cannot_serve_are_refused(tiny_dir):
  e = engine(tiny_dir, max_num_batched_tokens=32, diffusion_max_block_length=8)
  for params, field in [(SamplingParams(top_p=0.5), "top_p"), (SamplingParams(logprobs=1), "logprobs"),
                        (SamplingParams(max_tokens=64, block_length=4), "max_model_len"),
                        (SamplingParams(max_tokens=16, block_length=16), "block_length"),
                        (SamplingParams(max_tokens=48, block_length=4), "max_num_batched_tokens")]:
    with pytest.raises(ValueError, match=field): e.add_request([5, 6, 7], params)


def test_max_tokens_that_is_not_whole_blocks_is_a_cap(tiny_dir):
  """An OpenAI client's max_tokens need not be a multiple of the block: the canvas is rounded up to whole blocks and
  the output stops at max_tokens, the first tokens those of the whole-block request."""
  whole = run(engine(tiny_dir), [(PROMPTS[0], SamplingParams(max_tokens=16, block_length=8, temperature=0, ignore_eos=True))])[0]
  cut = run(engine(tiny_dir), [(PROMPTS[0], SamplingParams(max_tokens=13, block_length=8, temperature=0, ignore_eos=True))])[0]
  assert cut == whole[:13]
