"""Peers: other engines run on the same machine, right after tinyvllm, on the same workload, as subprocesses.

  llama.cpp       `llama-bench -o json` for batch 1 (prompt processing pp and generation tg tokens/s) and
                  `llama-batched-bench` for N sequences at once; binaries from --llama-cpp-bin or $LLAMA_CPP_BIN
  tinygrad.llm    tinygrad's own batch-1 runner (tinygrad 0.13.0, in its own venv; --tinygrad-llm-python or
                  $TINYGRAD_LLM_PYTHON) via workers/tinygrad_llm_generate.py, which stamps every token
  transformers    `generate` with a static cache via workers/hf_generate.py, when torch and transformers import
  torch           (diffusion) Fast-dLLM's prefix-cache loop on a LLaDA-shaped torch network via
                  workers/torch_diffusion.py, random weights of the benchmark's --shape

Where a peer reports per-token timestamps (tinygrad.llm, transformers' batch 1) they go through the same
`metrics.py` as tinyvllm's. llama.cpp reports rates, mapped onto the same names:
  TTFT ≈ input_len / pp tokens/s       TPOT = 1 / tg tokens/s       decode_tok_s = tg tokens/s
  throughput: N sequences of input_len + output_len tokens took T seconds in total → N / T requests/s, ...
(llama-bench runs every test at depths 0 and input_len; pp is read at depth 0, tg at depth input_len, where
tinyvllm's decode happens too.)
A peer that cannot run here returns {"skipped": why}; one that fails returns {"error": what}.
"""
from __future__ import annotations
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from tinyvllm.benchmarks.metrics import RequestTiming, latency_metrics, throughput_metrics
from tinyvllm.benchmarks.workloads import Request

WORKERS = Path(__file__).parent / "workers"


class PeerUnavailable(Exception):
  """The peer cannot run on this machine (no binary, no venv, no torch, no GGUF); not an error of the peer."""


def _run(command: list[str], timeout: float, stdin: str | None = None) -> tuple[str, str]:
  """(stdout, stderr) of a command that must succeed."""
  done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout)
  if done.returncode != 0:
    raise RuntimeError(f"{Path(command[0]).name} exited with {done.returncode}: {done.stderr.strip()[-1500:]}")
  return done.stdout, done.stderr


def _worker(python: str, script: str, spec: dict, timeout: float) -> dict:
  stdout, _ = _run([python, str(WORKERS / script)], timeout, json.dumps(spec))
  return json.loads(stdout.strip().splitlines()[-1])


def measured(peer: Callable[..., dict], *args, **kwargs) -> dict:
  """Run one peer measurement; its metrics, or {"skipped"/"error": why} so one peer never sinks the others."""
  try: return peer(*args, **kwargs)
  except PeerUnavailable as e: return {"skipped": str(e)}
  except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
    return {"error": f"{type(e).__name__}: {e}"}


# ---- llama.cpp ------------------------------------------------------------------------------------------------
def llama_cpp_tool(bin_dir: str | None, name: str) -> Path:
  bin_dir = bin_dir or os.environ.get("LLAMA_CPP_BIN")
  if not bin_dir: raise PeerUnavailable("no llama.cpp binaries: pass --llama-cpp-bin DIR or set LLAMA_CPP_BIN")
  tool = Path(bin_dir) / name
  if not tool.exists(): raise PeerUnavailable(f"{tool} does not exist")
  return tool


def llama_bench_rates(entries: list[dict], input_len: int) -> tuple[float, float]:
  """(pp tokens/s, tg tokens/s) from `llama-bench -o json`, one entry per test: the prompt processed from an empty
  context (n_gen 0, n_depth 0), and tokens generated after the prompt (n_prompt 0, n_depth input_len)."""
  pp = next(e["avg_ts"] for e in entries if e["n_gen"] == 0 and e["n_depth"] == 0)
  tg = next(e["avg_ts"] for e in entries if e["n_prompt"] == 0 and e["n_depth"] == input_len)
  return pp, tg


def llama_cpp_latency(bin_dir: str | None, gguf: Path, input_len: int, output_len: int, threads: int,
                      repetitions: int = 3, timeout: float = 900) -> dict:
  command = [str(llama_cpp_tool(bin_dir, "llama-bench")), "-m", str(gguf), "-p", str(input_len), "-n",
             str(output_len), "-d", f"0,{input_len}", "-t", str(threads), "-r", str(repetitions), "-o", "json"]
  pp, tg = llama_bench_rates(json.loads(_run(command, timeout)[0]), input_len)
  return {"ttft_ms": {"mean": 1000.0 * input_len / pp}, "tpot_ms": {"mean": 1000.0 / tg}, "prefill_tok_s": pp,
          "decode_tok_s": tg, "command": " ".join(command)}


