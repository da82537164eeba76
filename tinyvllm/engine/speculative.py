"""Speculative decoding: guess a sequence's next tokens cheaply, then let one step of the model check them all.

A decode step reads every weight to produce one token per sequence. If something cheap can guess the next k tokens,
the model can compute the last token and the k guesses in one step, a short prompt chunk whose every position
gives logits, and keep the guesses it agrees with:

    known:  ... the cat sat on      drafts: [the] [mat] [and]
    step:   on → "the" ✓   the → "mat" ✓   mat → "."  ✗ (the draft said "and")
    output: the mat .                       3 tokens for one step; "and" is dropped, its K/V overwritten later

Each row is sampled exactly as a plain decode step would sample it (the same seed stream at the same output
position, with penalties counting the drafts before it), and drafts are accepted while they equal the sampled
token. For greedy requests that is exact-match acceptance. For sampled requests it is rejection sampling with a
draft distribution that is certain of its guess (q(d) = 1): the draft is accepted with probability
min(1, p(d) / q(d)) = p(d), and on a rejection the sampled token is a draw from p with d removed, which is the
normalized residual max(0, p - q): so the output is distributed exactly as without speculation, and a seeded
request gives the same tokens with speculation on or off.

The guesser here is *prompt lookup* (n-gram): find the latest earlier place where the sequence's last n tokens
occurred (n from `prompt_lookup_max` down to `prompt_lookup_min`) and propose the k tokens that followed. It costs
one byte search per sequence and needs no model; it pays where outputs copy their context (code edits, quoting,
lists repeated with a change) and proposes nothing elsewhere. The others are a draft model, a smaller model with
the same tokenizer run greedily by an engine of its own (draft_model.py), and a diffusion LM that proposes a whole
block in one forward pass (APD, diffusion_draft.py). All answer `propose_all(seqs)` and hear back
`checked(seq, proposed, accepted)`.

The engine asks for drafts before scheduling (drafts.py); the scheduler counts them in the step's token budget and
block allocation, and trims them to fit (scheduler.py); the runner returns one sampled row per position
(runner/model_runner.py); the engine accepts, appends and moves `num_computed_tokens` back to the last accepted
token. Async scheduling waits for a step that checks drafts (overlap.py): the next step's drafts and positions depend
on how many this step accepts; where drafts do not pay (a large batch, below), steps overlap again.

Where it pays: checking k drafts costs a step of k + 1 tokens a sequence. While a step's cost is reading the weights
(a GPU at small batches) those tokens are nearly free; where it is arithmetic (a CPU, or any device at large
batches) a step of 4 tokens costs about what 4 steps of 1 do minus the weight reads. On the 2-core CPU a batch-1
SmolLM2 step of 4 tokens costs ~1.8× a step of 1, and at batch 32 drafts made the run 1.8× slower, so speculation
turns itself off while more than `disable_by_batch_size` sequences run (vLLM's field): by default 1 on a CPU and 16
on a GPU (the GPU's value is not measured yet).
"""
from __future__ import annotations
import json
import weakref
from array import array
from dataclasses import dataclass, replace
from tinyvllm.engine.sequence import Sequence
from tinyvllm.engine.structured_output import MatcherAfter


