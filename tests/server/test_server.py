"""The OpenAI-compatible server, from the outside: the official `openai` SDK, raw HTTP for the edges, and a real
headless browser for the chat page.

Most tests share one engine: a tiny random-weight Llama (2 layers, hidden size 64) with SmolLM2's real tokenizer
attached, so text goes in and out and kernels compile in seconds. Its replies are gibberish, which is fine: what is
checked is the protocol. Several servers with different guards (API key, rate limit, capacity, timeout) share that
engine, each in-process on a free 127.0.0.1 port with its event loop on a background thread. One test runs the real
SmolLM2 and checks that greedy text through the server equals `LLM.generate`.
"""
from __future__ import annotations
import asyncio
import base64
import collections
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
import aiohttp
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tinyvllm.engine_args import SHAPES, EngineArgs
from tinyvllm.async_engine import AsyncLLMEngine
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine.protocol import CompletionOutput, RequestOutput
from tinyvllm.engine.protocol import Engine, EngineStats
from tinyvllm.formats.gguf import read_gguf_metadata
from tinyvllm.model.loader import default_model_path
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.server import OpenAIServer, ServerConfig, serve, start
from tinyvllm.server.limits import RateLimiter
from tinyvllm.server.metrics import Histogram
from tinyvllm.server.protocol import APIError, GenerationRequest, parse_chat, parse_completion, parse_json
from tinyvllm.server.responses import ChatFormat, Choice, CompletionFormat, Generation

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=49152, rope_theta=10000.0, tie_word_embeddings=True,
                  max_position_embeddings=384, rms_norm_eps=1e-5)
# Big blocks keep every context within the smallest block-table bucket: fewer shapes, fewer kernels to compile.
MAX_MODEL_LEN, MAX_NUM_SEQS, BLOCK_SIZE = 384, 2, 64
GREEDY = {"temperature": 0}


