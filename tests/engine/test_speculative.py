"""Speculative decoding (engine/speculative.py): prompt lookup finds what it should; a step that checks drafts
commits exactly the tokens plain decoding gives (greedy and seeded sampling, with penalties, logprobs, min_tokens
and stops), never leaks a KV block, and keeps the output distribution of sampled requests (a chi-square test that a
wrong acceptance rule fails). The real SmolLM2, batched, chunked, preempted and prefix-cached, gives the tokens of
lone plain runs."""
import argparse
import json
import numpy as np
import pytest
from tinyvllm import LLM, EngineArgs, LLMEngine, SamplingParams
from tinyvllm.engine.speculative import NgramProposer, SpeculativeConfig, propose_ngram

TINY = dict(load_format="dummy", shape="tiny", block_size=4, max_model_len=64, max_num_batched_tokens=32,
            max_num_seqs=16, enable_prefix_caching=True)
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
        "disable_by_batch_size": 16}


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
  assert propose_ngram([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 2, 3, 1) == [9, 2]      # [1 2 3] beats the later [2 3]
  assert propose_ngram([5, 6, 5, 7, 5], 3, 2, 1) == [7, 5]                      # the latest [5], cut at the end
  assert propose_ngram([1, 2, 3, 4], 3, 3, 1) == []                             # nothing repeats
  assert propose_ngram([256, 1, 256], 2, 1, 1) == [1, 256]                      # whole tokens, not their bytes
  assert propose_ngram([1, 0, 0, 0, 1, 0, 0, 0, 7, 1], 2, 1, 1) == [0, 0]       # bytes 01 00 00 00 match mid-token
  assert propose_ngram([4, 4], 3, 5, 5) == []                                   # shorter than prompt_lookup_min


def test_rejected_proposals_pause_a_sequence_longer_each_time_until_one_is_accepted():
  from tinyvllm.engine.sequence import Sequence
  proposer = NgramProposer(SpeculativeConfig(2, "ngram", 2, 1), max_model_len=64)
  seq = Sequence("r", [1, 2, 3, 1, 2], SamplingParams())
  def proposes(n: int) -> list[bool]:
    """Whether each of n steps brings drafts; a step without adds one token that repeats the text (1 2 3 1 2 3 ...)"""
    steps = []
    for _ in range(n):
      seq.num_computed_tokens = seq.num_known_tokens - 1
      expected, drafts = proposer.may_propose([seq]), proposer.propose(seq)
      assert expected == bool(drafts)                   # async scheduling runs on exactly where none will come
      steps.append(bool(drafts))
      if not drafts: seq.output_token_ids.append(seq.token_ids[-3])
    return steps
  assert proposes(1) == [True]
  proposer.checked(seq, 2, 0)                                  # rejected: paused for the next token
  assert proposes(2) == [False, True]
  proposer.checked(seq, 2, 0)                                  # rejected again: 2 tokens
  assert proposes(3) == [False, False, True]
  proposer.checked(seq, 2, 1)                                  # accepted: proposing every step again
  assert proposes(2) == [True, True]
  assert proposer.counts == [3, 6, 1, 1, 0]                 # checks, drafts, accepted, accepted per position


def test_speculative_config_takes_vllms_json_and_names_the_bad_field():
  assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4}') == SpeculativeConfig(4, "ngram", 5, 5)
  assert SpeculativeConfig.parse({"num_speculative_tokens": 2, "prompt_lookup_max": 3}).prompt_lookup_min == 3
  assert SpeculativeConfig.parse('{"model": "draft.gguf", "num_speculative_tokens": 2}').method == "draft_model"
  for bad, field in (('{"num_speculative_tokens": 0}', "num_speculative_tokens"), ("{}", "num_speculative_tokens"),
                     ('{"num_speculative_tokens": 2, "method": "eagle"}', "method"),
                     ('{"num_speculative_tokens": 2, "method": "draft_model"}', "model"),
                     ('{"num_speculative_tokens": 2, "lookahead": 3}', "lookahead"), ("[2]", "speculative_config"),
                     ('{"num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3}', "prompt_lookup_min")):
    with pytest.raises(ValueError, match=field): SpeculativeConfig.parse(bad)


def test_speculative_config_flag_reaches_the_engine():
  """`--speculative-config JSON` as serve.py and bench.py parse it; a bad one fails the start naming the field."""
  parser = argparse.ArgumentParser()
  EngineArgs.add_cli_args(parser)
  args = parser.parse_args(["--speculative-config", json.dumps(SPEC)])
  engine = LLMEngine(EngineArgs(**{**TINY, "speculative_config": args.speculative_config}, num_kv_blocks=24))
  assert engine.speculative == SpeculativeConfig(3, "ngram", 3, 1, 16)
  with pytest.raises(ValueError, match="num_speculative_tokens"):
    LLMEngine(EngineArgs(**TINY, num_kv_blocks=24, speculative_config='{"num_speculative_tokens": -1}'))


