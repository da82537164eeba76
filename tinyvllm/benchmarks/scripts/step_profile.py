"""Where a step's time goes: per-kernel device time of one batch-S prefill step and one decode step (their shapes'
first calls, in which DEBUG=2 times the kernels one by one), then the wall time of the same step replayed from its
captured graph. The model runner captures a shape on its first call, which on a GPU already runs as graph launches:
there set JIT=0 for the per-kernel split (and take the replayed wall time from a run without it).

    python tinyvllm/benchmarks/scripts/step_profile.py [S] [prompt_len] [shape] [engine args as key=value ...]
    e.g. DEV=CUDA JIT=0 python tinyvllm/benchmarks/scripts/step_profile.py 256 128 llama-1b
"""
import sys, time, numpy as np
from tinyvllm import LLM, SamplingParams
from kernel_times import kernel_times, report

S, P = int(sys.argv[1]) if len(sys.argv) > 1 else 64, int(sys.argv[2]) if len(sys.argv) > 2 else 128
shape = sys.argv[3] if len(sys.argv) > 3 else "llama-1b"
extra = {k: (int(v) if v.isdigit() else v) for k, v in (a.split("=") for a in sys.argv[4:])}
STEPS = 12
# the whole prefill in one step, so the first decode step is its shape's first call
# one step at a time (no async scheduling), so that each step() call runs exactly the step it times
llm = LLM(load_format="dummy", shape=shape, max_num_seqs=S, max_num_batched_tokens=S * P, max_model_len=P + STEPS + 4,
          enable_prefix_caching=False, **{"async_scheduling": False, **extra})
engine, rng = llm.engine, np.random.default_rng(0)
params = SamplingParams(temperature=0, max_tokens=STEPS + 2, ignore_eos=True)
for i in range(S): engine.add_request(rng.integers(1, engine.model_config.vocab_size, P).tolist(), params)
t = time.perf_counter()
with kernel_times() as (times, counts): engine.step()
report(f"prefill step S={S} Q={P} (first call: {time.perf_counter() - t:.1f} s with compiling)", times, counts, top=10)
with kernel_times() as (times, counts): engine.step()
report(f"decode step S={S} (first call, kernels one by one)", times, counts, top=16)
engine.step()                                                   # the capture
walls = []
for _ in range(STEPS - 3):
  t = time.perf_counter(); engine.step(); walls.append(time.perf_counter() - t)
print(f"decode step S={S} replayed: median {np.median(walls) * 1e3:.2f} ms wall → {S / np.median(walls):.0f} tok/s")
