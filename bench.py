"""Benchmarks with vLLM's definitions: `python bench.py BENCHMARK [options]`, BENCHMARK one of:

  latency     batch 1: time to first token, time per output token, decode tokens/s
  throughput  N requests submitted at once: requests/s, output tokens/s, total tokens/s
  serve       a running server (--base-url) or one started here (default): TTFT/TPOT/ITL/E2EL percentiles, beside
              the offline throughput of the same requests; lengths vary and sampling is mixed by default
  prefix      shared system prompt and multi-turn chat, prefix cache on vs off
  sampling    decode step time with greedy requests vs every sampling knob on, at several batch sizes
  diffusion   a diffusion LM: LLaDA decoding vs Fast-dLLM threshold decoding, with and without its prefix cache
  chat-decoding  SmolLM2, the diffusion LM adapted from it (threshold decoding) and APD (it proposes, SmolLM2
              checks) on 50 chat prompts at batch 1: tok/s, tokens per forward, SmolLM2's log-likelihood of the answers

Every engine argument is an option (--load-format dummy --shape llama-1b: random weights, no files); --max-model-len
defaults to the longest sequence the workload makes. `--compare` adds peers measured right after tinyvllm on the same
machine and prints tinyvllm/peer ratios; `--json FILE` writes every number with the configuration and machine facts.
Metric definitions: tinyvllm/benchmarks/metrics.py.

  python bench.py latency --input-len 128 --output-len 32 --compare llama.cpp tinygrad.llm --llama-cpp-bin BIN
  python bench.py throughput --load-format dummy --shape llama-1b --num-prompts 256 --json out.json
  python bench.py serve --request-rate 4 --num-prompts 64
  python bench.py serve --random-range-ratio 0 --sampling-mix greedy      # fixed lengths, all greedy
  python bench.py diffusion --load-format dummy --shape llada-8b --num-prompts 32 --input-len 256 --gen-length 256 \
    --block-length 32 --diffusion-steps 64 --modes cache --compare torch      # against Fast-dLLM's loop in torch
"""
from __future__ import annotations
import argparse
import os
import sys
from tinyvllm.benchmarks import commands
from tinyvllm.benchmarks.diffusion import MODES
from tinyvllm.benchmarks.report import describe_workload, table, write_json
from tinyvllm.benchmarks.workloads import SAMPLING_MIXES
from tinyvllm.engine_args import EngineArgs


