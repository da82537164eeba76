"""Logits → next tokens, for every row of the batch at once, on the device, in a TinyJit graph of its own.

Each row carries its own parameters as tensors (temperature, top_k, top_p, min_p, seed), so one kernel chain serves
a batch that mixes greedy and sampled requests; nothing loops over sequences or over the vocabulary in Python.

Sampling uses the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log(u)), u uniform, draws exactly from
softmax(logits / T). The uniforms come from a counter-based hash of (request seed, output position, token id), not
from a global random stream, so a seeded request draws the same tokens whatever else shares its batch and however
its prompt was chunked or preempted.

top-k, top-p and min-p each keep the tokens whose probability is at least some threshold. The thresholds are found
by a 4-way search over probability values instead of sorting the vocabulary: each pass tests 3 candidate
thresholds at once (one reduction over the vocabulary for all of them) and keeps the quarter of the interval where
the answer lies, so 12 passes reach the precision of 24 halvings. (Measured: 16-way, 6 passes of 15 candidates, does
more compares than it saves in passes: 2.5x slower on an H100 at batch 64, ~1.7x on a 2-core CPU.)

Penalties and `logit_bias` touch only the tokens a row has seen or named, so the host sends, per row, a short padded
list of (token id, times generated, in prompt?, bias) and the device gathers those logits, adjusts them and scatters
them back: no [rows × vocab] table is built on the host. The order is vLLM's: bias (and the EOS ban of
`min_tokens`), then repetition/frequency/presence penalties, then temperature and the filters. Logprobs are
log_softmax of the adjusted logits divided by the temperature (undivided for greedy rows). Prompt logprobs (each
prompt token's logprob given the tokens before it) come from the logits of every position of a prefill chunk, scaled
by the temperature the same way; penalties and bias, which depend on the output so far, do not apply to them.

The graph that runs depends on a `SamplingPlan`, one of three (`plans`): greedy (an argmax, nothing else), sampled
(temperature and every filter) and general (also the top 20 logprobs, room for penalties and bias, and each row's
allowed-token bitmask for structured outputs: engine/structured_output.py), so that a batch of plain greedy requests
pays for none of this, and a new mix of parameters never needs a graph of its own: the runner captures one per plan
and row count before serving (graphs.py). A row that does not use a filter, a penalty or a grammar gets
parameters that make it a no-op. A diffusion LM's rows have a plan of their own, `SCORED`: temperature, classifier-free
guidance (a row's logits against its partner row's) and the chosen token's logprob (engine/denoising.py).
"""
from __future__ import annotations
from dataclasses import dataclass
from itertools import chain
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.uop.ops import UOp, KernelInfo
from tinyvllm.sampling_params import MAX_LOGPROBS, SamplingParams
from tinyvllm.engine.sequence import Sequence

ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed", "step", "presence", "frequency", "repetition",
              "constrained")
ADJUST_FIELDS = ("count", "in_prompt", "bias")
FILTERS = ("top_k", "top_p", "min_p")
_SEARCH_WAYS, _SEARCH_PASSES = 4, 12    # 4**12 = 2**24: the threshold to 24 bits of the row's largest probability


