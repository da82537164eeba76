"""Requests in: an OpenAI-style JSON body becomes token ids and a `SamplingParams`, or a clear error.

The server speaks OpenAI's HTTP API, so the official SDKs work against it unchanged. Every failure is answered with
the JSON shape OpenAI uses,

    HTTP 400  {"error": {"message": "'temperature' must be a number, got str",
                         "type": "invalid_request_error", "param": "temperature", "code": null}}

and the HTTP status picks the exception an SDK raises: 400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 429 RateLimitError, 5xx InternalServerError. `message` is for people, `param` names the offending
field, `code` is a stable machine-readable string when there is one.

Checks happen in the order a person would fix them: the body is JSON, each field has the right type, the values are
in range (`SamplingParams` owns those rules and names the field), and the prompt plus `max_tokens` fits the context.

Everything is bounded before anything is built from it, so no body can make the server allocate or compute in
proportion to a number it sent: JSON nests at most 32 deep, integers fit 64 bits and numbers are finite, a request
carries at most 256 prompts of `n` ≤ 128 choices each (`--max-n` may lower that), `logprobs`/`top_logprobs`/
`prompt_logprobs` ≤ 20, at most 16 stop strings of 1024 characters, 300 `logit_bias` entries, and token ids must
exist in the vocabulary.
"""
from __future__ import annotations
import json
import math
import re
from dataclasses import dataclass
from typing import Any
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.engine import structured_output
from tinyvllm.server.tools import Tools, history, parse_tools
from tinyvllm.server.tool_formats import native_format
from tinyvllm.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, SamplingParams, StructuredOutputsParams

MAX_JSON_DEPTH = 32
MAX_PROMPTS = 256                     # prompts in one /v1/completions request
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
  """An error the client should see, as OpenAI shapes it."""
  def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
  return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
  try: body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e: raise bad_request(f"the request body is not valid JSON: {e}")
  except RecursionError: raise _too_deep()             # nested past the parser's own limit
  if _depth(body) > MAX_JSON_DEPTH: raise _too_deep()
  if not isinstance(body, dict): raise bad_request("the request body must be a JSON object")
  return body


def _too_deep() -> APIError:
  return bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep")


def _depth(value: Any) -> int:
  """How deeply arrays and objects nest (a scalar is 0, {} is 1); without recursion, so no body can overflow it."""
  deepest, todo = 0, [(value, 1)]
  while todo:
    value, depth = todo.pop()
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if children is None: continue
    deepest = max(deepest, depth)
    if depth > MAX_JSON_DEPTH: break
    todo.extend((child, depth + 1) for child in children)
  return deepest


# ---- typed field access ---------------------------------------------------------------------------------------------
def _is(value: Any, kind: type) -> bool:
  if isinstance(value, bool): return kind is bool                  # JSON true is not the number 1
  if kind is float: return isinstance(value, (int, float))
  return isinstance(value, kind)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array",
               dict: "an object"}


def field(body: dict, name: str, kind: type, default: Any = None) -> Any:
  """body[name] if it has type `kind`; `default` when absent or null; otherwise a 400 naming the field."""
  value = body.get(name)
  if value is None: return default
  if not _is(value, kind): raise bad_request(f"'{name}' must be {_TYPE_NAMES[kind]}, got {type(value).__name__}", name)
  if kind in (int, float) and not _finite(value):
    raise bad_request(f"'{name}' is out of range: numbers must be finite and integers fit in 64 bits", name)
  return value


def _finite(value: int | float) -> bool:
  if isinstance(value, int): return -2**63 <= value < 2**64
  return math.isfinite(value)


def list_field(body: dict, name: str, item: type) -> list:
  values = field(body, name, list, [])
  if not all(_is(v, item) for v in values): raise bad_request(f"'{name}' must be an array of {_TYPE_NAMES[item]}s", name)
  return values


