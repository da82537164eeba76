"""The `bench.py` subcommands: measure tinyvllm, then each `--compare` peer, and return one result.

A result is what `--json` writes:
  {"benchmark", "options", "engine_args", "machine",
   "columns": {"tinyvllm": metrics, peer: metrics, ...}, "ratios": {"tinyvllm/peer": {metric: ratio}},
   "headline": [(label, metric path), ...]}          the rows of the printed table
Peers run after tinyvllm has released its memory, on the very requests tinyvllm ran (same seed, same token ids).
`serve` adds a column "offline": the same requests through the engine in this process, all submitted at once and
warmed up on their own shapes (what `throughput` measures), so tinyvllm/offline is what serving them costs.
"""
from __future__ import annotations
import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from tinygrad import Device
from tinyvllm.benchmarks import offline, peers, serving
from tinyvllm.benchmarks.chat_decoding import bench_chat_decoding
from tinyvllm.benchmarks.diffusion import bench_diffusion, diffusion_prompts
from tinyvllm.benchmarks.report import Row, machine_info, ratios
from tinyvllm.benchmarks.workloads import Workload, chat_requests, random_requests, shared_prefix_requests, summary
from tinyvllm.engine_args import DIFFUSION_FIELDS, SHAPES, EngineArgs
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.llm import create_engine
from tinyvllm.formats.gguf import read_gguf_metadata
from tinyvllm.model.loader import resolve
from tinyvllm.sampling_params import SamplingParams, StructuredOutputsParams
from tinyvllm.tinygrad_internals import release_device_memory

PEERS = ("llama.cpp", "tinygrad.llm", "transformers", "torch")
TINYGRAD_LLM_TOKENS = 16     # tinygrad.llm decodes ~1.5 tok/s on a 2-core CPU: a short run is enough for its rate

LATENCY_ROWS: list[Row] = [("TTFT mean (ms)", "ttft_ms.mean"), ("TTFT p99 (ms)", "ttft_ms.p99"),
                           ("TPOT mean (ms)", "tpot_ms.mean"), ("TPOT p99 (ms)", "tpot_ms.p99"),
                           ("E2E latency mean (ms)", "e2el_ms.mean"), ("prefill tok/s", "prefill_tok_s"),
                           ("decode tok/s", "decode_tok_s")]
THROUGHPUT_ROWS: list[Row] = [("requests/s", "request_throughput"), ("output tok/s", "output_throughput"),
                              ("total tok/s", "total_token_throughput")]