# ---- fixtures and helpers -------------------------------------------------------------------------------------------
def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LiveServer:
  """An OpenAIServer listening on a free loopback port, its event loop on a background thread."""
  def __init__(self, config: ServerConfig, engine: AsyncLLMEngine | None):
    self.server, self.engine, self.port = OpenAIServer(config), engine, free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.loop = asyncio.new_event_loop()

  def run(self, coro, timeout: float = 120):
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

  def __enter__(self) -> LiveServer:
    threading.Thread(target=self.loop.run_forever, daemon=True).start()
    self.runner = self.run(start(self.server, "127.0.0.1", self.port))
    if self.engine is not None: self.load()
    return self

  def load(self) -> None: self.run(self.server.load(lambda: self.engine), timeout=900)   # captures every graph

  def __exit__(self, *exc) -> None:
    self.run(self.runner.cleanup())
    self.loop.call_soon_threadsafe(self.loop.stop)

  def client(self, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def request(method: str, url: str, body: dict | bytes | None = None) -> tuple[int, dict | str]:
  """One HTTP request; returns (status, parsed JSON or text), whatever the status."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
  try: resp = urllib.request.urlopen(req, timeout=60)
  except urllib.error.HTTPError as e: resp = e
  with resp:
    text = resp.read().decode()
    return resp.status, json.loads(text) if resp.headers.get("Content-Type", "").startswith("application/json") else text


def metrics(url: str) -> dict[str, float]:
  """The /metrics page as {name: value}, labels dropped (one model, so one sample per name)."""
  _, text = request("GET", f"{url}/metrics")
  return {name: float(value) for name, value in re.findall(r"^([^#\s{]+)\{[^}]*\} (\S+)$", text, re.M)}


def wait_until_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
  deadline = time.monotonic() + timeout
  while True:
    m = metrics(url)
    if m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == m["vllm:kv_cache_usage_perc"] == 0: return m
    assert time.monotonic() < deadline, f"engine still busy: {m}"
    time.sleep(0.05)


async def read_stream(session: aiohttp.ClientSession, url: str, body: dict, hang_up_after: int | None = None) -> list:
  """POST a streaming request and return its events (dicts, then "[DONE]"); with `hang_up_after`, close the
  connection after that many events."""
  events = []
  async with session.post(url, json={**body, "stream": True}) as resp:
    assert resp.status == 200, await resp.text()
    async for line in resp.content:
      if not line.startswith(b"data: "): continue
      data = line[6:].strip().decode()
      events.append(data if data == "[DONE]" else json.loads(data))
      if hang_up_after is not None and len(events) >= hang_up_after:
        resp.close()                               # drops the connection, as a client that went away
        break
  return events


@pytest.fixture(scope="module")
def engine() -> AsyncLLMEngine:
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(SHAPES, "tiny-test", TINY_SHAPE)
    llm_engine = LLMEngine(EngineArgs(load_format="dummy", shape="tiny-test", max_model_len=MAX_MODEL_LEN,
                                      max_num_seqs=MAX_NUM_SEQS, block_size=BLOCK_SIZE,
                                      num_kv_blocks=MAX_NUM_SEQS * MAX_MODEL_LEN // BLOCK_SIZE + 1))
  llm_engine.tokenizer = Tokenizer.from_gguf_metadata(read_gguf_metadata(default_model_path()))
  return AsyncLLMEngine(llm_engine)


@pytest.fixture(scope="module")
def live(engine: AsyncLLMEngine):
  with LiveServer(ServerConfig(["tiny", "tiny-alias"]), engine) as server: yield server


@pytest.fixture
def client(live: LiveServer) -> openai.OpenAI: return live.client()


# ---- request parsing (no server) ------------------------------------------------------------------------------------
def test_the_engine_has_what_the_server_needs(engine):
  assert isinstance(engine.engine, Engine)                      # engine/protocol.py; test_interface.py checks the methods


def test_completion_body_maps_onto_sampling_params(engine):
  tok = engine.engine.tokenizer
  body = {"prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "n": 2,
          "seed": 3, "stop": "END", "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
          "logit_bias": {"42": -100}, "logprobs": 2, "min_tokens": 1, "ignore_eos": True, "stop_token_ids": [7]}
  req = parse_completion(body, tok, MAX_MODEL_LEN)
  p = req.params
  assert req.prompts == [tok.encode("Hi")] and not req.stream
  assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.n, p.seed) == (7, 0.5, 0.9, 5, 0.1, 2, 3)
  assert (p.stop, p.stop_token_ids, p.logit_bias, p.logprobs, p.min_tokens, p.ignore_eos) == \
    (["END"], [7], {42: -100.0}, 2, 1, True)
  assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)


def test_chat_template_kwargs_reach_the_template_and_may_not_replace_its_inputs(engine, monkeypatch):
  tok = engine.engine.tokenizer
  monkeypatch.setattr(tok, "chat_template", "{{ messages[0]['content'] }} thinking={{ enable_thinking }}")
  body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": False}}
  assert tok.decode(parse_chat(body, tok, MAX_MODEL_LEN).prompts[0]) == "hi thinking=False"
  for bad in ({"messages": []}, "no"):
    with pytest.raises(APIError) as e: parse_chat({**body, "chat_template_kwargs": bad}, tok, MAX_MODEL_LEN)
    assert e.value.status == 400 and e.value.param == "chat_template_kwargs"
  monkeypatch.setattr(tok, "chat_template", "{{ raise_exception('roles must alternate') }}")
  with pytest.raises(APIError, match="roles must alternate") as e: parse_chat(body, tok, MAX_MODEL_LEN)
  assert e.value.param == "messages"


def test_prompt_forms(engine):
  tok = engine.engine.tokenizer
  forms = {"a": [tok.encode("a")], "ab": [tok.encode("ab")]}
  assert parse_completion({"prompt": "a"}, tok, MAX_MODEL_LEN).prompts == forms["a"]
  assert parse_completion({"prompt": ["a", "ab"]}, tok, MAX_MODEL_LEN).prompts == forms["a"] + forms["ab"]
  assert parse_completion({"prompt": [1, 2]}, tok, MAX_MODEL_LEN).prompts == [[1, 2]]
  assert parse_completion({"prompt": [[1], [2, 3]]}, tok, MAX_MODEL_LEN).prompts == [[1], [2, 3]]
  chat = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, tok, MAX_MODEL_LEN)
  assert chat.prompts == [tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False)]
  assert chat.params.max_tokens is None                     # chat: up to the context length unless asked


@pytest.mark.parametrize("body, param", [
  ({"prompt": "x", "temperature": "hot"}, "temperature"),           # wrong type
  ({"prompt": "x", "max_tokens": True}, "max_tokens"),              # a boolean is not an integer
  ({"prompt": "x", "temperature": -1}, "temperature"),              # out of range (SamplingParams' rule)
  ({"prompt": "x", "top_p": 0}, "top_p"),
  ({"prompt": "x", "n": 0}, "n"),
  ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
  ({"prompt": "x", "stop": [1]}, "stop"),
  ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
  ({}, "prompt"),                                                    # missing
  ({"prompt": []}, "prompt"),
  ({"prompt": [[1.5]]}, "prompt"),
  ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),     # beyond the context
  ({"prompt": [1] * MAX_MODEL_LEN}, "prompt"),                      # prompt too long
  ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
  ({"prompt": "x", "echo": True}, "echo"),
  ({"prompt": "x", "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
  ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_bad_completion_bodies_name_the_field(engine, body, param):
  with pytest.raises(APIError) as e: parse_completion(body, engine.engine.tokenizer, MAX_MODEL_LEN)
  assert (e.value.status, e.value.param) == (400, param), e.value.message


def test_bad_json_and_chat_bodies(engine):
  for raw in (b"{", b"[1]", b"\xff"):
    with pytest.raises(APIError): parse_json(raw)
  for body in ({"messages": []}, {"messages": [{"content": "no role"}]}, {"messages": "hi"},
               {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}):
    with pytest.raises(APIError): parse_chat(body, engine.engine.tokenizer, MAX_MODEL_LEN)


# ---- response shaping (no server) -----------------------------------------------------------------------------------
def test_deltas_are_the_growth_of_the_text():
  choice, tokenizer = Choice(0), object()      # (a stand-in: only logprobs would read the tokenizer)
  steps = [("Hel", [1], None), ("Hel", [1, 2], None), ("Hello", [1, 2, 3], None), ("Hello!", [1, 2, 3, 4], "stop")]
  deltas = [choice.advance(CompletionOutput(0, text, ids, reason), tokenizer) for text, ids, reason in steps]
  assert [d and d.text for d in deltas] == ["Hel", None, "lo", "!"]       # a token that added no text sends nothing
  assert deltas[0].first and not deltas[2].first and deltas[3].finish_reason == "stop"
  assert all(d is None or d.token_ids is None for d in deltas)
  assert choice.num_tokens == 4
  assert choice.advance(CompletionOutput(0, "Hello!", [1, 2, 3, 4], "stop"), tokenizer) is None   # reported once


def test_without_a_tokenizer_every_token_streams_as_its_id():
  choice = Choice(0)
  steps = [([7], None), ([7, 8, 9], None), ([7, 8, 9], None), ([7, 8, 9, 4], "length")]
  deltas = [choice.advance(CompletionOutput(0, "", ids, reason), None) for ids, reason in steps]
  assert [d and d.token_ids for d in deltas] == [[7], [8, 9], None, [4]]
  chunk = CompletionFormat().chunk_choice(0, deltas[1])
  assert chunk["token_ids"] == [8, 9] and chunk["text"] == ""
  assert ChatFormat().chunk_choice(0, deltas[3])["token_ids"] == [4]


def test_logprobs_in_both_formats(engine):
  tok = engine.engine.tokenizer
  ids = tok.encode("Hello world")
  out = CompletionOutput(0, tok.decode(ids), ids, "length", logprobs=[{ids[0]: -0.5, 7: -1.5}, {ids[1]: -0.25}])
  choice = Choice(0)
  delta = choice.advance(out, tok)
  tokens = [tok.decode([i]) for i in ids]
  completion = CompletionFormat().logprobs(delta.logprobs, 0)
  assert completion == {"tokens": tokens, "token_logprobs": [-0.5, -0.25], "text_offset": [0, len(tokens[0])],
                        "top_logprobs": [{tokens[0]: -0.5, tok.decode([7]): -1.5}, {tokens[1]: -0.25}]}
  chat = ChatFormat().logprobs(choice.logprobs)["content"]
  entry = {"token": tokens[1], "logprob": -0.25, "bytes": list(tokens[1].encode())}
  assert chat[1] == {**entry, "top_logprobs": [entry]}


@pytest.mark.parametrize("fmt, whole, chunk", [(CompletionFormat(), Completion, None),
                                               (ChatFormat(), ChatCompletion, ChatCompletionChunk)])
def test_bodies_are_what_the_sdk_types_accept(engine, fmt, whole, chunk):
  """Whole responses and stream chunks, log-probabilities included, validate as the openai SDK's own types. (The SDK
  types completion chunks as `Completion`, whose finish_reason may not be null as it is mid-stream; it does not
  validate streamed events, so only chat chunks can be checked this way.)"""
  tok = engine.engine.tokenizer
  ids = tok.encode("Hello world")
  logprobs = [{i: -0.5, 7: -1.0} for i in ids]
  outputs = [CompletionOutput(0, tok.decode(ids[:1]), ids[:1], None, logprobs[:1]),
             CompletionOutput(0, tok.decode(ids), ids, "length", logprobs)]
  request = GenerationRequest([[1, 2]], SamplingParams(logprobs=2), stream=True, include_usage=True)
  gen = Generation(fmt, request, "id-1", "tiny", tok)
  chunks = [c for out in outputs for c in gen.update(0, RequestOutput("id-1-0", None, [1, 2], [out]))]
  assert len(chunks) == 2
  for body in chunks + [gen.usage_chunk()] if chunk else []: chunk.model_validate(body)
  assert whole.model_validate(gen.response()).usage.completion_tokens == len(ids)


def test_histogram_is_cumulative():
  h = Histogram("x_seconds", "help", (0.1, 1.0))
  for v in (0.05, 0.5, 0.7, 5.0): h.observe(v)
  lines = h.render('model_name="m"')
  assert 'x_seconds_bucket{model_name="m",le="0.1"} 1.0' in lines
  assert 'x_seconds_bucket{model_name="m",le="1.0"} 3.0' in lines
  assert 'x_seconds_bucket{model_name="m",le="+Inf"} 4.0' in lines and 'x_seconds_count{model_name="m"} 4.0' in lines


def test_rate_limiter_token_bucket():
  now = [0.0]
  limiter = RateLimiter(2, clock=lambda: now[0])
  assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0.5]
  assert limiter.acquire("b") == 0                          # per client
  now[0] = 0.5
  assert limiter.acquire("a") == 0 and limiter.acquire("a") > 0


# ---- the official SDK against the server ----------------------------------------------------------------------------
def test_models_list(client, live):
  assert [m.id for m in client.models.list()] == ["tiny", "tiny-alias"]


def test_completion_whole_and_streamed_agree(client):
  whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, **GREEDY)
  assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
  assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
  chunks = list(client.completions.create(model="tiny-alias", prompt="Once upon a time", max_tokens=12, stream=True,
                                          stream_options={"include_usage": True}, **GREEDY))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage and chunks[0].model == "tiny-alias"
  no_usage = list(client.completions.create(model="tiny", prompt="Once", max_tokens=2, stream=True, **GREEDY))
  assert all(c.usage is None for c in no_usage)


def test_chat_whole_and_streamed_agree(client):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
  whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **GREEDY)
  assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 8
  chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, stream=True,
                                               stream_options={"include_usage": True}, **GREEDY))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
  assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_several_prompts_and_n(client):
  """Choice prompt_index * n + i is output i of that prompt, whole or streamed."""
  out = client.completions.create(model="tiny", prompt=["a", "b c"], n=2, max_tokens=3, **GREEDY)
  assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.usage.completion_tokens == 12
  streamed = list(client.completions.create(model="tiny", prompt=["a", "b c"], n=2, max_tokens=3, stream=True, **GREEDY))
  texts = {i: "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(4)}
  assert texts == {c.index: c.text for c in out.choices}
  ids = client.completions.create(model="tiny", prompt=[[1, 2, 3], [4]], max_tokens=2, **GREEDY)
  assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 4


def test_prompt_logprobs_in_both_formats(client):
  """vLLM's layout: per prompt token (null first), {id: {logprob, decoded_token}} holding the prompt's own token."""
  prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
  out = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=2, extra_body={"prompt_logprobs": 1},
                                  **GREEDY).model_dump()
  for choice in out["choices"]:
    ids, got = prompts[choice["index"] // 2], choice["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for token, entry in zip(ids[1:], got[1:]):
      assert str(token) in entry and 1 <= len(entry) <= 2 and all(v["logprob"] <= 0 for v in entry.values())
  chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                        extra_body={"prompt_logprobs": 0}, **GREEDY).model_dump()
  assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
  assert "prompt_logprobs" not in client.completions.create(model="tiny", prompt="a", max_tokens=1, **GREEDY).model_dump()["choices"][0]


def test_sdk_raises_the_right_errors(client):
  with pytest.raises(openai.BadRequestError) as e: client.completions.create(model="tiny", prompt="x", temperature=-1)
  assert e.value.body["param"] == "temperature"
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model="tiny", prompt="x", max_tokens=MAX_MODEL_LEN)
  with pytest.raises(openai.BadRequestError):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * MAX_MODEL_LEN}])
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model="tiny", prompt=[10**9])      # not a token id: the engine refuses it
  with pytest.raises(openai.NotFoundError) as e: client.completions.create(model="gpt-4", prompt="x")
  assert e.value.body["code"] == "model_not_found"


def test_http_errors_have_openai_shape(live):
  for body, path, status in ((b"{not json", "/v1/completions", 400), ({"prompt": "x"}, "/v1/nope", 404)):
    code, err = request("POST", live.url + path, body)
    assert code == status and set(err["error"]) == {"message", "type", "param", "code"}


def test_tokenize_roundtrip(live):
  _, out = request("POST", f"{live.url}/tokenize", {"prompt": "Hello world"})
  assert out["count"] == len(out["tokens"]) and out["max_model_len"] == MAX_MODEL_LEN
  _, text = request("POST", f"{live.url}/detokenize", {"tokens": out["tokens"]})
  assert text == {"prompt": "Hello world"}
  _, chat = request("POST", f"{live.url}/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
  assert chat["count"] > out["count"]
  assert request("POST", f"{live.url}/detokenize", {"tokens": [-1]})[0] == 400


# ---- guards ---------------------------------------------------------------------------------------------------------
def test_api_key_and_rate_limit(engine):
  with LiveServer(ServerConfig(["tiny"], api_key="sekrit", rate_limit=2), engine) as s:
    with pytest.raises(openai.AuthenticationError): s.client(api_key="wrong").models.list()
    assert request("GET", f"{s.url}/v1/models")[0] == 401
    assert request("GET", f"{s.url}/health/ready")[0] == 200     # health and metrics stay open
    good = s.client(api_key="sekrit")
    good.models.list()                                           # the 401s above spent no tokens: 2 left
    good.models.list()
    with pytest.raises(openai.RateLimitError) as e: good.models.list()
    assert int(e.value.response.headers["Retry-After"]) >= 1


def test_capacity_and_draining(engine, monkeypatch):
  """max_in_flight=2: a third concurrent request gets 503; draining refuses new ones while in-flight ones finish."""
  # the two running requests must still run when the third arrives: steps of 10 ms make their 64 tokens last 0.64 s
  # (at the tiny model's own speed they could finish first on a busy machine), and ignore_eos keeps a random model
  # from stopping at once
  slow_steps(monkeypatch, engine, 0.01)
  with LiveServer(ServerConfig(["tiny"], max_in_flight=2), engine) as s:
    async def scenario():
      async with aiohttp.ClientSession() as session:
        url, body = f"{s.url}/v1/completions", {"prompt": "x", "max_tokens": 64, "ignore_eos": True, **GREEDY}
        running = [asyncio.create_task(read_stream(session, url, body)) for _ in range(2)]
        while s.server.in_flight < 2: await asyncio.sleep(0.01)
        async with session.post(url, json=body) as resp:
          assert resp.status == 503 and (await resp.json())["error"]["code"] == "queue_full"
        drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(s.server.drain(30), s.loop))
        while not s.server.draining: await asyncio.sleep(0.01)
        async with session.post(url, json=body) as resp:
          assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
        assert (await session.get(f"{s.url}/health/ready")).status == 503
        for events in await asyncio.gather(*running): assert events[-1] == "[DONE]"
        assert await drained
    asyncio.run(scenario())


def test_request_timeout_aborts(engine):
  # 376 tokens cannot be decoded in 0.05 s (0.2 ms a step); 0.3 s was once long enough for them on the tiny model
  with LiveServer(ServerConfig(["tiny"], request_timeout=0.05), engine) as s:
    body = {"prompt": "x", "max_tokens": MAX_MODEL_LEN - 8, "extra_body": {"ignore_eos": True}, **GREEDY}
    with pytest.raises(openai.APIStatusError) as e: s.client().completions.create(model="tiny", **body)
    assert e.value.status_code == 504 and "--request-timeout" in e.value.message
    with pytest.raises(openai.APIError, match="request-timeout"):
      for _ in s.client().completions.create(model="tiny", stream=True, **body): pass
    wait_until_idle(s.url)


def test_disconnect_frees_the_request_at_once(live):
  async def hang_up():
    async with aiohttp.ClientSession() as session:
      body = {"prompt": "x", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True, **GREEDY}
      events = await read_stream(session, f"{live.url}/v1/completions", body, hang_up_after=2)
      assert len(events) == 2
  asyncio.run(hang_up())
  t0 = time.monotonic()
  wait_until_idle(live.url)
  assert time.monotonic() - t0 < 2.0


def test_readiness_follows_loading(engine):
  with LiveServer(ServerConfig(["tiny"]), None) as s:
    assert request("GET", f"{s.url}/health/live")[0] == 200
    assert request("GET", f"{s.url}/health/ready")[0] == 503
    assert request("GET", f"{s.url}/v1/models")[1]["error"]["code"] == "model_loading"
    assert metrics(s.url)["vllm:num_requests_running"] == 0
    s.engine = engine
    s.load()
    assert request("GET", f"{s.url}/health/ready")[0] == request("GET", f"{s.url}/health")[0] == 200


# ---- load -----------------------------------------------------------------------------------------------------------
def test_load_32_streams_a_quarter_hang_up(live):
  """32 concurrent streaming requests (16× max_num_seqs, so most wait in the queue); every fourth client goes away
  after two chunks. Every other one completes with usage; afterwards the engine is empty and the server healthy."""
  before = metrics(live.url)

  async def load() -> tuple[list[list], float]:
    async with aiohttp.ClientSession() as session:
      body = {"max_tokens": 16, "stream_options": {"include_usage": True}, "ignore_eos": True, **GREEDY}
      tasks = [asyncio.create_task(read_stream(session, f"{live.url}/v1/completions", {**body, "prompt": f"Story {i}:"},
                                               hang_up_after=2 if i % 4 == 0 else None)) for i in range(32)]
      await asyncio.sleep(0.2)
      t0 = time.monotonic()
      async with session.get(f"{live.url}/health/live") as resp: assert resp.status == 200
      health_latency = time.monotonic() - t0                  # answered while the engine thread computes
      return await asyncio.gather(*tasks), health_latency

  results, health_latency = asyncio.run(load())
  for i, events in enumerate(results):
    if i % 4 == 0: continue
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 16, i
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) != ""
  assert health_latency < 2.0
  after = wait_until_idle(live.url)
  # the 24 that stayed finished; a client that hangs up after the engine already produced its last token (the
  # server notices a hang-up at its next write) leaves a finished request too
  assert 24 <= after["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"] <= 32
  assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] >= 24 * 16
  assert request("GET", f"{live.url}/health")[0] == 200


def test_no_graph_is_built_after_ready(live):
  """Traffic the server has never seen (prompt lengths, contexts, batch mixes and sampling parameters new to it) runs
  on the graphs captured before /health/ready: a capture on the request path would stall every stream for seconds."""
  def graphs() -> tuple[float, float]:
    page = metrics(live.url)
    return page["tinyvllm:graph_builds_total"], page["tinyvllm:graph_loads_total"]
  before = graphs()
  assert sum(before) > 0                     # the warmup captured the set, or loaded it from an earlier process's store
  tok = live.engine.engine.tokenizer
  mixes = [GREEDY, {"temperature": 0.8, "seed": 1}, {"temperature": 1.0, "top_p": 0.7, "top_k": 9, "seed": 2},
           {"min_p": 0.2, "seed": 3}, {"logprobs": 3, **GREEDY}, {"frequency_penalty": 0.5, "presence_penalty": 0.3},
           {"repetition_penalty": 1.2, "logit_bias": {"17": 5.0}}, {"min_tokens": 4, "temperature": 0.5, "seed": 4},
           {"prompt_logprobs": 2, **GREEDY}, {"n": 2, "temperature": 0.9, "seed": 5},
           {"stop": ["zz"], "logprobs": 1, "temperature": 0.3, "seed": 6}]

  async def traffic() -> list[dict]:
    async with aiohttp.ClientSession() as session:
      async def one(i: int, params: dict) -> dict:
        prompt = tok.decode([100 + (i * 37 + j * 11) % 5000 for j in range(3 + 23 * i)])     # 3 to 233 tokens
        body = {"prompt": prompt, "max_tokens": 2 + i % 5, "ignore_eos": True, **params}
        async with session.post(f"{live.url}/v1/completions", json=body) as resp: return await resp.json()
      return await asyncio.gather(*(one(i, params) for i, params in enumerate(mixes)))

  for reply in asyncio.run(traffic()): assert "choices" in reply, reply
  wait_until_idle(live.url)
  assert graphs() == before


def test_metrics_page_shows_speculative_counters_only_when_speculating():
  from tinyvllm.engine.protocol import EngineStats
  from tinyvllm.server.metrics import Metrics
  stats = EngineStats(spec_drafts=3, spec_draft_tokens=9, spec_accepted_tokens=5, spec_accepted_per_position=(3, 2, 0))
  page = Metrics("m").render(stats)
  for line in ('vllm:spec_decode_num_drafts_total{model_name="m"} 3.0',
               'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 9.0',
               'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 5.0',
               'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 2.0',
               'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 0.0'):
    assert line in page.splitlines()
  assert "spec_decode" not in Metrics("m").render(EngineStats())


def test_metrics_page_has_vllm_names(live):
  text = request("GET", f"{live.url}/metrics")[1]
  for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
               "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total", "tinyvllm:graph_builds_total",
               "tinyvllm:graph_build_seconds_total", "tinyvllm:jump_forward_tokens_total"):
    assert f"# TYPE {name} " in text
  for name in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
               "vllm:e2e_request_latency_seconds"):
    assert f"# TYPE {name} histogram" in text and f'{name}_bucket{{model_name="tiny",le="+Inf"}}' in text


# ---- shutdown -------------------------------------------------------------------------------------------------------
def test_sigterm_drains_then_returns(engine, monkeypatch):
  """`serve` as `python serve.py` runs it, on this (main) thread: SIGTERM while a request streams. New requests get
  503, the streaming one finishes, and serve() returns (so the process would exit 0)."""
  slow_steps(monkeypatch, engine, 0.01)     # 200 steps outlast the drain's first moments on a busy machine too
  port = free_port()
  url, seen, terminated = f"http://127.0.0.1:{port}", {}, threading.Event()

  def terminate() -> None:
    if not terminated.is_set(): os.kill(os.getpid(), signal.SIGTERM)
    terminated.set()

  async def go() -> None:
    async with aiohttp.ClientSession() as session:
      while True:
        with contextlib.suppress(aiohttp.ClientConnectionError):
          async with session.get(f"{url}/health/ready") as r:
            if r.status == 200: break
        await asyncio.sleep(0.05)
      # a stream that ends before the request below lets the drain finish and the server close: ask as soon as the
      # server says it is draining (a fixed 0.2 s wait was outlasted by 200 tokens once the steps got faster)
      body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, **GREEDY}
      async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as resp:
        await resp.content.readline()                         # streaming has begun
        terminate()
        while True:
          async with session.get(f"{url}/health/ready") as r:
            if (await r.json())["status"] == "draining": break
          await asyncio.sleep(0.002)
        async with session.post(f"{url}/v1/completions", json=body) as refused: seen["refused"] = refused.status
        seen["tail"] = (await resp.read()).decode().strip().splitlines()[-1]

  def client() -> None:
    try: asyncio.run(go())
    finally: terminate()                                      # never leave serve() waiting for a signal

  thread = threading.Thread(target=client)
  thread.start()
  asyncio.run(serve(OpenAIServer(ServerConfig(["tiny"])), "127.0.0.1", port, lambda: engine, drain_timeout=30))
  thread.join()
  assert seen == {"refused": 503, "tail": "data: [DONE]"}


# ---- hostile clients ------------------------------------------------------------------------------------------------
# Each knob is bounded before anything is allocated or computed from it, and whatever gets through cannot stall the
# engine: a watchdog fails requests stuck behind a step that never returns, and /health says so.
HUGE = 18446744073709551616                                         # 2**64: past every integer field's range


@pytest.mark.parametrize("body, param", [
  ({"prompt": "hi", "max_tokens": 1, "logprobs": HUGE}, "logprobs"),  # one argmax round per alternative: a stall
  ({"prompt": "hi", "logprobs": 21}, "logprobs"),
  ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
  ({"prompt": "hi", "n": HUGE}, "n"),
  ({"prompt": "hi", "n": 129}, "n"),
  ({"prompt": "hi", "n": 129, "best_of": 129}, "n"),
  ({"prompt": "hi", "max_tokens": 2**62}, "max_tokens"),
  ({"prompt": "hi", "stop": ["s"] * 17}, "stop"),
  ({"prompt": "hi", "stop": "s" * 1025}, "stop"),
  ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
  ({"prompt": "hi", "logit_bias": {"10000000": 1}}, "logit_bias"),  # not a token id: would index past the logits
  ({"prompt": "hi", "stop_token_ids": [49152]}, "stop_token_ids"),
  ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
  ({"prompt": "hi", "repetition_penalty": float("nan")}, "repetition_penalty"),
  ({"prompt": "hi", "temperature": float("inf")}, "temperature"),
  ({"prompt": "hi", "top_p": 10**400}, "top_p"),                    # overflows a float
  ({"prompt": "hi", "seed": HUGE}, "seed"),
  ({"prompt": "hi", "top_k": 2**40}, "top_k"),
  ({"prompt": ["hi"] * 257}, "prompt"),
])
def test_every_knob_is_bounded(engine, body, param):
  with pytest.raises(APIError) as e: parse_completion(body, engine.engine.tokenizer, MAX_MODEL_LEN, 49152)
  assert (e.value.status, e.value.param) == (400, param), e.value.message


@pytest.mark.parametrize("extra, param", [
  ({"logprobs": True, "top_logprobs": 1000}, "top_logprobs"),
  ({"n": HUGE}, "n"),
  ({"n": 3}, "n"),                                                   # --max-n 2
  ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),  # not passed into the template
  ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]}]}, "messages"),
])
def test_bad_chat_bodies_are_refused(engine, extra, param):
  body = {"messages": [{"role": "user", "content": "x"}], **extra}
  with pytest.raises(APIError) as e: parse_chat(body, engine.engine.tokenizer, MAX_MODEL_LEN, 49152, max_n=2)
  assert (e.value.status, e.value.param) == (400, param), e.value.message


def test_sampling_params_bounds_protect_llm_generate():
  for bad in ({"logprobs": 21}, {"prompt_logprobs": 10**6}, {"n": 10**6}, {"seed": HUGE}, {"top_k": 2**31},
              {"temperature": float("nan")}, {"stop": ["x"] * 100}, {"logit_bias": {-1: 1.0}}, {"min_p": 10**400}):
    with pytest.raises(ValueError, match=next(iter(bad))): SamplingParams(**bad)
  SamplingParams(n=128, logprobs=20, prompt_logprobs=20, seed=HUGE - 1, logit_bias={49151: 100})


def test_deep_json_is_a_400_not_a_crash(live):
  for raw in (b"[" * 100_000, b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}"):
    status, err = request("POST", f"{live.url}/v1/completions", raw)
    assert status == 400 and err["error"]["code"] == "json_too_deep"


def test_huge_logprobs_and_n_are_refused_at_once(live, client):
  t0 = time.monotonic()
  status, err = request("POST", f"{live.url}/v1/completions", {"prompt": "hi", "max_tokens": 1, "logprobs": HUGE})
  assert (status, err["error"]["param"]) == (400, "logprobs")
  status, err = request("POST", f"{live.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": HUGE})
  assert (status, err["error"]["param"]) == (400, "n")
  assert time.monotonic() - t0 < 5
  assert client.completions.create(model="tiny", prompt="hi", max_tokens=1, **GREEDY).choices[0].finish_reason == "length"


def slow_steps(monkeypatch, engine: AsyncLLMEngine, seconds: float, stall: threading.Event | None = None,
               stall_seconds: float = 0.0) -> None:
  """Every engine step sleeps `seconds` first; once `stall` is set, the next one sleeps `stall_seconds`."""
  step = engine.engine.step
  def slow():
    time.sleep(seconds)
    if stall is not None and stall.is_set():
      stall.clear()
      time.sleep(stall_seconds)
    return step()
  monkeypatch.setattr(engine.engine, "step", slow)


async def stream_lines(resp: aiohttp.ClientResponse):
  async for line in resp.content:
    if line.startswith(b"data: "):
      data = line[6:].strip().decode()
      yield data if data == "[DONE]" else json.loads(data)


def test_watchdog_fails_requests_behind_a_stuck_step(engine, monkeypatch):
  stall = threading.Event()
  slow_steps(monkeypatch, engine, 0.01, stall, stall_seconds=1.5)
  with LiveServer(ServerConfig(["tiny"], engine_iteration_timeout=0.3), engine) as s:
    async def scenario():
      async with aiohttp.ClientSession() as session:
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True, **GREEDY}
        async with session.post(f"{s.url}/v1/completions", json=body) as resp:
          events = []
          async for event in stream_lines(resp):
            if not events: stall.set()                        # the stream has begun: now a step gets stuck
            events.append(event)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_stalled"
        for path in ("/health", "/health/ready"):
          async with session.get(s.url + path) as r: assert (r.status, (await r.json())["status"]) == (503, "stalled")
        async with session.get(f"{s.url}/health/live") as r: assert r.status == 200    # the thread is alive
        async with session.post(f"{s.url}/v1/completions", json={**body, "stream": False}) as r:
          assert r.status == 503 and (await r.json())["error"]["code"] == "engine_stalled"
        deadline = time.monotonic() + 10
        while (await session.get(f"{s.url}/health")).status != 200:
          assert time.monotonic() < deadline
          await asyncio.sleep(0.05)                           # the stuck step returned: ready again
    asyncio.run(scenario())
    assert s.client().completions.create(model="tiny", prompt="x", max_tokens=2, **GREEDY).usage.completion_tokens == 2


class Dying:
  """An engine whose first step raises."""
  tokenizer, model_config, max_model_len = None, None, 0
  def stats(self) -> EngineStats: return EngineStats()
  def has_unfinished_requests(self) -> bool: return True
  def step(self): raise RuntimeError("kernel fault")


def test_liveness_fails_when_the_engine_thread_died():
  dead = AsyncLLMEngine(Dying())
  dead._thread.join(5)
  with LiveServer(ServerConfig(["tiny"]), None) as s:
    s.server.engine = dead
    for path in ("/health/live", "/health", "/health/ready"):
      status, body = request("GET", s.url + path)
      assert (status, body["status"]) == (503, "dead")


def test_call_runs_on_the_engine_thread(engine):
  """`call` is how the event loop gets anything else done with the engine: on its thread, the result (or the
  exception) coming back; on an engine whose loop died it raises at once instead of waiting forever."""
  assert asyncio.run(engine.call(lambda e: (threading.get_ident(), e))) == (engine._thread.ident, engine.engine)
  with pytest.raises(ZeroDivisionError): asyncio.run(engine.call(lambda e: 1 / 0))
  assert engine.alive                                         # the caller's error, not the engine's
  dead = AsyncLLMEngine(Dying())
  dead._thread.join(5)
  with pytest.raises(RuntimeError, match="kernel fault"): asyncio.run(dead.call(lambda e: 0))


class Watched:
  """Stands in for an object and records the threads that use it."""
  def __init__(self, target, threads: set[int]): self._target, self._threads = target, threads

  def __getattr__(self, name: str):
    self._threads.add(threading.get_ident())
    return getattr(self._target, name)


def test_only_the_engine_thread_touches_the_engine(engine, monkeypatch):
  """Loading, then /metrics, the health checks and the ops endpoints polled while requests stream: the engine's state
  (its stats and its scheduler's queues) is read on the engine thread only. The server reads the `stats` that thread
  published after its latest step, and that snapshot follows the load: it shows requests running, then none."""
  threads: set[int] = set()
  stats = engine.engine.stats
  def recorded_stats() -> EngineStats:
    threads.add(threading.get_ident())
    return stats()
  monkeypatch.setattr(engine.engine, "stats", recorded_stats)
  monkeypatch.setattr(engine.engine, "scheduler", Watched(engine.engine.scheduler, threads))
  slow_steps(monkeypatch, engine, 0.005)
  with LiveServer(ServerConfig(["tiny"]), engine) as s:
    async def scenario() -> float:
      async with aiohttp.ClientSession() as session:
        body = {"max_tokens": 24, "ignore_eos": True, **GREEDY}
        streams = [asyncio.create_task(read_stream(session, f"{s.url}/v1/completions", {**body, "prompt": f"Story {i}:"}))
                   for i in range(6)]
        busiest = 0.0
        while not all(task.done() for task in streams):
          async with session.get(f"{s.url}/metrics") as r: text = await r.text()
          busiest = max(busiest, float(re.search(r"^vllm:num_requests_running\{.*\} (\S+)$", text, re.M)[1]))
          for path in ("/health", "/health/ready", "/v1/models"):
            async with session.get(s.url + path) as r: assert r.status == 200
          async with session.post(f"{s.url}/tokenize", json={"prompt": "hi"}) as r: assert r.status == 200
          await asyncio.sleep(0.005)
        for events in await asyncio.gather(*streams): assert events[-1] == "[DONE]"
        return busiest
    assert asyncio.run(scenario()) == MAX_NUM_SEQS                 # the snapshot followed the engine
    wait_until_idle(s.url)
  assert threads == {engine._thread.ident}


def test_unset_sampling_fields_take_the_models_defaults(engine):
  """--generation-config: a field the request leaves out (or sends as null) gets the model's default; one it sets wins."""
  with LiveServer(ServerConfig(["tiny"], sampling_defaults={"temperature": 0.0}), engine) as s:
    client = s.client()
    ask = lambda **kw: [client.completions.create(model="tiny", prompt="Story:", max_tokens=12, extra_body={"ignore_eos": True},
                                                  seed=seed, **kw).choices[0].text for seed in (1, 2)]
    unset, null, greedy, hot = ask(), ask(temperature=None), ask(temperature=0), ask(temperature=2.0)
  assert unset == null == greedy and hot != greedy


def test_structured_outputs_through_the_openai_sdk_and_vllms_fields(live, client):
  """response_format (the SDK's parse() with a Pydantic model), structured_outputs and guided_*: the tiny random
  model's output still parses, as the grammar leaves it nothing else to write."""
  import pydantic
  from typing import Literal

  class Verdict(pydantic.BaseModel):
    ok: bool
    score: int = pydantic.Field(ge=0, le=9)
    colour: Literal["red", "green"]

  parsed = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "judge"}],
                                         response_format=Verdict, max_tokens=40, seed=1)
  assert isinstance(parsed.choices[0].message.parsed, Verdict)
  for extra in ({"structured_outputs": {"choice": ["alpha", "beta"]}}, {"guided_choice": ["alpha", "beta"]}):
    out = client.completions.create(model="tiny", prompt="pick", max_tokens=8, extra_body=extra, seed=2)
    assert out.choices[0].text in ("alpha", "beta") and out.choices[0].finish_reason == "stop"
  out = client.completions.create(model="tiny", prompt="a number", max_tokens=8, seed=3,
                                  extra_body={"guided_regex": "[1-9][0-9]?"})
  assert re.fullmatch("[1-9][0-9]?", out.choices[0].text)


