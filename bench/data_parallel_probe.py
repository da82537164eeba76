"""A measurement for data parallelism on the CPU: run this once per core, each pinned to its core, each with its
share of the throughput workload; the ranks start their measured pass together and each prints its output tok/s.

    rm -rf /tmp/tinyvllm-dp-probe; for core in 0 1; do taskset -c $core python bench/data_parallel_probe.py 16 2 & done; wait

tinygrad's HCQ2 wait for the device is a busy loop (`HCQ2Compiled._wait_signal`), which would take the core that
the other rank computes on; here it polls with 0.1 ms sleeps instead (a probe, not the engine's code).
"""
import os, sys, tempfile, time
import tinyvllm  # noqa: F401  (sets HCQ2 before tinygrad is imported)
from tinygrad.runtime.support import hcq2

N, RANKS = int(sys.argv[1]), int(sys.argv[2])

def wait_sleeping(self, signal, value, timeout=None):
  while signal[0] < value: time.sleep(0.0001)

hcq2.HCQ2Compiled._wait_signal = wait_sleeping
from tinyvllm import EngineArgs, LLMEngine  # noqa: E402
from throughput_steps import run_workload  # noqa: E402
engine = LLMEngine(EngineArgs())

run_workload(engine, N, 1)                                    # warm-up: captures every graph shape
barrier = os.path.join(tempfile.gettempdir(), "tinyvllm-dp-probe")
os.makedirs(barrier, exist_ok=True)
open(os.path.join(barrier, str(os.getpid())), "w").close()
while len(os.listdir(barrier)) < RANKS: time.sleep(0.05)
print(f"rank {os.getpid()}: {N} requests, {N * 128 / run_workload(engine, N, 2):.1f} output tok/s", flush=True)
os.remove(os.path.join(barrier, str(os.getpid())))
