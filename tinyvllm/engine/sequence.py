"""A request as the engine sees it: token ids, how many of them already have K/V in the cache, and the blocks holding it.

One idea makes prefill, decode, chunked prefill and recompute-after-preemption the same thing: a sequence has
`len(token_ids)` tokens of which the first `num_computed_tokens` have K/V in the cache. Each step the scheduler picks
how many of the rest to compute (all of a short prompt, a chunk of a long one, or the single newest token while
decoding). When the computed count reaches the token count, the step's logits give the next token.

With async scheduling (engine/overlap.py) the next step is scheduled before that token reaches the host: it counts as
*pending* (`num_pending_tokens`), part of `num_tokens` (it has a position and a slot) but not yet of
`output_token_ids` (it has no value), so `num_known_tokens` can be one less than `num_tokens`.

With speculative decoding a decoding sequence may carry *draft* tokens (`draft_token_ids`, engine/speculative.py):
guesses at its next tokens, part of `num_tokens` (each has a position and a slot, and the step computes them like a
short prompt chunk) but not of the output. The step that computes them checks them, and they become output or are
dropped:

    prompt + output          drafts          one step computes [last token | d1 d2 d3] and samples 4 rows:
    [ .......... t ]  [ d1 d2 d3 ]        t → d1? d1 → d2? d2 → d3? d3 → (bonus)

A diffusion LM's sequence may bring a *twin* (classifier-free guidance): the same tokens with the prompt masked, a
sequence of its own in the KV pool that the scheduler only ever runs in the same step as it.
"""
from __future__ import annotations
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from tinyvllm.sampling_params import SamplingParams
if TYPE_CHECKING:
  from tinyvllm.engine.denoising import Denoising
  from tinyvllm.engine.structured_output import Matcher


class SequenceStatus(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
  request_id: str
  prompt_token_ids: list[int]
  params: SamplingParams
  index: int = 0                        # which of the request's n completions (a seeded request's n differ by it)
  max_output_tokens: int | None = None  # max_tokens, capped by the room max_model_len leaves (None: no limit)
  arrival_time: float = field(default_factory=time.monotonic)
  seq_id: int = field(default_factory=lambda: next(_ids))
  output_token_ids: list[int] = field(default_factory=list)
  output_text: str = ""                 # detokenized output that is safe to show (see formats/detokenizer.py)
  output_logprobs: list[dict[int, float]] = field(default_factory=list)   # per output token, when asked for
  prompt_logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])  # the first has no context
  num_computed_tokens: int = 0
  num_pending_tokens: int = 0           # sampled by a step still running on the device, not yet in output_token_ids
  num_cached_tokens: int = 0            # of those, reused from the prefix cache at admission
  draft_token_ids: list[int] = field(default_factory=list)   # guesses the next step checks (speculative decoding)
  draft_bias: list[float] = field(default_factory=list)      # added to each draft's logit where it is checked (APD)
  block_table: list[int] = field(default_factory=list)
  num_blocks_in_cache: int = 0          # of its blocks, how many it has put in the prefix cache
  status: SequenceStatus = SequenceStatus.WAITING
  finish_reason: str | None = None      # "stop" | "length" | "abort"
  num_preemptions: int = 0
  num_returned_tokens: int = 0          # "delta" outputs: how much of the output earlier outputs carried
  num_returned_chars: int = 0
  matcher: Matcher | None = None        # structured outputs: its place in the grammar (engine/structured_output.py)
  denoising: Denoising | None = None    # a diffusion LM's sequence: its current block (engine/denoising.py)
  twin: Sequence | None = None          # classifier-free guidance: the same sequence with its prompt masked, computed
                                        # in the same steps, whose logits push this one's (engine/denoising.py)
  is_twin: bool = False                 # it is such a twin: scheduled, allocated and freed with its sequence

  @property
  def token_ids(self) -> list[int]: return self.prompt_token_ids + self.output_token_ids
  @property
  def num_tokens(self) -> int: return len(self.prompt_token_ids) + self.num_output_tokens + len(self.draft_token_ids)
  @property
  def num_known_tokens(self) -> int: return len(self.prompt_token_ids) + len(self.output_token_ids)
  @property
  def num_output_tokens(self) -> int:
    """Generated tokens, counting the one a running step is still sampling."""
    return len(self.output_token_ids) + self.num_pending_tokens
  @property
  def has_all_tokens(self) -> bool:
    """Every token it may generate is generated or being sampled: nothing is left to compute."""
    return self.max_output_tokens is not None and self.num_output_tokens >= self.max_output_tokens
  @property
  def num_uncomputed_tokens(self) -> int: return self.num_tokens - self.num_computed_tokens
  @property
  def wants_prompt_logprobs(self) -> bool:
    """Asked for prompt logprobs and some are still missing (they come from the logits of the prompt positions)."""
    return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)
  @property
  def is_finished(self) -> bool: return self.status is SequenceStatus.FINISHED

  @property
  def num_shareable_tokens(self) -> int:
    """Of its computed tokens, how many the prefix cache may give to other requests."""
    return self.num_tokens if self.denoising is None else self.denoising.num_shareable_tokens

  @property
  def group(self) -> list[Sequence]:
    """It and its twin, if it has one: what a step computes together."""
    return [self] if self.twin is None else [self, self.twin]

  def max_chunk(self, budget: int) -> int:
    """The most tokens a step may compute of it within `budget`, short of all of them: a diffusion LM's block must
    be computed whole (its positions attend to each other)."""
    if self.denoising is None: return budget
    return max(0, min(budget, self.denoising.first_uncut(self.num_computed_tokens) - self.num_computed_tokens))

  def tokens(self, start: int, n: int) -> list[int]:
    """Tokens start..start+n of prompt, output and drafts (shorter where a pending token has no value yet). Slices
    one list where it can: joining them copies every token, for every row of every step."""
    P, O = len(self.prompt_token_ids), len(self.output_token_ids)
    if start + n <= P: return self.prompt_token_ids[start:start + n]
    if start >= P and start + n <= P + O: return self.output_token_ids[start - P:start - P + n]
    return (self.prompt_token_ids + self.output_token_ids + self.draft_token_ids)[start:start + n]

