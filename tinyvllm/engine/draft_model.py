"""A draft model as the proposer: a smaller model with the target's tokenizer guesses the next k tokens greedily.

The draft runs in an `LLMEngine` of its own (its paged KV pool, scheduler and TinyJit graphs: the same machinery),
where each target sequence that decodes has a *shadow* request holding the same tokens. A round of proposals:

    target known:  p p p p a b c          (a b c: accepted since the shadow last ran)
    shadow:        p p p p a b x y        (x y: its last guesses; x was rejected)
    sync:          p p p p a b c          cut to the common prefix, the new tokens appended (K/V of x, y given back)
    draft steps:   p p p p a b c d e f    until every shadow has k new tokens: the proposals d e f

The shadows' new tokens are computed like a prompt chunk in the draft's first step, then one token a step; all the
shadows of a round step together, batched. Between rounds a shadow is parked: out of its scheduler's running list,
its blocks kept. A shadow whose target has finished is freed.
"""
from __future__ import annotations
from dataclasses import replace
from typing import TYPE_CHECKING
from tinyvllm.engine.sequence import Sequence
from tinyvllm.engine.speculative import Proposer, SpeculativeConfig
from tinyvllm.sampling_params import SamplingParams
if TYPE_CHECKING: from tinyvllm.engine.engine import LLMEngine

GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=None, output_kind="final_only")


class DraftModelProposer(Proposer):
  def __init__(self, config: SpeculativeConfig, draft: LLMEngine):
    super().__init__(config)
    self.draft = draft
    self.shadows: dict[Sequence, Sequence] = {}     # target sequence → its shadow, until the target finishes

  @staticmethod
  def build(config: SpeculativeConfig, args, cfg, engine_class: type[LLMEngine],
            num_blocks: int) -> DraftModelProposer:
    """The draft model in an engine of its own (`engine_class`: the target's), on the target's devices, its KV pool
    as many blocks as the target's (the same sequences fit; sized from free memory, it would get what the target's
    pool left: on a GPU, next to nothing); ValueError unless its vocabulary is the target's. With random weights
    (`load_format="dummy"`) `config.model` is a shape."""
    draft = engine_class(replace(args, **({"shape": config.model} if args.load_format == "dummy" else
                                          {"model": config.model}), speculative_config=None, async_scheduling=False,
                                 enable_prefix_caching=False, num_kv_blocks=num_blocks))
    if draft.model_config.vocab_size != cfg.vocab_size:
      raise ValueError(f"speculative_config.model: its vocabulary ({draft.model_config.vocab_size} tokens) is not "
                       f"the target's ({cfg.vocab_size})")
    return DraftModelProposer(config, draft)

  def propose_all(self, seqs: list[Sequence]) -> dict[Sequence, list[int]]:
    self._free_finished()
    wanted = {seq: self.room(seq, self.draft.max_model_len) for seq in seqs}   # the target's cap: max_tokens
    active = {seq: self._synced(seq) for seq, k in wanted.items() if k > 0}
    scheduler = self.draft.scheduler
    for shadow in active.values():
      if shadow not in scheduler.waiting: scheduler.running.append(shadow)      # a new or preempted one waits
    short = lambda: [s for s, shadow in active.items() if shadow.num_known_tokens - s.num_known_tokens < wanted[s]
                     and not shadow.is_finished]
    for _ in range(max(wanted.values(), default=0) + 64):       # bounded: a preempted shadow takes a few more
      if not short(): break
      self.draft.step()
    scheduler.running.clear()                                     # every shadow parked until the next round
    return {s: shadow.token_ids[s.num_known_tokens:s.num_known_tokens + wanted[s]]
            for s, shadow in active.items() if not shadow.is_finished}

  def _synced(self, seq: Sequence) -> Sequence:
    """The sequence's shadow, holding its known tokens (and K/V for those it shares with the last round's)."""
    shadow = self.shadows.get(seq)
    if shadow is None or shadow.is_finished:
      request = self.draft.make_request(seq.token_ids, GREEDY)
      self.draft.admit(request)
      shadow = self.shadows[seq] = request.seqs[0]
      return shadow
    known, P = seq.token_ids, len(shadow.prompt_token_ids)
    same = P
    for a, b in zip(shadow.output_token_ids, known[P:]):
      if a != b: break
      same += 1
    del shadow.output_token_ids[same - P:]
    shadow.output_token_ids += known[same:]
    # K/V past the common prefix is stale, and the last known token is computed again: its logits give the next
    computed = min(shadow.num_computed_tokens, same, len(known) - 1)
    if computed < shadow.num_computed_tokens:
      shadow.num_computed_tokens = computed
      self.draft.block_manager.trim(shadow, computed)
    return shadow

  def _free_finished(self) -> None:
    for seq, shadow in list(self.shadows.items()):
      if seq.is_finished:
        self.draft.abort_request(shadow.request_id)            # its blocks back to the draft's pool
        del self.shadows[seq]
