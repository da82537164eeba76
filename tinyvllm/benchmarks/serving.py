"""`serve`: an OpenAI-compatible server measured from outside, the way vLLM's `benchmark_serving` measures one.

Each request is a streamed POST /v1/completions (`"stream": true`, prompt as token ids, `ignore_eos`, and the
request's sampling fields: greedy, or a mix of temperature, top-p/top-k, logprobs and penalties). The client notes
when it sent the request and when every server-sent-events chunk that carries `choices` arrived; the `usage` chunk at
the end (`stream_options.include_usage`) gives the number of output tokens (without it, the number of chunks with
text: one token each on llama-server). A request that errs, or ends without a single chunk, is *failed*. Those
timestamps are all `metrics.py` needs.

Requests go out either all at once (`request_rate=inf`) or as a Poisson process of `request_rate` requests/s
(gamma-distributed gaps with `burstiness` ≠ 1), optionally capped at `max_concurrency` requests in flight:

    rate 2/s:      ──R1──────R2──R3─────────R4──R5──────►  (seeded, rescaled so the last one leaves at n / rate)
    concurrency 2: R3 waits until R1 or R2 finished

The server's own count of graphs it built (`tinyvllm:graph_builds_total` on GET /metrics, where it has one) is read
before and after the measured run: a server that compiles a graph for every new batch shape does so on the request
path, and the count says how often that happened while the client was timing it.

`launch_server` starts `python serve.py` (or llama-server, as a peer) on 127.0.0.1 and waits until GET /health/ready
(llama-server: /health) answers 200; any other server that speaks /v1/completions can be measured via `--base-url`.
"""
from __future__ import annotations
import asyncio
import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
import aiohttp
import numpy as np
from tinyvllm.benchmarks.metrics import RequestTiming, serving_metrics
from tinyvllm.benchmarks.report import Progress
from tinyvllm.benchmarks.workloads import Request, Workload
from tinyvllm.engine_args import EngineArgs

REPO_ROOT = Path(__file__).resolve().parents[2]


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
  """Seconds after the start at which each request is sent (vLLM's `get_request`, without ramp-up)."""
  if request_rate == float("inf"): return [0.0] * n
  gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
  offsets = np.cumsum(gaps)
  return (offsets * (n / request_rate) / offsets[-1]).tolist()


def _sse_data(line: bytes) -> dict | None:
  """The JSON of one `data: {...}` SSE line; None for blank lines, comments and `data: [DONE]`."""
  text = line.decode().strip()
  if not text.startswith("data:"): return None
  payload = text.removeprefix("data:").strip()
  return None if payload == "[DONE]" else json.loads(payload)


async def send_request(session: aiohttp.ClientSession, url: str, model: str | None, req: Request) -> RequestTiming:
  payload = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, **req.sampling,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
  timing = RequestTiming(time.perf_counter(), prompt_tokens=len(req.prompt_token_ids))
  try:
    async with session.post(url, json=payload) as response:
      if response.status != 200:
        return _failed(timing, f"HTTP {response.status}: {(await response.text())[:200]}")
      text_chunks = 0
      async for line in response.content:
        if (data := _sse_data(line)) is None: continue
        if choices := data.get("choices"):
          timing.chunk_times.append(time.perf_counter())
          text_chunks += bool(choices[0].get("text"))
        elif data.get("usage"): timing.output_tokens = data["usage"].get("completion_tokens", 0)
  except (aiohttp.ClientError, TimeoutError, ValueError) as e:
    return _failed(timing, f"{type(e).__name__}: {e}")
  if not timing.chunk_times: return _failed(timing, "the stream ended without a single chunk")
  timing.output_tokens = timing.output_tokens or text_chunks
  return timing


def _failed(timing: RequestTiming, error: str) -> RequestTiming:
  timing.success, timing.error = False, error
  return timing


async def _model_name(session: aiohttp.ClientSession, base_url: str) -> str | None:
  """The first model the server lists, as vLLM's benchmark asks; None if it lists none."""
  with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError, IndexError):
    async with session.get(f"{base_url}/v1/models") as response:
      return (await response.json())["data"][0]["id"]
  return None


