"""The HTTP server: OpenAI's API on aiohttp, in front of the engine loop.

    client ──HTTP──► handler on the event loop ──generate()──► AsyncLLMEngine ──► engine thread: step(), step(), ...
           ◄──JSON / SSE chunks──  Generation  ◄──RequestOutput (text so far)──┘

The model computes on the engine's own thread, so the event loop keeps answering health checks, metrics and new
requests while a step runs. Only that thread touches the engine: the handlers post requests, aborts and the warmup
to `AsyncLLMEngine`, and read only what it publishes after each step (`stats` for /metrics, `step_started` for the
watchdog) and the model's fixed facts (tokenizer, model_config, max_model_len).

Each prompt of an HTTP request becomes one engine request whose outputs its handler awaits. When the client hangs
up, aiohttp cancels the handler; the cancellation lands in the engine request's generator, whose `finally` aborts
it, and its KV blocks go back to the pool right away.

A server's life: live (it answers) → ready (the model is loaded and warmed, /health/ready says 200) → draining
(SIGTERM or SIGINT: new generation requests get 503 while those in flight finish, up to a drain timeout; streams still
running then end with an error event and `[DONE]`) → stopped.

A watchdog watches the engine thread. A step running longer than `engine_iteration_timeout` (a kernel that never
returns, a request the validation should have refused) turns /health and /health/ready to 503 and fails the requests
in flight with an error, instead of leaving every client waiting on a server that still looks healthy; it clears when
a step completes. An engine thread that died turns /health/live to 503 too, so an orchestrator restarts the process.

Guards, in the order a request meets them: CORS preflight (answered before anything else, as browsers send it
without credentials), API key (401; clients with too many failed attempts get 429), per-client rate limit (429),
header and body read timeouts (a connection must deliver its request head within `header_timeout` s, its body
within `body_timeout` s: 408), body and fields (400), model name (404), admission (503 when draining, stalled, or too
many requests are in flight), and the request timeout.
"""
from __future__ import annotations
import asyncio
import contextlib
import hmac
import json
import logging
import math
import signal
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import TypeVar
from aiohttp import web
from tinyvllm.async_engine import AsyncLLMEngine
from tinyvllm.engine.protocol import EngineStats
from tinyvllm.sampling_params import MAX_N, SamplingParams
from tinyvllm.server.limits import RateLimiter
from tinyvllm.server.metrics import CONTENT_TYPE, Metrics, RequestMetrics
from tinyvllm.server.protocol import (APIError, GenerationRequest, bad_request, chat_prompt, completion_prompts, field,
                                      list_field, parse_chat, parse_completion, parse_json)
from tinyvllm.server.responses import ChatFormat, CompletionFormat, Generation, ResponseFormat, ToolChatFormat

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
  max_n: int = MAX_N                      # choices per prompt
  engine_iteration_timeout: float = 120.0   # seconds one engine step may run before the watchdog declares a stall
  header_timeout: float = 30.0            # seconds to receive a request's head (and between requests on a connection)
  body_timeout: float = 30.0              # seconds to receive a request's body
  allowed_origins: list[str] = dataclass_field(default_factory=lambda: ["*"])    # CORS, as vLLM's defaults
  allowed_methods: list[str] = dataclass_field(default_factory=lambda: ["*"])
  allowed_headers: list[str] = dataclass_field(default_factory=lambda: ["*"])
  root_path: str = ""                     # a path prefix a proxy may put in front of every route
  ssl_keyfile: str | None = None          # both set: serve HTTPS
  ssl_certfile: str | None = None
  sampling_defaults: dict = dataclass_field(default_factory=dict)   # the model's, for the fields a request leaves
                                                                    # unset (model/generation_config.py)


# Failed API-key attempts per client: 10 at once, then one every 5 s.
AUTH_FAILURE_RATE, AUTH_FAILURE_BURST = 0.2, 10
CORS_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def unavailable(message: str, code: str) -> APIError: return APIError(503, message, "server_error", code=code)


