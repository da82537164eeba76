"""The HTTP server: OpenAI's API on aiohttp, in front of the engine loop.

    client ──HTTP──► handler on the event loop ──generate()──► AsyncLLMEngine ──► engine thread: step(), step(), ...
           ◄──JSON / SSE chunks──  Generation  ◄──RequestOutput (text so far)──┘

The model computes on the engine's own thread, so the event loop keeps answering health checks, metrics and new
requests while a step runs. Each prompt of an HTTP request becomes one engine request whose outputs its handler
awaits. When the client hangs up, aiohttp cancels the handler; the cancellation lands in the engine request's
generator, whose `finally` aborts it, and its KV blocks go back to the pool right away.

A server's life: live (it answers) → ready (the model is loaded and warmed, /health/ready says 200) → draining
(SIGTERM or SIGINT: new generation requests get 503 while those in flight finish, up to a drain timeout) → stopped.

Guards, in the order a request meets them: API key (401), per-client rate limit (429), body and fields (400),
model name (404), admission (503 when draining or when too many requests are in flight), and the request timeout.
"""
from __future__ import annotations
import asyncio
import contextlib
import hmac
import json
import logging
import math
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from aiohttp import web
from tinyvllm.engine import AsyncLLMEngine, EngineStats
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.server.limits import RateLimiter
from tinyvllm.server.metrics import CONTENT_TYPE, Metrics, RequestMetrics
from tinyvllm.server.protocol import (APIError, GenerationRequest, bad_request, chat_prompt, completion_prompts, field,
                                      list_field, parse_chat, parse_completion, parse_json)
from tinyvllm.server.responses import ChatFormat, CompletionFormat, Generation, ResponseFormat

log = logging.getLogger("tinyvllm.server")
STATIC = Path(__file__).parent / "static"
PROTECTED = ("/v1/", "/tokenize", "/detokenize")      # paths behind the API key and the rate limit
T = TypeVar("T")


@dataclass
class ServerConfig:
  served_model_names: list[str]           # the first is the one reported; requests may use any
  api_key: str | None = None
  max_in_flight: int | None = None        # more concurrent generation requests than this get 503
  request_timeout: float | None = None    # seconds; a request still running then is aborted
  rate_limit: float | None = None         # requests per second per client address


def unavailable(message: str, code: str) -> APIError: return APIError(503, message, "server_error", code=code)


