"""The engine loop on a tiny random-weight model: requests join and leave, blocks are accounted for every step."""
import pytest
from tinygrad.helpers import DEV
from tinyvllm import EngineArgs, LLMEngine, SamplingParams

TINY = dict(load_format="dummy", shape="tiny", block_size=4, max_model_len=64, max_num_batched_tokens=32,
            max_num_seqs=4, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def engine() -> LLMEngine: return LLMEngine(EngineArgs(**TINY, num_kv_blocks=17))


def run_checking_blocks(engine: LLMEngine) -> dict[str, list[int]]:
  done = {}
  bm = engine.block_manager
  while engine.has_unfinished_requests():
    for out in engine.step():
      if out.finished: done[out.request_id] = out.outputs[0].token_ids
    for seq in engine.scheduler.running:
      assert len(seq.block_table) == -(-seq.num_computed_tokens // bm.block_size)
    held = [b for s in engine.scheduler.running for b in s.block_table]
    assert len(held) == len(set(held)) and len(held) + len(bm.free_blocks) == bm.num_usable_blocks
  assert bm.usage == 0
  return done


def test_requests_join_and_leave_between_steps_and_free_everything(engine):
  params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5, 12, 7, 4)]
  for i, p in enumerate(params): engine.add_request([1 + i] * (5 + 7 * i), p, request_id=str(i))
  done = run_checking_blocks(engine)
  assert {k: len(v) for k, v in done.items()} == {str(i): p.max_tokens for i, p in enumerate(params)}
  assert engine.scheduler.num_preemptions > 0      # 16 usable blocks of 4 cannot hold them all at once


def test_abort_frees_blocks_at_once(engine):
  engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=40, ignore_eos=True), request_id="gone")
  engine.add_request(list(range(1, 10)), SamplingParams(max_tokens=3, ignore_eos=True), request_id="kept")
  engine.step(); engine.step()
  engine.abort_request("gone")
  assert all(s.request_id != "gone" for s in engine.scheduler.running + list(engine.scheduler.waiting))
  assert list(run_checking_blocks(engine)) == ["kept"]


def test_length_limits_end_generation_with_finish_reason_length(engine):
  engine.add_request(list(range(1, 60)), SamplingParams(max_tokens=100, ignore_eos=True), request_id="long")
  out = None
  while engine.has_unfinished_requests(): out = engine.step()[-1]
  assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 64 - 59


def test_n_completions_share_the_prompt_blocks():
  engine = LLMEngine(EngineArgs(**{**TINY, "enable_prefix_caching": True}, num_kv_blocks=40))
  engine.add_request(list(range(1, 34)), SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True))
  outs = [o for _ in range(40) if engine.has_unfinished_requests() for o in engine.step() if o.finished]
  assert len(outs) == 1 and len(outs[0].outputs) == 3
  assert engine.block_manager.prefix_cache.num_hit_tokens == 2 * 32   # siblings 2 and 3 reuse 8 full blocks


def test_requests_that_can_never_fit_are_rejected_clearly(engine):
  with pytest.raises(ValueError, match="max_model_len"): engine.add_request(list(range(64)), SamplingParams())
  with pytest.raises(ValueError, match="empty"): engine.add_request([], SamplingParams())
  with pytest.raises(ValueError, match="token ids"): engine.add_request([10**6], SamplingParams())
  for field, value in [("cfg_scale", 1.5), ("block_length", 8), ("threshold", 0.9), ("remasking", "random")]:
    with pytest.raises(ValueError, match=field): engine.add_request([1, 2], SamplingParams(**{field: value}))
  with pytest.raises(ValueError, match="cannot hold one sequence"): LLMEngine(EngineArgs(**TINY, num_kv_blocks=8))


