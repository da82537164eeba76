"""Responses out: engine progress becomes OpenAI-shaped JSON, either whole or as a stream of chunks.

A streamed response uses server-sent events (SSE): an ordinary HTTP response with `Content-Type: text/event-stream`
whose body the server keeps writing to, one event per chunk, each a `data:` line and a blank line. OpenAI ends the
stream with a literal `[DONE]`:

    data: {"id": "cmpl-9f", "object": "text_completion", "choices": [{"index": 0, "text": " Paris", ...}]}

    data: {"id": "cmpl-9f", "object": "text_completion", "choices": [{"index": 0, "text": ".", "finish_reason": "stop"}]}

    data: [DONE]

The engine reports each choice's whole text so far; a chunk carries only what is new since the previous one (the
*delta*). That text only ever grows at its end: the engine holds back half a UTF-8 character and the possible start
of a stop string until they are resolved (see tinyvllm/formats/detokenizer.py), so a delta never has to be taken back.

Both endpoints share all of this; `CompletionFormat` and `ChatFormat` differ only in how a choice is wrapped
(`"text"` versus `"message"`/`"delta"`) and how log-probabilities are laid out.
"""
from __future__ import annotations
import time
from dataclasses import dataclass, field
from tinyvllm.engine.protocol import CompletionOutput, RequestOutput
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.server.protocol import GenerationRequest
from tinyvllm.server.tools import Tools, stream_delta

# ---- log-probabilities ----------------------------------------------------------------------------------------------
@dataclass
class TokenLogprob:
  token: str
  token_bytes: bytes
  logprob: float


@dataclass
class PositionLogprobs:
  """One generated position: the token that was picked and the most likely alternatives."""
  chosen: TokenLogprob
  top: list[TokenLogprob]


def _token_logprob(tokenizer: Tokenizer | None, token_id: int, logprob: float) -> TokenLogprob:
  raw = tokenizer.id_to_bytes(token_id) if tokenizer else str(token_id).encode()
  return TokenLogprob(raw.decode("utf-8", errors="replace"), raw, logprob)


def position_logprobs(tokenizer: Tokenizer | None, token_ids: list[int],
                      logprobs: list[dict[int, float]]) -> list[PositionLogprobs]:
  """From the engine's per-position {token id: logprob} dicts (the sampled token plus the top-N)."""
  return [PositionLogprobs(_token_logprob(tokenizer, tid, top[tid]),
                           [_token_logprob(tokenizer, t, lp) for t, lp in top.items()])
          for tid, top in zip(token_ids, logprobs)]


def prompt_logprobs_json(tokenizer: Tokenizer | None, entries: list[dict[int, float] | None]) -> list[dict | None]:
  """vLLM's layout: per prompt token (null for the first), {token id: {"logprob", "decoded_token"}} for the prompt's
  own token and the top-N alternatives."""
  return [None if top is None else
          {str(t): {"logprob": lp, "decoded_token": _token_logprob(tokenizer, t, lp).token} for t, lp in top.items()}
          for top in entries]


# ---- one choice's progress ------------------------------------------------------------------------------------------
@dataclass
class Delta:
  text: str
  logprobs: list[PositionLogprobs] | None     # for the tokens new in this delta (None when not requested)
  logprob_offset: int                          # characters of token text before them (OpenAI's text_offset)
  finish_reason: str | None
  first: bool
  token_ids: list[int] | None = None           # a model without a tokenizer has no text: its new token ids instead


