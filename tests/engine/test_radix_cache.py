"""The prefix cache's contract: what `match` finds, what `insert` keeps, what `evict` gives back (least recently used
leaves, exactly as many as asked, never a block in use), and that the tree and the block pool never disagree about
who owns a block or how many could be evicted."""
import random
from collections import Counter
from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine.sequence import Sequence

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


def test_eviction_takes_the_least_recently_used_leaf_and_then_maybe_its_parent():
  bm = BlockManager(16, 2, enable_prefix_caching=True)
  a = computed(bm, [1, 2, 3, 4, 0])                  # root ─ [1 2] ─ [3 4]
  b = computed(bm, [5, 6, 0])                        # root ─ [5 6]
  c = computed(bm, [1, 2, 7, 8, 0])                  #        [1 2] ─ [7 8]   ([1 2] borrowed from a)
  (a12, a34), b56, c78 = a.block_table[:2], b.block_table[0], c.block_table[1]
  for s in (a, b, c): bm.free(s)
  assert bm.prefix_cache.match([5, 6, 0]) == [b56]                          # [5 6] is now the most recently used
  assert bm.num_free_blocks == bm.num_usable_blocks
  # [1 2] was used before [5 6], but it is no leaf until both its children are gone
  assert [bm.prefix_cache.evict(1) for _ in range(5)] == [[a34], [c78], [a12], [b56], []]


def test_a_block_held_by_a_running_sequence_is_never_evicted_nor_are_its_ancestors():
  bm = BlockManager(16, 2, enable_prefix_caching=True)
  a = computed(bm, [1, 2, 3, 4])                     # a and b computed the same prefix side by side
  b = computed(bm, [1, 2, 3, 4, 5, 6, 7, 8])
  tree_prefix, below = a.block_table[:], b.block_table[2:]
  bm.free(a)                                         # the tree keeps a's two blocks, which nobody holds now,
  bm.cache_computed_blocks(b)                        # and b's last two (which b holds) hang below them
  assert bm.num_free_blocks == len(bm.free_blocks) and bm.prefix_cache.evict(100) == []
  bm.free(b)                                         # b's own copies of [1 2] [3 4] were never cached: freed now
  assert bm.num_free_blocks == bm.num_usable_blocks
  assert bm.prefix_cache.evict(100) == below[::-1] + tree_prefix[::-1]


def test_the_allocator_evicts_exactly_the_blocks_it_needs():
  bm = BlockManager(1 + 512, BS, enable_prefix_caching=True)
  for i in range(128): bm.free(computed(bm, [i] * (4 * BS)))     # 512 cached blocks, all evictable, none free
  assert len(bm.free_blocks) == 0 and bm.num_free_blocks == 512
  bm.allocate(s := new_seq([1000] * 9), 9)                       # needs 3: the oldest chain loses its last 3
  assert len(bm.prefix_cache.blocks()) == 509 and len(bm.free_blocks) == 0 and bm.num_free_blocks == 509
  for n in range(10, 4 * BS + 1):                                # one block at a time as it crosses into a new one
    bm.allocate(s, n)
    assert len(bm.prefix_cache.blocks()) + len(s.block_table) == 512 and len(bm.free_blocks) == 0
  assert len(bm.prefix_cache.match([0] * 4 * BS)) == 0 and len(bm.prefix_cache.match([1] * 4 * BS)) == 3


class NoWalk(dict):
  """A node's children that may be looked up, added and removed, but not walked."""
  def _walked(self, *_): raise AssertionError("walked the tree")
  __iter__ = keys = values = items = _walked


def test_stats_allocation_and_eviction_never_walk_the_tree():
  bm = BlockManager(1 + 64, BS, enable_prefix_caching=True)
  for i in range(16): bm.free(computed(bm, [i] * (4 * BS)))      # a full pool, every block cached and evictable
  stack = [bm.prefix_cache.root]
  while stack:
    node = stack.pop()
    stack.extend(node.children.values())
    node.children = NoWalk(node.children)
  assert bm.usage == 0 and bm.num_free_blocks == 64
  assert bm.can_allocate(s := new_seq([1000] * 9), 9)
  bm.allocate(s, 9)                                               # evicts 3
  hit = computed(bm, [5] * (4 * BS) + [1])                        # borrows 4 blocks, evicts 1 for its last token
  assert hit.block_table[:4] == bm.prefix_cache.match([5] * (4 * BS) + [1])
  bm.free(hit); bm.free(s)
  assert bm.usage == 0 and bm.num_free_blocks == 64 and bm.prefix_cache.evict(64)