def batched_bench_result(output: str) -> dict:
  """The one result line of `llama-batched-bench --output-format jsonl` (keys pp, tg, pl, t, speed, ...)."""
  return next(json.loads(line) for line in output.splitlines() if line.startswith("{") and '"pl"' in line)


def llama_cpp_throughput(bin_dir: str | None, gguf: Path, num_prompts: int, input_len: int, output_len: int,
                         threads: int, timeout: float = 1800) -> dict:
  context = num_prompts * (input_len + output_len) + 16
  command = [str(llama_cpp_tool(bin_dir, "llama-batched-bench")), "-m", str(gguf), "-c", str(context),
             "-npp", str(input_len), "-ntg", str(output_len), "-npl", str(num_prompts), "-t", str(threads),
             "-b", "2048", "-ub", "512", "--output-format", "jsonl"]
  result = batched_bench_result("\n".join(_run(command, timeout)))     # its log goes to stdout or stderr
  metrics = throughput_metrics(num_prompts, num_prompts * input_len, num_prompts * output_len, result["t"])
  return metrics | {"command": " ".join(command)}


# ---- tinygrad.llm ---------------------------------------------------------------------------------------------
def tinygrad_llm_latency(python: str | None, gguf: Path, requests: list[Request], warmup: list[Request],
                         timeout: float = 900) -> dict:
  python = python or os.environ.get("TINYGRAD_LLM_PYTHON")
  if not python: raise PeerUnavailable("no tinygrad.llm venv: pass --tinygrad-llm-python "
                                       "(../shared/peers/tinygrad-llm-venv.sh prints it) or set TINYGRAD_LLM_PYTHON")
  spec = {"gguf": str(gguf), "output_len": requests[0].output_len,
          "max_context": max(len(r.prompt_token_ids) + r.output_len for r in requests + warmup) + 8,
          "prompts": [r.prompt_token_ids for r in requests], "warmup": [r.prompt_token_ids for r in warmup]}
  timings = [RequestTiming(**t) for t in _worker(python, "tinygrad_llm_generate.py", spec, timeout)["timings"]]
  return latency_metrics(timings) | {"python": python}


# ---- Hugging Face transformers ----------------------------------------------------------------------------------
def _hf_spec(model: dict) -> dict:
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    raise PeerUnavailable("torch and transformers are not installed in this python")
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return {"device": device, "dtype": "float16" if device == "cuda" else "float32", **model}


def hf_latency(model: dict, requests: list[Request], warmup: list[Request], timeout: float = 1800) -> dict:
  """`model`: {"config": HF config dict} for random weights, or {"model": path}."""
  spec = _hf_spec(model) | {"mode": "latency", "output_len": requests[0].output_len,
                            "prompts": [r.prompt_token_ids for r in requests],
                            "warmup": [r.prompt_token_ids for r in warmup]}
  timings = [RequestTiming(**t) for t in _worker(sys.executable, "hf_generate.py", spec, timeout)["timings"]]
  return latency_metrics(timings) | {"device": spec["device"]}


def hf_throughput(model: dict, requests: list[Request], timeout: float = 1800) -> dict:
  spec = _hf_spec(model) | {"mode": "throughput", "prompts": [r.prompt_token_ids for r in requests],
                            "output_lens": [r.output_len for r in requests]}
  out = _worker(sys.executable, "hf_generate.py", spec, timeout)
  return throughput_metrics(out["num_requests"], out["prompt_tokens"], out["output_tokens"], out["duration"]) | \
    {"device": spec["device"]}


# ---- a diffusion LM's loop in plain torch ---------------------------------------------------------------------
def torch_diffusion(shape: dict, prompts: list[list[int]], gen_length: int, block_length: int, steps: int | None,
                    timeout: float = 1800) -> dict:
  """Speed of Fast-dLLM's prefix-cache loop, with the columns `bench_diffusion` reports."""
  if importlib.util.find_spec("torch") is None: raise PeerUnavailable("torch is not installed in this python")
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  spec = {"config": shape, "prompts": prompts, "gen_length": gen_length, "block_length": block_length,
          "steps": steps or gen_length, "mask_id": shape["mask_token_id"], "device": device,
          "dtype": "float16" if device == "cuda" else "float32"}
  out = _worker(sys.executable, "torch_diffusion.py", spec, timeout)
  n, passes = out["output_tokens"], out["forward_passes"]
  return {"tokens_per_s": n / out["duration"], "model_calls_per_token": passes * out["num_requests"] / n,
          "batched_forwards": passes, "step_ms": 1000 * out["duration"] / passes, "seconds": out["duration"],
          "tokens": n, "device": device}
