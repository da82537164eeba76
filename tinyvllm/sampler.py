"""Logits → next tokens, for every row of the batch at once, on the device, inside the model's TinyJit graph.

Each row carries its own parameters as tensors (temperature, top_k, top_p, min_p, seed), so one kernel chain serves
a batch that mixes greedy and sampled requests; nothing loops over sequences or over the vocabulary in Python.

Sampling uses the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log(u)), u uniform, draws exactly from
softmax(logits / T). The uniforms come from a counter-based hash of (request seed, output position, token id), not
from a global random stream, so a seeded request draws the same tokens whatever else shares its batch and however
its prompt was chunked or preempted.

top-k, top-p and min-p each keep the tokens whose probability is at least some threshold. The thresholds are found
by bisection over probability values (24 halvings, vectorized over rows) instead of sorting the vocabulary.
"""
from __future__ import annotations
import numpy as np
from tinygrad import Tensor, dtypes
from tinyvllm.sequence import Sequence

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed", "step")
_BISECT_STEPS = 24


def sampling_arrays(rows: list[Sequence | None], seed_base: int) -> dict[str, np.ndarray]:
  """Host side: one value per row for each of SAMPLING_FIELDS; padding rows (None) are greedy."""
  out = {name: np.zeros(len(rows), np.float32) for name in SAMPLING_FIELDS}
  for i, seq in enumerate(rows):
    if seq is None: continue
    p = seq.params
    out["temperature"][i], out["top_p"][i], out["min_p"][i] = p.temperature, p.top_p, p.min_p
    out["top_k"][i] = p.top_k if p.top_k > 0 else 0
    # unseeded requests still get a per-request stream, so preemption replays the same draws
    out["seed"][i] = (p.seed if p.seed is not None else seed_base + seq.seq_id) % (1 << 24)
    out["step"][i] = len(seq.output_token_ids)
  return out


def _uniform(seed: Tensor, step: Tensor, vocab_size: int) -> Tensor:
  """u[row, v] in (0, 1), a pure function of (seed[row], step[row], v): murmur3's finalizer over a mixed counter."""
  v = Tensor.arange(vocab_size, dtype=dtypes.uint32).reshape(1, -1)
  x = v * 0x9E3779B1 + seed.cast(dtypes.uint32).reshape(-1, 1) * 0x85EBCA77 + step.cast(dtypes.uint32).reshape(-1, 1) * 0xC2B2AE3D
  x = x ^ (x >> 16)
  x = x * 0x85EBCA6B
  x = x ^ (x >> 13)
  x = x * 0xC2B2AE35
  x = x ^ (x >> 16)
  return ((x >> 8).cast(dtypes.float32) + 0.5) * (1.0 / (1 << 24))


def _bisect_threshold(probs: Tensor, keep_enough) -> Tensor:
  """The largest threshold t (per row) such that keep_enough(probs >= t) still holds; [S, 1]."""
  lo = Tensor.zeros(probs.shape[0], 1, device=probs.device)
  hi = probs.max(-1, keepdim=True)
  for _ in range(_BISECT_STEPS):
    mid = (lo + hi) / 2
    ok = keep_enough(probs >= mid)
    lo, hi = ok.where(mid, lo), ok.where(hi, mid)
  return lo


def sampling_mode(rows: list[Sequence | None]) -> str:
  """The cheapest graph that serves every row: "greedy", "random" (no filters), or "filtered"."""
  live = [seq.params for seq in rows if seq is not None and not seq.params.greedy]
  if not live: return "greedy"
  return "filtered" if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in live) else "random"


def sample(logits: Tensor, params: dict[str, Tensor], mode: str) -> Tensor:
  """logits: [S, V] float32; params: SAMPLING_FIELDS as [S] tensors. Returns [S] int32 token ids."""
  if mode == "greedy": return logits.argmax(-1).cast(dtypes.int32)
  S, V = logits.shape
  temperature = params["temperature"].reshape(S, 1)
  greedy = temperature <= 0
  probs = (logits / greedy.where(1.0, temperature)).softmax(-1)
  if mode == "filtered": probs = _filter(probs, params)
  gumbel = -(-_uniform(params["seed"], params["step"], V).log()).log()
  sampled = (probs > 0).where(probs.log() + gumbel, -float("inf")).argmax(-1)
  return greedy.reshape(S).where(logits.argmax(-1), sampled).cast(dtypes.int32)


def _filter(probs: Tensor, params: dict[str, Tensor]) -> Tensor:
  """Zero the tokens outside top-k, then outside the top-p nucleus of what is left, then below min_p × max."""
  S = probs.shape[0]
  top_k = params["top_k"].reshape(S, 1)
  k_thresh = _bisect_threshold(probs, lambda kept: kept.sum(-1, keepdim=True) >= top_k)
  probs = ((top_k > 0) & (probs < k_thresh)).where(0.0, probs)
  probs = probs / probs.sum(-1, keepdim=True)
  top_p = params["top_p"].reshape(S, 1) * (1 - 1e-6)     # float sums of a full nucleus may land a hair under top_p
  p_thresh = _bisect_threshold(probs, lambda kept: kept.where(probs, 0.0).sum(-1, keepdim=True) >= top_p)
  keep = (probs >= p_thresh) & (probs >= params["min_p"].reshape(S, 1) * probs.max(-1, keepdim=True))
  return keep.where(probs, 0.0)
