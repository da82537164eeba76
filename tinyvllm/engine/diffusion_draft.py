"""A diffusion LM as the proposer (APD: adaptive parallel decoding, Israel et al. 2025): it fills a block of k masks
after a sequence's known tokens in one forward pass, and the autoregressive model checks the k guesses in one step.

    target known:  p p p p a b c
    draft request: p p p p a b c [M M M M]      a block-causal diffusion LM with the target's tokenizer: one step,
    proposals:                    d e f g       every mask committed at once (its most likely token at each)
    target step:   c → d ✓  d → e ✓  e → x ✗     the multi-token step of speculative.py: 2 drafts kept, plus x

The diffusion model runs in an `LLMEngine` of its own (engine/denoising.py's block as one step), with its prefix
cache on: each round's request shares the blocks of the last round's tokens (a block-causal prompt keeps its K/V),
so a round computes the few new tokens and the block.

Acceptance is speculative.py's, at each position the target's own sample, with APD's mixture weight R: the sample
is drawn from p_target^(1-R) · p_draft^R (a product of experts) instead of p_target, and a draft is kept while it
equals that sample. R = 0 is plain speculative decoding: the output is what the target writes alone (greedy: token
for token); as R grows, more of the draft's confident tokens are kept. The draft's distribution is known here at
its chosen token only (probability q, the confidence the denoiser commits by); the rest of its mass, 1 - q, is
counted on whichever token competes with the draft, the most any single token could have. In logits that is a bias
of R/(1-R) · log(q / (1-q)) on the draft token where the target checks it (greedy rows: argmax(log p_t + bias)), so
a draft is kept only where the full mixture would keep it too, and a rejected draft's replacement is the target's
own token.
"""
from __future__ import annotations
import math
from dataclasses import replace
from typing import TYPE_CHECKING
from tinyvllm.engine.sequence import Sequence
from tinyvllm.engine.speculative import Proposer, SpeculativeConfig
from tinyvllm.sampling_params import SamplingParams
if TYPE_CHECKING: from tinyvllm.engine.engine import LLMEngine


class DiffusionProposer(Proposer):
  def __init__(self, config: SpeculativeConfig, draft: LLMEngine):
    super().__init__(config)
    self.draft = draft
    self.confidence: dict[Sequence, list[float]] = {}      # the last round's, per proposal

  @staticmethod
  def build(config: SpeculativeConfig, args, cfg, engine_class: type[LLMEngine], num_blocks: int) -> DiffusionProposer:
    """The diffusion LM in an engine of its own on the target's devices; ValueError unless it is a diffusion LM
    with the target's vocabulary."""
    where = {"shape": config.model} if args.load_format == "dummy" else {"model": config.model}
    draft = engine_class(replace(args, **where, speculative_config=None, async_scheduling=False,
                                 enable_prefix_caching=True, num_kv_blocks=num_blocks, chat_template=None))
    if draft.model_config.mask_token_id is None:
      raise ValueError(f"speculative_config.model: {config.model!r} is not a diffusion LM (method \"apd\")")
    if draft.model_config.vocab_size != cfg.vocab_size:
      raise ValueError(f"speculative_config.model: its vocabulary ({draft.model_config.vocab_size} tokens) is not "
                       f"the target's ({cfg.vocab_size})")
    try: draft.make_request([0], DiffusionProposer.block(config))      # a block the draft's engine cannot step
    except ValueError as e: raise ValueError(f"speculative_config.num_speculative_tokens: {e}") from None
    return DiffusionProposer(config, draft)

  @staticmethod
  def block(config: SpeculativeConfig) -> SamplingParams:
    """A round's request: one block of k masks, every one committed in its one step, greedily."""
    k = config.num_speculative_tokens
    return SamplingParams(max_tokens=k, block_length=k, diffusion_steps=1, temperature=0, ignore_eos=True,
                          output_kind="final_only")

  def propose_all(self, seqs: list[Sequence]) -> dict[Sequence, list[int]]:
    k, block = self.config.num_speculative_tokens, self.block(self.config)
    wanted = {seq: self.room(seq, self.draft.max_model_len) for seq in seqs}
    ids = {seq: self.draft.add_request(seq.token_ids, block) for seq, n in wanted.items()      # the whole block fits
           if n > 0 and seq.num_known_tokens + k <= self.draft.max_model_len}
    states = {seq: self.draft.requests[i].seqs[0].denoising for seq, i in ids.items()}
    proposals: dict[str, list[int]] = {}
    while self.draft.has_unfinished_requests():
      proposals.update({out.request_id: out.outputs[0].token_ids for out in self.draft.step() if out.finished})
    self.confidence = {seq: state.finished_confidence for seq, state in states.items()}
    return {seq: proposals[i][:wanted[seq]] for seq, i in ids.items()}

  def bias(self, seq: Sequence) -> list[float]:
    R = self.config.mixture_weight
    if not R: return []
    clipped = [min(max(q, 1e-6), 1 - 1e-6) for q in self.confidence.get(seq, [])]
    return [max(-100.0, min(100.0, R / (1 - R) * math.log(q / (1 - q)))) for q in clipped]   # logit_bias's range