class OpenAIServer:
  def __init__(self, config: ServerConfig):
    self.config = config
    self.engine: AsyncLLMEngine | None = None        # set once the model is loaded and warmed
    self.draining = False
    self.in_flight = 0
    self.metrics = Metrics(config.served_model_names[0])
    self.rate_limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
    self.app = web.Application(middlewares=[self._errors, self._auth, self._rate_limit])
    self.app.add_routes([
      web.get("/", self.index), web.get("/health", self.ready), web.get("/health/live", self.live),
      web.get("/health/ready", self.ready), web.get("/metrics", self.prometheus), web.get("/v1/models", self.models),
      web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
      web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize),
    ])

  # ---- lifecycle ------------------------------------------------------------------------------------------------
  async def load(self, build: Callable[[], AsyncLLMEngine]) -> None:
    """Build the engine off the event loop, warm it up, then start taking requests."""
    t0 = time.perf_counter()
    engine = await asyncio.to_thread(build)
    await warm_up(engine)
    self.engine = engine
    log.info("model ready", extra={"model": self.config.served_model_names[0], "seconds": round(time.perf_counter() - t0, 2)})

  async def drain(self, timeout: float) -> bool:
    """Refuse new generation requests and wait up to `timeout` s for those in flight; True if all finished."""
    self.draining = True
    deadline = time.monotonic() + timeout
    while self.in_flight and time.monotonic() < deadline: await asyncio.sleep(0.05)
    return self.in_flight == 0

  @contextlib.contextmanager
  def _admit(self) -> Iterator[None]:
    if self.draining: raise unavailable("the server is shutting down and takes no new requests", "draining")
    limit = self.config.max_in_flight
    if limit is not None and self.in_flight >= limit:
      raise unavailable(f"the server is at capacity ({self.in_flight} requests in flight): retry later", "queue_full")
    self.in_flight += 1
    try: yield
    finally: self.in_flight -= 1

  def _ready_engine(self) -> AsyncLLMEngine:
    if self.engine is None: raise unavailable("the model is still loading", "model_loading")
    return self.engine

  def _model_name(self, requested: str | None) -> str:
    names = self.config.served_model_names
    if requested is None or requested in names: return requested or names[0]
    raise APIError(404, f"The model `{requested}` does not exist; this server serves {', '.join(names)}",
                   param="model", code="model_not_found")

  # ---- middlewares ----------------------------------------------------------------------------------------------
  @web.middleware
  async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as OpenAI's {"error": {...}} JSON, unknown routes and crashes included."""
    try: return await handler(request)
    except APIError as e: return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
      if e.status < 400: raise
      return web.json_response(APIError(e.status, f"{e.reason}: {request.method} {request.path}").body(), status=e.status)
    except ConnectionResetError: raise                                     # the client is gone: nobody to tell
    except Exception:
      log.exception("unhandled error", extra={"path": request.path})
      return web.json_response(APIError(500, "internal server error", "server_error").body(), status=500)

  @web.middleware
  async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
    key = self.config.api_key
    if key and request.path.startswith(PROTECTED):
      sent = request.headers.get("Authorization", "").encode()
      if not hmac.compare_digest(sent, f"Bearer {key}".encode()):         # constant time: no guessing byte by byte
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    return await handler(request)

  @web.middleware
  async def _rate_limit(self, request: web.Request, handler) -> web.StreamResponse:
    if self.rate_limiter and request.path.startswith(PROTECTED):
      wait = self.rate_limiter.acquire(request.remote or "unknown")
      if wait:
        raise APIError(429, f"rate limit of {self.config.rate_limit} requests/s exceeded: retry in {wait:.2f} s",
                       "requests", code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait))})
    return await handler(request)

  # ---- small endpoints ------------------------------------------------------------------------------------------
  async def index(self, request: web.Request) -> web.FileResponse: return web.FileResponse(STATIC / "index.html")

  async def live(self, request: web.Request) -> web.Response: return web.json_response({"status": "live"})

  async def ready(self, request: web.Request) -> web.Response:
    status = "draining" if self.draining else "ready" if self.engine else "loading"
    return web.json_response({"status": status}, status=200 if status == "ready" else 503)

  async def prometheus(self, request: web.Request) -> web.Response:
    text = self.metrics.render(self.engine.engine.stats() if self.engine else EngineStats())
    return web.Response(text=text, headers={"Content-Type": CONTENT_TYPE})

  async def models(self, request: web.Request) -> web.Response:
    engine = self._ready_engine().engine
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "tinyvllm", "max_model_len": engine.max_model_len}
            for name in self.config.served_model_names]
    return web.json_response({"object": "list", "data": data})

  async def tokenize(self, request: web.Request) -> web.Response:
    """{"prompt": text} or {"messages": [...]} → {"tokens": [...], "count": n, "max_model_len": m}."""
    engine = self._ready_engine().engine
    body = parse_json(await request.read())
    self._model_name(field(body, "model", str))
    if "messages" in body: ids = chat_prompt(body, engine.tokenizer)
    else: ids = completion_prompts(field(body, "prompt", str, ""), engine.tokenizer,
                                   field(body, "add_special_tokens", bool, True))[0]
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})

  async def detokenize(self, request: web.Request) -> web.Response:
    engine = self._ready_engine().engine
    body = parse_json(await request.read())
    self._model_name(field(body, "model", str))
    ids = list_field(body, "tokens", int)
    if engine.tokenizer is None: raise bad_request("this model has no tokenizer", "tokens")
    if not all(0 <= t < engine.model_config.vocab_size for t in ids):
      raise bad_request(f"token ids must be in [0, {engine.model_config.vocab_size})", "tokens")
    return web.json_response({"prompt": engine.tokenizer.decode(ids)})

  # ---- generation -----------------------------------------------------------------------------------------------
  async def completions(self, request: web.Request) -> web.StreamResponse:
    return await self._generate(request, CompletionFormat(), parse_completion)

  async def chat(self, request: web.Request) -> web.StreamResponse:
    return await self._generate(request, ChatFormat(), parse_chat)

  async def _generate(self, request: web.Request, fmt: ResponseFormat,
                      parse: Callable[..., GenerationRequest]) -> web.StreamResponse:
    engine = self._ready_engine()
    body = parse_json(await request.read())
    model = self._model_name(field(body, "model", str))
    req = parse(body, engine.engine.tokenizer, engine.engine.max_model_len)
    gen = Generation(fmt, req, f"{fmt.id_prefix}-{uuid.uuid4().hex}", model, engine.engine.tokenizer)
    with self._admit():
      stats = self.metrics.request(gen.prompt_tokens)
      try:
        if req.stream: return await self._stream(request, engine, gen, stats)
        await self._run(engine, gen, stats, _ignore)
        return web.json_response(gen.response())
      finally:
        if gen.finished: stats.finish()
        log.info("request finished" if gen.finished else "request stopped early",
                 extra={"request_id": gen.request_id, "prompt_tokens": gen.prompt_tokens,
                        "completion_tokens": gen.completion_tokens,
                        "finish_reasons": [c.finish_reason for c in gen.choices]})

  async def _stream(self, request: web.Request, engine: AsyncLLMEngine, gen: Generation,
                    stats: RequestMetrics) -> web.StreamResponse:
    events = EventStream(request)
    try:
      await self._run(engine, gen, stats, events.send)
      if gen.request.include_usage: await events.send(gen.usage_chunk())
    except APIError as e:
      if not events.started: raise              # nothing sent yet: still time for a proper status code
      await events.send(e.body())               # OpenAI's SDKs raise on an event that carries "error"
    await events.send("[DONE]")
    return events.response

  async def _run(self, engine: AsyncLLMEngine, gen: Generation, stats: RequestMetrics,
                 emit: Callable[[dict], Awaitable[None]]) -> None:
    """Feed the engine's outputs for every prompt of `gen` into it until all choices finish; `emit` each chunk."""
    streams = [engine.generate(ids, gen.request.params, f"{gen.request_id}-{i}") for i, ids in enumerate(gen.request.prompts)]
    try:
      async with asyncio.timeout(self.config.request_timeout), contextlib.aclosing(merge(streams)) as outputs:
        async for i, out in outputs:
          for chunk in gen.update(i, out): await emit(chunk)
          stats.update(gen.completion_tokens, sum(gen.cached_tokens.values()))
    except TimeoutError:
      raise APIError(504, f"the request ran longer than the server's --request-timeout of {self.config.request_timeout} s "
                          f"and was aborted after {gen.completion_tokens} generated tokens", "server_error",
                     code="request_timeout")
    except ValueError as e: raise bad_request(str(e))          # the engine refused the request


