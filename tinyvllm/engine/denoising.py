"""A diffusion LM's sequence in the one engine: its current block is a multi-token step, committed a few tokens at a time.

An autoregressive sequence checks drafts in one step: the step computes the tokens after the last known one and
samples a row for each (engine/speculative.py). A masked diffusion LM (diffusion/sampler.py: LLaDA's algorithm) runs
through the same step. Its *drafts* are the current block of `block_length` positions, [MASK] or already committed
(and, where the model reads them, the masks of the blocks after it); each step computes them with every position
attending past itself (its *key limit* is the block's or the sequence's end, not its own position:
kernels/paged_attention.py), and samples one row per block position: the predicted token and its probability. The
denoiser commits the most confident, and the block is computed again in the next step, now with more of it filled
in. When no [MASK] is left the block becomes output (streamed like any new tokens) and the next block starts:

    prompt                 block 0 (committed)   block 1 (the step's drafts)   later blocks
    [ p0 p1 ... p99 ]      [ a b c d ]           [ e M M h ]                   [ M M M M ]
                                                  each step: 4 rows → commit some of the M, compute again

What a position sees, and so what the paged pool can keep, depends on how the model was trained:

- *block-causal* (BD3-LM, SDAR, Fast-dLLM v2: `ModelConfig.block_causal`): the prompt causally, as any prompt (so
  it is prefilled in chunks and shared through the prefix cache), and each block its prefix plus itself both ways.
  The prompt and finished blocks keep their K/V; a step computes the current block only (a finished block once
  more with its final tokens, at the next block's first step). Exact: a full recompute computes the same.
- *bidirectional* (LLaDA, Dream, the shipped model): every position sees the whole sequence, the masks of later
  blocks included. Cached, this is Fast-dLLM's prefix cache: a block's first step computes the whole sequence and
  keeps the K/V of the prompt and the finished blocks; its other steps compute the block and the masks after it
  against those. An approximation of LLaDA (the prefix's K/V was computed while the block was still masked), so
  `recompute` (EngineArgs.diffusion_recompute) runs LLaDA's algorithm itself: every step computes everything.
  tests/diffusion check both, token for token, against diffusion/sampler.py's `generate` with and without its
  cache. The prompt is neither chunked nor shared: its K/V depends on everything after it.

Classifier-free guidance (`cfg_scale` > 0, LLaDA's): a guided sequence brings a *twin*, the same sequence with its
prompt masked, which shares its Denoising and is scheduled, allocated and freed with it (engine/scheduler.py). The
twin's rows are the partners of the sequence's rows in the sampler, which reads uncond + (cfg_scale + 1) ·
(cond - uncond) (runner/sampler.py); the twin's own samples are dropped.
"""
from __future__ import annotations
import numpy as np
from tinyvllm.diffusion.sampler import DiffusionParams, select, transfer_schedule
from tinyvllm.model.config import ModelConfig
from tinyvllm.sampling_params import SamplingParams


# sampling fields of left-to-right decoding that masked diffusion does not have (refused rather than ignored)
AUTOREGRESSIVE_ONLY = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                       "logit_bias", "min_tokens", "stop", "logprobs", "prompt_logprobs", "structured_outputs")


DIFFUSION_ONLY = ("diffusion_steps", "block_length", "remasking", "threshold", "cfg_scale")


def _set(params: SamplingParams, names: tuple[str, ...]) -> list[str]:
  """Which of `names` the request sets to something other than the default."""
  return [name for name in names if getattr(params, name) != getattr(SamplingParams(), name)]


def refuse_diffusion_fields(params: SamplingParams) -> None:
  """An autoregressive model's request: ValueError where it sets a field that only a diffusion LM reads."""
  unsupported = _set(params, DIFFUSION_ONLY)
  if unsupported: raise ValueError(f"{', '.join(unsupported)}: only diffusion models use this (an autoregressive "
                                   "model is loaded)")


def start(params: SamplingParams, prompt_len: int, model: ModelConfig, recompute: bool, seed: int,
          max_model_len: int, max_num_batched_tokens: int, max_block_length: int) -> list[Denoising]:
  """The diffusion state of each of a request's n choices; ValueError (for the user) where the request asks for
  what a diffusion LM does not do or its blocks cannot fit a step."""
  unsupported = _set(params, AUTOREGRESSIVE_ONLY)
  if unsupported: raise ValueError(f"diffusion models do not support {', '.join(unsupported)}")
  dp = DiffusionParams.from_sampling_params(params)
  if dp.block_length > max_block_length:
    raise ValueError(f"block_length={dp.block_length} exceeds this engine's diffusion_max_block_length={max_block_length}")
  if prompt_len + dp.gen_length > max_model_len:
    raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({dp.gen_length}) exceeds max_model_len={max_model_len}")
  states = [Denoising(prompt_len, DiffusionParams(**{**dp.__dict__, "seed": seed + i}), model, recompute)
            for i in range(params.n)]
  if states[0].tokens_per_step > max_num_batched_tokens:
    raise ValueError(f"max_tokens: a step must compute {states[0].tokens_per_step} tokens of this request at once, "
                     f"more than max_num_batched_tokens={max_num_batched_tokens}")
  return states