@dataclass(frozen=True)
class SpeculativeConfig:
  """vLLM's `--speculative-config` JSON: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
  "prompt_lookup_min": m, "disable_by_batch_size": b}, or {"model": PATH, "num_speculative_tokens": k} for a draft
  model (engine/draft_model.py; with random weights, PATH names a shape: `--load-format dummy`), or {"method": "apd",
  "model": DIFFUSION_LM, "num_speculative_tokens": k}: a diffusion LM proposes a block of k (engine/diffusion_draft.py)."""
  num_speculative_tokens: int
  method: str = "ngram"                  # or "draft_model", "apd"
  prompt_lookup_max: int = 5             # vLLM's defaults: 5 and 5 if neither is given, else the one given for both
  prompt_lookup_min: int = 5
  disable_by_batch_size: int | None = None   # no drafts while more sequences run; None: sized for the device
  model: str | None = None               # the draft model
  mixture_weight: float = 0.0            # APD's R: accept from p_target^(1-R) · p_draft^R (0: the target alone)

  @staticmethod
  def parse(value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
    """From a dict or its JSON text (ValueError naming the field that is wrong)."""
    if value is None or isinstance(value, SpeculativeConfig): return value
    if isinstance(value, str):
      try: value = json.loads(value)
      except json.JSONDecodeError as e: raise ValueError(f"speculative_config: not JSON ({e})") from None
    if not isinstance(value, dict): raise ValueError("speculative_config: expected a JSON object")
    value = dict(value)
    known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size",
             "model", "mixture_weight"}
    if unknown := sorted(set(value) - known): raise ValueError(f"speculative_config.{unknown[0]}: unknown field")
    value.setdefault("method", "draft_model" if value.get("model") is not None else "ngram")
    if value["method"] not in ("ngram", "draft_model", "apd"):
      raise ValueError(f"speculative_config.method: {value['method']!r} is not available; use \"ngram\", "
                       "\"draft_model\" or \"apd\"")
    if value["method"] == "apd": value.setdefault("model", "diffusion")
    if value["method"] in ("draft_model", "apd") and not isinstance(value.get("model"), str):
      raise ValueError("speculative_config.model: a draft model's path is required")
    for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
      if name in value and value[name] is not None and (not isinstance(value[name], int) or isinstance(value[name], bool) or value[name] < 1):
        raise ValueError(f"speculative_config.{name}: must be a positive integer")
    if "num_speculative_tokens" not in value: raise ValueError("speculative_config.num_speculative_tokens: required")
    weight = value.get("mixture_weight", 0.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < 1:
      raise ValueError("speculative_config.mixture_weight: must be a number in [0, 1)")
    if weight and value["method"] != "apd": raise ValueError("speculative_config.mixture_weight: only method \"apd\" mixes")
    if "prompt_lookup_max" in value or "prompt_lookup_min" in value:
      value.setdefault("prompt_lookup_max", value.get("prompt_lookup_min"))
      value.setdefault("prompt_lookup_min", value["prompt_lookup_max"])
    config = SpeculativeConfig(**value)
    if config.prompt_lookup_min > config.prompt_lookup_max:
      raise ValueError("speculative_config.prompt_lookup_min: must not exceed prompt_lookup_max")
    return config


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
  """Up to k tokens that followed the latest earlier occurrence of `tokens`' last n tokens (the longest n that
  occurs, from n_max down to n_min); [] if none does. The search is bytes.rfind over the tokens as int32s, in C."""
  if k <= 0 or len(tokens) <= n_min: return []
  data = array("i", tokens).tobytes()
  for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
    pattern, end = data[-4 * n:], len(data) - 4       # an occurrence must end before the last token
    while (at := data.rfind(pattern, 0, end)) >= 0:
      if at % 4 == 0:                                  # aligned: a match of whole tokens
        follow = at // 4 + n
        return tokens[follow:follow + k]
      end = at + 4 * n - 1                             # misaligned: look further left
  return []


def draft_room(seq: Sequence, max_model_len: int) -> int:
  """How many drafts a decoding sequence has room for: none past its max_tokens (the step adds one token of its own)
  or `max_model_len`."""
  room = max_model_len - seq.num_known_tokens - 1
  if seq.max_output_tokens is not None: room = min(room, seq.max_output_tokens - len(seq.output_token_ids) - 1)
  return room


class Proposer:
  """What every guesser keeps: vLLM's counts of steps that checked drafts, drafts checked, drafts accepted, then
  accepted at each position."""
  def __init__(self, config: SpeculativeConfig):
    self.config = config
    self.counts = [0, 0, 0] + [0] * config.num_speculative_tokens

  def checked(self, seq: Sequence, proposed: int, accepted: int) -> None:
    """What the step made of the sequence's drafts: how many of them it accepted."""
    c = self.counts
    c[0], c[1], c[2] = c[0] + 1, c[1] + proposed, c[2] + accepted
    for position in range(accepted): c[3 + position] += 1

  def may_propose(self, seqs: list[Sequence]) -> bool:
    """Whether the next step may bring drafts for any of `seqs` (if not, it can be prepared before this step's tokens
    are known: async scheduling goes on)."""
    return True

  def bias(self, seq: Sequence) -> list[float]:
    """What to add to the target's logit of each of the sequence's drafts where it is checked: nothing."""
    return []

  def room(self, seq: Sequence, max_model_len: int) -> int:
    """How many drafts a decoding sequence may take: at most k, and `draft_room`."""
    return min(self.config.num_speculative_tokens, draft_room(seq, max_model_len))


class NgramProposer(Proposer):
  """Prompt lookup, with a back-off: a proposal the model rejects at its first token pauses the sequence's
  proposals for the next 1, 2, 4, ... tokens (at most 16) while the misses go on, so that text with nothing to copy
  goes back to steps of one token, overlapped with the host's work (overlap.py), instead of paying for drafts that
  fail; an accepted draft ends the pause."""
  def __init__(self, config: SpeculativeConfig, max_model_len: int):
    super().__init__(config)
    self.max_model_len = max_model_len
    # a paused sequence: (the token count at which it proposes again, its misses in a row)
    self.paused: weakref.WeakKeyDictionary[Sequence, tuple[int, int]] = weakref.WeakKeyDictionary()

  def checked(self, seq: Sequence, proposed: int, accepted: int) -> None:
    super().checked(seq, proposed, accepted)
    if accepted: self.paused.pop(seq, None)
    else:
      misses = self.paused.get(seq, (0, 0))[1]
      self.paused[seq] = (seq.num_known_tokens + min(16, 2 ** misses), misses + 1)

  def may_propose(self, seqs: list[Sequence]) -> bool:
    return any(self.paused.get(seq, (0, 0))[0] <= seq.num_output_tokens + len(seq.prompt_token_ids) for seq in seqs)

  def propose_all(self, seqs: list[Sequence]) -> dict[Sequence, list[int]]:
    return {seq: self.propose(seq) for seq in seqs}

  def propose(self, seq: Sequence) -> list[int]:
    """Drafts for a sequence that is decoding (every known token but the last computed): at most k, and never
    past its max_tokens (the step adds one token of its own) or max_model_len."""
    if self.paused.get(seq, (0, 0))[0] > seq.num_known_tokens: return []
    c, k = self.config, self.room(seq, self.max_model_len)
    return propose_ngram(seq.token_ids, k, c.prompt_lookup_max, c.prompt_lookup_min) if k > 0 else []


class AfterDrafts:
  """A sequence as it would be with its first `i` drafts accepted: what the sampler reads of the row that checks
  draft i + 1 (its seed stream's position, penalties' counts and min_tokens count those drafts as output, and a
  grammar's mask follows them)."""
  def __init__(self, seq: Sequence, i: int):
    self.seq, self.i = seq, i
    self.params = seq.params
    if i < len(seq.draft_bias) and i < len(seq.draft_token_ids):     # APD: the draft's own vote for its token
      bias = dict(seq.params.logit_bias or {})
      bias[seq.draft_token_ids[i]] = bias.get(seq.draft_token_ids[i], 0.0) + seq.draft_bias[i]
      self.params = replace(seq.params, logit_bias=bias)
    self.index, self.seq_id, self.prompt_token_ids = seq.index, seq.seq_id, seq.prompt_token_ids
    self.wants_prompt_logprobs, self.num_pending_tokens = False, 0
    self.matcher = None if seq.matcher is None else MatcherAfter(seq.matcher, seq.draft_token_ids[:i])
  @property
  def output_token_ids(self) -> list[int]: return self.seq.output_token_ids + self.seq.draft_token_ids[:self.i]
  @property
  def num_output_tokens(self) -> int: return self.seq.num_output_tokens + self.i
