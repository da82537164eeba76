"""Who runs this step, and how many of their tokens: continuous batching with chunked prefill and preemption.

Every step has a budget of `max_num_batched_tokens` tokens and `max_num_seqs` sequences. The scheduler spends it in
this order:

  1. running sequences that are decoding (one token each): their users are waiting for the next word;
  2. running sequences still in the middle of their prompt: the next chunk of it;
  3. waiting sequences, first come first served: as much of the prompt as the remaining budget allows.

    step k:   [A·][B·][C·][D·]  [E: prompt tokens 0..123]            budget 128: 4 decodes + a 124-token chunk
    step k+1: [A·][B·][C·][D·]  [E: prompt tokens 124..247]          E's 4k-token prompt never stalls A..D

That is *chunked prefill*: a long prompt is cut into chunks that ride along with the decodes instead of blocking
them for a whole prefill. Requests join (step 3) and leave (when finished) between any two steps: *continuous
batching*. When the KV pool has no block for a running sequence, the newest running sequence is *preempted*: its
blocks are freed and it goes back to the front of the waiting queue, to be recomputed from its tokens later
(prompt and everything it generated so far), which gives the same tokens it would have produced anyway.

A decoding sequence may bring draft tokens to check (speculative decoding, engine/speculative.py): they cost budget
like prompt tokens and each needs a row of logits, so they are cut to what the step has room for: tokens in the
budget, and rows within `max_num_seqs` (every running sequence keeps a row of its own). A diffusion LM's block
(engine/denoising.py) is never cut: its positions attend to each other, so a step computes all of it or none. A
guided one brings its twin (`Sequence.group`): the two are budgeted, allocated, preempted and freed as one, and
take two of the `max_num_seqs` seats.
"""
from __future__ import annotations
from collections import deque
from dataclasses import dataclass, field
from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
  seq: Sequence
  num_new_tokens: int          # computed this step, starting at `start`
  start: int                   # seq.num_computed_tokens when it was scheduled
  samples: bool = field(init=False)   # the step reaches the sequence's last token: its logits give the next one

  def __post_init__(self) -> None: self.samples = self.start + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
  def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
               enable_chunked_prefill: bool = True):
    self.block_manager = block_manager
    self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
    self.enable_chunked_prefill = enable_chunked_prefill
    self.waiting: deque[Sequence] = deque()
    self.running: list[Sequence] = []
    self.num_preemptions = 0

  def add(self, seq: Sequence) -> None: self.waiting.append(seq)

  def has_unfinished(self) -> bool: return bool(self.waiting or self.running)

  def schedule(self) -> list[ScheduledSequence]:
    budget = self.max_num_batched_tokens
    scheduled: list[ScheduledSequence] = []
    preemptions_before = self.num_preemptions
    extra_rows = sum(seq.twin is not None for seq in self.running)   # rows past one a sequence: twins', drafts'
    # decodes first; a sequence whose last token is being sampled needs nothing more
    unscheduled = sorted((s for s in self.running if not s.has_all_tokens),
                         key=lambda s: s.num_uncomputed_tokens - len(s.draft_token_ids) > 1)
    while unscheduled and budget > 0:
      seq = unscheduled.pop(0)
      if seq.draft_token_ids and seq.denoising is None:   # what the step has room for: tokens, rows of logits
        room = min(budget - 1, self.max_num_seqs - len(self.running) - extra_rows)
        del seq.draft_token_ids[max(0, room):]
        if not self.block_manager.can_allocate(seq, seq.num_tokens): seq.draft_token_ids.clear()   # no preempting
        extra_rows += len(seq.draft_token_ids)                                                      # for guesses
      n = self._chunk(seq, budget // len(seq.group))
      if n == 0: continue
      if not self._make_room(seq, n, unscheduled): continue      # seq itself was preempted
      budget -= self._allocate(seq, n, scheduled)
    # after a preemption the pool is tight: admitting newcomers would only preempt again
    while (self.waiting and budget > 0 and self.num_preemptions == preemptions_before
           and len(self.running) + extra_rows + len(self.waiting[0].group) <= self.max_num_seqs):
      seq = self.waiting[0]
      if self._sibling_prefilling(seq): break     # wait to share its prompt blocks instead of computing them again
      if seq.twin is None:        # a twin computes the same positions as its sequence: no cached prefix for either
        self.block_manager.reuse_cached_prefix(seq)
      n = self._chunk(seq, budget // len(seq.group))
      if n == 0 or not self._can_allocate(seq, n):
        self.block_manager.free(seq)              # give the borrowed prefix back; try again next step
        seq.num_computed_tokens = 0
        break
      self.waiting.popleft()
      self.block_manager.record_prefix_lookup(seq)
      seq.status = SequenceStatus.RUNNING
      self.running.append(seq)
      extra_rows += len(seq.group) - 1
      budget -= self._allocate(seq, n, scheduled)
    return scheduled

  def _can_allocate(self, seq: Sequence, n: int) -> bool:
    """Whether the pool has blocks for `n` more tokens of `seq` and of its twin."""
    bm = self.block_manager
    return sum(bm.blocks_needed(s, s.num_computed_tokens + n) for s in seq.group) <= bm.num_free_blocks

  def _allocate(self, seq: Sequence, n: int, scheduled: list[ScheduledSequence]) -> int:
    """Blocks for `n` more tokens of `seq` (and its twin), scheduled; the tokens this costs the budget."""
    for s in seq.group:
      self.block_manager.allocate(s, s.num_computed_tokens + n)
      scheduled.append(ScheduledSequence(s, n, s.num_computed_tokens))
    return n * len(seq.group)

  def _sibling_prefilling(self, seq: Sequence) -> bool:
    """True while another completion of the same request (n > 1) is still computing the shared prompt."""
    return any(s.request_id == seq.request_id and s.num_computed_tokens < len(s.prompt_token_ids) for s in self.running)

  def _chunk(self, seq: Sequence, budget: int) -> int:
    """Tokens of `seq` to compute this step: all that are left if they fit, else a chunk (or none, unchunked)."""
    if seq.num_uncomputed_tokens <= budget: return seq.num_uncomputed_tokens
    return seq.max_chunk(budget) if self.enable_chunked_prefill else 0

  def _make_room(self, seq: Sequence, num_new_tokens: int, unscheduled: list[Sequence]) -> bool:
    """Preempt the newest not-yet-scheduled running sequences until `seq` can grow by `num_new_tokens`;
    False if none is left to preempt but `seq` itself."""
    while not self._can_allocate(seq, num_new_tokens):
      victim = max(unscheduled + [seq], key=lambda s: s.arrival_time)
      self.preempt(victim)
      if victim is seq: return False
      unscheduled.remove(victim)
    return True

  def preempt(self, seq: Sequence) -> None:
    self.running.remove(seq)
    for s in seq.group:
      self.block_manager.free(s)
      s.num_computed_tokens = 0
      s.draft_token_ids.clear()
    seq.num_preemptions += 1
    seq.status = SequenceStatus.WAITING
    self.waiting.appendleft(seq)
    self.num_preemptions += 1

  def finish(self, seq: Sequence, reason: str) -> None:
    if seq in self.running: self.running.remove(seq)
    elif seq in self.waiting: self.waiting.remove(seq)
    for s in seq.group:
      self.block_manager.free(s)
      s.status, s.finish_reason = SequenceStatus.FINISHED, reason
