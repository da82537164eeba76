"""An engine's start as a server makes it: load the model, then `warmup` (every graph of the set captured, or loaded
from the cache an earlier start left). Run it twice with the same CACHEDB: an empty file first, then the cache the
first run left.

    python tinyvllm/benchmarks/scripts/engine_start.py [engine args as key=value ...]   e.g. load_format=dummy shape=llama-1b
"""
import sys, time
t0 = time.perf_counter()
from tinyvllm import EngineArgs, LLMEngine                         # noqa: E402  (timed: the import is part of a start)
from tinyvllm.tinygrad_internals import device_memory             # noqa: E402
extra = {k: (int(v) if v.isdigit() else v) for k, v in (a.split("=") for a in sys.argv[1:])}
engine = LLMEngine(EngineArgs(**extra))
loaded = time.perf_counter()
memory = device_memory(engine.args.devices()[0])
engine.warmup()
after, stats = device_memory(engine.args.devices()[0]), engine.stats()
line = (f"load {loaded - t0:.1f} s (import included); {stats.graph_builds} captured + {stats.graph_loads} loaded in "
        f"{time.perf_counter() - loaded:.1f} s; ready after {time.perf_counter() - t0:.1f} s; max_model_len "
        f"{engine.max_model_len}, {engine.block_manager.num_usable_blocks} KV blocks")
if memory and after:
  line += (f"; device memory in use {(memory[1] - memory[0]) / 2**30:.1f} GiB after load, "
           f"{(after[1] - after[0]) / 2**30:.1f} GiB after warm-up, of {memory[1] / 2**30:.1f}")
print(line)