def common_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  EngineArgs.add_cli_args(common.add_argument_group("engine"))
  out = common.add_argument_group("output and peers")
  out.add_argument("--json", metavar="FILE", help="write every metric, the configuration and machine facts here")
  out.add_argument("--warmup", type=int, default=2, help="warmup runs of the workload (other tokens, same lengths; "
                   "serve: other lengths and sampling too, like earlier traffic); the engine captures a shape on its "
                   "first call, the diffusion sampler on its second, so 2 leave nothing to compile")
  out.add_argument("--compare", nargs="*", default=[], choices=commands.PEERS, help="peers to measure as well")
  out.add_argument("--llama-cpp-bin", help="directory with llama-bench, llama-batched-bench, llama-server "
                                           "(default: $LLAMA_CPP_BIN)")
  out.add_argument("--tinygrad-llm-python", help="python of a venv with tinygrad 0.13.0 (default: "
                                                 "$TINYGRAD_LLM_PYTHON)")
  out.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for llama.cpp")
  out.add_argument("--peer-timeout", type=float, default=1800, help="seconds before a peer is given up on")
  return common


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="benchmark", required=True)
  common = [common_parser()]

  p = sub.add_parser("latency", parents=common, help="batch-1 TTFT, TPOT, decode tokens/s")
  p.add_argument("--input-len", type=int, default=32)
  p.add_argument("--output-len", type=int, default=128)
  p.add_argument("--num-iters", type=int, default=10)
  p.set_defaults(func=commands.latency)

  # vLLM's random dataset; `serve` defaults to traffic that varies (lengths, sampling), `throughput` to fixed shapes
  for name, func, help_text, range_ratio, mix in (
      ("throughput", commands.throughput, "offline: N requests at once", 0.0, "greedy"),
      ("serve", commands.serve, "an OpenAI-compatible server, streamed", 0.5, "mixed")):
    p = sub.add_parser(name, parents=common, help=help_text)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=128)
    p.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=range_ratio,
                   help="each request's lengths drawn uniformly from len × [1-r, 1+r]")
    p.add_argument("--random-prefix-len", type=int, default=0, help="tokens every prompt starts with")
    p.add_argument("--sampling-mix", choices=SAMPLING_MIXES, default=mix,
                   help="mixed: mostly greedy, some temperature, top-p/top-k, logprobs, penalties (seeded per request)")
    p.set_defaults(func=func)
  p.add_argument("--base-url", help="a running server (default: start `python serve.py` here)")
  p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
  p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1: Poisson")
  p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
  p.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for a started server")
  p.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                 help="also run the same requests through the engine in this process (not with --base-url)")

  p = sub.add_parser("prefix", parents=common, help="shared prefix + multi-turn chat, prefix cache on vs off")
  p.add_argument("--num-prompts", type=int, default=32, help="questions sharing one system prompt")
  p.add_argument("--prefix-len", type=int, default=512, help="system prompt tokens")
  p.add_argument("--question-len", type=int, default=32)
  p.add_argument("--output-len", type=int, default=32)
  p.add_argument("--num-conversations", type=int, default=8)
  p.add_argument("--turns", type=int, default=4)
  p.set_defaults(func=commands.prefix)

  p = sub.add_parser("sampling", parents=common, help="the sampler's share of a decode step")
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
  p.add_argument("--input-len", type=int, default=16)
  p.add_argument("--output-len", type=int, default=8, help="tokens per request; all but the first are timed steps")
  p.set_defaults(func=commands.sampling)

  p = sub.add_parser("diffusion", parents=common,
                     help="LLaDA vs Fast-dLLM decoding (--model: the shipped Django model)")
  p.add_argument("--num-prompts", type=int, default=8)
  p.add_argument("--gen-length", type=int, default=64)
  p.add_argument("--block-length", type=int, default=16)
  p.add_argument("--threshold", type=float, default=0.9, help="Fast-dLLM's confidence threshold")
  p.add_argument("--diffusion-steps", type=int, default=None,
                 help="forward passes per sequence in the fixed-schedule modes (default: one per token)")
  p.add_argument("--modes", nargs="+", choices=list(MODES), default=["llada", "threshold", "threshold+cache"])
  p.add_argument("--input-len", type=int, default=256, help="random prompts' tokens (--load-format dummy)")
  p.set_defaults(func=commands.diffusion)

  p = sub.add_parser("chat-decoding", parents=common, help="SmolLM2 vs its diffusion LM (threshold decoding, APD) on "
                     "50 chat prompts, batch 1: speed and SmolLM2's log-likelihood of the answers")
  p.add_argument("--num-prompts", type=int, default=50)
  p.add_argument("--max-tokens", type=int, default=96)
  p.add_argument("--block-length", type=int, default=4, help="the diffusion LM's block")
  p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5])
  p.add_argument("--apd-tokens", type=int, default=4, help="APD: the diffusion LM's block of proposals")
  p.add_argument("--mixture-weights", type=float, nargs="+", default=[0.0, 0.5], help="APD's R values")
  p.set_defaults(func=commands.chat_decoding)
  return parser


def main(argv: list[str] | None = None) -> dict:
  args = build_parser().parse_args(argv)
  engine_args = EngineArgs.from_cli_args(args)
  engine_args.max_model_len = engine_args.max_model_len or commands.workload_len(args)
  result = args.func(args, engine_args)
  if "workload" in result: print(f"workload: {describe_workload(result['workload'])}")
  print(table(f"bench {args.benchmark}", result["headline"], result["columns"]))
  for name, column in result["columns"].items():
    if "skipped" in column or "error" in column: print(f"{name}: {column.get('skipped') or column.get('error')}")
  if args.json: write_json(args.json, result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