@dataclass
class Choice:
  index: int
  text: str = ""                               # sent so far
  num_tokens: int = 0
  finish_reason: str | None = None
  started: bool = False                        # a chunk of this choice was sent
  logprobs: list[PositionLogprobs] | None = None
  logprob_chars: int = 0

  def advance(self, out: CompletionOutput, tokenizer: Tokenizer | None) -> Delta | None:
    """What is new in `out` since the last call, or None when there is nothing to send. Without a tokenizer (random
    weights, `--load-format dummy`) every new token is news: its id goes out, so a stream still streams."""
    if self.finish_reason is not None: return None       # with n > 1, finished choices keep being reported
    new_text = out.text[len(self.text):]
    new_ids = out.token_ids[self.num_tokens:] if tokenizer is None else None
    new_logprobs = None if out.logprobs is None else \
      position_logprobs(tokenizer, out.token_ids[self.num_tokens:], out.logprobs[self.num_tokens:])
    self.num_tokens = len(out.token_ids)
    if not (new_text or new_ids or new_logprobs or out.finish_reason): return None
    delta = Delta(new_text, new_logprobs, self.logprob_chars, out.finish_reason, first=not self.started, token_ids=new_ids)
    self.text, self.finish_reason, self.started = self.text + new_text, out.finish_reason, True
    if new_logprobs is not None:
      self.logprobs = (self.logprobs or []) + new_logprobs
      self.logprob_chars += sum(len(p.chosen.token) for p in new_logprobs)
    return delta


# ---- the two response formats ---------------------------------------------------------------------------------------
class CompletionFormat:
  """/v1/completions: choices carry "text"; logprobs are parallel arrays with character offsets."""
  id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

  def logprobs(self, positions: list[PositionLogprobs] | None, offset: int) -> dict | None:
    if positions is None: return None
    offsets, at = [], offset
    for p in positions:
      offsets.append(at)
      at += len(p.chosen.token)
    return {"tokens": [p.chosen.token for p in positions], "token_logprobs": [p.chosen.logprob for p in positions],
            "top_logprobs": [{t.token: t.logprob for t in p.top} for p in positions], "text_offset": offsets}

  def choice(self, c: Choice, prompt_logprobs: list | None) -> dict:
    choice = {"index": c.index, "text": c.text, "logprobs": self.logprobs(c.logprobs, 0), "finish_reason": c.finish_reason}
    return choice if prompt_logprobs is None else {**choice, "prompt_logprobs": prompt_logprobs}

  def chunk_choice(self, index: int, d: Delta) -> dict:
    return _with_ids({"index": index, "text": d.text, "logprobs": self.logprobs(d.logprobs, d.logprob_offset),
                      "finish_reason": d.finish_reason}, d)