def test_a_prefix_reused_again_and_again_leaves_no_pile_of_stale_heap_entries():
  bm = BlockManager(1 + 256, BS, enable_prefix_caching=True)
  for i in range(1000): bm.free(computed(bm, [1] * (4 * BS) + [i]))   # each reuse locks and unlocks the same 4
  assert len(bm.prefix_cache.heap) <= 2 * bm.prefix_cache.num_evictable + 65
  recount(bm, [])


def recount(bm: BlockManager, live: list[Sequence]) -> None:
  """Every count the block manager and the tree keep, checked against one computed from scratch."""
  cache = bm.prefix_cache
  holders = Counter(b for s in live for b in s.block_table)
  nodes, stack = [], [cache.root]
  while stack:
    nodes.append(node := stack.pop())
    stack.extend(node.children.values())
  locked = {}
  for node in reversed(nodes[1:]):                                # children before their parents
    locked[node] = (holders[node.block] > 0) + sum(locked[c] > 0 for c in node.children.values())
    assert node.lock_ref == locked[node], f"block {node.block}: lock_ref {node.lock_ref}, recount {locked[node]}"
  cached = {n.block for n in nodes[1:]}
  assert sorted(cached) == sorted(cache.blocks())
  assert all(bm.ref_counts[b] == holders[b] + (b in cached) for b in range(1, bm.num_blocks))
  assert sorted(bm.free_blocks) == [b for b in range(1, bm.num_blocks) if bm.ref_counts[b] == 0]
  evictable = [n for n in nodes[1:] if locked[n] == 0]
  assert cache.num_evictable == len(evictable) and bm.num_free_blocks == len(bm.free_blocks) + len(evictable)
  in_heap = {id(n) for _, _, n in cache.heap}
  assert all(id(n) in in_heap for n in evictable if not n.children), "an evictable leaf is missing from the heap"


def test_randomized_counts_always_equal_a_recount_from_scratch():
  rng = random.Random(7)
  bm = BlockManager(40, 2, enable_prefix_caching=True)
  prefixes = [[rng.randrange(6) for _ in range(rng.randint(0, 10))] for _ in range(5)]
  live: list[Sequence] = []
  for step in range(3000):
    op = rng.random()
    if op < 0.3 or not live:                                      # a new request, maybe on a cached prefix
      tokens = rng.choice(prefixes) + [rng.randrange(6) for _ in range(rng.randint(1, 8))]
      bm.reuse_cached_prefix(s := new_seq(tokens))
      if not bm.can_allocate(s, len(tokens)): bm.free(s)
      else:
        bm.allocate(s, len(tokens)); s.num_computed_tokens = len(tokens); live.append(s)
        if rng.random() < 0.5: bm.cache_computed_blocks(s)        # else a twin may compute the same blocks first
    elif op < 0.6:                                                # a running one generates a token
      s = rng.choice(live)
      if bm.can_allocate(s, s.num_tokens + 1):
        s.output_token_ids.append(rng.randrange(6))
        bm.allocate(s, s.num_tokens); s.num_computed_tokens = s.num_tokens
        bm.cache_computed_blocks(s)
    elif op < 0.9:
      bm.free(live.pop(rng.randrange(len(live))))
    else:
      for b in bm.prefix_cache.evict(rng.randint(1, 4)): bm.release(b)
    recount(bm, live)
  for s in live: bm.free(s)
  for b in bm.prefix_cache.evict(bm.num_usable_blocks): bm.release(b)
  recount(bm, [])
  assert len(bm.free_blocks) == bm.num_usable_blocks


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
