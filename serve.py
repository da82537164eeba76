"""An OpenAI-compatible server: `python serve.py` serves the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000.

    python serve.py --model path/to/model.gguf --port 8080 --api-key secret
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi!"}], "stream": true}'

Flags follow vLLM's `vllm serve`. Open http://127.0.0.1:8000/ for a chat page. SIGTERM or Ctrl-C drains: new
requests get 503, those in flight finish (up to --drain-timeout), then the process exits 0.
"""
from __future__ import annotations
import argparse
import asyncio
import json
import os
from pathlib import Path
from tinyvllm.engine.speculative import SpeculativeConfig
from tinyvllm.engine_args import EngineArgs
from tinyvllm.llm import sampling_defaults
from tinyvllm.async_engine import AsyncLLMEngine
from tinyvllm.llm import create_engine
from tinyvllm.model.loader import DEFAULT_MODEL_FILE
from tinyvllm.sampling_params import MAX_N
from tinyvllm.server import OpenAIServer, ServerConfig, serve
from tinyvllm.server.logs import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  EngineArgs.add_cli_args(p)     # --model (default: the embedded SmolLM2), --max-model-len, --max-num-seqs, --block-size, ...
  p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--served-model-name", nargs="+",
                 help="name(s) clients use in 'model' (default: the model file's stem, e.g. SmolLM2-135M-Instruct)")
  p.add_argument("--api-key", default=os.environ.get("TINYVLLM_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1 (default: $TINYVLLM_API_KEY)")
  p.add_argument("--max-queue-size", type=int, help="requests that may wait beyond --max-num-seqs; more get 503")
  p.add_argument("--request-timeout", type=float, help="seconds before a request is aborted (default: none)")
  p.add_argument("--rate-limit", type=float, help="requests per second per client address (default: none)")
  p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on shutdown")
  p.add_argument("--max-n", type=int, default=MAX_N, help=f"most choices ('n', 'best_of') per prompt (at most {MAX_N})")
  p.add_argument("--engine-iteration-timeout", type=float, default=120.0,
                 help="seconds one engine step may run before the server reports a stall and fails the requests in flight")
  p.add_argument("--header-timeout", type=float, default=30.0,
                 help="seconds a connection may take to send a request's head (also the idle keep-alive limit)")
  p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client may take to send a request's body")
  for name in ("origins", "methods", "headers"):
    p.add_argument(f"--allowed-{name}", type=_names, default=["*"],
                   help=f"CORS: allowed {name}, as a JSON array or comma-separated (default: all)")
  p.add_argument("--root-path", default="", help="path prefix a reverse proxy puts in front of every route")
  p.add_argument("--ssl-keyfile", help="serve HTTPS with this private key (with --ssl-certfile)")
  p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate chain")
  p.add_argument("--log-format", choices=["text", "json"], default="text")
  args = p.parse_args(argv)
  if not 1 <= args.max_n <= MAX_N: p.error(f"--max-n must be in [1, {MAX_N}]")
  if bool(args.ssl_keyfile) != bool(args.ssl_certfile): p.error("--ssl-keyfile and --ssl-certfile go together")
  try: SpeculativeConfig.parse(args.speculative_config)         # before minutes of loading, not after
  except ValueError as e: p.error(f"--speculative-config: {e}")
  return args


def _names(text: str) -> list[str]:
  """vLLM's JSON array ('["https://a.example"]'), or the plainer comma-separated list."""
  names = json.loads(text) if text.lstrip().startswith("[") else text.split(",")
  return [str(n).strip() for n in names if str(n).strip()]


def served_model_names(args: argparse.Namespace) -> list[str]:
  """--served-model-name, else what a person would type: the model file's stem ("SmolLM2-135M-Instruct" for
  models/SmolLM2-135M-Instruct.Q8_0.gguf). The full --model path is accepted too."""
  if args.served_model_name: return args.served_model_name
  if not args.model: return [DEFAULT_MODEL_FILE.split(".")[0]]
  return list(dict.fromkeys([Path(args.model).name.split(".")[0], args.model]))


def server_config(args: argparse.Namespace) -> ServerConfig:
  max_num_seqs = EngineArgs.from_cli_args(args).sized_for_device().max_num_seqs
  max_in_flight = None if args.max_queue_size is None else max_num_seqs + args.max_queue_size
  return ServerConfig(served_model_names(args), args.api_key, max_in_flight, args.request_timeout, args.rate_limit,
                      args.max_n, args.engine_iteration_timeout, args.header_timeout, args.body_timeout,
                      args.allowed_origins, args.allowed_methods, args.allowed_headers, args.root_path,
                      args.ssl_keyfile, args.ssl_certfile, sampling_defaults(EngineArgs.from_cli_args(args)))


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  setup_logging(args.log_format)
  engine_args = EngineArgs.from_cli_args(args)
  server = OpenAIServer(server_config(args))
  asyncio.run(serve(server, args.host, args.port, lambda: AsyncLLMEngine(create_engine(engine_args)), args.drain_timeout))


if __name__ == "__main__":
  main()