WEATHER_TOOL = {"type": "function", "function": {
  "name": "get_weather", "description": "The weather in a city now.",
  "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}


def test_a_streamed_tool_call_round_trip_through_the_openai_sdk(live, client):
  """A call (tool_choice "required"), streamed as OpenAI's delta.tool_calls; then the result as a "tool" message
  and a plain answer (tool_choice "none")."""
  messages = [{"role": "user", "content": "How warm is it in Paris?"}]
  stream = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
                                          stream=True, max_tokens=40, seed=1)
  calls, reasons = {}, []
  for chunk in stream:
    for choice in chunk.choices:
      reasons.append(choice.finish_reason)
      for call in choice.delta.tool_calls or []:
        entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
        entry["arguments"] += call.function.arguments or ""
  assert reasons[-1] == "tool_calls" and calls
  call = calls[0]
  assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in ("Paris", "Rome")
  messages += [{"role": "assistant", "content": None, "tool_calls": [
                 {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
               {"role": "tool", "tool_call_id": call["id"], "content": "21 C"}]
  final = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice="none",
                                         max_tokens=5, **GREEDY)
  assert final.choices[0].message.tool_calls is None and isinstance(final.choices[0].message.content, str)


def test_tool_choice_auto_and_named_give_a_call_or_an_answer(client):
  named = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=40,
                                         tools=[WEATHER_TOOL, {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"],
                                                                                            "name": "other"}}],
                                         tool_choice={"type": "function", "function": {"name": "other"}}, seed=3)
  assert [c.function.name for c in named.choices[0].message.tool_calls] == ["other"]
  assert named.choices[0].finish_reason == "tool_calls"
  for seed in range(3):
    auto = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=40,
                                          tools=[WEATHER_TOOL], parallel_tool_calls=False, seed=seed)
    message = auto.choices[0].message
    assert (message.tool_calls is None) != (message.content is None)
    assert message.tool_calls is None or len(message.tool_calls) == 1