# ---- sampling -------------------------------------------------------------------------------------------------------
# Request fields that map one-to-one onto SamplingParams fields of the same name (OpenAI's, then vLLM's extras).
SAMPLING_FIELDS: dict[str, type] = {
  "n": int, "temperature": float, "top_p": float, "seed": int, "presence_penalty": float,
  "frequency_penalty": float, "top_k": int, "min_p": float, "repetition_penalty": float, "min_tokens": int,
  "ignore_eos": bool, "include_stop_str_in_output": bool, "skip_special_tokens": bool, "prompt_logprobs": int,
  # diffusion LLMs
  "diffusion_steps": int, "block_length": int, "remasking": str, "threshold": float, "cfg_scale": float,
}


def sampling_params(body: dict, max_tokens: int | None, logprobs: int | None, vocab_size: int | None = None,
                    max_n: int = MAX_N, tokenizer: Tokenizer | None = None) -> SamplingParams:
  n = field(body, "n", int, 1)
  if not 1 <= n <= max_n: raise bad_request(f"'n' must be in [1, {max_n}], got {n}", "n")
  kwargs = {name: field(body, name, kind) for name, kind in SAMPLING_FIELDS.items()}
  kwargs = {name: value for name, value in kwargs.items() if value is not None}
  stop = body.get("stop")
  kwargs["stop"] = [stop] if isinstance(stop, str) else list_field(body, "stop", str)
  kwargs["stop_token_ids"] = list_field(body, "stop_token_ids", int)
  kwargs["logit_bias"] = _logit_bias(field(body, "logit_bias", dict))
  kwargs["structured_outputs"] = structured_outputs(body, tokenizer, vocab_size)
  if vocab_size is not None:              # an id past the vocabulary would index past the logits row
    for name, ids in (("stop_token_ids", kwargs["stop_token_ids"]), ("logit_bias", kwargs["logit_bias"] or ())):
      if not all(0 <= t < vocab_size for t in ids): raise bad_request(f"'{name}' token ids must be in [0, {vocab_size})", name)
  try: return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
  except ValueError as e:
    named = re.search(r"parameter (\w+)", str(e))       # SamplingParams names the field it rejects
    raise bad_request(str(e), named.group(1) if named else None)


GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(body: dict, tokenizer: Tokenizer | None, vocab_size: int | None) -> StructuredOutputsParams | None:
  """The output's constraint, from whichever of OpenAI's `response_format`, vLLM's `structured_outputs` or its older
  `guided_*` fields the request uses (one of them), checked against the tokenizer so that a schema, regex or grammar
  that does not compile is a 400 naming the field."""
  given = [name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS) if body.get(name) is not None]
  if len(given) > 1: raise bad_request(f"give one of {', '.join(given)}, not several", given[1])
  if not given: return None
  name = given[0]
  if name == "response_format":
    rf = field(body, name, dict)
    kind = rf.get("type")
    if kind == "text": return None
    if kind == "json_object": spec = {"json_object": True}
    elif kind == "json_schema":
      schema = rf.get("json_schema")
      if not isinstance(schema, dict) or not isinstance(schema.get("schema", {}), dict):
        raise bad_request("'response_format.json_schema' must be an object with a 'schema' object", name)
      spec = {"json": schema.get("schema", {})}
    else: raise bad_request("'response_format.type' must be 'text', 'json_object' or 'json_schema'", name)
  elif name == "structured_outputs": spec = field(body, name, dict)
  else: spec = {GUIDED_FIELDS[name]: body[name]}
  try:
    params = StructuredOutputsParams(**spec)
    if vocab_size is not None: structured_output.check(params, tokenizer, vocab_size)
  except TypeError: raise bad_request(f"'{name}' may hold only json, regex, choice, grammar and json_object", name)
  except ValueError as e: raise bad_request(str(e).replace("invalid sampling parameter ", ""), name)
  return params


def _logit_bias(bias: dict | None) -> dict[int, float] | None:
  """OpenAI sends {"token id as a string": bias in [-100, 100]}."""
  if bias is None: return None
  if len(bias) > MAX_LOGIT_BIAS: raise bad_request(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} entries", "logit_bias")
  try: parsed = {int(k): float(v) for k, v in bias.items()}
  except (TypeError, ValueError): raise bad_request("'logit_bias' must map token ids to numbers", "logit_bias")
  if not all(-100 <= v <= 100 for v in parsed.values()):          # NaN fails this too
    raise bad_request("'logit_bias' values must be in [-100, 100]", "logit_bias")
  return parsed


