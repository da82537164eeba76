#!/usr/bin/env bash
# Async scheduling on a GPU (session 16), A/B in one device call: the 256 x (128, 128) throughput run of a Llama-1B
# shape with HF transformers measured in the same call, and batch-1 latency of two shapes, each with async
# scheduling on and off. usage (on the device machine, with .whl carried): OUT=/some/dir bash bench/gpu_async_ab.sh
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site:$PWD DEV=CUDA PYTHONUNBUFFERED=1
run() { local name=$1; shift; echo "=== $name"; timeout 240 python bench.py "$@" --json "$OUT/$name.json" 2>&1 | grep -v "^\s*$" | tail -${TAIL:-12}; }
THROUGHPUT="throughput --load-format dummy --shape llama-1b --num-prompts 256 --input-len 128 --output-len 128
  --max-num-seqs 256 --max-num-batched-tokens 8192 --kv-cache-memory-gb 8 --warmup 2"
run throughput-async $THROUGHPUT --compare transformers
TAIL=6 run throughput-sync $THROUGHPUT --no-async-scheduling
for shape in llama-1b smollm2-135m; do
  for mode in async-scheduling no-async-scheduling; do
    TAIL=8 run latency-$shape-$mode latency --load-format dummy --shape $shape --input-len 128 --output-len 64 --num-iters 3 --$mode
  done
done