def mixed_requests() -> list[tuple[list[int], SamplingParams]]:
  """Repetitive prompts (drafts to check) with every sampling knob the engine has."""
  knobs = [dict(temperature=0), dict(temperature=0.9, seed=1), dict(temperature=0.7, top_k=5, seed=2),
           dict(temperature=1.0, top_p=0.8, seed=3, logprobs=2), dict(temperature=0.8, frequency_penalty=0.4, seed=4),
           dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.2), dict(temperature=0.6, min_tokens=9, seed=5),
           dict(temperature=0, stop_token_ids=[3, 7, 11]), dict(temperature=0.9, n=2, seed=6),
           dict(temperature=0, logit_bias={5: 2.0}, logprobs=1)]
  requests = []
  for i, knob in enumerate(knobs):
    prompt = ([1 + i, 2, 3, 4] * 4)[:5 + i] + [9, 1 + i, 2]
    requests.append((prompt, SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True, **knob)))
  return requests


def run(spec: dict | None, num_kv_blocks: int) -> tuple[dict, LLMEngine]:
  engine = LLMEngine(EngineArgs(**TINY, num_kv_blocks=num_kv_blocks, speculative_config=spec))
  for i, (prompt, params) in enumerate(mixed_requests()): engine.add_request(prompt, params, request_id=str(i))
  done, bm = {}, engine.block_manager
  while engine.has_unfinished_requests():
    for out in engine.step():
      if out.finished: done[out.request_id] = [(c.token_ids, c.logprobs, c.finish_reason) for c in out.outputs]
    for seq in engine.scheduler.running:        # no block past the computed tokens: rejected drafts' are given back
      assert len(seq.block_table) == -(-seq.num_computed_tokens // bm.block_size)
      assert seq.draft_token_ids == []
    held = [b for s in engine.scheduler.running for b in s.block_table]
    cached = [b for b in bm.prefix_cache.blocks() if bm.ref_counts[b] == 1]     # idle in the prefix cache only
    assert len(set(held)) + len(cached) + len(bm.free_blocks) == bm.num_usable_blocks
  assert all(bm.ref_counts[b] == 1 for b in bm.prefix_cache.blocks())      # every sequence gave its blocks back
  return done, engine


def test_checked_drafts_commit_exactly_the_tokens_of_plain_decoding():
  plain, _ = run(None, num_kv_blocks=24)
  speculative, engine = run(SPEC, num_kv_blocks=24)
  stats = engine.stats()
  assert stats.spec_draft_tokens > 20 and 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both happened
  per_position = stats.spec_accepted_per_position           # a draft is accepted only after those before it
  assert len(per_position) == 3 and list(per_position) == sorted(per_position, reverse=True)
  assert sum(per_position) == stats.spec_accepted_tokens
  assert engine.scheduler.num_preemptions > 0 and engine.overlap is not None   # steps overlap where no drafts are checked
  assert speculative.keys() == plain.keys()
  for request_id, completions in plain.items():
    for (tokens, logprobs, reason), (tokens_s, logprobs_s, reason_s) in zip(completions, speculative[request_id]):
      assert tokens_s == tokens and reason_s == reason, request_id
      for step, step_s in zip(logprobs or [], logprobs_s or []):
        assert step.keys() == step_s.keys() and all(abs(step[t] - step_s[t]) < 1e-4 for t in step)


def test_a_draft_model_commits_exactly_the_tokens_of_plain_decoding():
  """A draft model (the target's shape and weights: greedy rows accept its guesses, sampled rows often reject them)
  proposes through an engine of its own; the tokens are plain decoding's, and the draft's pool empties."""
  plain, _ = run(None, num_kv_blocks=24)
  speculative, engine = run({"model": "tiny", "num_speculative_tokens": 3, "disable_by_batch_size": 16}, 24)
  stats = engine.stats()
  assert stats.spec_draft_tokens > 20 and 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
  assert engine.scheduler.num_preemptions > 0
  for request_id, completions in plain.items():
    for (tokens, _, reason), (tokens_s, _, reason_s) in zip(completions, speculative[request_id]):
      assert tokens_s == tokens and reason_s == reason, request_id
  draft = engine.drafts.proposer.draft
  assert engine.drafts.proposer.propose_all([]) == {} and not engine.drafts.proposer.shadows
  assert len(draft.block_manager.free_blocks) == draft.block_manager.num_usable_blocks


def test_drafts_stop_while_more_sequences_run_than_disable_by_batch_size():
  """On a CPU the default is 1: a lone sequence checks drafts, two running together do not."""
  engine = LLMEngine(EngineArgs(**TINY, num_kv_blocks=24, speculative_config={**SPEC, "disable_by_batch_size": None}))
  assert engine.drafts.up_to == 1
  params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  for request_id in ("a", "b"): engine.add_request([3, 4, 5] * 4, params, request_id=request_id)
  while engine.has_unfinished_requests(): engine.step()
  assert engine.stats().spec_draft_tokens == 0
  engine.add_request([3, 4, 5] * 4, params, request_id="alone")
  while engine.has_unfinished_requests(): engine.step()
  assert engine.stats().spec_draft_tokens > 0


def second_tokens(engine: LLMEngine, seeds: range, draft: int, accept_wrongly: bool = False) -> np.ndarray:
  """The second generated token of one request per seed (temperature 1), each step proposing `draft`."""
  class Always(NgramProposer):
    def propose(self, seq): return [draft] if len(seq.output_token_ids) == 1 else []
  if engine.drafts.proposer: engine.drafts.proposer = Always(engine.speculative, engine.max_model_len)
  if accept_wrongly:     # accept a rejected draft half the time: acceptance p(d) + (1 - p(d)) / 2 instead of p(d)
    collect = engine.runner.collect
    def collect_wrongly(step):
      result = collect(step)
      for item in step.scheduled:
        rows = result.sampled.get(item.seq, [])
        if len(rows) > 1 and rows[0].token != draft and item.seq.seq_id % 2: rows[0].token = draft
      return result
    engine.runner.collect = collect_wrongly
  params = {seed: SamplingParams(temperature=1.0, seed=seed, max_tokens=3, ignore_eos=True, logit_bias={draft: 6.0})
            for seed in seeds}
  second = []
  for batch in range(seeds.start, seeds.stop, 4):          # 4 running: each has a row for its draft
    for seed in range(batch, min(batch + 4, seeds.stop)): engine.add_request([5, 9, 2, 7], params[seed], str(seed))
    while engine.has_unfinished_requests():
      second += [out.outputs[0].token_ids[1] for out in engine.step() if out.finished]
  return np.array(second)


def chi_square(a: np.ndarray, b: np.ndarray, draft: int) -> float:
  """Pearson's statistic of the 2 × 2 table (sample × [draft, anything else]): 1 degree of freedom."""
  table = np.array([[(a == draft).sum(), (a != draft).sum()], [(b == draft).sum(), (b != draft).sum()]], float)
  expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
  return float(((table - expected) ** 2 / expected).sum())


def test_sampled_tokens_keep_the_target_distribution():
  """Drafts of one token that the (biased) model samples about half the time: with speculation the second token is
  the draft as often as without (different seeds), and the statistic grows far past the 0.1 % threshold (10.83) when
  a rejected draft is accepted half the time."""
  draft, seeds = 17, 240
  args = EngineArgs(**TINY, num_kv_blocks=40)
  plain = second_tokens(LLMEngine(args), range(seeds, 2 * seeds), draft)
  speculative_engine = LLMEngine(EngineArgs(**{**TINY, "speculative_config": SPEC}, num_kv_blocks=40))
  speculative = second_tokens(speculative_engine, range(seeds), draft)
  assert speculative_engine.stats().spec_draft_tokens >= seeds // 2
  assert 0.2 < (plain == draft).mean() < 0.8
  assert chi_square(plain, speculative, draft) < 10.83
  wrong = second_tokens(LLMEngine(EngineArgs(**{**TINY, "speculative_config": SPEC}, num_kv_blocks=40)),
                        range(seeds), draft, accept_wrongly=True)
  assert chi_square(plain, wrong, draft) > 10.83


COPY = ["Repeat this list exactly, but replace 'pears' with 'plums': apples, bananas, cherries, dates, figs, grapes, "
        "kiwis, lemons, mangoes, pears, oranges.",
        "Fix the typo and print the corrected code:\ndef area(width, height):\n    return widht * height\n",
        "Copy this sentence twice: the quick brown fox jumps over the lazy dog."]


@pytest.mark.parametrize("config", [dict(max_model_len=256, max_num_batched_tokens=64, max_num_seqs=6,
                                         num_kv_blocks=17, enable_prefix_caching=True)])
def test_smollm2_greedy_with_drafts_equals_lone_plain_runs(smollm2, reference, config):
  """16 requests (copy-heavy chats, the reference prompts, a shared system prompt), greedy, with prompt lookup on a
  pool and budget small enough to chunk, preempt and reuse cached prefixes: every request's tokens are the tokens it
  gets alone without speculation."""
  tok = smollm2.get_tokenizer()
  system = [{"role": "system", "content": "You repeat text carefully."}]
  chats = [tok.encode(tok.apply_chat_template(system + [{"role": "user", "content": c + " " * i}]),
                      add_special_tokens=False) for i in range(4) for c in COPY]
  prompts = chats + [c["prompt_ids"] for c in reference["greedy"] if c["name"] != "long"]
  params = SamplingParams(temperature=0, max_tokens=40)
  alone = [smollm2.generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids for p in prompts]
  llm = LLM(**config, speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                                          "prompt_lookup_min": 2, "disable_by_batch_size": 6})
  outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
  for prompt, out, lone in zip(prompts, outs, alone): assert out.outputs[0].token_ids == lone, prompt[-8:]
  stats = llm.engine.stats()
  assert stats.spec_accepted_tokens > 50, stats
  assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.block_manager.prefix_cache.num_hit_tokens > 0


