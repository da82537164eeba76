"""What an engine is to the code that drives it: the `Engine` protocol, and the types that cross it.

Two classes are engines: `LLMEngine` (engine.py, the one to read; autoregressive and diffusion LMs alike) and
`DataParallelEngine` (parallel/data_parallel.py, N LLMEngines in processes of their own). `AsyncLLMEngine` and the server drive any of them through the members below and nothing else:

    make_request ──► admit ──► step, step, ... ──► RequestOutputs (abort_request stops one early)
                               stats ──► /metrics          warmup: once, before the first request

A request goes in as a record that `make_request` builds (tokenized and validated, the caller's errors raised) and
`admit` takes; each `step` returns a `RequestOutput` for every request it advanced, holding a `CompletionOutput` per
choice (a request with n=2 has two). The record is the engine's own: LLMEngine's and DataParallelEngine's is
`Request`, which a DataParallelEngine pickles to the rank that runs it.
"""
from __future__ import annotations
import time
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable
from tinyvllm.model.config import ModelConfig
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine.sequence import Sequence


@dataclass
class CompletionOutput:
  index: int
  text: str                                   # everything generated so far (streaming sends the growth)
  token_ids: list[int]
  finish_reason: str | None = None            # "stop" | "length" | "abort"
  logprobs: list[dict[int, float]] | None = None   # per token: the chosen id and the top-N alternatives


@dataclass
class RequestOutput:
  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool = False
  metrics: dict = field(default_factory=dict)
  num_cached_tokens: int = 0                   # prompt tokens served from the prefix cache
  prompt_logprobs: list[dict[int, float] | None] | None = None   # per prompt token (None for the first), when asked


@dataclass(frozen=True)
class EngineStats:
  """What /metrics shows of an engine: sequences running and waiting, the KV pool's share in use, preemptions, and
  the graphs it captured (and the seconds that took) or loaded from an earlier process's store: all of them before it
  was ready, if all is well. Frozen: a
  value one thread can hand to another, never changed after it is made."""
  running: int = 0
  waiting: int = 0
  kv_cache_usage: float = 0.0
  preemptions: int = 0
  graph_builds: int = 0
  graph_build_seconds: float = 0.0
  graph_loads: int = 0
  spec_drafts: int = 0                           # speculative decoding: steps of a sequence that checked drafts,
  spec_draft_tokens: int = 0                     # drafts checked, drafts accepted,
  spec_accepted_tokens: int = 0
  spec_accepted_per_position: tuple[int, ...] = ()   # and accepted at each position (empty without speculation)
  jump_forward_tokens: int = 0                   # tokens a grammar forced, committed in a step with another
  diffusion_forwards: int = 0                    # a diffusion LM's steps of a sequence (forward passes of its block)
  parallel_tokens_decoded: int = 0               # and the tokens they committed: tokens per forward is the ratio

  @staticmethod
  def total(parts: list[EngineStats]) -> EngineStats:
    """Several engines' stats as one (their pools are the same size, so usage is the mean)."""
    return EngineStats(sum(p.running for p in parts), sum(p.waiting for p in parts),
                       sum(p.kv_cache_usage for p in parts) / max(1, len(parts)), sum(p.preemptions for p in parts),
                       sum(p.graph_builds for p in parts), sum(p.graph_build_seconds for p in parts),
                       sum(p.graph_loads for p in parts), sum(p.spec_drafts for p in parts),
                       sum(p.spec_draft_tokens for p in parts), sum(p.spec_accepted_tokens for p in parts),
                       tuple(map(sum, zip(*(p.spec_accepted_per_position for p in parts)))),
                       sum(p.jump_forward_tokens for p in parts), sum(p.diffusion_forwards for p in parts),
                       sum(p.parallel_tokens_decoded for p in parts))


@dataclass
class Request:
  """A request as LLMEngine holds it: its prompt and its n sequences (one per choice), from `make_request` on."""
  request_id: str
  prompt: str | None
  seqs: list[Sequence]
  arrival_time: float = field(default_factory=time.monotonic)
  first_token_time: float | None = None

  def output(self) -> RequestOutput | None:
    """The request after this step, as its `output_kind` asks: everything so far, only what is new, or nothing
    until it is finished. (Copying every sequence's whole output each step costs 2 ms a step at batch 256.)"""
    finished = all(s.is_finished for s in self.seqs)
    kind = self.seqs[0].params.output_kind
    if kind == "final_only" and not finished: return None
    outs = [_completion(i, seq, delta=kind == "delta") for i, seq in enumerate(self.seqs)]
    metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time}
    first = self.seqs[0]
    if first.denoising is not None: metrics["model_calls"] = sum(s.denoising.calls for s in self.seqs)
    return RequestOutput(self.request_id, self.prompt, first.prompt_token_ids, outs, finished, metrics,
                         max(s.num_cached_tokens for s in self.seqs),
                         list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None)


def _completion(index: int, seq: Sequence, delta: bool) -> CompletionOutput:
  tokens, chars = (seq.num_returned_tokens, seq.num_returned_chars) if delta else (0, 0)
  if delta: seq.num_returned_tokens, seq.num_returned_chars = len(seq.output_token_ids), len(seq.output_text)
  return CompletionOutput(index, seq.output_text[chars:], seq.output_token_ids[tokens:], seq.finish_reason,
                          seq.output_logprobs[tokens:] if seq.params.logprobs is not None else None)


RequestT = TypeVar("RequestT")    # the engine's own request record: what its make_request returns and its admit takes


@runtime_checkable
class Engine(Protocol[RequestT]):
  """The members of an engine that `AsyncLLMEngine` and the server use (tests/engine/test_interface.py checks that the three
  engines have them, with the same parameters).

  Threads: the attributes are fixed once the engine is built, so any thread may read them. `make_request` only reads
  the engine, and `AsyncLLMEngine` calls it on the event loop; every other method changes or reads state that `step`
  changes, so `AsyncLLMEngine` calls them on its engine thread only."""

  tokenizer: Tokenizer | None
  """Text to token ids and back; None for a model that has none (prompts are then token ids)."""
  model_config: ModelConfig
  """The network's shapes; the server checks token ids against its `vocab_size`."""
  max_model_len: int
  """The most tokens a request may hold: its prompt plus everything it generates."""

  def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                   request_id: str | None = None) -> RequestT:
    """Tokenize and validate a request (ValueError with a message for the user), without changing the engine."""

  def admit(self, request: RequestT) -> str:
    """Take a request that `make_request` built; returns its id, and later `step`s return its outputs."""

  def abort_request(self, request_id: str) -> None:
    """Stop a request and free what it holds; an id that is unknown or already finished is ignored."""

  def has_unfinished_requests(self) -> bool:
    """Whether `step` has work: some admitted request is neither finished nor aborted."""

  def step(self) -> list[RequestOutput]:
    """Advance the running requests by one step; returns an output for each request that made progress."""

  def stats(self) -> EngineStats:
    """The engine's state for /metrics, now: sequences running and waiting, KV pool in use, graphs captured."""

  def warmup(self) -> float:
    """Prepare what serving needs (LLMEngine captures its graphs) before the first request; returns the seconds."""