SERVE_ROWS: list[Row] = [("completed", "completed"), ("failed", "failed"), *THROUGHPUT_ROWS,
                         *((f"{name} {stat} (ms)", f"{key}_ms.{stat}") for name, key in
                           (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2EL", "e2el"))
                           for stat in ("mean", "p50", "p90", "p99"))]
GRAPH_BUILD_ROWS: list[Row] = [("server ready (s)", "server_ready_s"), ("graphs built before", "graph_builds_before"),
                               ("graphs built after", "graph_builds_after"),
                               ("graphs built during the run", "graph_builds")]
SPECULATIVE_ROWS: list[Row] = [("draft acceptance rate", "speculative.acceptance_rate"),
                               ("mean accepted length", "speculative.mean_accepted_length")]
PREFIX_ROWS: list[Row] = [(f"{workload} {label}", f"{workload}.{path}") for workload in ("shared_prefix", "chat")
                          for label, path in (*THROUGHPUT_ROWS[:2], ("TTFT mean (ms)", "ttft_ms.mean"),
                                              ("prefix cache hit rate", "prefix_cache_hit_rate"))]


def _result(name: str, args: argparse.Namespace, engine_args: EngineArgs, columns: dict, rows: list[Row]) -> dict:
  engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
  options = {k: str(v) if v == float("inf") else v for k, v in vars(args).items()
             if k not in engine_fields and k != "func"}      # JSON has no Infinity
  return {"benchmark": name, "options": options, "engine_args": dataclasses.asdict(engine_args),
          "machine": machine_info(engine_args.device or Device.DEFAULT), "columns": columns,
          "ratios": ratios(columns, rows), "headline": rows}


def _measure_tinyvllm(engine_args: EngineArgs, measure: Callable[[LLMEngine], dict]) -> dict:
  """`measure(engine)` on a fresh engine, warmed up as a server warms up before it is ready (every graph a step can
  need captured), and dropped afterwards: the peers need its memory."""
  t0 = time.perf_counter()
  engine = create_engine(engine_args)
  loaded = time.perf_counter()
  if hasattr(engine, "warmup"): engine.warmup()
  startup = {"load_s": loaded - t0, "graph_capture_s": time.perf_counter() - loaded,
             "graphs": engine.stats().graph_builds}
  metrics = measure(engine)
  metrics["startup"] = startup
  if getattr(engine, "speculative", None): metrics["speculative"] = speculative_metrics(engine.stats())
  del engine
  release_device_memory(engine_args.device or Device.DEFAULT)
  return metrics


def speculative_metrics(stats) -> dict:
  """Drafts over the whole run (warm-up included): vLLM's acceptance rate (accepted / checked) and mean accepted
  length (tokens a step commits per sequence that checked drafts: the accepted ones plus the one it samples)."""
  return {"draft_tokens": stats.spec_draft_tokens, "accepted_tokens": stats.spec_accepted_tokens,
          "acceptance_rate": stats.spec_accepted_tokens / max(1, stats.spec_draft_tokens),
          "mean_accepted_length": 1 + stats.spec_accepted_tokens / max(1, stats.spec_drafts),
          "accepted_per_position": list(stats.spec_accepted_per_position)}


def _gguf(engine_args: EngineArgs) -> Path:
  if engine_args.load_format == "dummy": raise peers.PeerUnavailable("needs a GGUF file, not --load-format dummy")
  path = resolve(engine_args.model)
  if path.suffix != ".gguf": raise peers.PeerUnavailable(f"needs a GGUF file; {path} is not one")
  return path


def _hf_model(engine_args: EngineArgs) -> dict:
  if engine_args.load_format == "dummy":
    return {"config": {"architectures": ["LlamaForCausalLM"],
                       **{k: v for k, v in SHAPES[engine_args.shape].items() if k not in DIFFUSION_FIELDS}}}
  return {"model": str(resolve(engine_args.model))}


def vocab_size(engine_args: EngineArgs) -> int:
  """The model's vocabulary size without loading it (the `serve` client needs it for random prompts)."""
  if engine_args.load_format == "dummy": return SHAPES[engine_args.shape]["vocab_size"]
  path = resolve(engine_args.model)
  if path.is_file(): return len(read_gguf_metadata(path)["tokenizer.ggml.tokens"])
  return json.loads((path / "config.json").read_text())["vocab_size"]


def workload_len(args: argparse.Namespace) -> int | None:
  """The longest sequence (prompt + output tokens) the subcommand's workload makes: the default max_model_len, so
  a model with a 128k context does not need a KV pool for 128k tokens to run a benchmark of 200."""
  if args.benchmark == "diffusion":       # the shipped model's text prompts are short; random ones are input_len
    return args.input_len + args.gen_length if args.load_format == "dummy" else None
  if args.benchmark == "chat-decoding": return None      # each decoder's engine is sized by the prompts
  if args.benchmark == "prefix": return args.prefix_len + args.turns * (args.question_len + args.output_len)
  stretch = 1 + getattr(args, "random_range_ratio", 0.0)
  return getattr(args, "random_prefix_len", 0) + int(args.input_len * stretch) + int(args.output_len * stretch) + 1


def _peer_columns(args: argparse.Namespace, measurements: dict[str, Callable[[], dict]]) -> dict[str, dict]:
  """Run the requested peers that this benchmark knows how to measure, in `--compare` order."""
  columns = {}
  for name in args.compare:
    columns[name] = peers.measured(measurements[name]) if name in measurements else \
      {"skipped": f"{name} has no {args.benchmark} benchmark here"}
  return columns


def latency(args: argparse.Namespace, engine_args: EngineArgs) -> dict:
  vocab = vocab_size(engine_args)
  requests = lambda n, out, variant: random_requests(n, args.input_len, out, vocab, args.seed, variant=variant)
  measured, warmup = requests(args.num_iters, args.output_len, 0), requests(args.warmup, args.output_len, 1)
  ours = _measure_tinyvllm(engine_args, lambda engine: offline.latency(engine, measured, warmup))
  theirs = _peer_columns(args, {
    "llama.cpp": lambda: peers.llama_cpp_latency(args.llama_cpp_bin, _gguf(engine_args), args.input_len,
                                                 args.output_len, args.threads, timeout=args.peer_timeout),
    "tinygrad.llm": lambda: peers.tinygrad_llm_latency(args.tinygrad_llm_python, _gguf(engine_args),
                                                       requests(1, TINYGRAD_LLM_TOKENS, 0), requests(1, 3, 1),
                                                       args.peer_timeout),
    "transformers": lambda: peers.hf_latency(_hf_model(engine_args), measured, warmup, args.peer_timeout),
  })
  return _result("latency", args, engine_args, {"tinyvllm": ours, **theirs},
                 LATENCY_ROWS + (SPECULATIVE_ROWS if "speculative" in ours else []))


def _random_workload(args: argparse.Namespace, vocab: int, seed: int | None = None) -> Workload:
  return lambda variant: random_requests(args.num_prompts, args.input_len, args.output_len, vocab,
                                         args.seed if seed is None else seed, args.random_range_ratio, variant,
                                         args.random_prefix_len, args.sampling_mix)


def _serving_workload(args: argparse.Namespace, vocab: int) -> Workload:
  """The measured requests as variant 0; warmups are other traffic from the same distribution (their own lengths
  and sampling), not a rehearsal of the measured shapes: a server that compiles a graph per new shape on the
  request path then pays for it in the measured run, as it would in service."""
  measured = _random_workload(args, vocab)
  return lambda variant: measured(0) if variant == 0 else _random_workload(args, vocab, args.seed + variant)(variant)


def _offline_throughput(args: argparse.Namespace, engine_args: EngineArgs, make: Workload) -> dict:
  return _measure_tinyvllm(engine_args, lambda engine: offline.throughput(engine, make, args.warmup))


def throughput(args: argparse.Namespace, engine_args: EngineArgs) -> dict:
  make = _random_workload(args, vocab_size(engine_args))
  ours = _offline_throughput(args, engine_args, make)
  theirs = _peer_columns(args, {
    "llama.cpp": lambda: peers.llama_cpp_throughput(args.llama_cpp_bin, _gguf(engine_args), args.num_prompts,
                                                    args.input_len, args.output_len, args.threads,
                                                    args.peer_timeout),
    "transformers": lambda: peers.hf_throughput(_hf_model(engine_args), make(0), args.peer_timeout),
  })
  return _result("throughput", args, engine_args, {"tinyvllm": ours, **theirs},
                 THROUGHPUT_ROWS + (SPECULATIVE_ROWS if "speculative" in ours else []))


def _serve_against(base_url: str, args: argparse.Namespace, vocab: int) -> dict:
  return serving.benchmark(base_url, _serving_workload(args, vocab), args.warmup, request_rate=args.request_rate,
                           max_concurrency=args.max_concurrency, burstiness=args.burstiness, seed=args.seed)


def serve(args: argparse.Namespace, engine_args: EngineArgs) -> dict:
  vocab = vocab_size(engine_args)
  if args.base_url: ours = _serve_against(args.base_url.rstrip("/"), args, vocab)
  else:
    port, t0 = serving.free_port(), time.perf_counter()
    with serving.launch_server(serving.serve_command(engine_args, port), port, args.ready_timeout) as url:
      ours = {"server_ready_s": time.perf_counter() - t0} | _serve_against(url, args, vocab)   # load + captures
  # a server at --base-url may run other engine arguments, and holds the memory an engine here would need
  same_offline = {"skipped": "the server at --base-url is not this process's engine"} if args.base_url else \
    {"skipped": "--no-offline"} if not args.offline else \
    _offline_throughput(args, engine_args, _random_workload(args, vocab))
  theirs = _peer_columns(args, {"llama.cpp": lambda: _serve_llama_server(args, engine_args, vocab)})
  rows = SERVE_ROWS + [row for row in GRAPH_BUILD_ROWS if row[1] in ours]
  result = _result("serve", args, engine_args, {"tinyvllm": ours, "offline": same_offline, **theirs}, rows)
  return result | {"workload": summary(_random_workload(args, vocab)(0))}


def _serve_llama_server(args: argparse.Namespace, engine_args: EngineArgs, vocab: int) -> dict:
  """The same client against llama.cpp's OpenAI-compatible server, one slot per concurrent request."""
  slots = args.max_concurrency or args.num_prompts
  port, server = serving.free_port(), peers.llama_cpp_tool(args.llama_cpp_bin, "llama-server")
  command = [str(server), "-m", str(_gguf(engine_args)), "--host", "127.0.0.1", "--port", str(port),
             "-t", str(args.threads), "-np", str(slots), "-c", str(slots * workload_len(args))]
  with serving.launch_server(command, port, args.ready_timeout, ready_path="/health") as url:
    return _serve_against(url, args, vocab) | {"command": " ".join(command)}


def prefix(args: argparse.Namespace, engine_args: EngineArgs) -> dict:
  vocab = vocab_size(engine_args)
  shared = lambda variant: shared_prefix_requests(args.num_prompts, args.prefix_len, args.question_len,
                                                  args.output_len, vocab, args.seed, variant)
  chat = lambda variant: chat_requests(args.num_conversations, args.turns, args.prefix_len, args.question_len,
                                       args.output_len, vocab, args.seed, variant)
  columns = offline.prefix(engine_args, {"shared_prefix": shared, "chat": chat}, args.warmup)
  return _result("prefix", args, engine_args, columns, PREFIX_ROWS)


# the baseline, what a chat client usually sends, and every knob a request can turn on at once: temperature, the
# three filters, the three penalties, bias, logprobs
SAMPLING_CONFIGS = {"greedy": SamplingParams(temperature=0),
                    "chat": SamplingParams(temperature=0.7, top_p=0.9),
                    "all_knobs": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=0.5,
                                                frequency_penalty=0.5, repetition_penalty=1.1, logit_bias={0: -5.0},
                                                logprobs=5, seed=0)}


