"""How long the device waits for the host each step: async scheduling on and off, same workload (CPU is fine: the
host's Python is the same on every backend).

The device is idle from the moment a step's output is read back (collect returns) until the next step is queued
(launch returns). Without async scheduling that gap holds all of the host's work: appending the tokens, stop checks,
outputs, scheduling the next step and building its inputs. With it, only the launch itself: writing the unknown
tokens into the prepared inputs and copying them in.

    python tinyvllm/benchmarks/scripts/host_overlap.py [S=256] [shape=tiny] [tokens a step=S·128: one prefill step]

With a token budget below S·128 the prompts are prefilled in chunks first (the engine's defaults: 2,048 on a GPU).
"""
import sys, time
import numpy as np
from tinyvllm import EngineArgs, LLMEngine, SamplingParams


def measure(S: int, shape: str, async_scheduling: bool, tokens: int) -> tuple[float, float]:
  """(median wall ms per decode step, median ms the device waited for the host per step) over S × (128, 128)."""
  engine = LLMEngine(EngineArgs(load_format="dummy", shape=shape, max_num_seqs=S, max_num_batched_tokens=tokens,
                                max_model_len=256, kv_cache_memory_gb=1.0 if shape == "tiny" else 8.0,
                                async_scheduling=async_scheduling))
  runner, events = engine.runner, []          # (time, "read" | "queued")
  collect, launch = runner.collect, runner.launch
  def timed_collect(step):
    out = collect(step); events.append((time.perf_counter(), "read")); return out
  def timed_launch(step, before=None):
    out = launch(step, before); events.append((time.perf_counter(), "queued")); return out
  runner.collect, runner.launch = timed_collect, timed_launch
  walls = []
  for seed in range(2):          # the first pass captures every graph
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, output_kind="delta")
    for _ in range(S): engine.add_request(rng.integers(1, engine.model_config.vocab_size, 128).tolist(), params)
    scheduler = engine.scheduler
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in [*scheduler.running, *scheduler.waiting]):
      engine.step()              # the prefill, in chunks of `tokens`
    events.clear()
    walls.clear()
    while engine.has_unfinished_requests():
      t = time.perf_counter(); engine.step(); walls.append(time.perf_counter() - t)
  # from each read to the next launch, the device has nothing to do
  gaps = [t2 - t1 for (t1, a), (t2, b) in zip(events, events[1:]) if a == "read" and b == "queued"]
  return float(np.median(walls[1:-1])) * 1e3, float(np.median(gaps)) * 1e3


if __name__ == "__main__":
  S, shape = int(sys.argv[1]) if len(sys.argv) > 1 else 256, sys.argv[2] if len(sys.argv) > 2 else "tiny"
  tokens = int(sys.argv[3]) if len(sys.argv) > 3 else S * 128
  for on in (False, True):
    wall, gap = measure(S, shape, on, tokens)
    print(f"async scheduling {'on ' if on else 'off'}  S={S} {shape}, {tokens} tokens a step: {wall:6.2f} ms a step, "
          f"device waits {gap:5.2f} ms of it")
