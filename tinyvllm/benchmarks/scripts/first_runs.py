"""What a fresh process meets: the start (load, then every graph captured, as a server does before it is ready), then
the same-shaped workload three times, N requests × (prompt, output) submitted at once, each run with other tokens.
If no graph is built on the request path the first run is as fast as the third. Run it with CACHEDB=/tmp/empty.db
for a cold start (an empty tinygrad kernel cache), again for a warm one.

    python tinyvllm/benchmarks/scripts/first_runs.py [N=32] [prompt=128] [output=128] [json path] [engine args as key=value ...]
"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np                                   # noqa: E402  (timed: the imports are part of a start)
from tinyvllm import EngineArgs, LLMEngine, SamplingParams   # noqa: E402

N, P, O = (int(a) for a in (sys.argv[1:4] + ["32", "128", "128"][len(sys.argv[1:4]):]))
path = sys.argv[4] if len(sys.argv) > 4 else None
extra = {k: (int(v) if v.isdigit() else v) for k, v in (a.split("=") for a in sys.argv[5:])}
engine = LLMEngine(EngineArgs(**extra))
loaded = time.perf_counter()
engine.warmup()
ready = time.perf_counter()
result = {"requests": N, "prompt_len": P, "output_len": O, "engine_args": extra, "load_s": loaded - t0,
          "graph_capture_s": ready - loaded, "graphs": engine.stats().graph_builds, "runs": []}
print(f"load {loaded - t0:.1f} s, {result['graphs']} graphs captured in {ready - loaded:.1f} s", flush=True)
for run in range(3):
  rng = np.random.default_rng(run)
  for _ in range(N): engine.add_request(rng.integers(100, 40000, P).tolist(),
                                        SamplingParams(temperature=0, max_tokens=O, ignore_eos=True))
  start, before = time.perf_counter(), engine.stats().graph_builds
  while engine.has_unfinished_requests(): engine.step()
  seconds = time.perf_counter() - start
  result["runs"].append({"seconds": seconds, "output_tok_s": N * O / seconds,
                         "graphs_built": engine.stats().graph_builds - before})
  print(f"run {run + 1}: {N * O / seconds:.1f} output tok/s, {result['runs'][-1]['graphs_built']} graphs built",
        flush=True)
result["first_over_third"] = result["runs"][0]["output_tok_s"] / result["runs"][2]["output_tok_s"]
print(f"first run / third run: {result['first_over_third']:.3f}")
if path: json.dump(result, open(path, "w"), indent=1)