# "chat" constrained to a JSON object with one free string (it stays inside the string): what a grammar's mask costs,
# computed on the host every step (such steps also lose async scheduling's overlap). Needs a tokenizer: real weights.
STRUCTURED_CONFIG = {"json": SamplingParams(temperature=0.7, top_p=0.9, structured_outputs=StructuredOutputsParams(
  json={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}))}


def sampling(args: argparse.Namespace, engine_args: EngineArgs) -> dict:
  if engine_args.data_parallel_size > 1: raise ValueError("sampling times one engine's steps: use data_parallel_size 1")
  vocab = vocab_size(engine_args)
  configs = {**SAMPLING_CONFIGS, **(STRUCTURED_CONFIG if engine_args.load_format != "dummy" else {})}
  def measure(engine: LLMEngine) -> dict:
    return {f"batch {n}": offline.sampling(engine, lambda variant: random_requests(
              n, args.input_len, args.output_len, vocab, args.seed, variant=variant), args.warmup, configs)
            for n in args.batch_sizes}
  per_config = [(f"{c} step (ms)", f"step_ms.{c}") for c in configs] + \
    [row for c in list(configs)[1:] for row in ((f"{c} overhead (ms)", f"{c}_overhead_ms"),
                                                 (f"{c} share of the step", f"{c}_overhead_share"))]
  rows = [(f"batch {n} {label}", f"batch {n}.{path}") for n in args.batch_sizes for label, path in per_config]
  return _result("sampling", args, engine_args, {"tinyvllm": _measure_tinyvllm(engine_args, measure)}, rows)


