"""Where the throughput workload's time goes: N requests × (128 prompt, 128 output) submitted at once on one engine,
a warm-up pass (captures every graph shape), then a measured pass timed per model graph (T tokens a step): its
launch, its sampler's, and the wait for the sampled tokens.

    python tinyvllm/benchmarks/scripts/throughput_steps.py [N=32]
"""
import collections, sys, time
import numpy as np
from tinyvllm import EngineArgs, LLMEngine, SamplingParams
from tinyvllm.runner import model_runner


def run_workload(engine: LLMEngine, n: int, seed: int) -> float:
  """Submit n random 128-token prompts for 128 greedy tokens each, run them to the end; the seconds it took."""
  rng = np.random.default_rng(seed)
  for _ in range(n):
    engine.add_request([int(t) for t in rng.integers(100, 40000, 128)],
                       SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
  start = time.perf_counter()
  while engine.has_unfinished_requests(): engine.step()
  return time.perf_counter() - start


if __name__ == "__main__":
  N = int(sys.argv[1]) if len(sys.argv) > 1 else 32
  graph_time: collections.Counter = collections.Counter()
  launch = model_runner.ModelRunner.launch

  def timed(runner, step, before=None):
    start = time.perf_counter()
    try: return launch(runner, step, before)
    finally:
      for group in step.groups: group.output = group.sampler.read()         # wait here: the step's own time
      graph_time[step.groups[0].model.shape.T] += time.perf_counter() - start

  # one step at a time, so that a graph's time is its launch and the wait for its output
  model_runner.ModelRunner.launch = timed
  engine = LLMEngine(EngineArgs(async_scheduling=False))
  print(f"warm-up pass {run_workload(engine, N, 1):.1f} s")
  graph_time.clear()
  total = run_workload(engine, N, 2)
  print(f"measured pass {total:.1f} s, {N * 128 / total:.1f} output tok/s; in graphs {sum(graph_time.values()):.1f} s:")
  for T, t in graph_time.most_common(12): print(f"  T={T:4d}  {t:6.2f} s")
