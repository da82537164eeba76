"""Masked diffusion sampling: LLaDA's reference algorithm and Fast-dLLM's two speed-ups.

An autoregressive model writes one token per forward pass, left to right. A masked diffusion model starts from a
row of [MASK] tokens after the prompt and *unmasks* them: each forward pass predicts every masked position at once
(attention sees both sides), and the sampler keeps ("commits") only the predictions it trusts most; the rest go back
to [MASK] and are predicted again next step, now with more context. One step, 8 positions, 2 commits per step:

    x        The cat [M] [M] [M] [M] [M] [M]            prompt "The cat", gen_length 6
    predict  The cat sat  on  the  mat  .   it          argmax of the logits at every masked position
    conf               .91 .88 .34  .42 .71 .05         softmax probability of that argmax
    commit   The cat sat  on  [M] [M] [M] [M]           the 2 most confident; the others are remasked

Training (examples/train_diffusion.py) matches this: mask each token with probability t ~ U(0, 1) and learn to
predict the masked ones; the loss, weighted by 1/t, bounds the negative log-likelihood.

LLaDA's sampler (`DiffusionParams`):
- gen_length masks are split into blocks of block_length, filled left to right ("semi-autoregressive"); `steps`
  forward passes are spread evenly over the blocks, and each step of a block commits an equal share of its masks.
- remasking="low_confidence" commits the most probable predictions; "random" commits random masked positions.
- temperature > 0 samples each prediction with Gumbel noise (argmax of logits + T·Gumbel), in float64.
- cfg_scale > 0 (classifier-free guidance) also runs the sequence with its prompt masked and pushes the logits away
  from that unconditional guess: uncond + (cfg_scale + 1) · (cond - uncond).

Fast-dLLM's speed-ups:
- threshold: commit every masked position of the block whose confidence reaches it (at least one per step), so an
  easy block finishes in a few steps instead of a fixed number.
- prefix cache (`use_cache`): the prompt and the finished blocks change no more, so at a block's first step the
  full sequence runs once and the keys/values of everything before the block are kept; the block's other steps feed
  only the block and what follows it, attending to the cached prefix. The cache is refreshed at every block.

`denoise_step` runs one step for many sequences in one padded, batched forward pass; `generate` loops it for one.
This is the readable reference, dense and outside the engine: `LLMEngine` runs the same algorithm on the paged KV pool
with every other request (engine/denoising.py, which takes `transfer_schedule` and `select` from here), and
tests/diffusion hold it to `generate` token for token, with and without the prefix cache.
"""
from __future__ import annotations
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, TinyJit
from tinyvllm.diffusion.llada import KV, MaskedDiffusionLM

REMASKING = ("low_confidence", "random")
_JITS: dict[tuple[int, ...], TinyJit] = {}