DIFFUSION_ROWS: list[Row] = [("output tok/s", "tokens_per_s"), ("model calls per token", "model_calls_per_token"),
                             ("batched forward passes", "batched_forwards"), ("ms per step", "step_ms"),
                             ("tokens equal to llada's", "agreement_with_llada"),
                             ("log-likelihood per token", "log_likelihood_per_token")]


def diffusion(args: argparse.Namespace, engine_args: EngineArgs) -> dict:
  """LLaDA (one token per step), Fast-dLLM threshold decoding, threshold + prefix cache: one column each."""
  engine_args = dataclasses.replace(engine_args, model=engine_args.model or "llada")   # default: the Django model
  prompts = diffusion_prompts(engine_args, args.num_prompts, args.input_len, args.seed)
  columns = bench_diffusion(engine_args, prompts, args.gen_length, args.block_length, args.threshold, args.warmup,
                            tuple(args.modes), args.diffusion_steps)
  theirs = _peer_columns(args, {"torch": lambda: peers.torch_diffusion(
    _diffusion_shape(engine_args), prompts, args.gen_length, args.block_length, args.diffusion_steps,
    args.peer_timeout)})
  return _result("diffusion", args, engine_args, {**columns, **theirs}, DIFFUSION_ROWS)


def _diffusion_shape(engine_args: EngineArgs) -> dict:
  if engine_args.load_format != "dummy":
    raise peers.PeerUnavailable("the torch loop runs random weights of a shape: pass --load-format dummy --shape S")
  return SHAPES[engine_args.shape]


CHAT_DECODING_ROWS: list[Row] = [("output tok/s (batch 1)", "tokens_per_s"), ("speed vs ar", "speed_vs_ar"),
                                 ("SmolLM2 log-likelihood per token", "smollm2_log_likelihood_per_token"),
                                 ("quality drop vs ar (nats)", "quality_drop_vs_ar"),
                                 ("SmolLM2 tokens per forward", "ar_tokens_per_forward"),
                                 ("diffusion LM tokens per forward", "diffusion_tokens_per_forward"),
                                 ("APD mean accepted length", "mean_accepted_length")]


def chat_decoding(args: argparse.Namespace, engine_args: EngineArgs) -> dict:
  """SmolLM2, its diffusion LM alone (one token a step, thresholds) and APD on the chat prompts (chat_decoding.py)."""
  columns, samples = bench_chat_decoding(args.num_prompts, args.max_tokens, args.block_length, args.thresholds,
                                         args.apd_tokens, args.mixture_weights)
  result = _result("chat-decoding", args, engine_args, columns, CHAT_DECODING_ROWS)
  return result | {"answers": samples}