# ---- prompts --------------------------------------------------------------------------------------------------------
def _need_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
  if tokenizer is None: raise bad_request("this model has no tokenizer: send prompts as token ids", "prompt")
  return tokenizer


def _is_token_ids(value: Any) -> bool: return isinstance(value, list) and bool(value) and all(_is(t, int) for t in value)


def completion_prompts(prompt: Any, tokenizer: Tokenizer | None, add_special_tokens: bool = True) -> list[list[int]]:
  """OpenAI's four prompt forms (a string, strings, token ids, lists of token ids) as lists of token ids."""
  prompts = [prompt] if isinstance(prompt, str) or _is_token_ids(prompt) else prompt
  if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or _is_token_ids(p) for p in prompts):
    raise bad_request("'prompt' must be a string, an array of strings, or (arrays of) token ids", "prompt")
  if len(prompts) > MAX_PROMPTS: raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt")
  return [_need_tokenizer(tokenizer).encode(p, add_special_tokens=add_special_tokens) if isinstance(p, str) else list(p)
          for p in prompts]


def _message_text(message: Any) -> dict[str, Any]:
  """One chat message as {"role", "content"} (and its tool fields); content may be a string or an array of
  {"type": "text"} parts."""
  if not isinstance(message, dict) or not isinstance(message.get("role"), str):
    raise bad_request("each message must be an object with a string 'role'", "messages")
  if message["role"] not in ROLES:
    raise bad_request(f"unknown message role {message['role'][:40]!r}: expected one of {', '.join(ROLES)}", "messages")
  if message.get("function_call"):                   # OpenAI's older form: silently dropping it would change the meaning
    raise bad_request("'function_call' in messages is not supported: use 'tool_calls'", "messages")
  content = message.get("content") or ""
  if isinstance(content, list):
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
      raise bad_request("only text content parts are supported", "messages")
    content = "".join(p["text"] for p in content)
  if not isinstance(content, str): raise bad_request("message 'content' must be a string or text parts", "messages")
  # what a template that renders tools reads besides (server/tool_formats.py): earlier calls, the call a result answers
  return {"role": message["role"], "content": content,
          **{k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k) is not None}}


def chat_prompt(body: dict, tokenizer: Tokenizer | None, tools: Tools | None = None) -> list[int]:
  """The conversation rendered with the model's chat template, as token ids (with tools: server/tools.py's)."""
  messages = field(body, "messages", list)
  if not messages: raise bad_request("'messages' must be a non-empty array", "messages")
  tok = _need_tokenizer(tokenizer)
  messages = history(messages, tools, bad_request, native_format(tok.chat_template))
  kwargs = field(body, "chat_template_kwargs", dict, {})       # vLLM's: variables for the template
  reserved = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"} & set(kwargs)
  if reserved: raise bad_request(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}", "chat_template_kwargs")
  if tools is not None and tools.template_tools() is not None: kwargs = {**kwargs, "tools": tools.template_tools()}
  try: text = tok.apply_chat_template([_message_text(m) for m in messages],
                                      add_generation_prompt=field(body, "add_generation_prompt", bool, True), **kwargs)
  except ValueError as e: raise bad_request(str(e), "messages")
  return tok.encode(text, add_special_tokens=False)


def check_context(prompts: list[list[int]], max_tokens: int | None, max_model_len: int, param: str) -> None:
  for ids in prompts:
    if len(ids) >= max_model_len:
      raise bad_request(f"the prompt has {len(ids)} tokens, but this model's maximum context length is "
                        f"{max_model_len} tokens (prompt and completion together)", param)
    if max_tokens is not None and len(ids) + max_tokens > max_model_len:
      raise bad_request(f"this model's maximum context length is {max_model_len} tokens, but {len(ids) + max_tokens} "
                        f"were requested ({len(ids)} in the prompt, {max_tokens} for the completion): lower "
                        "max_tokens or shorten the prompt", "max_tokens")


