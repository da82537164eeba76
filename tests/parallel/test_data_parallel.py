"""Data parallelism: two engine processes behind one DataParallelEngine give every request the tokens one engine
gives it, aborts reach the rank that holds the request, and bad requests fail in the caller. The last test starts
`serve.py --data-parallel-size 2` on the real SmolLM2 and talks to it with the OpenAI SDK."""
import random
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
import openai
import pytest
from tinyvllm import EngineArgs, LLMEngine, SamplingParams
from tinyvllm.parallel.data_parallel import DataParallelEngine
from tinyvllm.engine.protocol import Engine
from tinyvllm.llm import create_engine

TINY = dict(load_format="dummy", shape="tiny", block_size=4, max_model_len=64, max_num_batched_tokens=32,
            max_num_seqs=4)


@pytest.fixture(scope="module")
def dp() -> DataParallelEngine:
  engine = DataParallelEngine(EngineArgs(**TINY, data_parallel_size=2))
  yield engine
  engine.shutdown()


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[tuple[list[int], str]]]:
  for request_id, (prompt, params) in requests.items(): engine.add_request(prompt, params, request_id)
  finished = {}
  while engine.has_unfinished_requests():
    for out in engine.step():
      if out.finished: finished[out.request_id] = [(o.token_ids, o.finish_reason) for o in out.outputs]
  return finished


def test_two_ranks_give_each_request_the_tokens_of_one_engine(dp):
  rng = random.Random(0)
  prompt = lambda: [rng.randrange(1, 512) for _ in range(rng.randrange(3, 30))]
  requests = {f"greedy-{i}": (prompt(), SamplingParams(temperature=0, max_tokens=rng.randrange(2, 12), ignore_eos=True))
              for i in range(6)}
  requests["sampled"] = (prompt(), SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True))
  requests["n=2"] = (prompt(), SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True))
  expected = run(LLMEngine(EngineArgs(**TINY)), requests)
  assert isinstance(dp, Engine)                                # what the server needs of an engine (engine/protocol.py)
  for request_id, (prompt_ids, params) in requests.items(): dp.add_request(prompt_ids, params, request_id)
  assert all(rank.live for rank in dp.ranks)                  # both ranks were given requests
  assert run(dp, {}) == expected
  assert len({tuple(ids) for ids, _ in expected["n=2"]}) == 2  # the test can tell sequences apart


def test_abort_reaches_the_rank_and_nothing_more_comes_back(dp):
  dp.add_request(list(range(1, 20)), SamplingParams(max_tokens=40, ignore_eos=True), request_id="gone")
  dp.add_request(list(range(1, 9)), SamplingParams(max_tokens=20, ignore_eos=True), request_id="kept")
  finished = set()          # "kept" may finish before "gone" shows up (its rank may be compiling a new shape)
  outs = []
  while not any(out.request_id == "gone" for out in outs):
    outs = dp.step()
    finished |= {out.request_id for out in outs if out.finished}
  dp.abort_request("gone")
  seen = set()
  while dp.has_unfinished_requests():
    outs = dp.step()
    seen |= {out.request_id for out in outs}
    finished |= {out.request_id for out in outs if out.finished}
  assert "gone" not in seen and finished == {"kept"}
  stats = dp.stats()
  assert (stats.running, stats.waiting, stats.kv_cache_usage) == (0, 0, 0)


def test_requests_reach_their_ranks_together_at_the_next_step(dp):
  """Sent with the step, all of them at once, so a rank schedules them as one engine would (parallel/data_parallel.py); one
  aborted before that step never reaches its rank."""
  for i in range(4): dp.add_request([1, 2, 3 + i], SamplingParams(max_tokens=3, ignore_eos=True), request_id=f"r{i}")
  dp.abort_request("r3")
  assert sorted(len(rank.unsent) for rank in dp.ranks) == [1, 2] and dp.has_unfinished_requests()
  outputs = dp.step()
  assert all(not rank.unsent and rank.aborts_unanswered == 0 for rank in dp.ranks)
  while dp.has_unfinished_requests(): outputs += dp.step()
  assert {out.request_id for out in outputs if out.finished} == {"r0", "r1", "r2"}


def test_bad_requests_fail_in_the_caller_and_the_ranks_keep_serving(dp):
  dp.add_request([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), request_id="busy")
  with pytest.raises(ValueError, match="already in use"): dp.add_request([1], request_id="busy")
  with pytest.raises(ValueError, match="max_model_len"): dp.add_request(list(range(1, 70)))
  with pytest.raises(ValueError, match=r"\[0, 512\)"): dp.add_request([7, 512])
  assert [len(ids) for ids, _ in run(dp, {})["busy"]] == [30]


def test_sizes_that_cannot_work_are_refused_before_any_process_starts():
  with pytest.raises(ValueError, match="at least 1"): create_engine(EngineArgs(data_parallel_size=0))
  with pytest.raises(ValueError, match="autoregressive"): create_engine(EngineArgs(model="diffusion", data_parallel_size=2))


def test_a_rank_that_cannot_start_names_the_reason():
  with pytest.raises(RuntimeError, match="rank 0 failed.*model not found"):
    DataParallelEngine(EngineArgs(model="/nonexistent/model.gguf", data_parallel_size=2))


def test_serve_with_two_ranks_answers_like_llm_generate(smollm2, tmp_path):
  """The real SmolLM2 behind `serve.py --data-parallel-size 2`: concurrent greedy completions through the OpenAI SDK
  equal LLM.generate's."""
  prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are"]
  expected = [o.outputs[0].text for o in smollm2.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
  port = 18000 + random.Random().randrange(1000)
  server = subprocess.Popen([sys.executable, str(Path(__file__).parents[2] / "serve.py"), "--data-parallel-size", "2", "--port", str(port),
                             "--max-model-len", "512"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"))
  try:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + 300
    while True:
      try:
        model = client.with_options(timeout=5).models.list().data[0].id
        break
      except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError): pass
      assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
      time.sleep(0.5)
    complete = lambda p: client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
    with ThreadPoolExecutor(len(prompts)) as pool: texts = list(pool.map(complete, prompts))
  finally:
    server.terminate()
    server.wait(30)
  assert texts == expected and "Paris" in texts[0]