def test_defaults_fit_the_device():
  cpu, gpu = EngineArgs(device="CPU").sized_for_device(), EngineArgs(device="CUDA").sized_for_device()
  assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (64, 256)
  assert (gpu.max_num_seqs, gpu.max_num_batched_tokens) == (256, 2048)
  assert EngineArgs(device="CUDA", max_num_seqs=8).sized_for_device().max_num_seqs == 8      # set: kept
  GiB = 2**30      # a GPU's pool takes what gpu_memory_utilization leaves of its memory after weights and scratch
  assert EngineArgs().kv_cache_bytes((70 * GiB, 80 * GiB), scratch=2 * GiB) == 60 * GiB      # 0.9 × 80 - 10 - 2
  # in whole 256 MiB: free memory that differs by a few MB between two starts gives the same pool (and graphs)
  assert EngineArgs().kv_cache_bytes((70 * GiB - 3 * 2**20, 80 * GiB), 2 * GiB) == 60 * GiB - 2**28
  assert EngineArgs().kv_cache_bytes((70 * GiB - 5 * 2**20, 80 * GiB), 2 * GiB) == 60 * GiB - 2**28
  assert EngineArgs(gpu_memory_utilization=0.5).kv_cache_bytes((70 * GiB, 80 * GiB), 2 * GiB) == 28 * GiB
  assert EngineArgs(kv_cache_memory_gb=3).kv_cache_bytes((70 * GiB, 80 * GiB), 2 * GiB) == 3 * GiB
  assert EngineArgs().kv_cache_bytes(None, 2 * GiB) == GiB                                    # a CPU
  with pytest.raises(ValueError, match="gpu_memory_utilization"):
    EngineArgs(gpu_memory_utilization=1.5).kv_cache_bytes((70 * GiB, 80 * GiB), 0)


def test_unset_max_model_len_is_what_the_pool_holds():
  args = {**TINY, "max_model_len": None}      # the tiny shape's context: 1,024 positions, more than 16 blocks of 4
  engine = LLMEngine(EngineArgs(**args, num_kv_blocks=17))
  assert engine.max_model_len == 16 * 4
  with pytest.raises(ValueError, match="cannot hold one sequence"):
    LLMEngine(EngineArgs(**{**args, "max_model_len": 128}, num_kv_blocks=17))     # asked for: refused, not shrunk


def test_an_engine_built_on_another_thread_than_the_one_that_opened_the_kernel_cache():
  # serve.py sizes its queue from the device on the main thread (which may open tinygrad's cache db there), then
  # builds the engine on a loader thread
  import threading
  from tinygrad import helpers
  helpers._db_connection = None
  helpers.db_connection()                         # a plain connection, opened on this thread
  errors = []
  def build():
    try: LLMEngine(EngineArgs(**TINY, num_kv_blocks=17)).warmup()
    except Exception as e: errors.append(e)
  thread = threading.Thread(target=build)
  thread.start()
  thread.join()
  assert errors == []


def generate(engine: LLMEngine, prompt: list[int], params: SamplingParams):
  engine.add_request(prompt, params, request_id="one")
  while engine.has_unfinished_requests():
    for out in engine.step():
      if out.finished: return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_prompt_logprobs_equal_the_logprobs_of_the_same_tokens_when_generated(temperature):
  """Generate 30 tokens with logprobs, then feed prompt + generation back as a prompt: the prompt logprobs of those
  positions (computed in chunks by the prefill path, every position at once) must equal the decode path's."""
  engine = LLMEngine(EngineArgs(**{**TINY, "enable_prefix_caching": True}, num_kv_blocks=40))
  head = list(range(7, 17))
  gen = generate(engine, head, SamplingParams(temperature=temperature, seed=3, max_tokens=30, ignore_eos=True,
                                               logprobs=3)).outputs[0]
  for _ in range(2):               # the second time the whole prompt is in the prefix cache: it must not be skipped
    out = generate(engine, head + gen.token_ids, SamplingParams(temperature=temperature, max_tokens=1, prompt_logprobs=3))
    assert len(out.prompt_logprobs) == 40 and out.prompt_logprobs[0] is None
    for token, expected, got in zip(gen.token_ids, gen.logprobs, out.prompt_logprobs[10:]):
      assert got.keys() == expected.keys() and token in got
      assert all(abs(got[t] - expected[t]) < 1e-3 for t in got)
    assert engine.block_manager.prefix_cache.match(head + gen.token_ids)      # cached, yet every position computed


def test_seeded_request_draws_the_same_tokens_alone_in_a_mixed_batch_and_when_preempted():
  seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=42, max_tokens=24, ignore_eos=True)
  prompt = list(range(3, 23))
  alone = generate(LLMEngine(EngineArgs(**TINY, num_kv_blocks=40)), prompt, seeded).outputs[0].token_ids
  crowded = LLMEngine(EngineArgs(**{**TINY, "max_num_seqs": 16}, num_kv_blocks=30))
  others = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            SamplingParams(temperature=1.2, min_p=0.05, max_tokens=16, ignore_eos=True),
            SamplingParams(temperature=0.8, presence_penalty=1.0, repetition_penalty=1.3, max_tokens=20, ignore_eos=True,
                           logprobs=2),
            SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=12, ignore_eos=True)]
  for i in range(15): crowded.add_request(list(range(40 + i, 52 + 2 * i)), others[i % len(others)], request_id=f"o{i}")
  crowded.add_request(prompt, seeded, request_id="seeded")         # newest: the first to be preempted
  seq = crowded.requests["seeded"].seqs[0]
  done = run_checking_blocks(crowded)
  assert seq.num_preemptions > 0 and done["seeded"] == alone


