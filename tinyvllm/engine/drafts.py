"""A step's drafts: the tokens after a sequence's last known one that the step checks along with it.

Two things propose them, and one mechanism checks them (a multi-token step: engine.py's `finish` keeps the drafts
the sampled tokens agree with):

    a grammar that forces tokens      jump-forward: the tokens a structured output's grammar allows one way only
                                      (structured_output.py), at most JUMP_FORWARD_TOKENS a step
    a proposer's guesses              prompt lookup, a draft model or a diffusion LM's block (speculative.py,
                                      draft_model.py, diffusion_draft.py), for sequences without a grammar

Drafts are asked for only while at most `up_to` sequences run: checking them costs arithmetic, which a large batch
has none to spare for (`disable_by_batch_size`, speculative.py). Async scheduling waits for a step whose next step
wants drafts (overlap.py): which drafts the next step checks depends on the tokens this one commits.
"""
from __future__ import annotations
from typing import TYPE_CHECKING
from tinyvllm.engine.diffusion_draft import DiffusionProposer
from tinyvllm.engine.draft_model import DraftModelProposer
from tinyvllm.engine.sequence import Sequence
from tinyvllm.engine.speculative import NgramProposer, SpeculativeConfig, draft_room
if TYPE_CHECKING: from tinyvllm.engine.engine import LLMEngine

JUMP_FORWARD_TOKENS = 7          # forced tokens a step checks at most: with the token before them, an 8-token step


class Drafts:
  def __init__(self, engine: LLMEngine, spec: SpeculativeConfig | None, num_blocks: int):
    args, self.max_model_len = engine.args, engine.max_model_len
    builders = {"draft_model": DraftModelProposer.build, "apd": DiffusionProposer.build}
    self.proposer = None if not spec else NgramProposer(spec, self.max_model_len) if spec.method == "ngram" else \
      builders[spec.method](spec, args, engine.model_config, type(engine), num_blocks)
    self.up_to = (spec and spec.disable_by_batch_size) or (1 if args._on_cpu() else 16)
    self.jump_forward, self.jump_forward_tokens = args.jump_forward, 0

  def wanted(self, running: list[Sequence]) -> bool:
    """Whether the next step should check drafts: something proposes them (a proposer, or a grammar that forces the
    tokens after the one being sampled) and few enough sequences run for checking them to pay."""
    return len(running) <= self.up_to and (
      (self.proposer is not None and self.proposer.may_propose(running))
      or (self.jump_forward and any(seq.matcher and len(seq.matcher.forced(2)) > seq.num_pending_tokens
                                    for seq in running)))

  def propose(self, running: list[Sequence]) -> None:
    """Set each running sequence's drafts: for a decoding one, the tokens its grammar forces, or the proposer's
    guesses; none for the others."""
    decoding = [seq for seq in running if seq.num_computed_tokens == seq.num_known_tokens - 1
                and not seq.num_pending_tokens]
    drafts = {seq: seq.matcher.forced(min(JUMP_FORWARD_TOKENS, draft_room(seq, self.max_model_len)))
              for seq in decoding if seq.matcher and self.jump_forward}
    guessable = [seq for seq in decoding if seq.matcher is None]
    if self.proposer and guessable: drafts.update(self.proposer.propose_all(guessable))
    for seq in running:
      seq.draft_token_ids = drafts.get(seq, [])
      seq.draft_bias = self.proposer.bias(seq) if self.proposer and seq.draft_token_ids and not seq.matcher else []

  def checked(self, seq: Sequence, proposed: int, accepted: int) -> None:
    """How many of a sequence's drafts its step accepted: a proposer learns from it, forced tokens are counted."""
    if seq.matcher is None: self.proposer.checked(seq, proposed, accepted)
    else: self.jump_forward_tokens += accepted

  def counts(self) -> list:
    """The proposer's [drafts, accepted, steps, accepted at each position]."""
    return self.proposer.counts if self.proposer else [0, 0, 0]

  def warmup(self) -> float:
    return self.proposer.draft.warmup() if isinstance(self.proposer, (DraftModelProposer, DiffusionProposer)) else 0.0
