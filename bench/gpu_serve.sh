#!/usr/bin/env bash
# Real traffic on a GPU, in one device call: `bench.py serve` starts a fresh server (random Llama-1B weights, default
# engine flags, max_model_len 1024), times its start (load + every graph captured) and sends it 100 requests at
# 20 requests/s (Poisson), prompts 128-384 tokens, outputs 64-192, mixed sampling; then the offline throughput of the
# same requests in this process. A second server start with the kernel cache the first one left shows a warm start.
#   OUT=/some/dir bash bench/gpu_serve.sh   (on the device machine, with .whl carried)
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site:$PWD DEV=CUDA PYTHONUNBUFFERED=1
SHAPE="--load-format dummy --shape llama-1b --max-model-len 1024"
echo "=== serve, first pass to a freshly ready server"
timeout 420 python bench.py serve $SHAPE --num-prompts 100 --random-input-len 256 --random-output-len 128 \
  --random-range-ratio 0.5 --request-rate 20 --warmup 0 --json "$OUT/gpu-h100-llama-1b-dummy-serve.json" 2>&1 | grep -v "^\s*$" | tail -40
echo "=== warm start (the kernel cache of the run above)"
timeout 120 python - <<'EOF' 2>&1 | tail -3
import time
from tinyvllm import EngineArgs, LLMEngine
t0 = time.perf_counter()
engine = LLMEngine(EngineArgs(load_format="dummy", shape="llama-1b", max_model_len=1024))
loaded = time.perf_counter()
engine.warmup()
print(f"warm start: load {loaded - t0:.1f} s, {engine.stats().graph_builds} graphs captured in "
      f"{time.perf_counter() - loaded:.1f} s, ready after {time.perf_counter() - t0:.1f} s")
EOF
