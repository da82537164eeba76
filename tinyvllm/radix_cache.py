"""Prefix cache: a radix tree over token ids whose nodes own KV blocks, so requests with a common prefix share them.

Two chat requests with the same system prompt compute the same K/V for its tokens. The tree remembers, for every
full block of tokens an earlier request computed, which KV block holds it, keyed by the tokens *and everything
before them* (the path from the root):

    root
     └─ [<|im_start|>system\\nYou are a helpful …]  block 7      ← system prompt, block 1 of 2
         └─ [… assistant.<|im_end|>\\n<|im_start|>user]  block 3  ← block 2 of 2: shared by A and B
             ├─ [\\nWhat is the capital of France?…]  block 9    ← request A's question
             └─ [\\nWrite a haiku about autumn.…]     block 4    ← request B's question

A new request walks down from the root as far as its own tokens match (`match`), borrows those blocks (the block
manager counts the extra reference) and only computes the rest of its prompt. Blocks enter the tree as soon as they
are full and computed (`insert`), so even a request that is still running lends its prefix to the next one. The
tree holds one reference to each of its blocks; a block that nobody else references is *evictable*, and when the
pool runs short the least recently used leaves go first (`evict`).

Each edge is exactly one block (SGLang's RadixAttention with page size = block size): the last, partial block of a
prompt is never shared, so no request ever writes into a block that another one reads.
"""
from __future__ import annotations
import heapq
import itertools
from dataclasses import dataclass, field

_clock = itertools.count()


@dataclass(eq=False)
class Node:
  tokens: tuple[int, ...]
  block: int
  parent: Node | None
  children: dict[tuple[int, ...], Node] = field(default_factory=dict)
  last_used: int = 0


class RadixCache:
  def __init__(self, block_size: int, ref_counts: list[int]):
    self.block_size, self.ref_counts = block_size, ref_counts   # ref_counts: the block manager's, shared
    self.root = Node((), -1, None)
    self.num_queried_tokens = self.num_hit_tokens = 0

  def _blocks_of(self, token_ids: list[int], num_blocks: int):
    bs = self.block_size
    return (tuple(token_ids[i * bs:(i + 1) * bs]) for i in range(num_blocks))

  def match(self, token_ids: list[int]) -> list[int]:
    """Blocks holding the longest cached prefix of `token_ids`, leaving at least one token to compute (the last
    prompt token's logits give the first output token)."""
    node, blocks, now = self.root, [], next(_clock)
    for key in self._blocks_of(token_ids, (len(token_ids) - 1) // self.block_size):
      node = node.children.get(key)
      if node is None: break
      node.last_used = now
      blocks.append(node.block)
    return blocks

  def insert(self, token_ids: list[int], block_table: list[int], num_computed_tokens: int) -> None:
    """Remember the full, computed blocks of a sequence. Where the tree already has a block for the same tokens it
    keeps its own (the sequence's duplicate is freed with the sequence)."""
    node, now = self.root, next(_clock)
    for key, block in zip(self._blocks_of(token_ids, num_computed_tokens // self.block_size), block_table):
      child = node.children.get(key)
      if child is None:
        child = node.children[key] = Node(key, block, node)
        self.ref_counts[block] += 1
      child.last_used = now
      node = child

  def evictable(self) -> list[Node]:
    """Nodes that only the tree references, leaves before their parents (a valid eviction order)."""
    out: list[Node] = []
    def visit(node: Node) -> bool:
      kids_free = all([visit(c) for c in node.children.values()])
      free = kids_free and (node is self.root or self.ref_counts[node.block] == 1)
      if free and node is not self.root: out.append(node)
      return free
    visit(self.root)
    return out

  def evict(self, num_blocks: int) -> list[int]:
    """Drop up to `num_blocks` least recently used evictable leaves; returns their blocks for the free list."""
    evictable = set(self.evictable())
    leaves = [(n.last_used, id(n), n) for n in evictable if not n.children]
    heapq.heapify(leaves)
    freed: list[int] = []
    while leaves and len(freed) < num_blocks:
      _, _, leaf = heapq.heappop(leaves)
      parent = leaf.parent
      del parent.children[leaf.tokens]
      freed.append(leaf.block)
      # one at a time: the parent may now be a leaf, and the next-oldest one
      if parent in evictable and not parent.children: heapq.heappush(leaves, (parent.last_used, id(parent), parent))
    return freed

  def blocks(self) -> list[int]:
    out, stack = [], list(self.root.children.values())
    while stack:
      node = stack.pop()
      out.append(node.block)
      stack.extend(node.children.values())
    return out