@pytest.mark.parametrize("template", ["Qwen-Qwen2.5-7B-Instruct.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja",
                                      "mistralai-Mistral-Nemo-Instruct-2407.jinja"])
def test_a_template_that_renders_tools_gets_them_and_the_reply_is_read_in_its_format(engine, client, monkeypatch,
                                                                                      template):
  """The template describes the tools in its own words; a required call comes back in the model's own format (the
  grammar makes the random model write one), then the call and its result render through the same template."""
  tok = engine.engine.tokenizer
  monkeypatch.setattr(tok, "chat_template", (Path(__file__).parents[1] / "data" / "chat_templates" / template).read_text())
  messages = [{"role": "user", "content": "How warm is it in Paris?"}]
  prompt = tok.decode(parse_chat({"messages": messages, "tools": [WEATHER_TOOL]}, tok, MAX_MODEL_LEN).prompts[0])
  assert "The weather in a city now." in prompt and "You can call these tools" not in prompt   # not the generic text
  out = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=40, seed=1)   # a random model goes on
  choice = out.choices[0]
  assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
  call = choice.message.tool_calls[0]
  assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
  messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
  for choice in ("auto", "none"):               # "none": no tools now, but the earlier call is still the model's own
    body = {"messages": messages, "tools": [WEATHER_TOOL], "tool_choice": choice}
    history = tok.decode(parse_chat(body, tok, MAX_MODEL_LEN).prompts[0])
    assert "21 C" in history and '"city": "' in history and "get_weather" in history.split("How warm")[1]
    assert '{"tool_calls": [' not in history and '{"tool_response": ' not in history   # not the generic format
  broken = messages[:1] + [{"role": "assistant", "content": None, "tool_calls": [{"function": 3}]}]
  with pytest.raises(APIError) as e: parse_chat({"messages": broken, "tools": [WEATHER_TOOL]}, tok, MAX_MODEL_LEN)
  assert e.value.param == "messages"
  final = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=5, **GREEDY)
  assert final.choices[0].finish_reason == "length" and final.choices[0].message.content   # "auto": free text
  chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=5,
                                               stream=True, **GREEDY))     # the same text, streamed as it comes
  texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
  assert "".join(texts) == final.choices[0].message.content
  assert len(texts) > 1 or not texts[0].strip()        # blank text may still become a Llama 3.1 call: held back


