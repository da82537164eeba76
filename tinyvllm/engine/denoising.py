"""A diffusion LM's sequence in the one engine: its current block is a multi-token step, committed a few tokens at a time.

An autoregressive sequence checks drafts in one step: the step computes the tokens after the last known one and
samples a row for each (engine/speculative.py). A masked diffusion LM (diffusion/sampler.py: LLaDA's algorithm) runs
through the same step. Its *drafts* are the current block of `block_length` positions, [MASK] or already committed;
each step computes them, with every position of the block attending to the whole block (its key limit is the block's
end, not its own position: kernels/paged_attention.py), and samples one row per position: the predicted token and its
probability. The denoiser commits the most confident of them, and the block is computed again in the next step, now
with more of it filled in. When no [MASK] is left the block becomes output (streamed like any new tokens) and the next
block starts:

    prompt (prefilled in chunks, causal)    block 0 (committed)   block 1 (the step's drafts)
    [ p0 p1 ... p99 ]                       [ a b c d ]           [ e M M h ]      each step: 4 rows → commit some
       key limit: own position                 limit: d              limit: h      of the M, compute block 1 again

The cache: the prompt and every finished block keep their K/V in the paged pool, and only the current block is
computed each step (a finished block once more with its final tokens, at the first step of the next block). A
position sees the prompt causally and its own block both ways: *block-causal* attention. For a model trained that way
(BD3-LM, SDAR, Fast-dLLM v2) this is exact. LLaDA and Dream were trained fully bidirectional (every position sees
every other, the masks of later blocks included), so for them the cache is an approximation, Fast-dLLM's kind;
`recompute` mode (EngineArgs.diffusion_recompute) is LLaDA's reference algorithm instead: every step computes the
whole sequence, prompt and all gen_length positions, each seeing all of them (tests/diffusion compare it with
diffusion/sampler.py's `generate`).

What the prefix cache may share: the prompt's K/V in block-causal mode (computed as any prompt is); nothing in
recompute mode, where the prompt's K/V depends on everything after it.
"""
from __future__ import annotations
import numpy as np
from tinyvllm.diffusion.sampler import DiffusionParams, select, transfer_schedule
from tinyvllm.sampling_params import SamplingParams


# sampling fields of left-to-right decoding that masked diffusion does not have (refused rather than ignored)
AUTOREGRESSIVE_ONLY = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                       "logit_bias", "min_tokens", "stop", "logprobs", "prompt_logprobs", "structured_outputs")


def start(params: SamplingParams, prompt_len: int, mask_id: int, recompute: bool, seed: int,
          max_model_len: int, max_num_batched_tokens: int) -> list[Denoising]:
  """The diffusion state of each of a request's n choices; ValueError (for the user) where the request asks for
  what a diffusion LM does not do or its blocks cannot fit a step."""
  unsupported = [name for name in AUTOREGRESSIVE_ONLY if getattr(params, name) != getattr(SamplingParams(), name)]
  if unsupported: raise ValueError(f"diffusion models do not support {', '.join(unsupported)}")
  if params.cfg_scale: raise ValueError("cfg_scale: classifier-free guidance is not supported by this engine")
  dp = DiffusionParams.from_sampling_params(params)
  if prompt_len + dp.gen_length > max_model_len:
    raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({dp.gen_length}) exceeds max_model_len={max_model_len}")
  # the tokens one step must compute whole: the sequence (recompute), or a finished block and the next one
  whole = prompt_len + dp.gen_length if recompute else 2 * dp.block_length
  if whole > max_num_batched_tokens:
    raise ValueError(f"max_tokens/block_length: a step must compute {whole} tokens of this request at once, more "
                     f"than max_num_batched_tokens={max_num_batched_tokens}")
  return [Denoising(prompt_len, DiffusionParams(**{**dp.__dict__, "seed": seed + i}), mask_id, recompute)
          for i in range(params.n)]


class Denoising:
  """One sequence's diffusion state: the current block's tokens, which step of the block it is at, its random
  stream (random remasking)."""
  def __init__(self, prompt_len: int, params: DiffusionParams, mask_id: int, recompute: bool):
    self.params, self.mask_id, self.recompute, self.prompt_len = params, mask_id, recompute, prompt_len
    self.block_index, self.step, self.calls = 0, 0, 0
    self.block = [mask_id] * params.block_length
    self.schedule = transfer_schedule(params.block_length, params.steps_per_block)
    self.rng = np.random.default_rng(params.seed)
    # one sampler row per block position: each draws its own noise, at a stream position no other step reuses
    self.row_params = SamplingParams(temperature=params.temperature, seed=params.seed, logprobs=0, max_tokens=None)

  @property
  def block_start(self) -> int: return self.prompt_len + self.block_index * self.params.block_length
  @property
  def end(self) -> int: return self.prompt_len + self.params.gen_length

  def drafts(self) -> list[int]:
    """The tokens after the committed ones that the next step computes: the block (recompute: and every later
    block's masks)."""
    later = self.params.gen_length - (self.block_index + 1) * self.params.block_length
    return self.block + [self.mask_id] * later if self.recompute else list(self.block)

  def key_limits(self, start: int, n: int) -> list[int]:
    """The last key each of positions start..start+n attends to."""
    if self.recompute: return [self.end - 1] * n
    B, P = self.params.block_length, self.prompt_len
    return [p if p < P else P + ((p - P) // B + 1) * B - 1 for p in range(start, start + n)]

  def first_uncut(self, num_computed: int) -> int:
    """Where the tokens that must be computed in one step begin (they attend to each other both ways): a step may
    end before this position, not after it, unless it computes them all."""
    if self.recompute: return 0
    B, P = self.params.block_length, self.prompt_len
    return max(P, P + (num_computed - P) // B * B) if num_computed >= P else P

  @property
  def num_shareable_tokens(self) -> int:
    """Tokens whose K/V the prefix cache may hand to another request."""
    return 0 if self.recompute else self.prompt_len

  def logits_positions(self) -> range:
    return range(self.block_start, self.block_start + self.params.block_length)

  def update(self, tokens: list[int], probs: list[float]) -> list[int] | None:
    """Commit tokens of the block from the step's predictions at its positions; the block's tokens when that
    finishes it (and the next block starts), else None."""
    p, block = self.params, np.array(self.block)
    masked = block == self.mask_id
    if self.step == 0: self.schedule = transfer_schedule(int(masked.sum()), p.steps_per_block)
    confidence = self.rng.random(len(block)) if p.remasking == "random" else np.array(probs)
    count = None if p.threshold is not None else int(self.schedule[min(self.step, len(self.schedule) - 1)])
    chosen = select(confidence, masked, count, p.threshold)
    block[chosen] = np.array(tokens)[chosen]
    self.block, self.step, self.calls = block.tolist(), self.step + 1, self.calls + 1
    if (block == self.mask_id).any(): return None
    finished, self.block_index, self.step = self.block, self.block_index + 1, 0
    self.block = [self.mask_id] * p.block_length
    return finished


class DenoisingRow:
  """What the sampler reads of the row for block position `i` of a denoising sequence: greedy or Gumbel noise at the
  request's temperature, the chosen token's logprob (its probability is the confidence), nothing else."""
  def __init__(self, seq, i: int):
    d = seq.denoising
    self.params, self.index, self.seq_id, self.prompt_token_ids = d.row_params, seq.index, seq.seq_id, seq.prompt_token_ids
    self.output_token_ids, self.matcher, self.wants_prompt_logprobs, self.num_pending_tokens = [], None, False, 0
    self.num_output_tokens = (d.calls * d.params.block_length + i) % (1 << 24)    # the noise's stream position