async def _ignore(chunk: dict) -> None: pass


class EventStream:
  """Server-sent events. The HTTP response starts with the first event, so that until then an error can still be
  answered with a proper status code instead of an event inside a 200."""
  HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

  def __init__(self, request: web.Request):
    self.request = request
    self.response: web.StreamResponse | None = None

  @property
  def started(self) -> bool: return self.response is not None

  async def send(self, data: dict | str) -> None:
    if self.response is None:
      self.response = web.StreamResponse(headers=self.HEADERS)
      await self.response.prepare(self.request)
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    await self.response.write(f"data: {payload}\n\n".encode())


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
  """Items of several async iterators as they arrive, tagged with the iterator's index. Leaving early cancels the
  rest, which for engine streams aborts their requests."""
  queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

  async def pump(i: int, stream: AsyncIterator[T]) -> None:
    try:
      async for item in stream: queue.put_nowait((i, item))
      queue.put_nowait((i, None))                                           # None: this stream is done
    except Exception as e: queue.put_nowait((i, e))

  tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
  try:
    remaining = len(tasks)
    while remaining:
      i, item = await queue.get()
      if isinstance(item, BaseException): raise item
      if item is None: remaining -= 1
      else: yield i, item
  finally:
    for t in tasks: t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def warm_up(engine: AsyncLLMEngine) -> None:
  """One short greedy request, so that compiling the first kernels is not charged to the first client: its two
  prompt tokens run as a prefill chunk, its second output token as a decode."""
  async for _ in engine.generate([0, 0], SamplingParams(max_tokens=2, temperature=0), f"warmup-{uuid.uuid4().hex}"): pass


async def start(server: OpenAIServer, host: str, port: int) -> web.AppRunner:
  """Listen on host:port. handler_cancellation makes a client's hang-up cancel its handler (and so abort its
  engine request) at once, instead of at the next write."""
  runner = web.AppRunner(server.app, handler_cancellation=True, shutdown_timeout=1.0)
  await runner.setup()
  await web.TCPSite(runner, host, port).start()
  return runner


async def serve(server: OpenAIServer, host: str, port: int, build: Callable[[], AsyncLLMEngine],
                drain_timeout: float) -> None:
  """Serve until SIGTERM or SIGINT, then drain: refuse new requests (503), let those in flight finish for up to
  `drain_timeout` s, stop. The model loads in the background; /health/ready turns 200 when it is warm."""
  loop, stop = asyncio.get_running_loop(), asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT): loop.add_signal_handler(sig, stop.set)
  runner = await start(server, host, port)
  log.info("listening", extra={"url": f"http://{host}:{port}"})
  try:
    loading, stopping = asyncio.create_task(server.load(build)), asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading in done:
      loading.result()                                                      # a model that failed to load: raise
      await stopping
    log.info("draining", extra={"in_flight": server.in_flight, "timeout": drain_timeout})
    if not await server.drain(drain_timeout): log.warning("drain timeout: aborting", extra={"in_flight": server.in_flight})
  finally:
    for sig in (signal.SIGTERM, signal.SIGINT): loop.remove_signal_handler(sig)
    await runner.cleanup()
  log.info("stopped")