class Denoising:
  """One sequence's diffusion state: the current block's tokens, which step of the block it is at, its random
  stream (random remasking)."""
  def __init__(self, prompt_len: int, params: DiffusionParams, model: ModelConfig, recompute: bool):
    self.params, self.prompt_len, self.recompute = params, prompt_len, recompute
    self.mask_id, self.block_causal, self.shift = model.mask_token_id, model.block_causal, model.logits_shift
    self.block_index, self.step, self.calls = 0, 0, 0
    self.block = [self.mask_id] * params.block_length
    self.confidence = [0.0] * params.block_length   # each position's probability when it was committed
    self.finished_confidence: list[float] = []      # the last finished block's (an APD proposal's: diffusion_draft.py)
    self.committed = 0                              # the last step's commits (metrics: tokens per forward)
    self.schedule = np.zeros(0, np.int64)      # masks each step of the block commits: set at its first step
    self.rng = np.random.default_rng(params.seed)
    # one sampler row per block position: each draws its own noise, at a stream position no other step reuses
    self.row_params = SamplingParams(temperature=params.temperature, seed=params.seed, logprobs=0, max_tokens=None)

  @property
  def block_start(self) -> int: return self.prompt_len + self.block_index * self.params.block_length
  @property
  def end(self) -> int: return self.prompt_len + self.params.gen_length

  def drafts(self) -> list[int]:
    """The tokens after the committed ones that the next step computes: the block, and the masks after it where
    something reads them."""
    later = self.params.gen_length - (self.block_index + 1) * self.params.block_length
    return self.block + ([] if self.block_causal and not self.recompute else [self.mask_id] * later)

  def key_limits(self, start: int, n: int) -> list[int]:
    """The last key each of positions start..start+n attends to."""
    B, P = self.params.block_length, self.prompt_len
    if self.block_causal: return [p if p < P else P + ((p - P) // B + 1) * B - 1 for p in range(start, start + n)]
    return [self.end - 1] * n

  def first_uncut(self, num_computed: int) -> int:
    """Where the tokens that must be computed in one step begin (they attend to each other both ways, or, with
    shifted logits, the position before the block is read with it): a step may end before this position, not after
    it, unless it computes them all. Only a block-causal model's prompt may be cut, and only before its last
    `shift` tokens."""
    if not self.block_causal or num_computed >= self.prompt_len - self.shift: return num_computed
    return self.prompt_len - self.shift

  @property
  def num_shareable_tokens(self) -> int:
    """Tokens whose K/V the prefix cache may hand to another request: a block-causal model's prompt (but the tokens
    whose logits the first block reads, which its steps compute)."""
    return self.prompt_len - self.shift if self.block_causal and not self.recompute else 0

  @property
  def tokens_per_step(self) -> int:
    """The most tokens one step must compute whole: block-causal, a finished block, the next one, and the position
    before them where logits are shifted."""
    return 2 * self.params.block_length + self.shift if self.block_causal and not self.recompute else self.end

  def kept_after_step(self, num_known: int, finished_block: bool) -> int:
    """How many of the sequence's first tokens keep their K/V after a step (`num_known`: prompt and output before
    it): the block's is stale (its tokens changed), and so is everything after a bidirectional block finishes
    (Fast-dLLM refreshes the prefix then). Dream's block logits come from the positions before: one more."""
    return 0 if self.recompute or (finished_block and not self.block_causal) else num_known - self.shift

  def logits_positions(self) -> range:
    """The positions whose logits predict the block's tokens (Dream's come from the position before each)."""
    return range(self.block_start - self.shift, self.block_start - self.shift + self.params.block_length)

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
    for i in np.flatnonzero(chosen): self.confidence[i] = probs[i]
    self.committed = int(chosen.sum())
    self.block, self.step, self.calls = block.tolist(), self.step + 1, self.calls + 1
    if (block == self.mask_id).any(): return None
    finished, self.block_index, self.step = self.block, self.block_index + 1, 0
    self.finished_confidence, self.confidence = self.confidence, [0.0] * p.block_length
    self.block = [self.mask_id] * p.block_length
    return finished


class DenoisingRow:
  """What the sampler reads of the row for block position `i` of a denoising sequence: greedy or Gumbel noise at the
  request's temperature, the chosen token's logprob (its probability is the confidence), nothing else. (At a
  temperature the sampler's logprob is of logits / T, where LLaDA's loop scores the token by the raw logits: the
  tokens drawn have the same distribution, the confidences differ.)"""
  def __init__(self, seq, i: int):
    d = seq.denoising
    self.params, self.index, self.seq_id, self.prompt_token_ids = d.row_params, seq.index, seq.seq_id, seq.prompt_token_ids
    self.output_token_ids, self.matcher, self.wants_prompt_logprobs, self.num_pending_tokens = [], None, False, 0
    self.num_output_tokens = (d.calls * d.params.block_length + i) % (1 << 24)    # the noise's stream position
