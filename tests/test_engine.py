"""The engine loop on a tiny random-weight model: requests join and leave, blocks are accounted for every step."""
import pytest
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
  with pytest.raises(ValueError, match="cannot hold one sequence"): LLMEngine(EngineArgs(**TINY, num_kv_blocks=8))
