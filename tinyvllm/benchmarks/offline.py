"""`latency`, `throughput`, `prefix`, `sampling`: the engine in this process, stepped by hand so every token is timed.

One driver serves all three: submit requests, call `engine.step()` until nothing is left, and note the time of every
step that gave a request a new token (that step is the request's "chunk" in the sense of `metrics.py`). A finished
request of a multi-turn conversation submits the conversation's next turn.

  latency     one request at a time (batch 1), each with a fresh prompt
  throughput  every request submitted at once (vLLM's offline throughput: N requests → one `generate`)
  prefix      the shared-prefix and multi-turn chat workloads, each with the prefix cache on and then off
  sampling    the time of a decode step with greedy requests and with every sampling knob on: the sampler's cost

Before measuring, each benchmark runs the workload `warmup` times on prompts of the same lengths but different
tokens: that compiles and captures every TinyJit graph the measured run will use (the engine captures a shape on
its first call, so one warmup leaves nothing to compile), without leaving the measured prompts in a prefix cache.
"""
from __future__ import annotations
import dataclasses
import gc
import statistics
import time
from tinyvllm.benchmarks.metrics import RequestTiming, latency_metrics, serving_metrics
from tinyvllm.benchmarks.report import Progress
from tinyvllm.benchmarks.workloads import Request, Workload
from tinyvllm.engine_args import EngineArgs
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.llm import create_engine
from tinyvllm.sampling_params import SamplingParams


def run_requests(engine: LLMEngine, requests: list[Request], label: str = "") -> tuple[list[RequestTiming], float]:
  """Submit `requests` at once and step the engine until they (and their follow-up turns) are done; returns each
  request's timing and the wall time of the whole run. A `label` shows a progress bar."""
  progress = Progress(sum(1 + len(r.next_turns) for r in requests), label, enabled=bool(label))
  live: dict[str, tuple[Request, RequestTiming, list[int]]] = {}

  def submit(req: Request) -> None:
    # "delta" outputs: each step hands over only the new tokens, as a streaming client would see them
    params = SamplingParams(max_tokens=req.output_len, ignore_eos=True, output_kind="delta", **req.sampling)
    timing = RequestTiming(time.perf_counter(), prompt_tokens=len(req.prompt_token_ids))
    live[engine.add_request(req.prompt_token_ids, params)] = (req, timing, [])

  start, timings = time.perf_counter(), []
  for req in requests: submit(req)
  while engine.has_unfinished_requests():
    outputs, now = engine.step(), time.perf_counter()
    for out in outputs:
      req, timing, token_ids = live[out.request_id]
      if out.outputs[0].token_ids: timing.chunk_times.append(now)
      token_ids += out.outputs[0].token_ids
      timing.output_tokens, timing.cached_tokens = len(token_ids), out.num_cached_tokens
      if not out.finished: continue
      del live[out.request_id]
      timings.append(timing)
      progress.update()
      if (next_turn := req.follow_up(token_ids)) is not None: submit(next_turn)
  progress.close()
  return timings, time.perf_counter() - start


def _warm_and_measure(engine: LLMEngine, make: Workload, warmup: int, label: str) -> tuple[list[RequestTiming], float]:
  """`make(variant)` builds the workload; variants 1..`warmup` warm up, variant 0 is measured."""
  for i in range(warmup): run_requests(engine, make(i + 1), f"{label} warmup {i + 1}/{warmup}")
  return run_requests(engine, make(0), label)


def _one_at_a_time(engine: LLMEngine, requests: list[Request], label: str) -> list[RequestTiming]:
  progress = Progress(len(requests), label)
  timings = []
  for req in requests:
    timings += run_requests(engine, [req])[0]
    progress.update()
  progress.close()
  return timings


def latency(engine: LLMEngine, requests: list[Request], warmup_requests: list[Request]) -> dict:
  _one_at_a_time(engine, warmup_requests, "latency warmup")
  return latency_metrics(_one_at_a_time(engine, requests, "latency"))


def throughput(engine: LLMEngine, make: Workload, warmup: int) -> dict:
  return serving_metrics(*_warm_and_measure(engine, make, warmup, "throughput"))


def prefix(engine_args: EngineArgs, workloads: dict[str, Workload], warmup: int) -> dict[str, dict]:
  """Every workload on an engine with the prefix cache on, then on one with it off."""
  columns = {}
  for cache in (True, False):
    name = f"cache {'on' if cache else 'off'}"
    engine = create_engine(dataclasses.replace(engine_args, enable_prefix_caching=cache))
    columns[name] = {workload: serving_metrics(*_warm_and_measure(engine, make, warmup, f"{name} {workload}"))
                     for workload, make in workloads.items()}
    del engine
    gc.collect()    # the next engine's weights and KV pool need the memory
  return columns


def decode_step_times(engine: LLMEngine, requests: list[Request], params: SamplingParams) -> list[float]:
  """Submit `requests` at once with `params`, run their prefills, then time (seconds) every step in which all of
  them decode."""
  for req in requests:
    engine.add_request(req.prompt_token_ids, dataclasses.replace(params, max_tokens=req.output_len, ignore_eos=True))
  times = []
  while engine.has_unfinished_requests():
    all_decoding = not engine.scheduler.waiting and all(s.num_uncomputed_tokens == 1 for s in engine.scheduler.running)
    start = time.perf_counter()
    engine.step()
    if all_decoding: times.append(time.perf_counter() - start)
  return times


def sampling(engine: LLMEngine, make: Workload, warmup: int, configs: dict[str, SamplingParams]) -> dict:
  """Median decode step time under each sampling configuration (the first is the baseline) on the same workload,
  and what the others add to it."""
  step_ms = {}
  for name, params in configs.items():
    for i in range(warmup): decode_step_times(engine, make(i + 1), params)
    step_ms[name] = 1000 * statistics.median(decode_step_times(engine, make(0), params))
  base, *others = configs
  return {"step_ms": step_ms, **{f"{name}_overhead_ms": step_ms[name] - step_ms[base] for name in others},
          **{f"{name}_overhead_share": (step_ms[name] - step_ms[base]) / step_ms[name] for name in others}}
