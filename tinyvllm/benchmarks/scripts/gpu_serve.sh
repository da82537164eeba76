#!/usr/bin/env bash
# Real traffic on a GPU, in one device call, with no tuning flags (random Llama-1B weights): the start of an engine
# with an empty kernel cache and again with the cache it left (load + every graph captured, the device memory in use
# after); then `bench.py serve` starts a fresh server and sends it 100 requests at 20 requests/s (Poisson), prompts
# 128-384 tokens, outputs 64-192, mixed sampling, with the offline throughput of the same requests in this process;
# then the same requests all at once.
#   OUT=/some/dir bash tinyvllm/benchmarks/scripts/gpu_serve.sh  (on the device machine, with .whl carried)
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site:$PWD DEV=CUDA PYTHONUNBUFFERED=1 CACHEDB=/tmp/serve-cache.db
rm -f $CACHEDB
SHAPE="--load-format dummy --shape llama-1b"
for start in cold warm; do
  echo "=== $start start: $(timeout 260 python tinyvllm/benchmarks/scripts/engine_start.py load_format=dummy shape=llama-1b 2>&1 | grep "^load" | tail -1)"
done
for rate in 20 inf; do
  echo "=== serve, request rate $rate, a freshly ready server"
  name=$([ $rate = inf ] && echo serve-all-at-once || echo serve)
  timeout 300 python bench.py serve $SHAPE --num-prompts 100 --random-input-len 256 --random-output-len 128 \
    --random-range-ratio 0.5 --request-rate $rate --warmup 0 --json "$OUT/gpu-h100-llama-1b-dummy-$name.json" \
    2>&1 | grep -v "^\s*$\|Exception ignored\|^Traceback\|^  File\|^TypeError" | tail -32
done
