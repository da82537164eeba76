"""Tests for bench.py and tinyvllm.benchmarks: the metric definitions on made-up timestamps, the workloads, the
streaming client against a fake server with known chunks, the peers' output parsers, and a smoke run of every
subcommand on a tiny random model."""
from __future__ import annotations
import asyncio
import contextlib
import json
import shutil
import sys
import threading
from pathlib import Path
import numpy as np
import pytest
from aiohttp import web
from tinyvllm.benchmarks import commands, peers, serving
from tinyvllm.benchmarks.metrics import RequestTiming, distribution, latency_metrics, serving_metrics
from tinyvllm.benchmarks.report import describe_workload, lookup, ratios, table
from tinyvllm.benchmarks.workloads import chat_requests, random_requests, shared_prefix_requests, summary
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine_args import SHAPES, EngineArgs

REPO = Path(__file__).resolve().parents[2]


# ---- metrics: vLLM's definitions on timestamps we choose ----------------------------------------------------------
def timings() -> list[RequestTiming]:
  return [
    RequestTiming(start=0.0, chunk_times=[0.5, 0.6, 0.8, 1.1], prompt_tokens=10, output_tokens=4),
    RequestTiming(start=1.0, chunk_times=[1.2, 1.6], prompt_tokens=20, output_tokens=5),   # 2 chunks, 5 tokens
    RequestTiming(start=2.0, chunk_times=[2.3], prompt_tokens=5, output_tokens=1),         # no TPOT
    RequestTiming(start=2.5, prompt_tokens=7, success=False, error="HTTP 500"),
  ]


def test_per_request_definitions():
  a, b, c, _ = timings()
  assert a.ttft == pytest.approx(0.5) and a.e2el == pytest.approx(1.1)
  assert a.itls == pytest.approx([0.1, 0.2, 0.3])
  assert a.tpot == pytest.approx((1.1 - 0.5) / 3)           # (E2EL − TTFT) / (output tokens − 1)
  assert b.tpot == pytest.approx(0.4 / 4) and b.itls == pytest.approx([0.4])   # TPOT counts tokens, ITL chunks
  assert c.tpot is None and c.itls == []


def test_serving_metrics():
  m = serving_metrics(timings(), duration=4.0)
  assert (m["completed"], m["failed"]) == (3, 1)
  assert (m["total_input_tokens"], m["total_output_tokens"]) == (35, 10)     # failed requests count nowhere
  assert m["request_throughput"] == pytest.approx(3 / 4)
  assert m["output_throughput"] == pytest.approx(10 / 4)
  assert m["total_token_throughput"] == pytest.approx(45 / 4)
  assert m["ttft_ms"]["mean"] == pytest.approx(1000 / 3)                       # (500 + 200 + 300) / 3
  assert m["ttft_ms"]["median"] == m["ttft_ms"]["p50"] == pytest.approx(300)
  assert m["ttft_ms"]["p99"] == pytest.approx(300 + 0.98 * 200)               # linear between closest ranks
  assert m["tpot_ms"]["mean"] == pytest.approx(150)                            # (200 + 100) / 2, c has none
  assert m["itl_ms"]["mean"] == pytest.approx(250)                             # pooled gaps 100, 200, 300, 400
  assert m["itl_ms"]["p90"] == pytest.approx(370)
  assert m["e2el_ms"]["mean"] == pytest.approx((1100 + 600 + 300) / 3)
  assert m["prefix_cache_hit_rate"] == 0.0


