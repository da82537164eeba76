"""How to pick tokens and when to stop: vLLM's `SamplingParams`, with the same names and meanings.

Validation happens here, once, so every entry point (the offline `LLM`, the server) rejects the same bad values with
the same `ValueError` naming the field; the server turns that into an HTTP 400.

Every knob has an upper bound, because a step's work grows with some of them: the sampler runs one argmax round per
requested logprob, each choice of `n` is a sequence in the batch, every stop string is searched for after each token.
One request asking for 10**20 of something must be refused here, not stall the engine thread for everyone. The bounds
follow OpenAI's API where it has one (n ≤ 128, logprobs ≤ 20, logit_bias ≤ 300 entries), and otherwise keep every
integer within the int32 the engine's tensors carry (seeds: 64 bits) and every float finite.
"""
from __future__ import annotations
import math
from dataclasses import dataclass, field

MAX_N = 128                      # choices per prompt
MAX_LOGPROBS = 20                # top alternatives per position (logprobs and prompt_logprobs)
MAX_STOP, MAX_STOP_CHARS = 16, 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300             # entries
MAX_DIFFUSION_STEPS = 4096
INT32 = 2**31 - 1                # token counts, top_k, block lengths
MAX_SCALE = 1e4                  # temperature, cfg_scale: far past any useful value, well within float32
SEED_RANGE = (-2**63, 2**64 - 1)

def _within(value, low: float, high: float) -> bool:
  """low <= value <= high for a real number, False for NaN, infinities, huge ints that overflow a float and non-numbers."""
  try: return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high
  except OverflowError: return False


def _count(value, high: int) -> bool: return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


@dataclass(frozen=True)
class StructuredOutputsParams:
  """vLLM's: the output must match one of these (set exactly one). engine/structured_output.py compiles it."""
  json: dict | str | None = None              # a JSON schema (an object, or its text)
  regex: str | None = None
  choice: list[str] | None = None             # exactly one of these strings
  grammar: str | None = None                  # a Lark grammar, or llama.cpp's GBNF
  json_object: bool | None = None             # any JSON object (OpenAI's response_format {"type": "json_object"})

  def __post_init__(self) -> None:
    kinds = [name for name in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, name)]
    if len(kinds) != 1:
      raise ValueError(f"invalid sampling parameter structured_outputs: set exactly one of json, regex, choice, grammar, "
                       f"json_object (got {', '.join(kinds) or 'none'})")
    if self.choice is not None and not (all(isinstance(c, str) and c for c in self.choice) and len(self.choice) <= 4096):
      raise ValueError("invalid sampling parameter structured_outputs: choice must be at most 4096 non-empty strings")

  @property
  def kind(self) -> str: return next(n for n in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, n))


@dataclass
class SamplingParams:
  n: int = 1                                  # completions per prompt
  temperature: float = 1.0                    # 0 means greedy
  top_p: float = 1.0                          # keep the smallest set of tokens whose probability sums to top_p
  top_k: int = -1                             # keep the k most likely tokens; -1 (or 0) keeps all
  min_p: float = 0.0                          # drop tokens less likely than min_p × the most likely one
  presence_penalty: float = 0.0               # subtract once from every token already generated
  frequency_penalty: float = 0.0              # subtract per occurrence in the generated tokens
  repetition_penalty: float = 1.0             # divide positive (multiply negative) logits of prompt+output tokens
  logit_bias: dict[int, float] | None = None  # added to the logits of those token ids
  seed: int | None = None                     # a seeded request samples the same tokens whatever shares its batch
  max_tokens: int | None = 16                 # None: up to the context length
  min_tokens: int = 0                         # EOS and stop tokens are banned until this many were generated
  ignore_eos: bool = False
  stop: list[str] = field(default_factory=list)
  stop_token_ids: list[int] = field(default_factory=list)
  include_stop_str_in_output: bool = False
  skip_special_tokens: bool = True
  logprobs: int | None = None                 # also return the top-N logprobs at each generated position
  prompt_logprobs: int | None = None          # the prompt's own tokens' logprobs (+ top-N) at each prompt position
  structured_outputs: StructuredOutputsParams | None = None   # the output must match a schema or grammar
  output_kind: str = "cumulative"             # what each step's RequestOutput holds: "cumulative" (all so far),
                                              # "delta" (what is new) or "final_only" (one output, at the end)
  # diffusion LLMs only (see diffusion/sampler.py); max_tokens is the generated length
  diffusion_steps: int | None = None          # denoising steps in all; None: one per generated token
  block_length: int | None = None             # tokens generated per semi-autoregressive block; None: min(32, max_tokens)
  remasking: str = "low_confidence"           # which masked positions to commit each step: "low_confidence" | "random"
  threshold: float | None = None              # Fast-dLLM: commit every position at least this confident
  cfg_scale: float = 0.0                      # classifier-free guidance strength

  def __post_init__(self) -> None:
    if isinstance(self.stop, str): self.stop = [self.stop]
    self.stop, self.stop_token_ids = list(self.stop or []), list(self.stop_token_ids or [])
    checks = {
      "n": _count(self.n, MAX_N) and self.n >= 1,
      "temperature": _within(self.temperature, 0, MAX_SCALE),
      "top_p": _within(self.top_p, 0, 1) and self.top_p > 0,
      "top_k": _within(self.top_k, -1, INT32) and isinstance(self.top_k, int),
      "min_p": _within(self.min_p, 0, 1),
      "presence_penalty": _within(self.presence_penalty, -2, 2),
      "frequency_penalty": _within(self.frequency_penalty, -2, 2),
      "repetition_penalty": _within(self.repetition_penalty, 0, 2) and self.repetition_penalty > 0,
      "logit_bias": self.logit_bias is None or (len(self.logit_bias) <= MAX_LOGIT_BIAS and all(
        _count(t, INT32) and _within(b, -100, 100) for t, b in self.logit_bias.items())),
      "seed": self.seed is None or (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
      "max_tokens": self.max_tokens is None or (_count(self.max_tokens, INT32) and self.max_tokens >= 1),
      "min_tokens": _count(self.min_tokens, INT32) and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
      "logprobs": self.logprobs is None or _count(self.logprobs, MAX_LOGPROBS),
      "prompt_logprobs": self.prompt_logprobs is None or _count(self.prompt_logprobs, MAX_LOGPROBS),
      "output_kind": self.output_kind in ("cumulative", "delta", "final_only"),
      "stop": len(self.stop) <= MAX_STOP and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
      "stop_token_ids": len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS and all(_count(t, INT32) for t in self.stop_token_ids),
      "diffusion_steps": self.diffusion_steps is None or (_count(self.diffusion_steps, MAX_DIFFUSION_STEPS) and self.diffusion_steps >= 1),
      "block_length": self.block_length is None or (_count(self.block_length, INT32) and self.block_length >= 1),
      "remasking": self.remasking in ("low_confidence", "random"),
      "threshold": self.threshold is None or (_within(self.threshold, 0, 1) and self.threshold > 0),
      "cfg_scale": _within(self.cfg_scale, 0, MAX_SCALE),
    }
    for name, ok in checks.items():
      if not ok: raise ValueError(f"invalid sampling parameter {name}={_short(getattr(self, name))}")

  @property
  def greedy(self) -> bool: return self.temperature == 0


def _short(value) -> str:
  """repr, cut short: the message echoes the value back, and a rejected value may be a megabyte long."""
  text = repr(value)
  return text if len(text) <= 80 else f"{text[:77]}..."