async def run_serving(base_url: str, requests: list[Request], request_rate: float = float("inf"),
                      max_concurrency: int | None = None, burstiness: float = 1.0, seed: int = 0,
                      label: str = "serve") -> tuple[list[RequestTiming], float]:
  progress = Progress(len(requests), label)
  limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
  timeout = aiohttp.ClientTimeout(total=6 * 3600)
  # a connection per request: a server that drops idle keep-alive connections (llama-server) would otherwise fail
  # the request that tries to reuse one with ServerDisconnectedError
  connector = aiohttp.TCPConnector(limit=0, force_close=True)
  async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
    model, url = await _model_name(session, base_url), f"{base_url}/v1/completions"

    async def one(req: Request, offset: float) -> RequestTiming:
      await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
      async with limit: timing = await send_request(session, url, model, req)
      progress.update()
      return timing

    start = time.perf_counter()
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    timings = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    duration = time.perf_counter() - start
  progress.close()
  return list(timings), duration


GRAPH_BUILDS = "tinyvllm:graph_builds_total"


def prometheus_value(text: str, name: str) -> float | None:
  """The sum over label sets of metric `name` in a Prometheus text page; None when the page does not have it."""
  values = [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]
  return sum(values) if values else None


def scrape(base_url: str, name: str) -> float | None:
  """`name` from GET /metrics; None when the server has no such page or metric."""
  async def get() -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
      async with session.get(f"{base_url}/metrics") as response:
        return await response.text() if response.status == 200 else ""
  try: return prometheus_value(asyncio.run(get()), name)
  except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError): return None


def benchmark(base_url: str, make: Workload, warmup: int, **kwargs) -> dict:
  """`make(variant)` builds the workload; variants 1..`warmup` run first with the same settings, variant 0 is
  measured. Whether the warmups rehearse the measured shapes is up to `make`."""
  for i in range(warmup): asyncio.run(run_serving(base_url, make(i + 1), label=f"serve warmup {i + 1}", **kwargs))
  builds_before = scrape(base_url, GRAPH_BUILDS)
  timings, duration = asyncio.run(run_serving(base_url, make(0), **kwargs))
  builds_after = scrape(base_url, GRAPH_BUILDS)
  done = [t for t in timings if t.success]
  if done and all(len(t.chunk_times) == 1 < t.output_tokens for t in done):
    print("warning: the server sent each response in one chunk, so TTFT is the whole response and there is no ITL "
          "(a server without a tokenizer that streams only non-empty text does this)", file=sys.stderr)
  errors = sorted({t.error for t in timings if not t.success})
  for error in errors[:10]: print(f"failed request: {error}", file=sys.stderr)
  builds = {} if builds_before is None or builds_after is None else \
    {"graph_builds_before": builds_before, "graph_builds_after": builds_after,
     "graph_builds": builds_after - builds_before}
  return serving_metrics(timings, duration) | builds | {"errors": errors[:10]}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


async def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
  """Poll `url` until it answers 200; fail early if the server process exits."""
  deadline = time.monotonic() + timeout
  async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
    while time.monotonic() < deadline:
      if process.poll() is not None: raise RuntimeError(f"the server exited with code {process.returncode}")
      with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with session.get(url) as response:
          if response.status == 200: return
      await asyncio.sleep(0.5)
  raise TimeoutError(f"the server was not ready after {timeout:.0f}s")


@contextlib.contextmanager
def launch_server(command: list[str], port: int, ready_timeout: float = 600.0,
                  ready_path: str = "/health/ready") -> Iterator[str]:
  """Run `command` (a server listening on 127.0.0.1:`port`), yield its base URL once `ready_path` answers 200,
  stop it afterwards."""
  log = tempfile.NamedTemporaryFile("w+", prefix="bench-server-", suffix=".log", delete=False)
  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
  base_url = f"http://127.0.0.1:{port}"
  try:
    try: asyncio.run(wait_ready(base_url + ready_path, process, ready_timeout))
    except (RuntimeError, TimeoutError) as e:
      log.seek(0)
      raise RuntimeError(f"{e}; server log {log.name}:\n{log.read()[-3000:]}") from e
    yield base_url
  finally:
    process.terminate()
    try: process.wait(timeout=30)
    except subprocess.TimeoutExpired: process.kill()
    log.close()


def serve_command(engine_args: EngineArgs, port: int) -> list[str]:
  """`python serve.py` on 127.0.0.1:`port`, given every engine argument that differs from its default
  (`max_num_seqs=8` → --max-num-seqs 8, `enable_prefix_caching=False` → --no-enable-prefix-caching)."""
  flags = []
  for f in dataclasses.fields(EngineArgs):
    value, name = getattr(engine_args, f.name), f.name.replace("_", "-")
    if value == f.default: continue
    flags += [f"--{name}" if value else f"--no-{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
  return [sys.executable, "serve.py", "--host", "127.0.0.1", "--port", str(port), *flags]