# ---- whole requests -------------------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
  """What /v1/completions and /v1/chat/completions have in common once parsed."""
  prompts: list[list[int]]            # token ids, one entry per prompt; each gets `params.n` choices
  params: SamplingParams
  stream: bool
  include_usage: bool                 # stream_options.include_usage: a last chunk with token counts
  tools: Tools | None = None          # chat with tools: the reply is a call or an answer (server/tools.py)


def _common(body: dict, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
            max_model_len: int, prompt_param: str, vocab_size: int | None, max_n: int,
            tokenizer: Tokenizer | None) -> GenerationRequest:
  stream = field(body, "stream", bool, False)
  stream_options = field(body, "stream_options", dict, {})
  if stream_options and not stream: raise bad_request("'stream_options' needs 'stream': true", "stream_options")
  include_usage = field(stream_options, "include_usage", bool, False)
  params = sampling_params(body, max_tokens, logprobs, vocab_size, max_n, tokenizer)
  if stream and params.prompt_logprobs is not None:       # as in vLLM: they would all arrive in the first chunk
    raise bad_request("'prompt_logprobs' is not available when 'stream' is true", "prompt_logprobs")
  check_context(prompts, max_tokens, max_model_len, prompt_param)
  return GenerationRequest(prompts, params, stream, include_usage)


def _unsupported(body: dict, *names: str) -> None:
  for name in names:
    if body.get(name): raise bad_request(f"'{name}' is not supported by this server", name)


def parse_completion(body: dict, tokenizer: Tokenizer | None, max_model_len: int, vocab_size: int | None = None,
                     max_n: int = MAX_N) -> GenerationRequest:
  """POST /v1/completions. max_tokens defaults to 16, as in OpenAI's API; `logprobs` is the top-N count."""
  _unsupported(body, "echo", "suffix")
  if field(body, "best_of", int) not in (None, field(body, "n", int, 1)):
    raise bad_request("'best_of' must equal 'n' (no server-side best-of selection)", "best_of")
  if "prompt" not in body: raise bad_request("'prompt' is required", "prompt")
  prompts = completion_prompts(body["prompt"], tokenizer, field(body, "add_special_tokens", bool, True))
  logprobs = field(body, "logprobs", int)
  if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
    raise bad_request(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
  return _common(body, prompts, field(body, "max_tokens", int, 16), logprobs, max_model_len, "prompt", vocab_size, max_n,
                 tokenizer)


def parse_chat(body: dict, tokenizer: Tokenizer | None, max_model_len: int, vocab_size: int | None = None,
               max_n: int = MAX_N) -> GenerationRequest:
  """POST /v1/chat/completions. No max_tokens means up to the context length; `logprobs` is a boolean and
  `top_logprobs` the top-N count."""
  _unsupported(body, "functions", "function_call")
  tools = parse_tools(body, bad_request, native_format(tokenizer.chat_template if tokenizer else None))
  if tools is not None:                  # the reply is constrained to calls (or an answer), or parsed for calls
    given = [n for n in ("response_format", "structured_outputs", *GUIDED_FIELDS) if body.get(n) is not None]
    if given: raise bad_request(f"'{given[0]}' cannot be combined with 'tools'", given[0])
    constraint = tools.structured_outputs(tokenizer)
    if constraint is not None and vocab_size is not None:
      try: structured_output.check(StructuredOutputsParams(**constraint), tokenizer, vocab_size)
      except ValueError as e: raise bad_request(f"the tools' parameters: {e}", "tools")
    if constraint is not None: body = {**body, "structured_outputs": constraint}
  max_tokens = field(body, "max_completion_tokens", int)
  if max_tokens is None: max_tokens = field(body, "max_tokens", int)
  top = field(body, "top_logprobs", int, 0)
  if not 0 <= top <= MAX_LOGPROBS: raise bad_request(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
  if top and not field(body, "logprobs", bool): raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
  logprobs = top if field(body, "logprobs", bool) else None
  request = _common(body, [chat_prompt(body, tokenizer, tools)], max_tokens, logprobs, max_model_len, "messages",
                    vocab_size, max_n, tokenizer)
  request.tools = tools
  return request
