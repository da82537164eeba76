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
import os
from tinyvllm.config import EngineArgs
from tinyvllm.engine import AsyncLLMEngine
from tinyvllm.llm import create_engine
from tinyvllm.model.loader import DEFAULT_MODEL_FILE
from tinyvllm.server import OpenAIServer, ServerConfig, serve
from tinyvllm.server.logs import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  EngineArgs.add_cli_args(p)     # --model (default: the embedded SmolLM2), --max-model-len, --max-num-seqs, --block-size, ...
  p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--served-model-name", nargs="+", help="name(s) clients use in 'model' (default: --model)")
  p.add_argument("--api-key", default=os.environ.get("TINYVLLM_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1 (default: $TINYVLLM_API_KEY)")
  p.add_argument("--max-queue-size", type=int, help="requests that may wait beyond --max-num-seqs; more get 503")
  p.add_argument("--request-timeout", type=float, help="seconds before a request is aborted (default: none)")
  p.add_argument("--rate-limit", type=float, help="requests per second per client address (default: none)")
  p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on shutdown")
  p.add_argument("--log-format", choices=["text", "json"], default="text")
  return p.parse_args(argv)


def server_config(args: argparse.Namespace) -> ServerConfig:
  names = args.served_model_name or [args.model or DEFAULT_MODEL_FILE.split(".")[0]]
  max_in_flight = None if args.max_queue_size is None else args.max_num_seqs + args.max_queue_size
  return ServerConfig(names, args.api_key, max_in_flight, args.request_timeout, args.rate_limit)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  setup_logging(args.log_format)
  engine_args = EngineArgs.from_cli_args(args)
  server = OpenAIServer(server_config(args))
  asyncio.run(serve(server, args.host, args.port, lambda: AsyncLLMEngine(create_engine(engine_args)), args.drain_timeout))


if __name__ == "__main__":
  main()
