"""Where the throughput workload's time goes: N requests × (128 prompt, 128 output) submitted at once on one engine,
a warm-up pass (captures every graph shape), then a measured pass timed per captured graph shape (S, Q, NB).

    python bench/throughput_steps.py [N=32]
"""
import collections, sys, time
import numpy as np
from tinyvllm import EngineArgs, LLMEngine, SamplingParams
from tinyvllm import model_runner


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
  launch, read = model_runner._Graph.launch, model_runner._Graph.read

  def timed(run):
    def call(graph, *args):
      start = time.perf_counter()
      try: return run(graph, *args)
      finally: graph_time[(graph.shape.S, graph.shape.Q, graph.shape.NB)] += time.perf_counter() - start
    return call

  # one step at a time, so that a graph's time is its launch and the wait for its output
  model_runner._Graph.launch, model_runner._Graph.read = timed(launch), timed(read)
  engine = LLMEngine(EngineArgs(async_scheduling=False))
  print(f"warm-up pass {run_workload(engine, N, 1):.1f} s")
  graph_time.clear()
  total = run_workload(engine, N, 2)
  print(f"measured pass {total:.1f} s, {N * 128 / total:.1f} output tok/s; in graphs {sum(graph_time.values()):.1f} s:")
  for (S, Q, NB), t in graph_time.most_common(12): print(f"  S={S:3d} Q={Q:4d} NB={NB:3d}  {t:6.2f} s")
