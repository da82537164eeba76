"""What BEAM buys one decode graph: S sequences of a Llama-1B-shaped random model, prefilled in one step, then the
replayed decode step timed without BEAM, then the same shape recaptured with BEAM=<width> and timed again. Only the
decode graph is searched, as `--beam` does.

    DEV=CUDA python tinyvllm/benchmarks/scripts/decode_beam.py 256 2
"""
import sys, time, numpy as np
from tinyvllm import LLM, SamplingParams
S, P, beam = int(sys.argv[1]), 128, int(sys.argv[2])
llm = LLM(load_format="dummy", shape="llama-1b", max_num_seqs=S, max_num_batched_tokens=S * P, max_model_len=P + 64,
          enable_prefix_caching=False)
eng, rng = llm.engine, np.random.default_rng(0)
params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
for i in range(S): eng.add_request(rng.integers(1, 128000, P).tolist(), params)
eng.step()
def replay(label, n=8):
  walls = []
  for _ in range(n): t = time.perf_counter(); eng.step(); walls.append(time.perf_counter() - t)
  print(f"{label}: first {walls[0]*1e3:.0f} ms, second {walls[1]*1e3:.0f} ms, median of rest {np.median(walls[2:])*1e3:.2f} ms -> {S/np.median(walls[2:]):.0f} tok/s", flush=True)
replay("no BEAM")
eng.runner.graphs.models.clear(); eng.runner.graphs.compile_options = {"BEAM": beam}
t = time.perf_counter(); replay(f"BEAM={beam}"); print(f"beam pass took {time.perf_counter()-t:.0f} s", flush=True)
