"""Benchmark workloads: seeded lists of requests made of random token ids, so no tokenizer or dataset is needed.

Random ids make every workload reproducible from its seed and valid for random (`--load-format dummy`) weights;
requests always run with `ignore_eos`, so each produces exactly its `output_len` tokens. `variant` changes the tokens
and nothing else (the lengths come from `seed` alone): variant 0 is measured, the others warm up on the same shapes.

  random          n requests, lengths `input_len`/`output_len`, or drawn uniformly from len × [1 − r, 1 + r] with
                  `range_ratio` r, after an optional `prefix_len` tokens every request shares (vLLM's random dataset:
                  `--random-range-ratio`, `--random-prefix-len`):  [PRE PRE q1 q1 q1]  [PRE PRE q2]  [PRE PRE q3 q3]
                  each with sampling parameters from a mix (below), or all greedy
  shared prefix   one system prompt + n different questions: [SYS SYS SYS SYS q1 q1]  [SYS SYS SYS SYS q2 q2] ...
                  a prefix cache computes SYS once
  multi-turn chat conversations that each start from the system prompt; turn k+1 is sent after turn k's answer and
                  repeats all of it:  [SYS q1] → a1,  [SYS q1 a1 q2] → a2,  [SYS q1 a1 q2 a2 q3] → a3
                  a prefix cache computes every token once per conversation

The "mixed" sampling draws each request's OpenAI fields from `SAMPLING_MIX`: mostly greedy, as benchmarks usually
are, but also the knobs real clients turn (temperature, top-p/top-k, logprobs, penalties), each with its own seed, so
an engine whose sampler only stays fast while the batch is all greedy shows it. The fields are those of
/v1/completions and of `SamplingParams` alike, so the server and the in-process engine run the same request.
"""
from __future__ import annotations
from collections.abc import Callable
from dataclasses import dataclass, field
import numpy as np


@dataclass
class Request:
  prompt_token_ids: list[int]
  output_len: int
  next_turns: list[list[int]] = field(default_factory=list)   # later user messages of the same conversation
  sampling: dict = field(default_factory=lambda: dict(GREEDY))  # /v1/completions fields = SamplingParams fields

  def follow_up(self, output_token_ids: list[int]) -> Request | None:
    """The conversation's next request once this one answered with `output_token_ids`; None when it is over."""
    if not self.next_turns: return None
    return Request(self.prompt_token_ids + output_token_ids + self.next_turns[0], self.output_len, self.next_turns[1:],
                   self.sampling)


Workload = Callable[[int], list[Request]]    # variant → requests: variant 0 is measured, the others warm up
GREEDY = {"temperature": 0.0}

# (share of the requests, what they send); values are drawn per request. Half stay greedy; logprobs stay ≤ 5 and
# penalties moderate, as chat clients send them.
SAMPLING_MIX: list[tuple[float, Callable[[np.random.Generator], dict]]] = [
  (0.50, lambda rng: {}),
  (0.20, lambda rng: {"temperature": float(rng.choice([0.6, 0.8, 1.0]))}),
  (0.15, lambda rng: {"temperature": 0.8, "top_p": float(rng.choice([0.8, 0.9, 0.95])),
                      "top_k": int(rng.choice([-1, 20, 50]))}),
  (0.10, lambda rng: {"logprobs": int(rng.integers(1, 6))}),
  (0.05, lambda rng: {"temperature": 0.7, "frequency_penalty": float(rng.choice([0.2, 0.5])),
                      "presence_penalty": float(rng.choice([0.0, 0.5]))}),
]
SAMPLING_MIXES = ("mixed", "greedy")


def _tokens(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
  return rng.integers(0, vocab_size, n).tolist()


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> list[int]:
  low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
  return rng.integers(low, high + 1, n).tolist()


def sampling_mix(rng: np.random.Generator, n: int, mix: str = "greedy") -> list[dict]:
  """n requests' sampling fields: all greedy, or drawn from `SAMPLING_MIX`; any that samples gets a seed, so a rerun
  samples the same tokens."""
  if mix not in SAMPLING_MIXES: raise ValueError(f"unknown sampling mix {mix!r}; one of {SAMPLING_MIXES}")
  if mix == "greedy": return [dict(GREEDY) for _ in range(n)]
  shares, makers = zip(*SAMPLING_MIX)
  picks = rng.choice(len(makers), size=n, p=shares)
  fields = [GREEDY | makers[i](rng) for i in picks]
  return [f | {"seed": int(rng.integers(2**31))} if f["temperature"] > 0 else f for f in fields]


def random_requests(n: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                    range_ratio: float = 0.0, variant: int = 0, prefix_len: int = 0,
                    sampling: str = "greedy") -> list[Request]:
  """Prompts of exactly `prefix_len` + their drawn input length tokens; lengths and sampling come from `seed`,
  tokens (the shared prefix too) from `seed` and `variant`."""
  lengths, rng = np.random.default_rng(seed), np.random.default_rng((seed, variant))
  inputs, outputs = _lengths(lengths, input_len, range_ratio, n), _lengths(lengths, output_len, range_ratio, n)
  params, prefix = sampling_mix(lengths, n, sampling), _tokens(rng, prefix_len, vocab_size)
  return [Request(prefix + _tokens(rng, i, vocab_size), o, sampling=p) for i, o, p in zip(inputs, outputs, params)]


def summary(requests: list[Request]) -> dict:
  """What a workload turned out to be: length ranges and how many requests use each sampling field."""
  prompts, outputs = [len(r.prompt_token_ids) for r in requests], [r.output_len for r in requests]
  uses = lambda name, default: sum(r.sampling.get(name, default) != default for r in requests)
  return {"requests": len(requests),
          **{f"{name}_len": {"min": min(lens), "mean": float(np.mean(lens)), "max": max(lens)}
             for name, lens in (("prompt", prompts), ("output", outputs))},
          "greedy": sum(r.sampling.get("temperature", 1.0) == 0 for r in requests),
          **{name: uses(name, default) for name, default in (("top_p", 1.0), ("top_k", -1), ("logprobs", None),
                                                             ("frequency_penalty", 0.0), ("presence_penalty", 0.0))}}


def shared_prefix_requests(n: int, prefix_len: int, question_len: int, output_len: int, vocab_size: int,
                           seed: int = 0, variant: int = 0) -> list[Request]:
  rng = np.random.default_rng((seed, variant))
  system = _tokens(rng, prefix_len, vocab_size)
  return [Request(system + _tokens(rng, question_len, vocab_size), output_len) for _ in range(n)]


def chat_requests(num_conversations: int, turns: int, prefix_len: int, question_len: int, output_len: int,
                  vocab_size: int, seed: int = 0, variant: int = 0) -> list[Request]:
  """The first turn of each conversation; the later turns come from `Request.follow_up`."""
  rng = np.random.default_rng((seed, variant))
  system = _tokens(rng, prefix_len, vocab_size)
  conversations = [[_tokens(rng, question_len, vocab_size) for _ in range(turns)] for _ in range(num_conversations)]
  return [Request(system + questions[0], output_len, questions[1:]) for questions in conversations]
