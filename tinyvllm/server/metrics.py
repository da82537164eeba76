"""GET /metrics: the server's counters in Prometheus' text format, under vLLM's metric names.

Prometheus scrapes a plain-text page of samples, each optionally preceded by its help and type:

    # HELP vllm:prompt_tokens_total Prefill tokens processed.
    # TYPE vllm:prompt_tokens_total counter
    vllm:prompt_tokens_total{model_name="SmolLM2-135M-Instruct"} 1234.0

Three kinds are used here. A *gauge* is a value read at scrape time (requests running now). A *counter* only goes up
(tokens generated since start); Prometheus derives rates from it. A *histogram* counts observations into cumulative
buckets `le` ("less than or equal"), plus their `_sum` and `_count`, so quantiles can be estimated across servers:

    vllm:e2e_request_latency_seconds_bucket{le="0.5",...} 3.0       3 requests took ≤ 0.5 s
    vllm:e2e_request_latency_seconds_bucket{le="1.0",...} 7.0       7 took ≤ 1 s (the 3 included)
    vllm:e2e_request_latency_seconds_bucket{le="+Inf",...} 8.0      all 8
    vllm:e2e_request_latency_seconds_sum{...} 6.2
    vllm:e2e_request_latency_seconds_count{...} 8.0

Dashboards built for vLLM work unchanged because the names, types and buckets match vLLM's.
"""
from __future__ import annotations
import bisect
import time
from dataclasses import dataclass, field
from tinyvllm.engine.protocol import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


def _header(name: str, kind: str, help: str) -> list[str]: return [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]


@dataclass
class Counter:
  name: str
  help: str
  value: float = 0.0

  def render(self, labels: str) -> list[str]: return _header(self.name, "counter", self.help) + \
    [f"{self.name}{{{labels}}} {float(self.value)}"]


@dataclass
class Histogram:
  name: str
  help: str
  buckets: tuple[float, ...]
  counts: list[int] = field(init=False)
  sum: float = 0.0

  def __post_init__(self) -> None: self.counts = [0] * (len(self.buckets) + 1)     # the last one is +Inf

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.buckets, value)] += 1
    self.sum += value

  def render(self, labels: str) -> list[str]:
    lines, total = _header(self.name, "histogram", self.help), 0
    for le, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
      total += count
      lines.append(f'{self.name}_bucket{{{labels},le="{le}"}} {float(total)}')
    return lines + [f"{self.name}_sum{{{labels}}} {self.sum}", f"{self.name}_count{{{labels}}} {float(total)}"]


class Metrics:
  """Counters and histograms the server updates per request; gauges are the EngineStats that the engine thread
  published last (AsyncLLMEngine.stats), read at scrape time."""
  def __init__(self, model_name: str):
    escaped = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    self.labels = f'model_name="{escaped}"'
    self.prompt_tokens = Counter("vllm:prompt_tokens_total", "Prefill tokens processed.")
    self.generation_tokens = Counter("vllm:generation_tokens_total", "Generation tokens processed.")
    self.prefix_queries = Counter("vllm:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.")
    self.prefix_hits = Counter("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
    self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
    self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token in seconds.", TPOT_BUCKETS)
    self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.", E2E_BUCKETS)

  def request(self, prompt_tokens: int) -> RequestMetrics: return RequestMetrics(self, prompt_tokens)

  def render(self, stats: EngineStats) -> str:
    """The whole page, with the engine's `stats` as its gauges (all zero while the model is still loading)."""
    gauges = {
      "vllm:num_requests_running": ("Number of requests in model execution batches.", stats.running),
      "vllm:num_requests_waiting": ("Number of requests waiting to be processed.", stats.waiting),
      "vllm:kv_cache_usage_perc": ("KV-cache usage; 1 means 100 percent.", stats.kv_cache_usage),
    }
    lines = []
    for name, (help, value) in gauges.items(): lines += _header(name, "gauge", help) + [f"{name}{{{self.labels}}} {float(value)}"]
    preemptions = Counter("vllm:num_preemptions_total", "Cumulative number of preemptions from the engine.",
                          stats.preemptions)
    builds = Counter("tinyvllm:graph_builds_total", "TinyJit graphs captured (all of them before ready, if all is "
                     "well: one after ready made a request wait).", stats.graph_builds)
    build_seconds = Counter("tinyvllm:graph_build_seconds_total", "Seconds spent capturing graphs.",
                            stats.graph_build_seconds)
    loads = Counter("tinyvllm:graph_loads_total", "TinyJit graphs loaded from the store an earlier process with the "
                    "same code, model and shapes left (instead of captured).", stats.graph_loads)
    jumped = Counter("tinyvllm:jump_forward_tokens_total", "Tokens a grammar forced, checked in one step with the "
                     "token before them (structured outputs' jump-forward).", stats.jump_forward_tokens)
    forwards = Counter("tinyvllm:diffusion_forwards_total", "A diffusion LM's forward passes of a sequence's block "
                       "(its own steps, or its proposals under APD).", stats.diffusion_forwards)
    parallel = Counter("tinyvllm:parallel_tokens_decoded_total", "Tokens a diffusion LM committed; over "
                       "diffusion_forwards_total, its tokens per forward.", stats.parallel_tokens_decoded)
    for metric in (self.prompt_tokens, self.generation_tokens, self.prefix_queries, self.prefix_hits, preemptions,
                   builds, build_seconds, loads, jumped, forwards, parallel,
                   self.ttft, self.tpot, self.e2e):
      lines += metric.render(self.labels)
    if stats.spec_accepted_per_position: lines += self._speculative(stats)
    return "\n".join(lines) + "\n"


  def _speculative(self, stats: EngineStats) -> list[str]:
    """Speculative decoding's counters, as vLLM names them (shown only when it is on)."""
    lines = []
    for name, help, value in (("drafts", "Steps of a sequence that checked drafts.", stats.spec_drafts),
                              ("draft_tokens", "Draft tokens checked.", stats.spec_draft_tokens),
                              ("accepted_tokens", "Draft tokens accepted.", stats.spec_accepted_tokens)):
      lines += Counter(f"vllm:spec_decode_num_{name}_total", help, value).render(self.labels)
    name = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
    lines += _header(name, "counter", "Draft tokens accepted, by their position among a step's drafts.")
    return lines + [f'{name}{{{self.labels},position="{i}"}} {float(v)}'
                    for i, v in enumerate(stats.spec_accepted_per_position)]


class RequestMetrics:
  """One request's contribution. `update` takes its running totals; the first generated token observes the time to
  first token and counts the prompt as prefilled, each later step observes the time per new output token."""
  def __init__(self, metrics: Metrics, prompt_tokens: int):
    self.metrics, self.prompt_tokens = metrics, prompt_tokens
    self.start, self.last_token_time = time.monotonic(), None
    self.generated = self.cached = 0

  def update(self, generated: int, cached: int) -> None:
    m, now, new = self.metrics, time.monotonic(), generated - self.generated
    if new > 0:
      if self.last_token_time is None:
        m.ttft.observe(now - self.start)
        m.prompt_tokens.value += self.prompt_tokens
        m.prefix_queries.value += self.prompt_tokens
      else: m.tpot.observe((now - self.last_token_time) / new)
      self.last_token_time = now
    m.generation_tokens.value += new
    m.prefix_hits.value += cached - self.cached
    self.generated, self.cached = generated, cached

  def finish(self) -> None: self.metrics.e2e.observe(time.monotonic() - self.start)
