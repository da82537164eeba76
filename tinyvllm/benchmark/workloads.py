"""Benchmark workloads: seeded lists of requests made of random token ids, so no tokenizer or dataset is needed.

Random ids make every workload reproducible from its seed and valid for random (`--load-format dummy`) weights;
requests always run with `ignore_eos`, so each produces exactly its `output_len` tokens. `variant` changes the tokens
and nothing else (the lengths come from `seed` alone): variant 0 is measured, the others warm up on the same shapes.

  random          n requests, lengths `input_len`/`output_len`, or drawn uniformly from len × [1 − r, 1 + r] with
                  `range_ratio` r (vLLM's `--random-range-ratio`)
  shared prefix   one system prompt + n different questions: [SYS SYS SYS SYS q1 q1]  [SYS SYS SYS SYS q2 q2] ...
                  a prefix cache computes SYS once
  multi-turn chat conversations that each start from the system prompt; turn k+1 is sent after turn k's answer and
                  repeats all of it:  [SYS q1] → a1,  [SYS q1 a1 q2] → a2,  [SYS q1 a1 q2 a2 q3] → a3
                  a prefix cache computes every token once per conversation
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

  def follow_up(self, output_token_ids: list[int]) -> Request | None:
    """The conversation's next request once this one answered with `output_token_ids`; None when it is over."""
    if not self.next_turns: return None
    return Request(self.prompt_token_ids + output_token_ids + self.next_turns[0], self.output_len, self.next_turns[1:])


Workload = Callable[[int], list[Request]]    # variant → requests: variant 0 is measured, the others warm up


def _tokens(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
  return rng.integers(0, vocab_size, n).tolist()


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> list[int]:
  low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
  return rng.integers(low, high + 1, n).tolist()


def random_requests(n: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                    range_ratio: float = 0.0, variant: int = 0) -> list[Request]:
  lengths, rng = np.random.default_rng(seed), np.random.default_rng((seed, variant))
  inputs, outputs = _lengths(lengths, input_len, range_ratio, n), _lengths(lengths, output_len, range_ratio, n)
  return [Request(_tokens(rng, i, vocab_size), o) for i, o in zip(inputs, outputs)]


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