@pytest.mark.parametrize("extra, param", [
  ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
  ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
  ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
  ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
  ({"tool_choice": "required"}, "tool_choice"),
  ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
  ({"tools": [WEATHER_TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
  ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "response_format"),
  ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools"),
])
def test_bad_tools_are_a_400_naming_the_field(live, extra, param):
  body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}
  status, body = request("POST", f"{live.url}/v1/chat/completions", body)
  assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.parametrize("extra, param", [
  ({"response_format": {"type": "xml"}}, "response_format"),
  ({"response_format": {"type": "json_schema", "json_schema": {"schema": "nope"}}}, "response_format"),
  ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
  ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
  ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs"),
  ({"guided_json": {"type": "nonsense"}}, "guided_json"),
  ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_a_bad_constraint_is_a_400_naming_its_field(live, extra, param):
  status, body = request("POST", f"{live.url}/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, **extra})
  assert status == 400 and body["error"]["param"] == param, body


def test_drain_limit_ends_streams_with_an_error_and_done(engine, monkeypatch):
  slow_steps(monkeypatch, engine, 0.02)
  with LiveServer(ServerConfig(["tiny"]), engine) as s:
    async def scenario():
      async with aiohttp.ClientSession() as session:
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True, **GREEDY}
        begun = [asyncio.Event(), asyncio.Event()]

        async def read(started: asyncio.Event) -> list:
          async with session.post(f"{s.url}/v1/completions", json=body) as resp:
            events = []
            async for event in stream_lines(resp):
              started.set()
              events.append(event)
            return events
        streams = [asyncio.create_task(read(started)) for started in begun]
        for started in begun: await started.wait()
        drained = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(s.server.drain(0.2), s.loop))
        assert not drained
        for events in await asyncio.gather(*streams):
          assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "draining"
    asyncio.run(scenario())


def test_num_requests_running_counts_requests(engine, monkeypatch):
  slow_steps(monkeypatch, engine, 0.02)
  with LiveServer(ServerConfig(["tiny"]), engine) as s:
    async def scenario():
      async with aiohttp.ClientSession() as session:
        body = {"prompt": "x", "max_tokens": 40, "ignore_eos": True, "n": 2, "temperature": 1, "seed": 1}
        task = asyncio.create_task(read_stream(session, f"{s.url}/v1/completions", body, hang_up_after=3))
        seen = 0
        while not task.done():
          seen = max(seen, metrics(s.url)["vllm:num_requests_running"])   # both choices run: still one request
          await asyncio.sleep(0.02)
        assert seen == 1
    asyncio.run(scenario())


def test_cors_preflight_before_auth_and_headers_on_responses(engine):
  preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
  with LiveServer(ServerConfig(["tiny"], api_key="k"), engine) as s:
    async def scenario():
      async with aiohttp.ClientSession() as session:
        async with session.options(f"{s.url}/v1/chat/completions", headers=preflight) as r:
          assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
          assert "POST" in r.headers["Access-Control-Allow-Methods"]
          assert "authorization" in r.headers["Access-Control-Allow-Headers"]
        headers = {"Origin": "https://app.example", "Authorization": "Bearer k"}
        async with session.get(f"{s.url}/v1/models", headers=headers) as r:
          assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        body = {"prompt": "x", "max_tokens": 1, "stream": True}
        async with session.post(f"{s.url}/v1/completions", json=body, headers=headers) as r:   # a stream too
          assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
          await r.read()
    asyncio.run(scenario())
  with LiveServer(ServerConfig(["tiny"], allowed_origins=["https://ok.example"]), engine) as s:
    async def scenario():
      async with aiohttp.ClientSession() as session:
        async with session.options(f"{s.url}/v1/models", headers=preflight) as r:
          assert r.status == 400 and (await r.json())["error"]["code"] == "cors_disallowed"
        async with session.options(f"{s.url}/v1/models", headers={**preflight, "Origin": "https://ok.example"}) as r:
          assert r.headers["Access-Control-Allow-Origin"] == "https://ok.example"
        async with session.get(f"{s.url}/v1/models", headers={"Origin": "https://app.example"}) as r:
          assert "Access-Control-Allow-Origin" not in r.headers
    asyncio.run(scenario())


def test_405_names_the_allowed_methods(live):
  req = urllib.request.Request(f"{live.url}/v1/completions", method="GET")
  with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(req, timeout=10)
  assert e.value.status == 405 and e.value.headers["Allow"] == "POST"
  assert set(json.loads(e.value.read())["error"]) == {"message", "type", "param", "code"}


def test_failed_api_keys_are_rate_limited(engine):
  with LiveServer(ServerConfig(["tiny"], api_key="sekrit"), engine) as s:
    for _ in range(10):
      with pytest.raises(openai.AuthenticationError): s.client(api_key="guess").models.list()
    with pytest.raises(openai.RateLimitError) as e: s.client(api_key="guess").models.list()
    assert e.value.body["code"] == "too_many_auth_failures"
    with pytest.raises(openai.RateLimitError): s.client(api_key="sekrit").models.list()   # no more guesses for now


def test_root_path(engine):
  with LiveServer(ServerConfig(["tiny"], api_key="k", root_path="/llm"), engine) as s:
    for prefix in ("/llm", ""):                           # behind a proxy that keeps the prefix, or strips it
      client = openai.OpenAI(base_url=f"{s.url}{prefix}/v1", api_key="k", max_retries=0)
      assert client.models.list().data[0].id == "tiny"
      assert request("GET", f"{s.url}{prefix}/v1/models")[0] == 401
      assert request("GET", f"{s.url}{prefix}/health")[0] == 200


def test_https(engine, tmp_path):
  key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                  "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
  with LiveServer(ServerConfig(["tiny"], ssl_keyfile=str(key), ssl_certfile=str(cert)), engine) as s:
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    with urllib.request.urlopen(f"https://127.0.0.1:{s.port}/health", context=context, timeout=10) as r:
      assert r.status == 200


def test_half_sent_requests_are_dropped(live_timeouts):
  def exchange(data: bytes) -> tuple[float, bytes]:
    with socket.create_connection(("127.0.0.1", live_timeouts.port), timeout=10) as sock:
      sock.sendall(data)
      t0, reply = time.monotonic(), b""
      while chunk := sock.recv(65536): reply += chunk          # until the server closes the connection
      return time.monotonic() - t0, reply
  head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
  seconds, reply = exchange(head)                              # the head never ends
  assert seconds < 5 and reply == b""
  for partial in (head + b"Content-Length: 100\r\n\r\n{\"prompt\"", head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"):
    seconds, reply = exchange(partial)                         # the body never ends
    assert seconds < 5 and reply.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in reply


@pytest.fixture
def live_timeouts(engine):
  with LiveServer(ServerConfig(["tiny"], header_timeout=0.5, body_timeout=0.5), engine) as s: yield s


def test_served_model_name_is_the_file_stem():
  spec = importlib.util.spec_from_file_location("serve", Path(__file__).parents[2] / "serve.py")
  serve_cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve_cli)
  args = serve_cli.parse_args(["--model", "models/SmolLM2-135M-Instruct.Q8_0.gguf"])
  assert serve_cli.server_config(args).served_model_names == ["SmolLM2-135M-Instruct", "models/SmolLM2-135M-Instruct.Q8_0.gguf"]
  with pytest.raises(SystemExit): serve_cli.parse_args(["--speculative-config", '{"num_speculative_tokens": 0}'])
  assert serve_cli.parse_args(["--speculative-config", '{"num_speculative_tokens": 2}']).speculative_config
  args = serve_cli.parse_args(["--allowed-origins", '["https://a.example"]', "--allowed-methods", "GET,POST"])
  config = serve_cli.server_config(args)
  assert (config.allowed_origins, config.allowed_methods, config.allowed_headers) == (["https://a.example"], ["GET", "POST"], ["*"])


def fuzz_bodies(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
  """(path, raw body): valid requests with one to three fields set to hostile values, and a few hostile wholes."""
  nested = json.loads("[" * 40 + "]" * 40)
  hostile = [HUGE, -HUGE, 10**400, -1, 0, 1, 2, 21, 10**6, 0.5, -0.5, 1e308, -1e308, float("nan"), float("inf"),
             float("-inf"), "x", "", "9" * 5000, True, False, None, [], {}, [1] * 1000, ["s"] * 50, {"1": 1},
             {str(i): 1 for i in range(400)}, nested, {"a": nested}, [{"role": "user"}], "\x00\ud800"]
  fields = ["max_tokens", "temperature", "top_p", "n", "best_of", "logprobs", "stop", "seed", "presence_penalty",
            "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "prompt_logprobs",
            "stop_token_ids", "stream", "stream_options", "model", "ignore_eos", "diffusion_steps", "cfg_scale"]
  endpoints = {"/v1/completions": ({"prompt": "hi", "max_tokens": 1, **GREEDY}, fields + ["prompt", "echo", "suffix"]),
               "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **GREEDY},
                                        fields + ["messages", "top_logprobs", "logprobs", "max_completion_tokens", "tools"])}
  bodies = []
  for _ in range(count):
    path = rng.choice(list(endpoints))
    base, names = endpoints[path]
    if rng.random() < 0.05:
      whole = rng.choice([nested, "text", HUGE, [base], None, {"prompt": "x" * 1_100_000}])
      bodies.append((path, json.dumps(whole).encode()))
      continue
    body = dict(base)
    for name in rng.sample(names, rng.randint(1, 3)): body[name] = rng.choice(hostile)
    bodies.append((path, json.dumps(body).encode()))
  return bodies


def test_fuzz_bodies_never_500_and_the_engine_keeps_going(live):
  bodies = fuzz_bodies(random.Random(0), 1200)
  statuses = collections.Counter()

  async def one(session: aiohttp.ClientSession, limit: asyncio.Semaphore, path: str, raw: bytes) -> None:
    async with limit, session.post(live.url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
      text = await r.text()
      statuses[r.status] += 1
      assert r.status < 500, (raw[:300], text[:300])
      if r.status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), text[:300]

  async def run():
    limit = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
      await asyncio.gather(*(one(session, limit, path, raw) for path, raw in bodies))
  asyncio.run(run())
  assert sum(statuses.values()) == len(bodies) and statuses[200] > 0 and statuses[400] > len(bodies) // 2, statuses
  assert request("GET", f"{live.url}/health")[0] == 200
  wait_until_idle(live.url)
  assert live.client().completions.create(model="tiny", prompt="hi", max_tokens=2, **GREEDY).usage.completion_tokens == 2


# ---- the chat page in a real browser --------------------------------------------------------------------------------
@dataclass
class Browser:
  """Headless Chromium driven over the DevTools protocol: navigate, type, press Enter, read the page."""
  ws: aiohttp.ClientWebSocketResponse
  next_id: int = 0

  async def call(self, method: str, **params) -> dict:
    self.next_id += 1
    await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
    async for msg in self.ws:
      reply = json.loads(msg.data)
      if reply.get("id") == self.next_id: return reply.get("result", {})
    raise ConnectionError("the browser closed the DevTools connection")

  async def js(self, expression: str):
    return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

  async def wait_for(self, expression: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await self.js(expression):
      assert time.monotonic() < deadline, f"timed out waiting for {expression}"
      await asyncio.sleep(0.1)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_chat_page_streams_a_reply_in_chromium(live, client, tmp_path):
  expected = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                            max_tokens=8, **GREEDY).choices[0].message.content
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           "--remote-debugging-port=0", "about:blank"]
  proc = subprocess.Popen([CHROMIUM, *flags], stderr=subprocess.PIPE, text=True)
  try:
    devtools = next(m[1] for line in proc.stderr if (m := re.search(r"DevTools listening on ws://([^/]+)/", line)))

    async def chat() -> str:
      async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{devtools}/json/list") as r: target = next(t for t in await r.json() if t["type"] == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
          page = Browser(ws)
          await page.call("Page.navigate", url=f"{live.url}/?temperature=0&max_tokens=8")
          await page.wait_for("document.getElementById('model')?.textContent === 'tiny'")
          await page.js("document.getElementById('prompt').focus()")
          await page.call("Input.insertText", text="Hello!")
          await page.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
          await page.wait_for("document.getElementById('status').dataset.state === 'done'")
          shot = await page.call("Page.captureScreenshot")
          (tmp_path / "chat.png").write_bytes(base64.b64decode(shot["data"]))
          return await page.js("[...document.querySelectorAll('.msg')].map(m => m.className + ': ' + m.textContent)")

    messages = asyncio.run(chat())
  finally:
    proc.terminate()
    proc.wait(10)
  assert messages == ["msg user: Hello!", f"msg assistant: {expected}"]


# ---- the real model -------------------------------------------------------------------------------------------------
def test_smollm2_greedy_text_through_server_equals_llm_generate(smollm2):
  """The embedded SmolLM2 (the suite's shared instance): the server's greedy completion, whole and streamed, is
  LLM.generate's text. Kernels compiled by generate are reused by the server: same engine, same shapes."""
  prompt = "The capital of France is"
  expected = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
  with LiveServer(ServerConfig(["smollm2"]), AsyncLLMEngine(smollm2.engine)) as s:
    whole = s.client().completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    streamed = s.client().completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert whole.choices[0].text == "".join(c.choices[0].text for c in streamed) == expected
  assert "Paris" in expected