def test_empty_distribution_reads_zero():
  assert distribution([]) == {"mean": 0.0, "median": 0.0, "std": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_latency_metrics():
  runs = [RequestTiming(0.0, [0.2, 0.3, 0.4], 8, 3), RequestTiming(1.0, [1.4, 1.5, 1.6], 8, 3)]
  m = latency_metrics(runs)
  assert m["ttft_ms"]["mean"] == pytest.approx(300) and m["tpot_ms"]["mean"] == pytest.approx(100)
  assert m["decode_tok_s"] == pytest.approx(10) and m["prefill_tok_s"] == pytest.approx(8 / 0.3)


# ---- workloads ---------------------------------------------------------------------------------------------------
def test_random_requests_are_seeded_and_variants_share_lengths():
  a = random_requests(16, 100, 20, 1000, seed=3, range_ratio=0.5)
  assert a == random_requests(16, 100, 20, 1000, seed=3, range_ratio=0.5)
  assert all(50 <= len(r.prompt_token_ids) <= 150 and 10 <= r.output_len <= 30 for r in a)
  assert all(0 <= t < 1000 for r in a for t in r.prompt_token_ids)
  b = random_requests(16, 100, 20, 1000, seed=3, range_ratio=0.5, variant=1)
  assert [len(r.prompt_token_ids) for r in a] == [len(r.prompt_token_ids) for r in b]
  assert [r.output_len for r in a] == [r.output_len for r in b]
  assert a[0].prompt_token_ids != b[0].prompt_token_ids


def test_random_requests_with_prefix_and_mixed_sampling():
  a = random_requests(200, 40, 30, 1000, seed=5, range_ratio=0.5, prefix_len=16, sampling="mixed")
  assert a == random_requests(200, 40, 30, 1000, seed=5, range_ratio=0.5, prefix_len=16, sampling="mixed")
  assert a != random_requests(200, 40, 30, 1000, seed=6, range_ratio=0.5, prefix_len=16, sampling="mixed")
  assert all(16 + 20 <= len(r.prompt_token_ids) <= 16 + 60 and 15 <= r.output_len <= 45 for r in a)
  assert len({tuple(r.prompt_token_ids[:16]) for r in a}) == 1
  assert len({len(r.prompt_token_ids) for r in a}) > 10 and len({r.output_len for r in a}) > 10
  for r in a: SamplingParams(max_tokens=r.output_len, **r.sampling)       # every mix is a valid request
  s = summary(a)
  assert 70 <= s["greedy"] <= 130 and s["top_p"] and s["top_k"] and s["frequency_penalty"] and s["logprobs"]
  assert all(1 <= r.sampling["logprobs"] <= 5 for r in a if "logprobs" in r.sampling)
  assert all("seed" in r.sampling for r in a if r.sampling["temperature"] > 0)
  assert s["prompt_len"]["min"] >= 36 and "200 requests" in describe_workload(s)
  greedy = random_requests(200, 40, 30, 1000, seed=5, range_ratio=0.5, sampling="greedy")   # same lengths
  assert all(r.sampling == {"temperature": 0.0} for r in greedy)
  assert [r.output_len for r in greedy] == [r.output_len for r in a]


def test_shared_prefix_and_chat():
  shared = shared_prefix_requests(4, 32, 8, 5, 1000)
  assert len({tuple(r.prompt_token_ids[:32]) for r in shared}) == 1
  assert len({tuple(r.prompt_token_ids[32:]) for r in shared}) == 4
  first = chat_requests(2, 3, 16, 4, 2, 1000)[0]
  second = first.follow_up([7, 7])
  assert second.prompt_token_ids[:20] == first.prompt_token_ids and second.prompt_token_ids[20:22] == [7, 7]
  assert len(second.prompt_token_ids) == 26 and second.follow_up([1, 1]).follow_up([2, 2]) is None


def test_arrival_offsets():
  assert serving.arrival_offsets(5, float("inf")) == [0.0] * 5
  offsets = serving.arrival_offsets(10, 4.0, seed=1)
  assert offsets == sorted(offsets) and offsets[-1] == pytest.approx(10 / 4.0)
  assert offsets == serving.arrival_offsets(10, 4.0, seed=1) != serving.arrival_offsets(10, 4.0, seed=2)
  for burstiness in (1.0, 0.25):        # gamma gaps: mean 1/rate for any shape, coefficient of variation 1/√shape
    gaps = np.diff([0.0, *serving.arrival_offsets(4000, 8.0, burstiness, seed=0)])
    assert gaps.mean() == pytest.approx(1 / 8.0) and gaps.std() / gaps.mean() == pytest.approx(burstiness ** -0.5, 0.1)


def test_serve_defaults_and_warmups_that_do_not_rehearse(bench):
  args = bench.build_parser().parse_args(["serve", "--num-prompts", "32"])
  assert (args.random_range_ratio, args.sampling_mix, args.request_rate) == (0.5, "mixed", float("inf"))
  make = commands._serving_workload(args, 1000)
  measured, warmup = make(0), make(1)
  assert measured == random_requests(32, 128, 128, 1000, args.seed, 0.5, sampling="mixed")   # what offline runs
  assert [r.output_len for r in warmup] != [r.output_len for r in measured]   # other shapes: no rehearsal


def test_prometheus_value():
  page = "# HELP tinyvllm:graph_builds_total Graphs.\n# TYPE tinyvllm:graph_builds_total counter\n" \
         'tinyvllm:graph_builds_total{model_name="m",kind="decode"} 3\n' \
         'tinyvllm:graph_builds_total{kind="prefill"} 4.0\n' \
         "tinyvllm:graph_builds_totalx 9\nvllm:num_requests_running 1\n"
  assert serving.prometheus_value(page, serving.GRAPH_BUILDS) == 7.0
  assert serving.prometheus_value(page, "vllm:num_requests_running") == 1.0
  assert serving.prometheus_value(page, "vllm:missing") is None


# ---- report ------------------------------------------------------------------------------------------------------
def test_table_and_ratios():
  columns = {"tinyvllm": {"decode_tok_s": 40.0, "ttft_ms": {"mean": 50.0}},
             "llama.cpp": {"decode_tok_s": 80.0}, "tinygrad.llm": {"skipped": "no venv"}}
  rows = [("decode tok/s", "decode_tok_s"), ("TTFT mean (ms)", "ttft_ms.mean")]
  assert lookup(columns["tinyvllm"], "ttft_ms.mean") == 50.0 and lookup(columns["llama.cpp"], "ttft_ms.mean") is None
  assert ratios(columns, rows) == {"tinyvllm/llama.cpp": {"decode_tok_s": 0.5}, "tinyvllm/tinygrad.llm": {}}
  text = table("latency", rows, columns)
  assert "tinyvllm/llama.cpp" in text and "0.5" in text.splitlines()[2]


# ---- peers: parsing their output -----------------------------------------------------------------------------------
def test_llama_cpp_parsers():
  bench_json = [{"n_prompt": p, "n_gen": g, "n_depth": d, "avg_ts": ts} for p, g, d, ts in
                ((128, 0, 0, 640.0), (128, 0, 128, 600.0), (0, 32, 0, 90.0), (0, 32, 128, 80.0))]
  assert peers.llama_bench_rates(bench_json, 128) == (640.0, 80.0)     # prompt from empty, decode after it
  stdout = "main: n_kv_max = 4096\n" + json.dumps({"pp": 128, "tg": 32, "pl": 8, "n_kv": 1280, "t": 4.0}) + "\n"
  assert peers.batched_bench_result(stdout)["t"] == 4.0


def test_unavailable_peer_is_skipped(monkeypatch):
  monkeypatch.delenv("LLAMA_CPP_BIN", raising=False)
  result = peers.measured(peers.llama_cpp_tool, None, "llama-bench")
  assert "skipped" in result and "--llama-cpp-bin" in result["skipped"]


def test_serve_command_passes_non_default_engine_args():
  command = serving.serve_command(EngineArgs(load_format="dummy", enable_prefix_caching=False), 8123)
  assert command[1:] == ["serve.py", "--host", "127.0.0.1", "--port", "8123", "--load-format", "dummy",
                         "--no-enable-prefix-caching"]


# ---- the streaming client against a fake server with known chunks --------------------------------------------------
FAIL_TOKEN, NO_USAGE_TOKEN, CHUNK_DELAY, TOKENS_PER_CHUNK = 13, 14, 0.02, 2


async def fake_completions(request: web.Request) -> web.StreamResponse:
  """/v1/completions streaming `max_tokens` tokens, 2 per chunk, one chunk every 20 ms, then a chunk that only
  says why it stopped, and the usage; prompts starting with token 13 get a 500, with token 14 no usage chunk."""
  body = await request.json()
  if body["prompt"][0] == FAIL_TOKEN: return web.Response(status=500, text="boom")
  response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
  await response.prepare(request)
  send = lambda data: response.write(f"data: {json.dumps(data)}\n\n".encode())
  for _ in range(body["max_tokens"] // TOKENS_PER_CHUNK):
    await asyncio.sleep(CHUNK_DELAY)
    await send({"choices": [{"index": 0, "text": "ab", "finish_reason": None}]})
  await send({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
  if body["prompt"][0] != NO_USAGE_TOKEN:
    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
    await send({"choices": [], "usage": usage})
  await response.write(b"data: [DONE]\n\n")
  return response


async def fake_models(_request: web.Request) -> web.Response: return web.json_response({"data": [{"id": "fake"}]})


@contextlib.contextmanager
def fake_server():
  app = web.Application()
  app.router.add_post("/v1/completions", fake_completions)
  app.router.add_get("/v1/models", fake_models)
  loop, runner, port = asyncio.new_event_loop(), web.AppRunner(app), serving.free_port()
  loop.run_until_complete(runner.setup())
  loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
  thread = threading.Thread(target=loop.run_forever, daemon=True)
  thread.start()
  try: yield f"http://127.0.0.1:{port}"
  finally:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.run_until_complete(runner.cleanup())


def test_streaming_client_against_fake_server():
  requests = random_requests(6, 8, 8, 1000, seed=0)
  requests[2].prompt_token_ids[0], requests[3].prompt_token_ids[0] = FAIL_TOKEN, NO_USAGE_TOKEN
  with fake_server() as url:
    timings, duration = asyncio.run(serving.run_serving(url, requests, request_rate=50.0, max_concurrency=3))
  m = serving_metrics(timings, duration)
  assert (m["completed"], m["failed"]) == (5, 1) and "500" in timings[2].error
  assert all(len(t.chunk_times) == 5 for t in timings if t.success)     # 4 with text + the finish_reason one
  assert [t.output_tokens for t in timings] == [8, 8, 0, 4, 8, 8]       # usage; without it, chunks with text
  assert m["ttft_ms"]["mean"] >= 1000 * CHUNK_DELAY
  assert 1000 * CHUNK_DELAY * 0.9 <= m["itl_ms"]["median"] < 1000 * CHUNK_DELAY * 5
  for t in (t for t in timings if t.output_tokens == 8):              # 4 gaps between chunks, 7 tokens after the 1st
    assert t.tpot == pytest.approx(sum(t.itls) / 7) and sum(t.itls) / len(t.itls) == pytest.approx(t.tpot * 7 / 4)


# ---- smoke: every subcommand on a tiny random model ----------------------------------------------------------------
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=256,
            rms_norm_eps=1e-5)
ENGINE = ["--load-format", "dummy", "--shape", "tiny", "--max-num-seqs", "4", "--num-kv-blocks", "64",
          "--warmup", "0"]


@pytest.fixture
def bench(monkeypatch):
  """bench.py (a script at the repo root, so not importable from everywhere) with the tiny shape registered."""
  monkeypatch.setitem(SHAPES, "tiny", TINY)
  monkeypatch.syspath_prepend(str(REPO))
  import bench as module
  return module


@pytest.mark.parametrize("argv", [
  ["latency", "--input-len", "8", "--output-len", "4", "--num-iters", "2", "--compare", "llama.cpp"],
  ["throughput", "--input-len", "8", "--output-len", "4", "--num-prompts", "4"],
  ["prefix", "--num-prompts", "2", "--prefix-len", "16", "--question-len", "4", "--output-len", "2",
   "--num-conversations", "2", "--turns", "2"],
  ["sampling", "--batch-sizes", "1", "2", "--input-len", "8", "--output-len", "3"],
])
def test_smoke(bench, argv, tmp_path, capsys):
  result = bench.main([*argv, *ENGINE, "--json", str(tmp_path / "out.json")])
  saved = json.loads((tmp_path / "out.json").read_text())
  assert saved["benchmark"] == argv[0] and saved["machine"]["cores"] >= 1
  first = next(iter(result["columns"].values()))
  assert all(lookup(first, path) is not None for _, path in result["headline"])
  assert f"bench {argv[0]}" in capsys.readouterr().out
  if "--compare" in argv: assert "skipped" in result["columns"]["llama.cpp"]


@pytest.mark.skipif(not (REPO / "serve.py").exists(), reason="serve.py is not there yet")
def test_smoke_serve(bench, monkeypatch, tmp_path, capsys):
  """`serve` starts `python serve.py --load-format dummy --shape tiny` and streams from it; the server process
  registers the tiny shape before serve.py runs."""
  shim = f"import runpy, sys; from tinyvllm.engine_args import SHAPES; SHAPES['tiny'] = {TINY!r}; " \
         "sys.argv = sys.argv[1:]; runpy.run_path('serve.py', run_name='__main__')"
  real_command = serving.serve_command
  monkeypatch.setattr(serving, "serve_command", lambda *a: [sys.executable, "-c", shim, *real_command(*a)[1:]])
  # greedy: on a CPU every new sampling configuration compiles kernels, which would take minutes here
  bench.main(["serve", "--load-format", "dummy", "--shape", "tiny", "--max-num-seqs", "4", "--warmup", "0",
              "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "4", "--random-prefix-len", "4",
              "--request-rate", "20", "--sampling-mix", "greedy", "--json", str(tmp_path / "out.json")])
  saved = json.loads((tmp_path / "out.json").read_text())
  serve, offline = saved["columns"]["tinyvllm"], saved["columns"]["offline"]
  workload = saved["workload"]
  assert (serve["completed"], serve["failed"]) == (offline["completed"], 0) == (4, 0)
  # the same requests both ways: varied lengths (range ratio 0.5 by default), forced to their length
  assert serve["total_output_tokens"] == offline["total_output_tokens"] == 4 * workload["output_len"]["mean"]
  assert serve["total_input_tokens"] == offline["total_input_tokens"] == 4 * workload["prompt_len"]["mean"]
  assert workload["prompt_len"]["min"] >= 4 + 4 and workload["prompt_len"]["max"] <= 4 + 12
  assert saved["ratios"]["tinyvllm/offline"]["output_throughput"] == \
    pytest.approx(serve["output_throughput"] / offline["output_throughput"])
  assert saved["options"]["request_rate"] == 20 and saved["options"]["random_range_ratio"] == 0.5
  if "graph_builds" in serve:              # servers that count their graph builds
    assert serve["graph_builds"] == serve["graph_builds_after"] - serve["graph_builds_before"] >= 0
  assert "tinyvllm/offline" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory) -> Path:
  """A random LLaDA checkpoint with the shipped model's layout and tokenizer, one layer of width 32."""
  from safetensors.numpy import save_file
  from tinygrad.nn.state import get_state_dict
  from tinyvllm.model.loader import DJANGO_DIFFUSION_MODEL
  from tinyvllm.diffusion.llada import DiffusionConfig, MaskedDiffusionLM, to_llada_layout
  path = tmp_path_factory.mktemp("tiny-llada")
  config = json.loads((DJANGO_DIFFUSION_MODEL / "config.json").read_text()) | \
    dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=64)
  model, rng = MaskedDiffusionLM(DiffusionConfig.from_hf(config)), np.random.default_rng(0)
  weights = {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in get_state_dict(model).items()
             if not k.startswith("rope_")}
  save_file(to_llada_layout(weights, model.config.model), str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(config))
  for name in ("tokenizer.model", "tokenizer_config.json"): shutil.copy(DJANGO_DIFFUSION_MODEL / name, path / name)
  return path


def test_smoke_diffusion(bench, tiny_llada, tmp_path, capsys):
  result = bench.main(["diffusion", "--model", str(tiny_llada), "--num-prompts", "2", "--gen-length", "4",
                       "--block-length", "2", "--warmup", "0", "--json", str(tmp_path / "out.json")])
  columns = json.loads((tmp_path / "out.json").read_text())["columns"]
  assert list(columns) == ["llada", "threshold", "threshold+cache"] and "bench diffusion" in capsys.readouterr().out
  assert all(lookup(c, path) is not None for c in columns.values() for _, path in result["headline"])
  llada = columns["llada"]
  assert (llada["tokens"], llada["model_calls_per_token"], llada["batched_forwards"]) == (8, 1.0, 4)
  assert llada["agreement_with_llada"] == 1.0 and llada["log_likelihood_per_token"] < 0
  for c in columns.values(): assert c["tokens"] == 8 and 0 < c["model_calls_per_token"] <= 1 and c["tokens_per_s"] > 0


def test_the_diffusion_benchmark_runs_the_shipped_diffusion_model_by_default(bench, monkeypatch):
  from tinyvllm.benchmarks import commands
  models = []
  def measured(engine_args, *args):
    models.append(engine_args.model)
    return {"llada": {"tokens_per_s": 1.0}}
  monkeypatch.setattr(commands, "bench_diffusion", measured)
  bench.main(["diffusion", "--num-prompts", "1"])
  bench.main(["diffusion", "--num-prompts", "1", "--model", "elsewhere"])
  assert models == ["llada", "elsewhere"]


def test_smoke_diffusion_random_weights(bench, tmp_path):
  """A --shape's random weights: random prompts, speed only; LLaDA's fixed schedule with and without the cache."""
  result = bench.main(["diffusion", "--load-format", "dummy", "--shape", "tiny-diffusion", "--num-prompts", "2",
                       "--input-len", "6", "--gen-length", "8", "--block-length", "4", "--diffusion-steps", "4",
                       "--modes", "cache", "llada", "--warmup", "0", "--compare", "torch",
                       "--json", str(tmp_path / "out.json")])
  columns = result["columns"]
  assert list(columns) == ["cache", "llada", "torch"] and result["engine_args"]["max_model_len"] == 14
  for name in ("cache", "llada"):
    c = columns[name]
    assert (c["tokens"], c["model_calls_per_token"], c["batched_forwards"]) == (16, 0.5, 4)
    assert c["step_ms"] > 0 and "log_likelihood_per_token" not in c
  assert "skipped" in columns["torch"] or columns["torch"]["batched_forwards"] == 4
