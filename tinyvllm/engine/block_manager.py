"""Which KV blocks each sequence owns: a free list, reference counts, and allocation one block at a time.

The pool has `num_blocks` blocks of `block_size` token slots (see `kernels/paged_attention.py` for the picture).
Block 0 is never handed out: padded rows of a batch write their garbage there.

A sequence asks for blocks *incrementally*: before a step computes tokens up to position `n`, it must own
ceil(n / block_size) blocks, so a new block is taken only when the last one is full. Nothing is reserved for the
`max_tokens` a request might generate; when the pool runs dry the scheduler preempts someone instead.

Blocks are reference counted because a block can be shared: the prefix cache (`radix_cache.py`) lends the blocks
of a common prompt to every request that starts with it. `ref_counts[b]` counts every holder of block b: each
sequence with b in its block table, plus one for the cache if b is in it. So each usable block is

    free      count 0                       on the free list
    in use    count >= 1 (>= 2 if cached)   a sequence holds it (and maybe the cache)
    idle      count 1, cached               only the cache holds it: evictable, handed out when the free list runs dry

A cached block moves between in use and idle only here (`share`, `release`), and the cache is told each time
(`lock`, `unlock`): it keeps its own count of what it could give up, so neither side ever searches the other.
"""
from __future__ import annotations
from collections import deque
from tinyvllm.engine.radix_cache import RadixCache
from tinyvllm.engine.sequence import Sequence

NULL_BLOCK = 0


class BlockManager:
  def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
    if num_blocks < 2: raise ValueError(f"the KV pool needs at least 2 blocks (one is reserved), got {num_blocks}")
    self.num_blocks, self.block_size = num_blocks, block_size
    self.free_blocks: deque[int] = deque(range(1, num_blocks))
    self.ref_counts = [0] * num_blocks                # holders of each block: sequences, plus the cache's one
    self.prefix_cache = RadixCache(block_size) if enable_prefix_caching else None

  @property
  def num_usable_blocks(self) -> int: return self.num_blocks - 1
  @property
  def num_free_blocks(self) -> int:
    """Blocks a sequence could get now: the free list plus what the prefix cache would give up."""
    return len(self.free_blocks) + (self.prefix_cache.num_evictable if self.prefix_cache else 0)
  @property
  def usage(self) -> float: return 1 - self.num_free_blocks / self.num_usable_blocks

  def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
    """How many more blocks `seq` needs so that its first `num_tokens` tokens have a slot."""
    return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

  def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
    return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

  def allocate(self, seq: Sequence, num_tokens: int) -> None:
    needed = self.blocks_needed(seq, num_tokens)
    if needed > len(self.free_blocks) and self.prefix_cache:
      # evict exactly the shortfall, least recently used first: dropping the cache's reference frees each block
      for block in self.prefix_cache.evict(needed - len(self.free_blocks)): self.release(block)
    if needed > len(self.free_blocks):
      raise RuntimeError(f"KV pool exhausted: need {needed}, {len(self.free_blocks)} free")
    for _ in range(needed): seq.block_table.append(self._take())

  def reuse_cached_prefix(self, seq: Sequence) -> None:
    """Start a fresh sequence on the blocks of its longest cached prefix: those tokens count as computed (unless it
    still needs prompt logprobs, which come from computing every prompt position)."""
    if not self.prefix_cache or seq.block_table or seq.wants_prompt_logprobs: return
    blocks = self.prefix_cache.match(seq.token_ids[:seq.num_shareable_tokens])
    self.share(seq, blocks)
    seq.num_blocks_in_cache = len(blocks)
    seq.num_computed_tokens = len(blocks) * self.block_size

  def record_prefix_lookup(self, seq: Sequence) -> None:
    """Count an admitted sequence's tokens as prefix-cache queries, and its reused ones as hits."""
    seq.num_cached_tokens = seq.num_computed_tokens
    if self.prefix_cache:
      self.prefix_cache.num_queried_tokens += seq.num_tokens
      self.prefix_cache.num_hit_tokens += seq.num_computed_tokens

  def cache_computed_blocks(self, seq: Sequence, only_new: bool = True) -> None:
    """Blocks full of computed tokens join the prefix cache: tokens the host knows (a step that runs ahead computes
    K/V for a token still being sampled on the device). The tree insert walks the whole prefix, so `only_new` skips
    it unless a block filled up since the sequence's last insert."""
    if not self.prefix_cache: return
    full = min(seq.num_computed_tokens, seq.num_known_tokens, seq.num_shareable_tokens) // self.block_size
    if only_new and full <= seq.num_blocks_in_cache: return
    for b in self.prefix_cache.insert(seq.token_ids, seq.block_table, full * self.block_size):
      self.ref_counts[b] += 1                             # the cache's own reference
    seq.num_blocks_in_cache = full

  def share(self, seq: Sequence, blocks: list[int]) -> None:
    """Give `seq` blocks that someone else already filled (a cached prefix); they are not copied, only counted."""
    for b in blocks:
      self.ref_counts[b] += 1
      if self.ref_counts[b] == 2 and self._cached(b): self.prefix_cache.lock(b)   # idle -> in use
    seq.block_table.extend(blocks)

  def free(self, seq: Sequence) -> None:
    self.cache_computed_blocks(seq, only_new=False)   # a finished, aborted or preempted sequence still lends its prefix
    for b in reversed(seq.block_table): self.release(b)
    seq.block_table, seq.num_blocks_in_cache = [], 0

  def trim(self, seq: Sequence, num_tokens: int) -> None:
    """Give back the blocks past `seq`'s first `num_tokens` tokens (those that held rejected drafts only)."""
    keep = -(-num_tokens // self.block_size)
    for b in reversed(seq.block_table[keep:]): self.release(b)
    del seq.block_table[keep:]

  def release(self, block: int) -> None:
    assert self.ref_counts[block] > 0, f"block {block} released more often than taken"
    self.ref_counts[block] -= 1
    if self.ref_counts[block] == 0: self.free_blocks.append(block)
    elif self.ref_counts[block] == 1 and self._cached(block): self.prefix_cache.unlock(block)   # in use -> idle

  def _cached(self, block: int) -> bool: return self.prefix_cache is not None and block in self.prefix_cache

  def _take(self) -> int:
    block = self.free_blocks.popleft()
    self.ref_counts[block] = 1
    return block

  def slot(self, seq: Sequence, position: int) -> int:
    """Where token `position` of `seq` lives in the pool (a row of the [num_blocks * block_size, ...] cache)."""
    return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