def test_beam_searches_decode_sized_graphs_only(monkeypatch):
  """`--beam` applies to model graphs of at most max_num_seqs tokens (decode steps, which replay every step); a step
  with a long prompt chunk compiles without it. The compile context is recorded instead of entered, so no search
  runs here."""
  import contextlib
  import tinyvllm.runner.graphs as graphs
  seen: list[dict] = []
  monkeypatch.setattr(graphs, "Context", lambda **options: seen.append(options) or contextlib.nullcontext())
  engine = LLMEngine(EngineArgs(**TINY, beam=2))
  engine.add_request(list(range(1, 20)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
  while engine.has_unfinished_requests(): engine.step()
  assert sorted(shape.T for shape in engine.runner.graphs.models) == [1, 32]
  assert seen == [{}, {"BEAM": 2}, {"BEAM": 2}]                   # one prefill step, then two decode steps


def test_unknown_attention_backend_is_refused_before_loading():
  with pytest.raises(ValueError, match="attention_backend"): LLMEngine(EngineArgs(**TINY, attention_backend="flash"))


def test_device_argument_places_the_engine_on_that_device():
  before = DEV.value
  try:
    engine = LLMEngine(EngineArgs(**TINY, device="CPU:1", num_kv_blocks=17))
    assert engine.model.model.norm.weight.device == "CPU:1"
    engine.add_request(list(range(1, 12)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(next(o for _ in range(10) for o in engine.step() if o.finished).outputs[0].token_ids) == 4
  finally: DEV.value = before


def test_seeded_n_completions_differ_from_each_other_and_repeat_exactly(engine):
  params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
  runs = []
  for request_id in ("first", "again"):
    engine.add_request(list(range(1, 12)), params, request_id=request_id)
    runs.append(next(out for _ in range(40) for out in engine.step() if out.finished))
  completions = [tuple(tuple(c.token_ids) for c in run.outputs) for run in runs]
  assert completions[0] == completions[1] and len(set(completions[0])) == 3


def test_output_kinds_carry_the_same_tokens(engine):
  """"cumulative" outputs grow step by step; "delta" ones, joined, are the same tokens and logprobs; "final_only"
  gives one output, the finished one. Each request has n = 2 with seeds, so the two completions differ."""
  seen: dict[str, list] = {}
  for kind in ("cumulative", "delta", "final_only"):
    p = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, logprobs=1, output_kind=kind)
    engine.add_request(list(range(3, 20)), p, request_id=kind)
    seen[kind] = []
    while engine.has_unfinished_requests(): seen[kind] += [o for o in engine.step() if o.request_id == kind]
  cumulative, delta, final = seen["cumulative"], seen["delta"], seen["final_only"]
  assert len(final) == 1 and final[0].finished and len(delta) == len(cumulative) > 1
  for i in range(2):
    tokens = [o.outputs[i].token_ids for o in cumulative]
    assert all(a == b[:len(a)] for a, b in zip(tokens, tokens[1:]))              # each extends the one before
    joined = [t for o in delta for t in o.outputs[i].token_ids]
    assert joined == tokens[-1] == final[0].outputs[i].token_ids and len(joined) == 6
    assert [lp for o in delta for lp in o.outputs[i].logprobs] == cumulative[-1].outputs[i].logprobs
  assert cumulative[-1].outputs[0].token_ids != cumulative[-1].outputs[1].token_ids


def test_unknown_output_kind_is_rejected():
  with pytest.raises(ValueError, match="output_kind"): SamplingParams(output_kind="partial")


def run_mixed_workload(async_scheduling: bool) -> tuple[dict[str, list], int]:
  """20 requests of every kind on a pool too small for all of them: greedy and seeded sampling, stop tokens that end
  some early, n=2, logprobs, a frequency penalty (whose steps cannot run ahead), shared prefixes. Returns each
  request's (token ids, logprobs) per completion and how many steps were prepared while the one before still ran."""
  engine = LLMEngine(EngineArgs(**{**TINY, "enable_prefix_caching": True, "max_num_seqs": 6}, num_kv_blocks=30,
                                async_scheduling=async_scheduling))
  prepare, ahead = engine.prepare, [0]
  def counted():
    ahead[0] += engine.overlap is not None and engine.overlap.in_flight is not None
    return prepare()
  engine.prepare = counted
  shared = list(range(20, 32))
  for i in range(20):
    prompt = (shared if i % 3 == 0 else []) + [(7 * i + j) % 500 + 1 for j in range(3 + (5 * i) % 30)]
    engine.add_request(prompt, SamplingParams(
      n=2 if i % 7 == 3 else 1, temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=1 + (11 * i) % 24,
      stop_token_ids=[5, 9, 13, 17, 21] if i % 4 == 0 else [], ignore_eos=True, logprobs=2 if i % 5 == 1 else None,
      frequency_penalty=0.5 if i == 8 else 0.0), request_id=str(i))
  done = {}
  while engine.has_unfinished_requests():
    for out in engine.step():
      if out.finished: done[out.request_id] = [(c.token_ids, c.logprobs) for c in out.outputs]
  assert engine.scheduler.num_preemptions > 0 and len(engine.scheduler.running) == 0
  assert all(engine.block_manager.ref_counts[b] == 1 for b in engine.block_manager.prefix_cache.blocks())
  return done, ahead[0]


def test_steps_prepared_while_the_last_one_runs_give_the_tokens_of_one_step_at_a_time():
  ahead, num_ahead = run_mixed_workload(async_scheduling=True)
  one_by_one, none_ahead = run_mixed_workload(async_scheduling=False)
  assert num_ahead > 20 and none_ahead == 0, "most steps should have been prepared ahead, with async scheduling only"
  assert len(ahead) == 20 and ahead.keys() == one_by_one.keys()
  for request_id, completions in ahead.items():    # batches differ (finished rows leave a step later): logprobs
    for (tokens, logprobs), (tokens_1, logprobs_1) in zip(completions, one_by_one[request_id]):   # may round apart
      assert tokens == tokens_1
      for step, step_1 in zip(logprobs or [], logprobs_1 or []):
        assert step.keys() == step_1.keys() and all(abs(step[t] - step_1[t]) < 1e-4 for t in step)


def _mixed_batch(prompt_step: int, length_step: int, **engine_args) -> dict:
  """Four requests (greedy and seeded sampling, logprobs, prompts of different lengths chunked across steps) run to
  the end in one engine: their finished outputs by request id."""
  engine = LLMEngine(EngineArgs(**TINY, num_kv_blocks=40, **engine_args))
  for i in range(4):
    params = SamplingParams(temperature=0.8 if i % 2 else 0, seed=i, max_tokens=6, logprobs=3, ignore_eos=True)
    prompt = [(prompt_step * i + 5 * j) % 500 + 1 for j in range(7 + length_step * i)]
    engine.add_request(prompt, params, request_id=str(i))
  return {o.request_id: o.outputs[0] for _ in range(100) if engine.has_unfinished_requests()
          for o in engine.step() if o.finished}


def _assert_same_tokens_and_logprobs(fast: dict, reference: dict) -> None:
  assert len(fast) == 4
  for request_id, out in fast.items():
    assert out.token_ids == reference[request_id].token_ids
    for a, b in zip(out.logprobs, reference[request_id].logprobs):
      assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_paged_attention_equals_the_gather_reference():
  """The fast path (kernels that read the pool through the block tables) and the readable reference (a dense copy
  of each token's context, then tinygrad's attention) give the same tokens and logprobs, with prompts chunked across
  steps, decodes and prompt chunks in one batch, and contexts of different lengths."""
  _assert_same_tokens_and_logprobs(_mixed_batch(7, 13, attention_backend="paged"),
                                   _mixed_batch(7, 13, attention_backend="gather"))


def test_fast_kernels_equal_the_reference_kernels():
  """The same tiny model through the fast kernels (attention straight from the pool, RoPE applied inside the KV write
  and the attention kernels, q/k/v read in place from one projection's output) and through `kernels="reference"`
  (tinygrad's plain operations: RoPE, norms and residuals of their own, a dense copy of each context): the same
  tokens and logprobs. Both load unpacked weights, so both have the same random ones."""
  _assert_same_tokens_and_logprobs(_mixed_batch(11, 11, kernels="fast", packed_weights=False),
                                   _mixed_batch(11, 11, kernels="reference", packed_weights=False))


def test_reference_kernels_refuse_packed_weights_and_unknown_kernels():
  with pytest.raises(ValueError, match="unpacked"): LLMEngine(EngineArgs(**TINY, kernels="reference", packed_weights=True))
  with pytest.raises(ValueError, match="kernels"): LLMEngine(EngineArgs(**TINY, kernels="fastest"))