def bucket(n: int, minimum: int = 1) -> int:
  """Round a size up to a power of two (at least `minimum`; 0 stays 0) so a few compiled shapes serve them all."""
  return 0 if n == 0 else max(minimum, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class SamplingPlan:
  mode: str             # "greedy" | "filtered" (temperature and top-k/top-p/min-p)
  filters: tuple[str, ...]   # the filters some row of the batch uses, from FILTERS; () unless mode is "filtered"
  num_adjusted: int     # U: token slots per row for penalties/bias; 0 = none
  num_logprobs: int     # K: top logprobs returned per row; 0 = none
  want_logprobs: bool   # return the chosen token's logprob (and K alternatives)
  num_prompt_logprobs: int | None = None   # P: top logprobs at every position of the chunk; None = not asked
  mask_words: int = 0   # W: int32 words of each row's allowed-token bitmask (structured outputs); 0 = no mask
  guided: bool = False  # classifier-free guidance: a row's logits pushed away from a partner row's (a diffusion LM's)

  @property
  def output_width(self) -> int: return 2 + 2 * self.num_logprobs   # token, its logprob, K ids, K logprobs
  @property
  def prompt_output_width(self) -> int: return 1 + 2 * (self.num_prompt_logprobs or 0)  # next token's logprob, top P


def _keys(pieces: list[tuple[int, list[int]]]) -> np.ndarray:
  """(row, token ids) pieces -> int64 keys row << 32 | token: one sort orders and dedups a whole batch's tokens."""
  tokens = np.fromiter(chain.from_iterable(ids for _, ids in pieces), np.int64)
  return np.repeat(np.array([row for row, _ in pieces], np.int64), [len(ids) for _, ids in pieces]) << 32 | tokens


def penalized(p: SamplingParams) -> bool:
  """Whether a request's logits depend on the tokens it generated, which the host must then know before a step."""
  return bool(p.presence_penalty or p.frequency_penalty) or p.repetition_penalty != 1


def _adjusts_logits(seq: Sequence) -> bool:
  """A bias, stop tokens banned until min_tokens, or a penalty: something for _pack_adjustments to pack."""
  p = seq.params
  return bool(p.logit_bias) or seq.num_output_tokens < p.min_tokens or penalized(p)


def _pack_adjustments(rows: list[Sequence | None], stop_ids: set[int], U: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row, the tokens its params touch, sorted and padded to U: ids [S, U] and [times generated, appears in
  prompt, additive bias] as [3, S, U]. Vectorized over the batch: per-row dicts cost 24 ms of host time per step at
  batch 64 with 128-token prompts."""
  if not U or not any(seq is not None and _adjusts_logits(seq) for seq in rows):
    return np.zeros((len(rows), U), np.int32), np.zeros((len(ADJUST_FIELDS), len(rows), U), np.float32)
  generated, prompts, biased, bias_values = [], [], [], []
  for row, seq in enumerate(rows):
    if seq is None: continue
    p = seq.params
    bias = {int(k): float(v) for k, v in (p.logit_bias or {}).items()}
    if seq.num_output_tokens < p.min_tokens:
      for t in stop_ids | set(p.stop_token_ids): bias[t] = -float("inf")
    if penalized(p): generated.append((row, seq.output_token_ids))
    if p.repetition_penalty != 1: prompts.append((row, seq.prompt_token_ids))
    biased.append((row, list(bias)))
    bias_values += bias.values()
  generated, prompts, biased = _keys(generated), _keys(prompts), _keys(biased)
  keys = np.sort(np.concatenate([generated, prompts, biased]))
  keys = keys[np.diff(keys, prepend=-1) != 0]                     # deduplicated; np.unique hashes: 15× slower here
  values = np.zeros((len(ADJUST_FIELDS), len(keys)), np.float32)
  values[0] = np.bincount(np.searchsorted(keys, generated), minlength=len(keys))
  values[1, np.searchsorted(keys, prompts)] = 1.0
  values[2, np.searchsorted(keys, biased)] = bias_values
  key_row, token = keys >> 32, (keys & 0xFFFFFFFF).astype(np.int32)
  per_row = np.bincount(key_row, minlength=len(rows))
  start = np.cumsum(per_row) - per_row
  assert per_row.max(initial=0) <= U, "more adjusted tokens in a row than the plan has room for"
  ids, extra = np.zeros((len(rows), U), np.int32), np.zeros((len(ADJUST_FIELDS), len(rows), U), np.float32)
  # padding repeats the row's first entry: duplicate writes of the same value are harmless
  first = start[has := per_row > 0]
  ids[has], extra[:, has] = token[first, None], values[:, first, None]
  column = np.arange(len(keys)) - start[key_row]
  ids[key_row, column], extra[:, key_row, column] = token, values
  return ids, extra


def _stream(seq: Sequence, seed_base: int) -> int:
  """The seed of a row's random stream: unseeded requests get one of their own too, so that preemption replays it."""
  p = seq.params
  return (p.seed + seq.index if p.seed is not None else seed_base + seq.seq_id) % (1 << 24)


GREEDY = SamplingPlan("greedy", (), 0, 0, False)
SCORED = SamplingPlan("filtered", (), 0, 0, True, guided=True)  # temperature, guidance and the chosen token's
                                                      # logprob, nothing else: a diffusion LM's rows (engine/denoising.py)


def plans(max_adjusted: int, prompt: bool = False, mask_words: int = 0) -> list[SamplingPlan]:
  """The plans a batch can get, so that a graph per (rows, plan) is a known, bounded set: greedy; sampled (any
  temperature and filters, and with `mask_words` an allowed-token bitmask a row for structured outputs); general
  (anything else: logprobs, penalties, bias, min_tokens, with every filter, the top MAX_LOGPROBS logprobs, room for
  `max_adjusted` adjusted tokens a row, and the masks). With `prompt`: the plan of a prompt that wants prompt
  logprobs."""
  general = SamplingPlan("filtered", FILTERS, max_adjusted, MAX_LOGPROBS, True, None, mask_words)
  if prompt: return [SamplingPlan("filtered", FILTERS, max_adjusted, MAX_LOGPROBS, True, MAX_LOGPROBS, mask_words)]
  return [GREEDY, SamplingPlan("filtered", FILTERS, 0, 0, False, None, mask_words), general]


def plan_and_pack(rows: list[Sequence | None], seed_base: int, stop_ids: set[int], max_adjusted: int,
                  plan: SamplingPlan | None = None, mask_words: int = 0,
                  guidance: tuple[list[int], list[float]] | None = None) -> tuple[SamplingPlan, np.ndarray, np.ndarray]:
  """Host side: the plan for this batch (the cheapest of PLANS that serves every row, or `plan`), plus its int32
  inputs (adjusted token ids, then the allowed-token masks, then a guided plan's partner rows) and float32 inputs
  (the rows' fields, the adjustments, a guided plan's scales). `guidance`: (partner row, scale) of the first rows;
  the others are their own partners."""
  live = [seq for seq in rows if seq is not None]
  if plan is None:
    if any(s.wants_prompt_logprobs for s in live): plan = plans(max_adjusted, True, mask_words)[0]
    elif any(s.params.logprobs is not None or _adjusts_logits(s) for s in live):
      plan = plans(max_adjusted, mask_words=mask_words)[2]
    elif any(not s.params.greedy or s.matcher for s in live): plan = plans(max_adjusted, mask_words=mask_words)[1]
    else: plan = GREEDY
  ids, extra = _pack_adjustments(rows, stop_ids, plan.num_adjusted)
  # one tuple of ROW_FIELDS per row, made into an array once (a numpy store per field and row: 0.5 ms at batch 256)
  per_row = np.array([(0.0,) * len(ROW_FIELDS) if seq is None else
                      (seq.params.temperature, max(seq.params.top_k, 0), seq.params.top_p, seq.params.min_p,
                       _stream(seq, seed_base), seq.num_output_tokens, seq.params.presence_penalty,
                       seq.params.frequency_penalty, seq.params.repetition_penalty, float(seq.matcher is not None))
                      for seq in rows],
                     np.float32).reshape(len(rows), len(ROW_FIELDS))
  floats = np.concatenate([per_row.T.ravel(), extra.ravel()])
  # the masks, where a row has a grammar (every other row's mask is ignored: its "constrained" field is 0). Without
  # one, the sampled plan's masks are not sent at all: the device keeps stale ones, which no row reads.
  has_grammar = any(seq is not None and seq.matcher for seq in rows)
  if plan.mask_words and (has_grammar or plan.num_adjusted or plan.num_prompt_logprobs is not None):
    masks = np.full((len(rows), plan.mask_words), -1, np.int32)
    for row, seq in enumerate(rows):
      if seq is not None and seq.matcher and not seq.num_pending_tokens: masks[row] = seq.matcher.allowed()
    ids = np.concatenate([ids.ravel(), masks.ravel()])
  if plan.guided:
    partner, scale = np.arange(len(rows), dtype=np.int32), np.zeros(len(rows), np.float32)
    if guidance: partner[:len(guidance[0])], scale[:len(guidance[1])] = guidance
    ids, floats = np.concatenate([ids.ravel(), partner]), np.concatenate([floats, scale])
  return plan, ids.ravel(), floats


def unpack(ints: Tensor, floats: Tensor, S: int, plan: SamplingPlan) -> dict[str, Tensor]:
  """Device side: split the packed inputs back into named [S] and [S, U] tensors."""
  U, W = plan.num_adjusted, plan.mask_words
  rows, adjust = floats[:S * len(ROW_FIELDS)], floats[S * len(ROW_FIELDS):]
  out = {name: t.reshape(S, 1) for name, t in zip(ROW_FIELDS, rows.split(S))}
  if U: out.update({name: t.reshape(S, U) for name, t in zip(ADJUST_FIELDS, adjust.split(S * U))},
                   ids=ints[:S * U].reshape(S, U))
  if W: out["mask"] = ints[S * U:S * (U + W)].reshape(S, W)
  if plan.guided:
    out["partner"] = ints[S * (U + W):S * (U + W + 1)].reshape(S, 1)
    out["guidance"] = adjust[len(ADJUST_FIELDS) * S * U:][:S].reshape(S, 1)
  return out


def _allowed(logits: Tensor, mask: Tensor, constrained: Tensor) -> Tensor:
  """In a constrained row [S, 1], tokens whose bit is clear in its mask [S, W] (token t: bit t % 32 of word t // 32)
  get -inf."""
  S, V = logits.shape
  words = mask.reshape(S, -1, 1).expand(S, mask.shape[1], 32).reshape(S, -1)[:, :V].bitcast(dtypes.uint32)
  bits = (words >> (Tensor.arange(V, dtype=dtypes.uint32) % 32).reshape(1, V)) & 1
  return ((constrained == 0) | (bits == 1)).where(logits, -float("inf"))


def _scatter_kernel(out: UOp, ids: UOp, values: UOp) -> UOp:
  """out[s, ids[s, u]] = values[s, u]"""
  s, u = UOp.range(ids.shape[0], 0), UOp.range(ids.shape[1], 1)
  return out[s, ids[s, u].cast(dtypes.weakint)].store(values[s, u]).end(s, u).sink(arg=KernelInfo(name="logits_scatter"))


def _gather_rows_kernel(out: UOp, x: UOp, rows: UOp) -> UOp:
  """out[s, v] = x[rows[s], v]"""
  s, v = UOp.range(out.shape[0], 0), UOp.range(out.shape[1], 1)
  return out[s, v].store(x[rows[s, 0].cast(dtypes.weakint), v]).end(s, v).sink(arg=KernelInfo(name="logits_rows"))


def _guided(logits: Tensor, partner: Tensor, scale: Tensor) -> Tensor:
  """Classifier-free guidance, LLaDA's formula: uncond + (scale + 1) · (cond - uncond), where uncond is the partner
  row's logits (the same position computed with the prompt masked). A row without guidance is its own partner with
  scale 0: its logits pass unchanged. The partner rows are copied by a kernel of its own: a gather across rows
  would compare every row with every other."""
  uncond = Tensor.empty(*logits.shape, dtype=logits.dtype, device=logits.device)
  uncond = uncond.custom_kernel(logits, partner.contiguous(), fxn=_gather_rows_kernel)[0]
  return (uncond + (scale + 1) * (logits - uncond)).contiguous()


def _adjust(logits: Tensor, p: dict[str, Tensor]) -> Tensor:
  """Bias, then repetition / frequency / presence penalties, on the U listed tokens of each row."""
  g = logits.gather(1, p["ids"]) + p["bias"]
  seen = (p["count"] > 0) | (p["in_prompt"] > 0)
  g = seen.where((g > 0).where(g / p["repetition"], g * p["repetition"]), g)
  g = g - p["frequency"] * p["count"] - p["presence"] * (p["count"] > 0).float()
  return logits.contiguous().custom_kernel(p["ids"], g.contiguous(), fxn=_scatter_kernel)[0]


def _uniform(seed: Tensor, step: Tensor, vocab_size: int) -> Tensor:
  """u[row, v] in (0, 1), a pure function of (seed[row], step[row], v): murmur3's finalizer over a mixed counter."""
  v = Tensor.arange(vocab_size, dtype=dtypes.uint32).reshape(1, -1)
  x = v * 0x9E3779B1 + seed.cast(dtypes.uint32) * 0x85EBCA77 + step.cast(dtypes.uint32) * 0xC2B2AE3D
  x = x ^ (x >> 16)
  x = x * 0x85EBCA6B
  x = x ^ (x >> 13)
  x = x * 0xC2B2AE35
  x = x ^ (x >> 16)
  return ((x >> 8).cast(dtypes.float32) + 0.5) * (1.0 / (1 << 24))


def _search_threshold(probs: Tensor, target: Tensor, weighted: bool) -> Tensor:
  """The largest threshold t (per row) such that the tokens with probs >= t still reach `target` [S, 1]: in number
  of tokens, or, `weighted`, in probability mass. Returns [S, 1]."""
  lo, width = Tensor.zeros(probs.shape[0], 1, 1), probs.max(-1, keepdim=True).unsqueeze(-1)
  fractions = Tensor.arange(1, _SEARCH_WAYS).reshape(1, -1, 1) / _SEARCH_WAYS
  probs = probs.unsqueeze(1)                                                       # [S, 1, V]
  for _ in range(_SEARCH_PASSES):
    kept = probs >= lo + width * fractions                                         # [S, C, V]: C candidates, rising
    reached = (kept.where(probs, 0.0) if weighted else kept).sum(-1, keepdim=True) >= target.unsqueeze(-1)
    passing = reached.sum(1, keepdim=True)                                         # a prefix of the candidates
    # materialized each pass, so that every pass runs the same kernels: left lazy, each pass's kernels would carry
    # the whole chain of the passes before it, a new kernel to compile per pass (SmolLM2's sampled plan: 69 kernels
    # a row count where 25 do)
    width = (width / _SEARCH_WAYS).contiguous()
    lo = (lo + passing * width).contiguous()
  return lo.squeeze(-1)


def _kept(probs: Tensor, p: dict[str, Tensor], filters: tuple[str, ...]) -> Tensor:
  """The tokens that survive top-k, then the top-p nucleus of what is left, then min_p × max: a [S, V] mask. Only
  the filters some row uses are built; a row that does not use one gets a threshold that keeps everything.
  The probabilities are materialized before each search: fused into its passes, they would be recomputed (exp,
  log_softmax) for every candidate threshold of every pass."""
  probs = probs.contiguous()
  if "top_k" in filters:
    k_thresh = _search_threshold(probs, p["top_k"], weighted=False)
    probs = ((p["top_k"] > 0) & (probs < k_thresh)).where(0.0, probs)
    probs = (probs / probs.sum(-1, keepdim=True)).contiguous()
  kept = probs > 0
  if "top_p" in filters:
    top_p = p["top_p"] * (1 - 1e-6)       # float sums of a full nucleus may land a hair under top_p
    p_thresh = _search_threshold(probs, top_p, weighted=True)
    kept = kept & ((p["top_p"] >= 1) | (probs >= p_thresh))
  if "min_p" in filters: kept = kept & (probs >= p["min_p"] * probs.max(-1, keepdim=True))
  return kept


def _softmax(x: Tensor) -> tuple[Tensor, Tensor]:
  """(log_softmax, softmax) of each row, sharing one exp(x - max). It is materialized: fused into the sum, the
  exponentials ran in a scalar loop on the CPU (7.9 ms against 1 ms as an elementwise kernel, 16 rows × 49k)."""
  shifted = x - x.max(-1, keepdim=True)
  e = shifted.exp().contiguous()
  total = e.sum(-1, keepdim=True)
  return shifted - total.log(), e / total


def _temperature_scaled(logits: Tensor, temperature: Tensor) -> Tensor:
  return logits / (temperature <= 0).where(1.0, temperature)


def _argmax(x: Tensor) -> tuple[Tensor, Tensor]:
  """(index, value) of each row's largest entry ([S, 1] each; the first index on ties) in one reduction over the
  vocabulary instead of tinygrad's two (max, then the index of the max) plus a gather: the value's float bits, turned
  into an unsigned integer with the same order, and the reversed index share one uint64 key; the largest key wins."""
  V = x.shape[-1]
  bits, sign = x.bitcast(dtypes.uint32), 0x80000000
  ordered = (bits >= sign).where(bits ^ 0xFFFFFFFF, bits | sign)    # negatives order backwards: flip all their bits
  reversed_index = (V - 1 - Tensor.arange(V)).cast(dtypes.uint64)
  best = (ordered.cast(dtypes.uint64) * (1 << 32) + reversed_index).max(-1, keepdim=True)
  high = (best // (1 << 32)).cast(dtypes.uint32)
  value = (high >= sign).where(high ^ sign, high ^ 0xFFFFFFFF).bitcast(dtypes.float32)
  return V - 1 - (best & 0xFFFFFFFF).cast(dtypes.int32), value


def _top(logprobs: Tensor, k: int) -> list[Tensor]:
  """[ids, logprobs] of the k most likely tokens per row, as float columns; nothing for k = 0. k rounds of argmax:
  `Tensor.topk` sorts the whole vocabulary, hundreds of kernels (it was 90% of a batch-64 step on an H100)."""
  if not k: return []
  vocab, ids, values = Tensor.arange(logprobs.shape[-1]).reshape(1, -1), [], []
  for _ in range(k):
    best, value = _argmax(logprobs)
    ids.append(best)
    values.append(value)
    logprobs = (vocab == best).where(-float("inf"), logprobs)
  # each gathered by a kernel of its own: one kernel reading all 2k rounds' results (and the sampled token, and the
  # prompt logprobs') takes more arguments than a CPU program may have
  return [Tensor.cat(*ids, dim=1).float().contiguous(), Tensor.cat(*values, dim=1).contiguous()]


def prompt_logprobs(logits: Tensor, next_tokens: Tensor, temperature: Tensor, num_top: int) -> Tensor:
  """logits [S*Q, V] at every position, next_tokens [S*Q] (the prompt token each position predicts), temperature
  [S, 1] -> [S*Q, 1 + 2 * num_top]: the next token's logprob, then the top ids and their logprobs."""
  SQ, S = logits.shape[0], temperature.shape[0]
  logprobs = _softmax(_temperature_scaled(logits, temperature.expand(S, SQ // S).reshape(SQ, 1)))[0]
  return Tensor.cat(logprobs.gather(1, next_tokens.reshape(SQ, 1)), *_top(logprobs, num_top), dim=1)


def sample(logits: Tensor, p: dict[str, Tensor], plan: SamplingPlan) -> Tensor:
  """logits [S, V] float32 -> [S, plan.output_width] float32: token id, its logprob, top ids, top logprobs."""
  S, V = logits.shape
  # materialized: fused into the reductions below, the lm_head matmul would be recomputed inside them (150 ms a step)
  logits = _adjust(logits, p) if plan.num_adjusted else logits.contiguous()
  if plan.mask_words: logits = _allowed(logits, p["mask"], p["constrained"]).contiguous()
  if plan.guided: logits = _guided(logits, p["partner"], p["guidance"])
  token = _argmax(logits)[0]
  if plan.mode != "greedy" or plan.want_logprobs:
    logprobs, probs = _softmax(_temperature_scaled(logits, p["temperature"]))
  if plan.mode != "greedy":
    # Gumbel-max over the kept tokens (log-probabilities differ from the filtered, renormalized ones by a constant).
    # The noise is its own kernel, as in _softmax: fused into the argmax it took 17.5 ms on the CPU, alone 2.3 ms.
    noisy = logprobs - (-_uniform(p["seed"], p["step"], V).log()).log().contiguous()
    if plan.mode == "filtered": noisy = _kept(probs, p, plan.filters).where(noisy, -float("inf"))
    token = (p["temperature"] <= 0).where(token, _argmax(noisy)[0])
  out = [token.float()]
  if plan.want_logprobs: out += [logprobs.gather(1, token), *_top(logprobs, plan.num_logprobs)]
  else: out.append(Tensor.zeros(S, plan.output_width - 1))
  return Tensor.cat(*out, dim=1)