class OpenAIServer:
  def __init__(self, config: ServerConfig):
    self.config = config
    self.engine: AsyncLLMEngine | None = None        # set once the model is loaded and warmed
    self.draining = False
    self.stalled = False                             # the watchdog saw a step run past engine_iteration_timeout
    self.in_flight = 0
    self.metrics = Metrics(config.served_model_names[0])
    self.rate_limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
    self.auth_failures = RateLimiter(AUTH_FAILURE_RATE, AUTH_FAILURE_BURST)
    self.root_path = config.root_path.rstrip("/")
    self.app = web.Application(middlewares=[self._cors, self._errors, self._auth, self._rate_limit])
    self.app.on_response_prepare.append(self._cors_headers)
    self.app.on_cleanup.append(self._stop_watchdog)
    self._watchdog: asyncio.Task | None = None
    for prefix in dict.fromkeys(["", self.root_path]):     # behind a proxy that keeps the prefix, or strips it
      self.app.add_routes([
        web.get(f"{prefix}/", self.index), web.get(f"{prefix}/health", self.ready),
        web.get(f"{prefix}/health/live", self.live), web.get(f"{prefix}/health/ready", self.ready),
        web.get(f"{prefix}/metrics", self.prometheus), web.get(f"{prefix}/v1/models", self.models),
        web.post(f"{prefix}/v1/completions", self.completions), web.post(f"{prefix}/v1/chat/completions", self.chat),
        web.post(f"{prefix}/tokenize", self.tokenize), web.post(f"{prefix}/detokenize", self.detokenize),
      ])

  # ---- lifecycle ------------------------------------------------------------------------------------------------
  async def load(self, build: Callable[[], AsyncLLMEngine]) -> None:
    """Build the engine off the event loop, warm it up, then start taking requests."""
    t0 = time.perf_counter()
    engine = await asyncio.to_thread(build)
    await warm_up(engine)
    self.engine = engine
    self._watchdog = asyncio.create_task(self._watch(engine))
    stats = engine.stats                             # as the engine thread published it after the warmup
    log.info("model ready", extra={"model": self.config.served_model_names[0], "seconds": round(time.perf_counter() - t0, 2),
                                   "graphs": stats.graph_builds, "graph_seconds": round(stats.graph_build_seconds, 2),
                                   "graphs_loaded": stats.graph_loads})

  async def drain(self, timeout: float) -> bool:
    """Refuse new generation requests and wait up to `timeout` s for those in flight; True if all finished."""
    self.draining = True
    if await self._wait_idle(timeout): return True
    if self.engine is not None:        # streams end with an error event and [DONE], the others with a 503
      self.engine.fail_all(unavailable(f"the server shut down before the request finished (drain timeout {timeout} s)",
                                       "draining"))
      await self._wait_idle(2.0)
    return False

  async def _wait_idle(self, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while self.in_flight and time.monotonic() < deadline: await asyncio.sleep(0.05)
    return self.in_flight == 0

  async def _watch(self, engine: AsyncLLMEngine) -> None:
    """The engine watchdog: once a step runs past the limit, fail the requests in flight (they would wait for it
    forever) and say so on /health; the mark clears when a step completes."""
    limit = self.config.engine_iteration_timeout
    while True:
      await asyncio.sleep(min(1.0, limit / 4))
      started = engine.step_started
      stalled = started is not None and time.monotonic() - started > limit
      if stalled and not self.stalled:
        log.error("engine stalled: failing the requests in flight", extra={"limit": limit, "in_flight": self.in_flight})
        engine.fail_all(unavailable(f"the engine made no progress for {limit} s: the request was aborted",
                                    "engine_stalled"))
      elif self.stalled and not stalled: log.warning("engine progressing again")
      self.stalled = stalled

  async def _stop_watchdog(self, app: web.Application) -> None:
    if self._watchdog is not None: self._watchdog.cancel()

  def health(self) -> str:
    """loading, ready, draining, stalled (a step is stuck) or dead (the engine thread is gone)."""
    if self.engine is not None and not self.engine.alive: return "dead"
    if self.draining: return "draining"
    if self.engine is None: return "loading"
    return "stalled" if self.stalled else "ready"

  @contextlib.contextmanager
  def _admit(self) -> Iterator[None]:
    if self.draining: raise unavailable("the server is shutting down and takes no new requests", "draining")
    if (status := self.health()) != "ready": raise unavailable(f"the engine is {status}: retry later", f"engine_{status}")
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

  def _route(self, request: web.Request) -> str:
    """The request's path without --root-path."""
    path = request.path
    return path[len(self.root_path):] or "/" if self.root_path and path.startswith(self.root_path + "/") else path

  async def _body(self, request: web.Request) -> dict:
    """The JSON body, read within body_timeout: a client that sends half a body must not hold its handler forever."""
    try:
      async with asyncio.timeout(self.config.body_timeout): raw = await request.read()
    except TimeoutError:
      raise APIError(408, f"the request body did not arrive within {self.config.body_timeout} s", code="body_timeout")
    return parse_json(raw)

  # ---- middlewares ----------------------------------------------------------------------------------------------
  def _allowed_origin(self, origin: str) -> str | None:
    """The Access-Control-Allow-Origin value for `origin`, or None when it is not allowed."""
    origins = self.config.allowed_origins
    return "*" if "*" in origins else origin if origin in origins else None

  @web.middleware
  async def _cors(self, request: web.Request, handler) -> web.StreamResponse:
    """Answer a CORS preflight (OPTIONS with Access-Control-Request-Method) before auth: browsers send it without
    credentials, and only the real request that follows must carry the key."""
    method = request.headers.get("Access-Control-Request-Method")
    if request.method != "OPTIONS" or method is None or "Origin" not in request.headers: return await handler(request)
    methods = CORS_METHODS if "*" in self.config.allowed_methods else [m.upper() for m in self.config.allowed_methods]
    origin = self._allowed_origin(request.headers["Origin"])
    if origin is None or method.upper() not in methods:
      return web.json_response(APIError(400, "CORS preflight refused: origin or method not allowed", param="Origin",
                                        code="cors_disallowed").body(), status=400)
    requested = request.headers.get("Access-Control-Request-Headers", "")
    headers = requested if "*" in self.config.allowed_headers else ", ".join(self.config.allowed_headers)
    return web.Response(status=200, headers={
      "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": ", ".join(methods),
      "Access-Control-Allow-Headers": headers, "Access-Control-Max-Age": "600", "Vary": "Origin"})

  async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
    """Let the browser hand a cross-origin response (errors and streams too) to the page that asked."""
    origin = request.headers.get("Origin")
    allowed = origin and self._allowed_origin(origin)
    if allowed and "Access-Control-Allow-Origin" not in response.headers:
      response.headers["Access-Control-Allow-Origin"] = allowed
      response.headers.add("Vary", "Origin")

  @web.middleware
  async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as OpenAI's {"error": {...}} JSON, unknown routes and crashes included."""
    try: return await handler(request)
    except APIError as e:
      return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
      if e.status < 400: raise
      allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}     # a 405 names the methods that work
      return web.json_response(APIError(e.status, f"{e.reason}: {request.method} {request.path}").body(), status=e.status,
                               headers=allow)
    except ConnectionResetError: raise                                     # the client is gone: nobody to tell
    except Exception:
      log.exception("unhandled error", extra={"path": request.path})
      return web.json_response(APIError(500, "internal server error", "server_error").body(), status=500)

  @web.middleware
  async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
    key = self.config.api_key
    if key and self._route(request).startswith(PROTECTED):
      client = request.remote or "unknown"
      if wait := self.auth_failures.wait(client):       # refused before comparing: guessing stays slow
        raise APIError(429, f"too many failed API-key attempts: retry in {wait:.1f} s", "requests",
                       code="too_many_auth_failures", headers={"Retry-After": str(math.ceil(wait))})
      sent = request.headers.get("Authorization", "").encode()
      if not hmac.compare_digest(sent, f"Bearer {key}".encode()):         # constant time: no guessing byte by byte
        self.auth_failures.acquire(client)
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    return await handler(request)

  @web.middleware
  async def _rate_limit(self, request: web.Request, handler) -> web.StreamResponse:
    if self.rate_limiter and self._route(request).startswith(PROTECTED):
      wait = self.rate_limiter.acquire(request.remote or "unknown")
      if wait:
        raise APIError(429, f"rate limit of {self.config.rate_limit} requests/s exceeded: retry in {wait:.2f} s",
                       "requests", code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait))})
    return await handler(request)

  # ---- small endpoints ------------------------------------------------------------------------------------------
  async def index(self, request: web.Request) -> web.FileResponse: return web.FileResponse(STATIC / "index.html")

  async def live(self, request: web.Request) -> web.Response:
    dead = self.health() == "dead"
    return web.json_response({"status": "dead" if dead else "live"}, status=503 if dead else 200)

  async def ready(self, request: web.Request) -> web.Response:
    status = self.health()
    return web.json_response({"status": status}, status=200 if status == "ready" else 503)

  async def prometheus(self, request: web.Request) -> web.Response:
    text = self.metrics.render(self.engine.stats if self.engine else EngineStats())    # as of the latest step
    return web.Response(text=text, headers={"Content-Type": CONTENT_TYPE})

  async def models(self, request: web.Request) -> web.Response:
    engine = self._ready_engine()
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "tinyvllm", "max_model_len": engine.max_model_len}
            for name in self.config.served_model_names]
    return web.json_response({"object": "list", "data": data})

  async def tokenize(self, request: web.Request) -> web.Response:
    """{"prompt": text} or {"messages": [...]} → {"tokens": [...], "count": n, "max_model_len": m}."""
    engine = self._ready_engine()
    body = await self._body(request)
    self._model_name(field(body, "model", str))
    if "messages" in body: ids = chat_prompt(body, engine.tokenizer)
    else: ids = completion_prompts(field(body, "prompt", str, ""), engine.tokenizer,
                                   field(body, "add_special_tokens", bool, True))[0]
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})

  async def detokenize(self, request: web.Request) -> web.Response:
    engine = self._ready_engine()
    body = await self._body(request)
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
    body = await self._body(request)
    model = self._model_name(field(body, "model", str))
    body = {**self.config.sampling_defaults, **{name: value for name, value in body.items() if value is not None}}
    req = parse(body, engine.tokenizer, engine.max_model_len, engine.model_config.vocab_size, self.config.max_n)
    if req.tools is not None: fmt = ToolChatFormat(req.tools)                      # chat with tools
    gen = Generation(fmt, req, f"{fmt.id_prefix}-{uuid.uuid4().hex}", model, engine.tokenizer)
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
    except RuntimeError as e:          # the engine failed it: the watchdog's or the drain's APIError, or a dead engine
      if isinstance(e.__cause__, APIError): raise e.__cause__
      raise APIError(500, f"the engine failed: {e}", "server_error", code="engine_error")


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
  """Capture every graph a step can need (runner/graphs.py: a bounded set), so that no client ever waits for one,
  then
  one short greedy request through the whole path. The capture runs on the engine thread, as everything that touches
  the engine does; the event loop stays free meanwhile."""
  await engine.call(lambda e: e.warmup())
  async for _ in engine.generate([0, 0], SamplingParams(max_tokens=2, temperature=0), f"warmup-{uuid.uuid4().hex}"): pass


async def start(server: OpenAIServer, host: str, port: int) -> web.AppRunner:
  """Listen on host:port (HTTPS when the config names a key and certificate). handler_cancellation makes a client's
  hang-up cancel its handler (and so abort its engine request) at once, instead of at the next write. aiohttp's
  keep-alive timer also closes a connection that sends no complete request head in time, so it is the header
  timeout; what remains of a body the handler gave up on is read (and dropped) for at most body_timeout more."""
  config = server.config
  runner = web.AppRunner(server.app, handler_cancellation=True, shutdown_timeout=1.0,
                         keepalive_timeout=config.header_timeout, lingering_time=config.body_timeout)
  await runner.setup()
  context = None
  if config.ssl_certfile:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
  await web.TCPSite(runner, host, port, ssl_context=context).start()
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
