#!/usr/bin/env bash
# The GPU measurements of one device call: each benchmark writes its JSON under $OUT.
# usage (on the device machine): OUT=/some/dir bash tinyvllm/benchmarks/scripts/gpu_runs.sh
set -u
export DEV=CUDA PYTHONUNBUFFERED=1
run() { local name=$1; shift; echo "=== $name"; timeout 150 python bench.py "$@" --json "$OUT/$name.json" 2>&1 | grep -v "^\s*$" | tail -14; }
run gpu-h100-smollm2-dummy-latency latency --load-format dummy --shape smollm2-135m --input-len 128 --output-len 64 --num-iters 3
run gpu-h100-smollm2-dummy-latency-packed latency --load-format dummy --shape smollm2-135m --packed-weights \
  --input-len 128 --output-len 64 --num-iters 3
run gpu-h100-llama-1b-dummy-latency-fused latency --load-format dummy --shape llama-1b --input-len 128 --output-len 64 --num-iters 3
run gpu-h100-smollm2-dummy-sampling sampling --load-format dummy --shape smollm2-135m --batch-sizes 1 64
