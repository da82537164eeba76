#!/usr/bin/env bash
# Cold and warm start to the first token on a GPU (random weights of two shapes), each with its own tinygrad cache.
#   OUT=/some/dir bash tinyvllm/benchmarks/scripts/gpu_start.sh  (on the device machine, with .whl carried)
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site:$PWD DEV=CUDA PYTHONUNBUFFERED=1
for sh in smollm2-135m llama-1b; do
  for run in cold warm; do echo "=== $sh $run: $(CACHEDB=/tmp/cache-$sh.db timeout 200 python tinyvllm/benchmarks/scripts/start_time.py load_format=dummy shape=$sh max_model_len=8192 2>&1 | tail -1)"; done
done