def test_smollm2_with_itself_as_draft_model_equals_lone_plain_runs(smollm2):
  """SmolLM2 drafting for itself (a draft model needs the target's tokenizer; this is the only real pair here): the
  tokens are the lone plain runs', and nearly every draft is accepted (the two engines' steps differ in shape)."""
  from tinyvllm.model.loader import default_model_path
  tok = smollm2.get_tokenizer()
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
             for c in COPY]
  params = SamplingParams(temperature=0, max_tokens=32)
  alone = [smollm2.generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids for p in prompts]
  llm = LLM(max_model_len=512, max_num_seqs=4, speculative_config={
    "model": str(default_model_path()), "num_speculative_tokens": 3, "disable_by_batch_size": 4})
  outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
  for prompt, out, lone in zip(prompts, outs, alone): assert out.outputs[0].token_ids == lone, prompt[-8:]
  stats = llm.engine.stats()
  assert stats.spec_accepted_tokens > 0.8 * stats.spec_draft_tokens > 0, stats


def apd_run(monkeypatch=None, **spec) -> tuple[dict, LLMEngine]:
  spec = {"method": "apd", "model": "tiny-block-diffusion", "num_speculative_tokens": 4, "disable_by_batch_size": 16,
          **spec}
  greedy = [(prompt, params) for prompt, params in mixed_requests() if params.temperature == 0 and params.n == 1]
  engine = LLMEngine(EngineArgs(**TINY, num_kv_blocks=48, speculative_config=spec if spec["model"] else None))
  for i, (prompt, params) in enumerate(greedy): engine.add_request(prompt, params, request_id=str(i))
  done = {}
  while engine.has_unfinished_requests():
    done.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
  return done, engine


