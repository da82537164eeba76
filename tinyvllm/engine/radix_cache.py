"""Prefix cache: a radix tree over token ids whose nodes own KV blocks, so requests with a common prefix share them.

Two chat requests with the same system prompt compute the same K/V for its tokens. The tree remembers, for every
full block of tokens an earlier request computed, which KV block holds it, keyed by the tokens *and everything
before them* (the path from the root):

    root                                                             lock_ref (A running, B finished)
     └─ [<|im_start|>system\\nYou are a helpful …]  block 7           2   ← system prompt, block 1 of 2
         └─ [… assistant.<|im_end|>\\n<|im_start|>user]  block 3      2   ← block 2 of 2: shared by A and B
             ├─ [\\nWhat is the capital of France?…]  block 9         1   ← request A's question
             └─ [\\nWrite a haiku about autumn.…]     block 4         0   ← request B's question: evictable

A new request walks down from the root as far as its own tokens match (`match`), borrows those blocks and only
computes the rest of its prompt. Blocks enter the tree as soon as they are full and computed (`insert`), so even a
request that is still running lends its prefix to the next one.

Who counts what: the block manager counts every reference to a block (one per sequence, one for the tree); it tells
the tree when a cached block gets a sequence again (`lock`) or loses its last one (`unlock`). The tree keeps, per node,

    lock_ref = (1 if a sequence holds its block) + (number of children whose lock_ref > 0)

so lock_ref == 0 means nothing below the node is in use: its whole subtree can go, leaves first. `num_evictable`
counts those nodes, and a change walks up only while it flips a node between 0 and not 0 (a sequence holds a whole
path, so that is usually one step). Nodes with lock_ref == 0 and no children are the *evictable leaves*; a heap keyed
by last use hands out the oldest one first (`evict`), which may make its parent an evictable leaf in turn.

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
  parent: Node | None                 # None for the root, and for a node once evicted
  children: dict[tuple[int, ...], Node] = field(default_factory=dict)
  last_used: int = 0
  lock_ref: int = 0                   # see the module docstring


class RadixCache:
  def __init__(self, block_size: int):
    self.block_size, self.root = block_size, Node((), -1, None)
    self.nodes: dict[int, Node] = {}                 # block -> its node
    self.num_evictable = 0                           # nodes with lock_ref == 0
    # every evictable leaf as (last_used when pushed, tie-break, node), among stale entries that `evict` skips
    self.heap: list[tuple[int, int, Node]] = []
    self.num_queried_tokens = self.num_hit_tokens = 0

  def __contains__(self, block: int) -> bool: return block in self.nodes
  def blocks(self) -> list[int]: return list(self.nodes)

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

  def insert(self, token_ids: list[int], block_table: list[int], num_computed_tokens: int) -> list[int]:
    """Remember the full, computed blocks of a sequence that holds them; returns the blocks new to the tree. Where
    the tree already has a block for the same tokens it keeps its own (the sequence's duplicate is freed with it)."""
    node, now, new = self.root, next(_clock), []
    for key, block in zip(self._blocks_of(token_ids, num_computed_tokens // self.block_size), block_table):
      child = node.children.get(key)
      if child is None:
        child = node.children[key] = self.nodes[block] = Node(key, block, node)
        self.num_evictable += 1
        self.lock(block)                               # its sequence holds it
        new.append(block)
      child.last_used = now
      node = child
    return new

  def lock(self, block: int) -> None: self._add_lock(self.nodes[block], +1)
  def unlock(self, block: int) -> None: self._add_lock(self.nodes[block], -1)

  def _add_lock(self, node: Node, delta: int) -> None:
    # a parent counts its locked children, not their locks: walk up only while a node flips between 0 and not 0
    while node is not self.root:
      was_free = node.lock_ref == 0
      node.lock_ref += delta
      if was_free == (node.lock_ref == 0): return
      self.num_evictable -= delta
      if self._evictable_leaf(node): self._push(node)
      node = node.parent

  def evict(self, num_blocks: int) -> list[int]:
    """Drop up to `num_blocks` least recently used evictable leaves, one at a time (the parent of one may be the
    next); returns their blocks, which nobody but the tree held."""
    freed: list[int] = []
    while self.heap and len(freed) < num_blocks:
      pushed_at, _, node = heapq.heappop(self.heap)
      if not self._evictable_leaf(node): continue                 # stale: evicted, in use again or a parent now
      if pushed_at != node.last_used: self._push(node); continue  # matched since: back in line at its new age
      parent = node.parent
      del parent.children[node.tokens], self.nodes[node.block]
      node.parent = None
      self.num_evictable -= 1
      freed.append(node.block)
      if self._evictable_leaf(parent): self._push(parent)
    return freed

  def _evictable_leaf(self, node: Node) -> bool:
    return node.parent is not None and node.lock_ref == 0 and not node.children

  def _push(self, node: Node) -> None:
    if len(self.heap) > 2 * self.num_evictable + 64:   # mostly stale: sweep them out, one entry per evictable leaf
      leaves = {id(n): n for _, _, n in self.heap if self._evictable_leaf(n)}
      self.heap = [(n.last_used, next(_clock), n) for n in leaves.values()]
      heapq.heapify(self.heap)
    heapq.heappush(self.heap, (node.last_used, next(_clock), node))
