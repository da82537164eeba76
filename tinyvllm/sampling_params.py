"""How to pick tokens and when to stop: vLLM's `SamplingParams`, with the same names and meanings.

Validation happens here, once, so every entry point (the offline `LLM`, the server) rejects the same bad values with
the same `ValueError` naming the field; the server turns that into an HTTP 400.
"""
from __future__ import annotations
from dataclasses import dataclass, field


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
  output_kind: str = "cumulative"             # what each step's RequestOutput holds: "cumulative" (all so far),
                                              # "delta" (what is new) or "final_only" (one output, at the end)
  # diffusion LLMs only (see diffusion.py); max_tokens is the generated length
  diffusion_steps: int | None = None          # denoising steps in all; None: one per generated token
  block_length: int | None = None             # tokens generated per semi-autoregressive block; None: min(32, max_tokens)
  remasking: str = "low_confidence"           # which masked positions to commit each step: "low_confidence" | "random"
  threshold: float | None = None              # Fast-dLLM: commit every position at least this confident
  cfg_scale: float = 0.0                      # classifier-free guidance strength

  def __post_init__(self) -> None:
    if isinstance(self.stop, str): self.stop = [self.stop]
    self.stop, self.stop_token_ids = list(self.stop or []), list(self.stop_token_ids or [])
    checks = {
      "n": self.n >= 1,
      "temperature": self.temperature >= 0,
      "top_p": 0 < self.top_p <= 1,
      "top_k": self.top_k >= -1,
      "min_p": 0 <= self.min_p <= 1,
      "presence_penalty": -2 <= self.presence_penalty <= 2,
      "frequency_penalty": -2 <= self.frequency_penalty <= 2,
      "repetition_penalty": self.repetition_penalty > 0,
      "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
      "min_tokens": self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
      "logprobs": self.logprobs is None or self.logprobs >= 0,
      "prompt_logprobs": self.prompt_logprobs is None or self.prompt_logprobs >= 0,
      "output_kind": self.output_kind in ("cumulative", "delta", "final_only"),
      "stop": all(isinstance(s, str) and s for s in self.stop),
      "diffusion_steps": self.diffusion_steps is None or self.diffusion_steps >= 1,
      "block_length": self.block_length is None or self.block_length >= 1,
      "remasking": self.remasking in ("low_confidence", "random"),
      "threshold": self.threshold is None or 0 < self.threshold <= 1,
      "cfg_scale": self.cfg_scale >= 0,
    }
    for name, ok in checks.items():
      if not ok: raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}")

  @property
  def greedy(self) -> bool: return self.temperature == 0
