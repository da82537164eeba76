"""The prefix cache's contract: what `match` finds, what `insert` keeps, what `evict` gives back, and that the tree
and the block pool never disagree about who owns a block."""
import random
from tinyvllm.block_manager import BlockManager
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.sequence import Sequence

BS = 4


def new_seq(tokens: list[int]) -> Sequence: return Sequence("r", list(tokens), SamplingParams())


def computed(bm: BlockManager, tokens: list[int]) -> Sequence:
  """A sequence whose tokens were all computed (as after a prefill), reusing whatever the cache has."""
  s = new_seq(tokens)
  bm.reuse_cached_prefix(s)
  bm.allocate(s, len(tokens))
  s.num_computed_tokens = len(tokens)
  return s


def test_second_request_reuses_the_shared_full_blocks_only():
  bm = BlockManager(32, BS, enable_prefix_caching=True)
  system = list(range(100, 110))                      # 10 tokens: 2 full blocks + 2 tokens
  a = computed(bm, system + [1, 2, 3])
  a_blocks = list(a.block_table)
  bm.free(a)
  b = new_seq(system + [7, 8, 9])
  bm.reuse_cached_prefix(b)
  assert b.num_computed_tokens == 8 and b.block_table == a_blocks[:2]
  assert bm.ref_counts[a_blocks[0]] == 2             # held by the tree and by b
  assert a_blocks[3] in bm.free_blocks                # a's partial last block was not cached


def test_match_leaves_the_last_prompt_token_to_compute():
  bm = BlockManager(32, BS, enable_prefix_caching=True)
  bm.free(computed(bm, list(range(8))))
  again = new_seq(list(range(8)))
  bm.reuse_cached_prefix(again)
  assert again.num_computed_tokens == 4               # not 8: the last token's logits are still needed


def test_blocks_held_only_by_the_tree_are_evicted_lru_when_the_pool_runs_short():
  bm = BlockManager(7, BS, enable_prefix_caching=True)   # 6 usable blocks
  old, recent = computed(bm, list(range(12))), computed(bm, list(range(50, 62)))
  bm.free(old); bm.free(recent)
  assert bm.usage == 0 and len(bm.free_blocks) == 0      # all six cached, all evictable
  bm.reuse_cached_prefix(probe := new_seq(list(range(50, 62))))   # touch `recent`
  bm.free(probe)
  s = new_seq(list(range(200, 212)))
  bm.allocate(s, 12)                                       # needs 3: the least recently used prefix goes
  hit = new_seq(list(range(50, 62)) + [1]); bm.reuse_cached_prefix(hit)
  assert hit.num_computed_tokens == 12
  miss = new_seq(list(range(12)) + [1]); bm.reuse_cached_prefix(miss)
  assert miss.num_computed_tokens == 0


def test_a_pool_full_of_cached_blocks_is_not_walked_at_every_allocation(monkeypatch):
  """Each eviction walks the whole tree: under steady load on a full pool, 128 one-block allocations must not mean
  128 walks (they stalled batch-256 steps by 250 ms on the H100)."""
  bm = BlockManager(1 + 512, BS, enable_prefix_caching=True)
  for i in range(128): bm.free(computed(bm, [i] * (4 * BS)))     # 512 cached blocks, all evictable, none free
  assert len(bm.free_blocks) == 0
  walks = []
  evict = bm.prefix_cache.evict
  monkeypatch.setattr(bm.prefix_cache, "evict", lambda n: walks.append(n) or evict(n))
  for i in range(128):
    s = new_seq([1000 + i])
    assert bm.can_allocate(s, 1)
    bm.allocate(s, 1)
  assert len(walks) <= 128 // (513 // 64) + 1
  assert 512 - len(bm.prefix_cache.blocks()) == 128 + len(bm.free_blocks)   # what was evicted is in use or free


def test_random_workload_keeps_tree_and_pool_consistent():
  rng = random.Random(1)
  bm = BlockManager(24, BS, enable_prefix_caching=True)
  prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 12))] for _ in range(4)]
  live: list[Sequence] = []
  for _ in range(1500):
    if rng.random() < 0.55 or not live:
      tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
      s = new_seq(tokens)
      bm.reuse_cached_prefix(s)
      if bm.can_allocate(s, len(tokens)):
        bm.allocate(s, len(tokens)); s.num_computed_tokens = len(tokens); live.append(s)
      else: bm.free(s)
    else:
      bm.free(live.pop(rng.randrange(len(live))))
    tree = bm.prefix_cache.blocks()
    held = {b for s in live for b in s.block_table}
    assert len(tree) == len(set(tree)), "the tree holds a block twice"
    assert not (set(tree) | held) & set(bm.free_blocks), "a block is both free and in use"
    assert all(c >= 0 for c in bm.ref_counts)
    assert len(set(tree) | held) + len(bm.free_blocks) == bm.num_usable_blocks, "a block went missing"
  for s in live: bm.free(s)
  for b in bm.prefix_cache.evict(bm.num_usable_blocks): bm.release(b)
  assert len(bm.free_blocks) == bm.num_usable_blocks and not bm.prefix_cache.blocks()