class ChatFormat:
  """/v1/chat/completions: choices carry a "message" (whole) or a "delta" (streamed); logprobs are a list of
  {token, logprob, bytes, top_logprobs} under "content"."""
  id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

  @staticmethod
  def _entry(t: TokenLogprob) -> dict: return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)}

  def logprobs(self, positions: list[PositionLogprobs] | None, offset: int = 0) -> dict | None:
    if positions is None: return None
    return {"content": [{**self._entry(p.chosen), "top_logprobs": [self._entry(t) for t in p.top]} for p in positions]}

  def choice(self, c: Choice, prompt_logprobs: list | None) -> dict:   # the prompt's logprobs go on the response
    return {"index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish_reason}

  def chunk_choice(self, index: int, d: Delta) -> dict:
    delta = {"role": "assistant", "content": d.text} if d.first else {"content": d.text}
    return _with_ids({"index": index, "delta": delta, "logprobs": self.logprobs(d.logprobs),
                      "finish_reason": d.finish_reason}, d)


class ToolChatFormat(ChatFormat):
  """/v1/chat/completions with tools: the reply becomes tool calls or content (server/tools.py). A stream sends the
  text of a reply that may be an answer (tool_choice "auto" in a model's own format) as it comes, up to where a call
  begins or may begin; the rest, and any other reply, goes out as one delta once it is complete."""
  def __init__(self, tools: Tools):
    self.tools = tools
    self.sent: dict[int, int] = {}           # characters of each choice's text streamed as content

  def choice(self, c: Choice, prompt_logprobs: list | None) -> dict:
    message, reason = self.tools.message(c.text, c.finish_reason)
    return {"index": c.index, "message": message, "logprobs": None, "finish_reason": reason}

  def stream_choice(self, c: Choice, d: Delta) -> dict | None:
    native = self.tools.native if self.tools.answer_allowed else None
    sent = self.sent.get(c.index, 0)
    answer_so_far = native.text_before_calls(c.text) if native else 0
    if d.finish_reason is None:
      if answer_so_far <= sent: return None
      self.sent[c.index] = answer_so_far
      delta = {"content": c.text[sent:answer_so_far]}
      return {"index": c.index, "delta": {"role": "assistant", **delta} if sent == 0 else delta, "logprobs": None,
              "finish_reason": None}
    message, reason = self.tools.message(c.text, d.finish_reason)
    if sent:                                 # what is left to send: the calls (and any text before them), or the text
      rest = c.text[sent:answer_so_far] if message.get("tool_calls") else c.text[sent:]
      message = {**message, "content": rest or None}
    return {"index": c.index, "delta": stream_delta(message, first=sent == 0), "logprobs": None,
            "finish_reason": reason}


def _with_ids(choice: dict, d: Delta) -> dict:
  """A streamed choice of a model without a tokenizer carries its new tokens as `token_ids` (vLLM's field name)."""
  return choice if d.token_ids is None else {**choice, "token_ids": d.token_ids}


ResponseFormat = CompletionFormat | ChatFormat | ToolChatFormat


# ---- a whole request ------------------------------------------------------------------------------------------------
@dataclass
class Generation:
  """One HTTP request's progress over its engine requests (one per prompt) and their `n` choices each.
  Choice `prompt_index * n + i` is output `i` of prompt `prompt_index`, as in OpenAI's API."""
  fmt: ResponseFormat
  request: GenerationRequest
  request_id: str
  model: str
  tokenizer: Tokenizer | None
  created: int = field(default_factory=lambda: int(time.time()))
  choices: list[Choice] = field(init=False)
  cached_tokens: dict[int, int] = field(default_factory=dict)
  prompt_logprobs: dict[int, list] = field(default_factory=dict)     # per prompt index, in vLLM's JSON layout

  def __post_init__(self) -> None:
    self.choices = [Choice(i) for i in range(len(self.request.prompts) * self.request.params.n)]

  @property
  def prompt_tokens(self) -> int: return sum(len(p) for p in self.request.prompts)
  @property
  def completion_tokens(self) -> int: return sum(c.num_tokens for c in self.choices)
  @property
  def finished(self) -> bool: return all(c.finish_reason is not None for c in self.choices)

  def update(self, prompt_index: int, out: RequestOutput) -> list[dict]:
    """Take in one engine output; returns the stream chunks it produced (one per choice that advanced)."""
    self.cached_tokens[prompt_index] = getattr(out, "num_cached_tokens", None) or 0   # vLLM's RequestOutput field
    if out.finished and out.prompt_logprobs is not None:
      self.prompt_logprobs[prompt_index] = prompt_logprobs_json(self.tokenizer, out.prompt_logprobs)
    chunks = []
    for o in out.outputs:
      choice = self.choices[prompt_index * self.request.params.n + o.index]
      delta = choice.advance(o, self.tokenizer)
      if delta is None: continue
      streamed = self.fmt.stream_choice(choice, delta) if isinstance(self.fmt, ToolChatFormat) else \
        self.fmt.chunk_choice(choice.index, delta)
      if streamed is not None: chunks.append(self._envelope(self.fmt.chunk_object, [streamed]))
    return chunks

  def usage(self) -> dict:
    return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens}

  def usage_chunk(self) -> dict: return {**self._envelope(self.fmt.chunk_object, []), "usage": self.usage()}

  def response(self) -> dict:
    n = self.request.params.n
    body = self._envelope(self.fmt.object, [self.fmt.choice(c, self.prompt_logprobs.get(c.index // n))
                                            for c in self.choices])
    if isinstance(self.fmt, ChatFormat) and self.prompt_logprobs: body["prompt_logprobs"] = self.prompt_logprobs[0]
    return {**body, "usage": self.usage()}

  def _envelope(self, object: str, choices: list[dict]) -> dict:
    body = {"id": self.request_id, "object": object, "created": self.created, "model": self.model, "choices": choices}
    if self.request.stream and self.request.include_usage: body["usage"] = None
    return body
