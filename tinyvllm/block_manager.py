"""Which KV blocks each sequence owns: a free list, reference counts, and allocation one block at a time.

The pool has `num_blocks` blocks of `block_size` token slots (see `model/paged_attention.py` for the picture).
Block 0 is never handed out: padded rows of a batch write their garbage there.

A sequence asks for blocks *incrementally*: before a step computes tokens up to position `n`, it must own
ceil(n / block_size) blocks, so a new block is taken only when the last one is full. Nothing is reserved for the
`max_tokens` a request might generate; when the pool runs dry the scheduler preempts someone instead.

Blocks are reference counted because a block can be shared: the prefix cache lends the blocks of a common prompt
to every request that starts with it. A block returns to the free list when its count drops to zero.
"""
from __future__ import annotations
from collections import deque
from tinyvllm.sequence import Sequence

NULL_BLOCK = 0


class BlockManager:
  def __init__(self, num_blocks: int, block_size: int):
    if num_blocks < 2: raise ValueError(f"the KV pool needs at least 2 blocks (one is reserved), got {num_blocks}")
    self.num_blocks, self.block_size = num_blocks, block_size
    self.free_blocks: deque[int] = deque(range(1, num_blocks))
    self.ref_counts = [0] * num_blocks

  @property
  def num_usable_blocks(self) -> int: return self.num_blocks - 1
  @property
  def num_free_blocks(self) -> int: return len(self.free_blocks)
  @property
  def usage(self) -> float: return 1 - self.num_free_blocks / self.num_usable_blocks

  def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
    """How many more blocks `seq` needs so that its first `num_tokens` tokens have a slot."""
    return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

  def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
    return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

  def allocate(self, seq: Sequence, num_tokens: int) -> None:
    needed = self.blocks_needed(seq, num_tokens)
    if needed > self.num_free_blocks: raise RuntimeError(f"KV pool exhausted: need {needed}, {self.num_free_blocks} free")
    for _ in range(needed): seq.block_table.append(self._take())

  def share(self, seq: Sequence, blocks: list[int]) -> None:
    """Give `seq` blocks that someone else already filled (a cached prefix); they are not copied, only counted."""
    for b in blocks: self.ref_counts[b] += 1
    seq.block_table.extend(blocks)

  def free(self, seq: Sequence) -> None:
    for b in reversed(seq.block_table): self.release(b)
    seq.block_table = []

  def release(self, block: int) -> None:
    assert self.ref_counts[block] > 0, f"block {block} released more often than taken"
    self.ref_counts[block] -= 1
    if self.ref_counts[block] == 0: self.free_blocks.append(block)

  def _take(self) -> int:
    block = self.free_blocks.popleft()
    self.ref_counts[block] = 1
    return block

  def slot(self, seq: Sequence, position: int) -> int:
    """Where token `position` of `seq` lives in the pool (a row of the [num_blocks * block_size, ...] cache)."""
    return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
