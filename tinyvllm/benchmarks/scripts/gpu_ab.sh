#!/usr/bin/env bash
# Paged vs gathered decode attention on a GPU: batch-1 latency of two shapes and a batch-256 decode step
# profile, each with --attention-backend paged and gather. usage (on the device machine, with .whl carried):
#   OUT=/some/dir bash tinyvllm/benchmarks/scripts/gpu_ab.sh
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD DEV=CUDA PYTHONUNBUFFERED=1
for be in paged gather; do
  for sh in llama-1b smollm2-135m; do
    echo "=== $sh $be"; timeout 120 python bench.py latency --load-format dummy --shape $sh --input-len 128 --output-len 64 --num-iters 3 --attention-backend $be --json $OUT/lat-$sh-$be.json 2>&1 | grep -v "^\s*$" | tail -4
  done
  echo "=== step256 $be"; timeout 150 python tinyvllm/benchmarks/scripts/step_profile.py 256 128 llama-1b attention_backend=$be 2>&1 | grep -v "^\s*$" | tail -22
done
