#!/usr/bin/env bash
# Time to first token from a freshly ready server against the same server in steady state (the real-traffic goal:
# p99 within 3x). Starts `serve.py` (the embedded SmolLM2 unless SERVE_ARGS says otherwise), waits for
# /health/ready, then sends the same workload twice: 64 streams at once, prompts 64-192 tokens, outputs 32-96,
# mixed sampling. The first pass meets a server that has served nothing; the second one what it left. The two passes
# send the same prompts, so the prefix cache is off: with it the second pass would skip its prefills.
#   bash tinyvllm/benchmarks/scripts/fresh_server.sh [json prefix, e.g. tinyvllm/benchmarks/results/cpu-smollm2-serve-64]
set -e
PREFIX=${1:-/tmp/fresh-server}
PORT=${PORT:-8123}
python serve.py --port $PORT --no-enable-prefix-caching $SERVE_ARGS > /tmp/fresh-server.log 2>&1 &
SERVER=$!
trap "kill $SERVER 2>/dev/null" EXIT
until curl -sf localhost:$PORT/health/ready > /dev/null; do sleep 1; kill -0 $SERVER || { cat /tmp/fresh-server.log; exit 1; }; done
grep -m1 "graphs ready" /tmp/fresh-server.log || true
for pass in fresh steady; do
  echo "=== $pass"
  python bench.py serve --base-url http://127.0.0.1:$PORT --num-prompts 64 --max-concurrency 64 --request-rate inf \
    --random-input-len 128 --random-output-len 64 --random-range-ratio 0.5 --warmup 0 --no-offline \
    --json $PREFIX-$pass.json 2>&1 | grep -E "TTFT|output tok/s|graphs|completed|failed"
done
python - "$PREFIX" <<'PY'
import json, sys
p99 = {k: json.load(open(f"{sys.argv[1]}-{k}.json"))["columns"]["tinyvllm"]["ttft_ms"]["p99"] for k in ("fresh", "steady")}
print(f"TTFT p99: fresh {p99['fresh']:.0f} ms, steady {p99['steady']:.0f} ms, ratio {p99['fresh'] / p99['steady']:.2f}")
PY