@dataclass(frozen=True)
class DiffusionParams:
  gen_length: int = 64
  steps: int | None = None                    # forward passes over all blocks; None: one per token
  block_length: int = 32
  temperature: float = 0.0
  remasking: str = "low_confidence"
  threshold: float | None = None              # Fast-dLLM parallel decoding; None: a fixed count per step
  cfg_scale: float = 0.0
  seed: int | None = None

  def __post_init__(self) -> None:
    checks = {
      "gen_length": self.gen_length >= 1,
      "block_length": 1 <= self.block_length and self.gen_length % self.block_length == 0,
      "steps": self.steps is None or (self.steps >= 1 and self.steps % self.num_blocks == 0),
      "temperature": self.temperature >= 0,
      "remasking": self.remasking in REMASKING,
      "threshold": self.threshold is None or 0 < self.threshold <= 1,
      "cfg_scale": self.cfg_scale >= 0,
    }
    for name, ok in checks.items():
      if not ok: raise ValueError(f"invalid diffusion parameter {name}={getattr(self, name)!r} (gen_length="
                                  f"{self.gen_length}, block_length={self.block_length}, steps={self.steps})")

  @property
  def num_blocks(self) -> int: return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int: return (self.steps or self.gen_length) // self.num_blocks

  @classmethod
  def from_sampling_params(cls, sp) -> DiffusionParams:
    """SamplingParams -> DiffusionParams: gen_length is max_tokens in whole blocks (rounded up: the engine stops the
    output at max_tokens, as an OpenAI client expects of any max_tokens); the knobs are SamplingParams' diffusion
    fields."""
    gen_length = sp.max_tokens or cls.gen_length
    block_length = sp.block_length or min(cls.block_length, gen_length)
    gen_length = -(-gen_length // block_length) * block_length
    return cls(gen_length=gen_length, steps=sp.diffusion_steps, block_length=block_length, temperature=sp.temperature,
               remasking=sp.remasking, threshold=sp.threshold, cfg_scale=sp.cfg_scale, seed=sp.seed)


# ---- one step of one block: propose, score, commit ---------------------------------------------------------------
def transfer_schedule(num_masked: int, steps: int) -> np.ndarray:
  """How many masks each of a block's steps commits: equal shares, the remainder to the first steps."""
  base, extra = divmod(num_masked, steps)
  return base + (np.arange(steps) < extra)


def propose(logits: np.ndarray, temperature: float, remasking: str,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """logits [L, V] -> (predicted token [L], confidence [L])."""
  logits = logits.astype(np.float64)
  noisy = logits if temperature == 0 else logits - temperature * np.log(-np.log(rng.random(logits.shape)))
  x0 = noisy.argmax(-1)
  if remasking == "random": return x0, rng.random(len(x0))
  shifted = logits - logits.max(-1, keepdims=True)
  probs = np.exp(shifted[np.arange(len(x0)), x0]) / np.exp(shifted).sum(-1)
  return x0, probs


def select(confidence: np.ndarray, masked: np.ndarray, count: int | None, threshold: float | None) -> np.ndarray:
  """Which positions to commit: the `count` most confident masked ones, or (threshold) every masked one at or above
  the threshold and at least the most confident one. Returns a bool mask [L]."""
  conf = np.where(masked, confidence, -np.inf)
  order = np.argsort(-conf, kind="stable")
  if threshold is not None: count = max(1, int((conf >= threshold).sum()))
  chosen = np.zeros(len(conf), dtype=bool)
  chosen[order[:count]] = True
  return chosen & masked


def guided(cond: np.ndarray, uncond: np.ndarray, cfg_scale: float) -> np.ndarray:
  return uncond + (cfg_scale + 1) * (cond - uncond)


# ---- a sequence being denoised ------------------------------------------------------------------------------------
class Denoiser:
  """One sequence: its tokens (prompt + masks), which block and step it is at, and its prefix caches."""
  def __init__(self, prompt: list[int], params: DiffusionParams, mask_id: int, stop_ids: set[int] = frozenset(),
               rng: np.random.Generator | None = None):
    self.params, self.mask_id, self.stop_ids, self.prompt_len = params, mask_id, set(stop_ids), len(prompt)
    self.x = np.array(list(prompt) + [mask_id] * params.gen_length, dtype=np.int64)
    self.rng = rng or np.random.default_rng(params.seed)
    self.block, self.step, self.calls = 0, 0, 0
    self.schedule = np.zeros(0, dtype=np.int64)
    self.caches: list[list[KV] | None] = [None, None]     # conditional, unconditional (cfg) row

  @property
  def span(self) -> tuple[int, int]:
    start = self.prompt_len + self.block * self.params.block_length
    return start, start + self.params.block_length

  @property
  def finished(self) -> bool:
    return self.block == self.params.num_blocks or bool(self.stop_ids & set(self.committed().tolist()))

  def committed(self) -> np.ndarray:
    """The generated tokens of the finished blocks."""
    return self.x[self.prompt_len:self.span[0]]

  def unconditional(self) -> np.ndarray:
    """The sequence with its prompt masked (classifier-free guidance's unconditional input)."""
    return np.concatenate([np.full(self.prompt_len, self.mask_id), self.x[self.prompt_len:]])

  def update(self, logits: np.ndarray) -> bool:
    """Commit tokens of the current block from its logits [block_length, V]; True when that finishes the block."""
    p, (start, end) = self.params, self.span
    block = self.x[start:end]                                          # a view: writing it writes self.x
    masked = block == self.mask_id
    if self.step == 0: self.schedule = transfer_schedule(int(masked.sum()), p.steps_per_block)
    x0, confidence = propose(logits, p.temperature, p.remasking, self.rng)
    count = None if p.threshold is not None else int(self.schedule[self.step])
    chosen = select(confidence, masked, count, p.threshold)
    block[chosen] = x0[chosen]
    self.step, self.calls = self.step + 1, self.calls + 1
    if (block == self.mask_id).any(): return False
    self.block, self.step, self.caches = self.block + 1, 0, [None, None]
    return True


# ---- one batched forward pass for many sequences ------------------------------------------------------------------
@dataclass
class _Row:
  """One row of the batch: a sequence (or its unconditional twin) as the model sees it this step."""
  seq: Denoiser
  which: int                                  # 0: conditional, 1: unconditional
  tokens: np.ndarray                          # query tokens: the whole sequence, or (cached) the block onwards
  past: list[KV] | None                       # cached K/V of the positions before `query_from`
  query_from: int
  window: int                                 # where the block's logits start, in query coordinates
  refresh: bool                               # keep this pass's K/V of the prefix as the new cache


def _rows(seq: Denoiser, use_cache: bool, shift: int) -> list[_Row]:
  start, _ = seq.span
  rows = []
  for which, tokens in enumerate([seq.x] + ([seq.unconditional()] if seq.params.cfg_scale > 0 else [])):
    past = seq.caches[which] if use_cache else None
    query_from = 0 if past is None else start - shift
    rows.append(_Row(seq, which, tokens[query_from:], past, query_from, start - shift - query_from,
                     use_cache and past is None))
  return rows


def _stack_past(rows: list[_Row], R: int, num_layers: int, length: int) -> list[KV] | None:
  """Per layer, the rows' caches padded to `length` positions and stacked (zeros for rows without one, up to R rows):
  [R, length, kv_heads, head_dim]."""
  if length == 0: return None
  like = next(r.past for r in rows if r.past is not None)[0][0]
  def padded(t: Tensor | None) -> Tensor:
    if t is None: return Tensor.zeros(length, *like.shape[1:], dtype=like.dtype)
    return t.pad(((0, length - t.shape[0]), None, None))
  caches = [r.past for r in rows] + [None] * (R - len(rows))
  return [tuple(Tensor.stack(*[padded(None if c is None else c[layer][i]) for c in caches]) for i in range(2))
          for layer in range(num_layers)]


def _bucket(n: int, size: int = 16) -> int: return -(-n // size) * size


def _compiled(model: MaskedDiffusionLM, key: tuple[int, ...]) -> TinyJit:
  """One TinyJit per padded batch shape (rows, query length, past length, window): the layers are scheduled and
  compiled once per shape, then replayed."""
  if (id(model), *key) not in _JITS:
    def run(tokens: Tensor, positions: Tensor, valid: Tensor, index: Tensor, *past_flat: Tensor) -> list[Tensor]:
      past = [(past_flat[i], past_flat[i + 1]) for i in range(0, len(past_flat), 2)] or None
      h, kv = model.hidden(tokens, positions, valid, past)
      R, L = index.shape
      logits = model.logits(h.gather(1, index.reshape(R, L, 1).expand(R, L, h.shape[-1])))
      return [t.realize() for t in (logits, *[t for pair in kv for t in pair])]
    _JITS[(id(model), *key)] = TinyJit(run)
  return _JITS[(id(model), *key)]


def forward_rows(model: MaskedDiffusionLM, rows: list[_Row], block_length: int) -> tuple[np.ndarray, list[KV]]:
  """The batch through the model, padded to bucketed shapes (rows to a power of two, lengths to multiples of 16):
  logits of each row's block window [R, block_length, V] and the K/V of every row's query tokens per layer
  [R, T, kv_heads, head_dim]."""
  n, mc = len(rows), model.config.model
  R, T = 1 << (n - 1).bit_length(), _bucket(max(len(r.tokens) for r in rows))
  P = _bucket(max(r.query_from if r.past is not None else 0 for r in rows))
  tokens, positions = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
  valid, index = np.zeros((R, P + T), bool), np.zeros((R, block_length), np.int32)
  valid[n:, P] = True                                                     # padding rows attend to one slot, not none
  for i, r in enumerate(rows):
    past_len = r.query_from if r.past is not None else 0
    tokens[i, :len(r.tokens)] = r.tokens
    positions[i] = np.minimum(r.query_from + np.arange(T), mc.max_position_embeddings - 1)
    valid[i, :past_len], valid[i, P:P + len(r.tokens)] = True, True
    index[i] = np.minimum(r.window + np.arange(block_length), T - 1)
  past = _stack_past(rows, R, mc.num_layers, P)
  past_flat = [t for pair in past for t in pair] if past else []
  if past_flat: Tensor.realize(*past_flat)
  logits, *kv_flat = _compiled(model, (R, T, P, block_length))(
    Tensor(tokens), Tensor(positions), Tensor(valid), Tensor(index), *past_flat)
  return logits.numpy()[:n], [(kv_flat[i], kv_flat[i + 1]) for i in range(0, len(kv_flat), 2)]


def denoise_step(model: MaskedDiffusionLM, seqs: list[Denoiser], use_cache: bool = False) -> list[bool]:
  """One denoising step for every sequence, in one forward pass; per sequence, whether it finished a block."""
  shift = model.config.shift
  rows = [row for seq in seqs for row in _rows(seq, use_cache, shift)]
  block_length = max(seq.params.block_length for seq in seqs)
  logits, kv = forward_rows(model, rows, block_length)
  fresh = []
  for i, r in enumerate(rows):
    if r.refresh:     # copied out: the compiled pass reuses its output buffers
      r.seq.caches[r.which] = [(k[i, :r.seq.span[0] - shift].contiguous(), v[i, :r.seq.span[0] - shift].contiguous())
                               for k, v in kv]
      fresh += [t for pair in r.seq.caches[r.which] for t in pair]
  if fresh: Tensor.realize(*fresh)
  by_seq: dict[int, list[np.ndarray]] = {}
  for i, r in enumerate(rows): by_seq.setdefault(id(r.seq), []).append(logits[i, :r.seq.params.block_length])
  done = []
  for seq in seqs:
    out = by_seq[id(seq)]
    done.append(seq.update(out[0] if len(out) == 1 else guided(out[0], out[1], seq.params.cfg_scale)))
  return done


def generate(model: MaskedDiffusionLM, prompt: list[int], params: DiffusionParams, use_cache: bool = False,
             stop_ids: set[int] = frozenset()) -> Denoiser:
  """Denoise one sequence to the end; the returned Denoiser holds the tokens (`x`) and the model calls made."""
  seq = Denoiser(prompt, params, model.config.mask_token_id, stop_ids)
  while not seq.finished: denoise_step(model, [seq], use_cache)
  return seq
