"""The scheduler's policy, on plain integers: decodes first, chunked prefill, preemption, continuous batching."""
from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine.scheduler import Scheduler
from tinyvllm.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, chunked=True):
  return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, chunked)


def seq(n: int, name: str = "r") -> Sequence: return Sequence(name, list(range(n)), SamplingParams())


def run(sched: Scheduler) -> dict[str, int]:
  """One step as the engine does it: compute what was scheduled, append a token where the prompt is done."""
  out = sched.schedule()
  for s in out:
    s.seq.num_computed_tokens += s.num_new_tokens
    if s.seq.num_uncomputed_tokens == 0: s.seq.output_token_ids.append(7)
  return {s.seq.request_id: s.num_new_tokens for s in out}


def test_long_prompt_is_chunked_and_decodes_go_first():
  sched = make(budget=16)
  a = seq(3, "a"); sched.add(a)
  assert run(sched) == {"a": 3}
  b = seq(40, "b"); sched.add(b)
  assert run(sched) == {"a": 1, "b": 15}        # a decodes; b's prompt fills the rest of the budget
  assert run(sched) == {"a": 1, "b": 15}
  assert run(sched) == {"a": 1, "b": 10}        # b's last chunk; it samples its first token
  assert run(sched) == {"a": 1, "b": 1}


def test_without_chunking_a_prompt_waits_for_a_budget_that_fits_it_whole():
  sched = make(budget=16, chunked=False)
  sched.add(seq(10, "a")); sched.add(seq(10, "b"))
  assert run(sched) == {"a": 10}
  assert run(sched) == {"a": 1, "b": 10}


def test_max_num_seqs_caps_the_batch():
  sched = make(max_num_seqs=2, budget=64)
  for name in "abc": sched.add(seq(2, name))
  assert run(sched) == {"a": 2, "b": 2}
  assert [s.request_id for s in sched.waiting] == ["c"]


def test_newest_sequence_is_preempted_when_blocks_run_out_and_recomputed_later():
  sched = make(num_blocks=5, block_size=4, budget=64)      # 4 usable blocks = 16 slots
  a, b = seq(7, "a"), seq(7, "b")
  sched.add(a); sched.add(b)
  assert run(sched) == {"a": 7, "b": 7}                     # 2 + 2 blocks: the pool is full
  assert run(sched) == {"a": 1, "b": 1}                     # token 7 still fits each second block
  steps = run(sched)                                        # a needs a third block: b (newest) is preempted
  assert steps == {"a": 1} and b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
  assert sched.num_preemptions == 1 and b.block_table == [] and sched.waiting[0] is b
  sched.finish(a, "stop")
  assert run(sched) == {"b": 9}                             # recompute prompt + the 2 tokens it had generated


def test_finish_frees_blocks_and_leaves_nothing_behind():
  sched = make()
  seqs = [seq(5, str(i)) for i in range(4)]
  for s in seqs: sched.add(s)
  run(sched)
  for s in seqs: sched.finish(s, "abort")
  assert not sched.has_unfinished() and sched.block_manager.usage == 0
