"""The numbers people quote for inference engines, defined exactly as vLLM's benchmark scripts define them.

Everything here is a pure function of timestamps, so the definitions can be checked with made-up numbers. One request
is observed from the client's side as one start time and the arrival time of every streamed chunk that carried
output (in-process, a chunk is one engine step that appended a token):

    start          chunk 0           chunk 1     chunk 2   ...   chunk k (last)
      │──── TTFT ────│── ITL ──────────│── ITL ────│── ...  ──────│
      │──────────────────────────── E2EL ──────────────────────────│

  TTFT   time to first token      = chunk 0 − start           (queueing + prefill + the first sampled token)
  ITL    inter-token latency      = chunk i − chunk i−1       one value per gap between chunks, pooled over all
                                                              requests (a chunk may hold several tokens)
  E2EL   end-to-end latency       = last chunk − start
  TPOT   time per output token    = (E2EL − TTFT) / (output_tokens − 1)     only for requests with > 1 output token;
                                                              counts tokens, not chunks, so it differs from ITL when
                                                              chunks carry several tokens
  request throughput              = completed requests / duration
  output token throughput         = Σ output tokens / duration
  total token throughput          = Σ (prompt + output tokens) / duration
  prefix cache hit rate           = Σ prompt tokens found in the prefix cache / Σ prompt tokens   (not in vLLM's
                                                              benchmark; from RequestOutput.num_cached_tokens)

`duration` is the wall time of the whole run: first request sent → last response finished. Failed requests count in
`failed` and nowhere else. Every distribution is summarised by mean, median, standard deviation and percentiles from
`numpy.percentile` (linear interpolation between closest ranks); an empty one reads 0, as in vLLM. Times are reported
in milliseconds. Sources: vllm/benchmarks/serve.py `calculate_metrics`, vllm/benchmarks/lib/endpoint_request_func.py
`async_request_openai_completions` (TTFT, ITL, E2EL from the chunk timestamps), vllm/benchmarks/throughput.py
(requests/s and tokens/s over the elapsed time of one `generate` call).

Batch-1 (`latency`) speeds: `decode_tok_s` = 1 / mean TPOT, the rate at which a lone request's tokens come out once
its prompt is done; `prefill_tok_s` = mean prompt tokens / mean TTFT (TTFT also holds the first token's sampling).
"""
from __future__ import annotations
from dataclasses import dataclass, field
import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestTiming:
  """What one request looked like from the client: when it was sent, when each output chunk arrived."""
  start: float
  chunk_times: list[float] = field(default_factory=list)
  prompt_tokens: int = 0
  output_tokens: int = 0
  cached_tokens: int = 0           # prompt tokens the prefix cache already held (when the engine says)
  success: bool = True
  error: str = ""

  @property
  def ttft(self) -> float: return self.chunk_times[0] - self.start

  @property
  def e2el(self) -> float: return self.chunk_times[-1] - self.start

  @property
  def itls(self) -> list[float]: return np.diff(self.chunk_times).tolist()

  @property
  def tpot(self) -> float | None:
    return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def distribution(values: list[float], percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
                 scale: float = 1000.0) -> dict[str, float]:
  """mean / median / std / pNN of `values` × `scale` (seconds → ms by default); zeros when there are none."""
  arr = np.asarray(values if values else [0.0], dtype=np.float64) * scale
  summary = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
  return summary | {f"p{p:g}": float(np.percentile(arr, p)) for p in percentiles}


def throughput_metrics(completed: int, input_tokens: int, output_tokens: int, duration: float) -> dict:
  """Requests and tokens per second of wall time (vLLM's throughput benchmark and the top of `calculate_metrics`)."""
  return {"completed": completed, "duration_s": duration, "total_input_tokens": input_tokens,
          "total_output_tokens": output_tokens, "request_throughput": completed / duration,
          "output_throughput": output_tokens / duration,
          "total_token_throughput": (input_tokens + output_tokens) / duration}


def serving_metrics(timings: list[RequestTiming], duration: float,
                    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict:
  """vLLM's `calculate_metrics`: throughput over the run's duration, latency distributions over completed requests."""
  done = [t for t in timings if t.success]
  totals = throughput_metrics(len(done), sum(t.prompt_tokens for t in done), sum(t.output_tokens for t in done),
                              duration)
  return {
    "failed": len(timings) - len(done), **totals,
    "ttft_ms": distribution([t.ttft for t in done], percentiles),
    "tpot_ms": distribution([t.tpot for t in done if t.tpot is not None], percentiles),
    "itl_ms": distribution([gap for t in done for gap in t.itls], percentiles),
    "e2el_ms": distribution([t.e2el for t in done], percentiles),
    "prefix_cache_hit_rate": sum(t.cached_tokens for t in done) / max(totals["total_input_tokens"], 1),
  }


def latency_metrics(timings: list[RequestTiming], percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict:
  """Batch-1 latency: one request at a time, so TTFT is the prefill and TPOT the decode step, undisturbed."""
  metrics = serving_metrics(timings, sum(t.e2el for t in timings if t.success), percentiles)
  mean_ttft_ms, mean_tpot_ms = metrics["ttft_ms"]["mean"], metrics["tpot_ms"]["mean"]
  mean_prompt = metrics["total_input_tokens"] / max(metrics["completed"], 1)
  return {"ttft_ms": metrics["ttft_ms"], "tpot_ms": metrics["tpot_ms"], "e2el_ms": metrics["e2el_ms"],
          "prefill_tok_s": 1000.0 * mean_prompt / mean_ttft_ms if mean_ttft_ms else 0.0,
          "decode_tok_s": 1000.0 / mean_tpot_ms if mean_tpot_ms else 0.0, "iterations": metrics["completed"]}
