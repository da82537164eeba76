#!/usr/bin/env bash
# An engine flag A/B on a GPU, in one device call: the 256 x (128, 128) throughput run of a Llama-1B shape with flag A
# (HF transformers measured in the same call) and with flag B, batch-1 latency of two shapes with each, then a
# per-kernel profile of A's batch-256 decode step. usage (on the device machine, with .whl carried):
#   OUT=/some/dir bash tinyvllm/benchmarks/scripts/gpu_flag_ab.sh "--attention-backend paged" "--attention-backend gather"
# (e.g. async scheduling: "--async-scheduling" "--no-async-scheduling")
A=$1 B=$2
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site:$PWD DEV=CUDA PYTHONUNBUFFERED=1
run() { local name=$1; shift; echo "=== $name"; timeout 240 python bench.py "$@" --json "$OUT/$name.json" 2>&1 | grep -v "^\s*$" | tail -${TAIL:-12}; }
THROUGHPUT="throughput --load-format dummy --shape llama-1b --num-prompts 256 --input-len 128 --output-len 128
  --max-num-seqs 256 --max-num-batched-tokens 8192 --kv-cache-memory-gb 8 --warmup 2"
run throughput-a $THROUGHPUT $A --compare transformers
TAIL=6 run throughput-b $THROUGHPUT $B
for shape in llama-1b smollm2-135m; do
  TAIL=8 run latency-$shape-a latency --load-format dummy --shape $shape --input-len 128 --output-len 64 --num-iters 3 $A
  TAIL=8 run latency-$shape-b latency --load-format dummy --shape $shape --input-len 128 --output-len 64 --num-iters 3 $B
done
echo "=== decode step profile, $A"   # (a flag with a value: it becomes a key=value engine argument)
timeout 150 python tinyvllm/benchmarks/scripts/step_profile.py 256 128 llama-1b $(echo "${A#--}" | sed 's/-/_/g; s/ /=/') 2>&1 | grep -v "^\s*$" | tail -22
