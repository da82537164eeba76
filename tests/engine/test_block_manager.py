"""The block manager's contract: incremental allocation, reference counts, and nothing ever lost."""
import random
import pytest
from tinyvllm.engine.block_manager import BlockManager, NULL_BLOCK
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine.sequence import Sequence


def seq(n_tokens: int = 1) -> Sequence: return Sequence("r", list(range(n_tokens)), SamplingParams())


def test_blocks_are_taken_one_at_a_time_as_tokens_arrive():
  bm, s = BlockManager(num_blocks=10, block_size=4), seq()
  for n_tokens, n_blocks in [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)]:
    bm.allocate(s, n_tokens)
    assert len(s.block_table) == n_blocks
  assert bm.num_free_blocks == 9 - 3


def test_null_block_is_never_handed_out():
  bm = BlockManager(num_blocks=5, block_size=2)
  s = seq()
  bm.allocate(s, 8)
  assert NULL_BLOCK not in s.block_table and bm.num_free_blocks == 0
  assert not bm.can_allocate(s, 9)
  with pytest.raises(RuntimeError, match="exhausted"): bm.allocate(s, 9)


def test_shared_blocks_return_to_the_pool_only_when_the_last_owner_frees_them():
  bm = BlockManager(num_blocks=6, block_size=4)
  a, b = seq(), seq()
  bm.allocate(a, 8)
  bm.share(b, a.block_table[:1])
  bm.free(a)
  assert bm.num_free_blocks == 4         # a's second block is back, the shared one is still b's
  bm.free(b)
  assert bm.num_free_blocks == 5 and bm.usage == 0


def test_slot_mapping_follows_the_block_table():
  bm, s = BlockManager(num_blocks=8, block_size=4), seq()
  bm.allocate(s, 6)
  assert [bm.slot(s, p) for p in range(6)] == [s.block_table[p // 4] * 4 + p % 4 for p in range(6)]


def test_random_workload_keeps_every_invariant():
  rng = random.Random(0)
  bm = BlockManager(num_blocks=40, block_size=4)
  live: dict[Sequence, int] = {}           # sequence -> tokens it holds
  for _ in range(3000):
    op = rng.random()
    if op < 0.3 or not live:
      s, n = seq(), rng.randint(1, 20)
      if bm.can_allocate(s, n): bm.allocate(s, n); live[s] = n
    elif op < 0.8:
      s = rng.choice(list(live)); n = live[s] + rng.randint(1, 6)
      if bm.can_allocate(s, n): bm.allocate(s, n); live[s] = n
    else:
      s = rng.choice(list(live)); bm.free(s); del live[s]
    held = [b for s in live for b in s.block_table]
    assert all(len(s.block_table) == -(-n // 4) for s, n in live.items())
    assert len(held) == len(set(held)) and not set(held) & set(bm.free_blocks)
    assert len(held) + bm.num_free_blocks == bm.num_usable_blocks
    assert all(c >= 0 for c in bm.ref_counts)
  for s in list(live): bm.free(s)
  assert bm.num_free_blocks == bm.num_usable_blocks