def test_a_diffusion_lm_proposes_blocks_that_the_target_checks():
  """APD with mixture weight 0: a block diffusion LM (random weights, the target's vocabulary) proposes k tokens in
  one step of its own engine, and the tokens are plain decoding's; the draft engine keeps no request or block."""
  plain, _ = apd_run(model=None)
  ours, engine = apd_run()
  assert ours == plain and engine.stats().spec_draft_tokens > 20
  draft = engine.drafts.proposer.draft
  assert not draft.has_unfinished_requests()
  assert all(draft.block_manager.ref_counts[b] <= 1 for b in range(draft.block_manager.num_usable_blocks))


def test_an_apd_block_the_draft_engine_cannot_step_fails_the_start():
  with pytest.raises(ValueError, match="num_speculative_tokens.*diffusion_max_block_length"):
    LLMEngine(EngineArgs(**TINY, num_kv_blocks=48, diffusion_max_block_length=8, speculative_config={
      "method": "apd", "model": "tiny-block-diffusion", "num_speculative_tokens": 9}))


def test_apds_mixture_keeps_the_drafts_a_confident_diffusion_lm_vouches_for(monkeypatch):
  """Mixture weight R: the target's row for a draft adds R/(1-R) · log(q/(1-q)) to the draft's logit. A draft made
  certain (q → 1) under R = 0.9 is kept at every position; under R = 0 the same drafts are mostly rejected."""
  from tinyvllm.engine.diffusion_draft import DiffusionProposer
  propose = DiffusionProposer.propose_all
  def certain(self, seqs):
    out = propose(self, seqs)
    self.confidence = {seq: [1.0] * len(tokens) for seq, tokens in out.items()}
    return out
  monkeypatch.setattr(DiffusionProposer, "propose_all", certain)
  _, mixed = apd_run(mixture_weight=0.9)
  _, alone = apd_run(mixture_weight=0.0)
  assert mixed.stats().spec_accepted_tokens == mixed.stats().spec_draft_tokens > 20
  assert alone.stats().spec_accepted_tokens < alone.stats().spec_draft_tokens / 2
