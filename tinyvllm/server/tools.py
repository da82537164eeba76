"""Tool calling: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, for any model.

Models trained to call tools each write calls in a format of their own (`<tool_call>` tags, `[TOOL_CALLS]`, bare
JSON). Where the model's chat template renders tools in one of the formats server/tool_formats.py knows, the
template gets the tools and the reply is read in that format. Every other model gets one generic format, llama.cpp's
answer for models without a native one: the tools are described in a system message, and the reply is constrained
(engine/structured_output.py) to one JSON object, so it always parses:

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}   calls (one, unless parallel calls)
    {"response": "It is sunny in Paris."}                                      an answer (tool_choice "auto" only)

    tool_choice   "none": no tools; "auto" (the default): a call or an answer; "required": a call;
                  {"type": "function", "function": {"name": N}}: one call of N

The reply becomes OpenAI's `message.tool_calls` (finish_reason "tool_calls") or `content`; a stream sends it as one
delta once it is complete, except a native `auto` reply's text, which streams up to where a call begins. A conversation's earlier calls (assistant messages with `tool_calls`) and results
(`role: "tool"`) are written back in the format of the reply, so a model reads its own history as it wrote it.
"""
from __future__ import annotations
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable
from tinyvllm.server.tool_formats import CallFormat

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")          # OpenAI's rule for function names
MAX_TOOLS = 128                                      # OpenAI's limit: each tool is a branch of the reply's grammar


@dataclass
class Tools:
  functions: list[dict]            # {"name", "description", "parameters"} of the tools the reply may call
  answer_allowed: bool             # tool_choice "auto": the reply may be an answer instead
  parallel: bool                   # several calls in one reply
  native: CallFormat | None = None   # the model's own format (its template renders tools), or None: the generic one

  def call_schema(self, arguments_key: str = "arguments") -> dict:
    """The JSON schema of one call of one of the tools."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, arguments_key: f["parameters"]},
                       "required": ["name", arguments_key], "additionalProperties": False} for f in self.functions]}

  def structured_outputs(self, tokenizer) -> dict | None:
    """The constraint on the reply (vLLM's `structured_outputs` field): the generic format's JSON schema; a native
    format's grammar of calls where a call is required; none where a native reply may be an answer."""
    if self.native is None: return {"json": self.schema()}
    if self.answer_allowed: return None
    parallel = self.parallel and self.native.parallel
    return {"grammar": self.native.grammar(self.call_schema(self.native.arguments_key), parallel, tokenizer)}

  def template_tools(self) -> list[dict] | None:
    """The tools as a native template reads them (OpenAI's form); None for the generic format."""
    return None if self.native is None else [{"type": "function", "function": f} for f in self.functions]

  def schema(self) -> dict:
    """The generic format's JSON schema, which the reply is constrained to."""
    call = self.call_schema()
    calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1,
                                                             **({} if self.parallel else {"maxItems": 1})}},
             "required": ["tool_calls"], "additionalProperties": False}
    if not self.answer_allowed: return calls
    answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
              "additionalProperties": False}
    return {"anyOf": [calls, answer]}

  def system_prompt(self) -> str:
    described = json.dumps([{"name": f["name"], "description": f.get("description", ""), "parameters": f["parameters"]}
                            for f in self.functions], ensure_ascii=False)
    how = 'Reply with JSON only: {"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]} to call ' + \
          ("tools" if self.parallel else "a tool")
    if self.answer_allowed: how += ', or {"response": <your answer>} to answer without a tool'
    return f"You can call these tools:\n{described}\n\n{how}."

  def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The reply as OpenAI's assistant message and finish_reason (a reply cut short stays text, "length"; so does a
    native reply without well-formed calls of these tools)."""
    as_text = {"role": "assistant", "content": text}, finish_reason
    if self.native is not None:
      if finish_reason == "length": return as_text                      # its calls may be cut short
      parsed = self.native.parse(text)
      names = {f["name"] for f in self.functions}
      if parsed is None or any(c["name"] not in names for c in parsed[1]): return as_text
      content, calls = parsed[0] or None, parsed[1]
    else:
      try: reply = json.loads(text)
      except json.JSONDecodeError: return as_text
      if "response" in reply: return {"role": "assistant", "content": reply["response"]}, finish_reason
      content, calls = None, reply["tool_calls"]
    return {"role": "assistant", "content": content,
            "tool_calls": [{"id": self._call_id(), "type": "function",
                            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                           for c in calls]}, "tool_calls"

  def _call_id(self) -> str:
    """OpenAI's `call_…`; Mistral's templates accept 9 letters and digits only."""
    hex_id = uuid.uuid4().hex
    return hex_id[:9] if self.native is not None and self.native.name == "mistral" else f"call_{hex_id[:24]}"


def parse_tools(body: dict, bad_request: Callable[[str, str], Exception], native: CallFormat | None = None) \
    -> Tools | None:
  """The request's tools and tool_choice, checked (a 400 naming the field); None when the reply is free text.
  `native`: the format the model's chat template renders tools in (tool_formats.native_format), if any."""
  tools, choice = body.get("tools"), body.get("tool_choice")
  if tools is None:
    if choice not in (None, "none"): raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
    return None
  if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
    raise bad_request(f"'tools' must be an array of 1 to {MAX_TOOLS} tools", "tools")
  functions = []
  for i, tool in enumerate(tools):
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
      raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a name "
                        "of letters, digits, _ and - (at most 64)", "tools")
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict): raise bad_request(f"tools[{i}].function.parameters must be an object", "tools")
    functions.append({"name": fn["name"], "description": str(fn.get("description", "")), "parameters": parameters})
  if len({f["name"] for f in functions}) != len(functions): raise bad_request("tool names must differ", "tools")
  parallel = body.get("parallel_tool_calls", True)
  if not isinstance(parallel, bool): raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
  if choice in (None, "auto"): return Tools(functions, True, parallel, native)
  if choice == "none": return None
  if choice == "required": return Tools(functions, False, parallel, native)
  name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
  if not isinstance(name, str):
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                      "{\"name\": ...}}", "tool_choice")
  named = [f for f in functions if f["name"] == name]
  if not named: raise bad_request(f"'tool_choice' names {name!r}, which is not one of the tools", "tool_choice")
  return Tools(named, False, False, native)


def history(messages: list[dict], tools: Tools | None, bad_request: Callable[[str, str], Exception],
            native: CallFormat | None = None) -> list[dict]:
  """The conversation as the model reads it. With a template that renders tools (`native`), the messages as they
  came, each earlier call's arguments as an object (the templates write them out with `tojson`); the template
  describes the tools. Otherwise the generic format: with tools, their description first (in the system message),
  and earlier calls and results written in that format (results as user turns: many templates know no other roles).
  Either way an assistant message's `tool_calls` must be well-formed (a 400 naming `messages` if not)."""
  names, out = {}, []
  for m in messages:
    if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls") is not None:
      calls = _calls(m["tool_calls"], bad_request)
      names.update((c["id"], c["name"]) for c in calls)
      if native is not None:
        out.append({**m, "tool_calls": [{"id": c["id"], "type": "function",
                                         "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]})
      else:
        calls = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
        out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
    elif isinstance(m, dict) and m.get("role") == "tool" and native is None:
      result = {"name": names.get(m.get("tool_call_id")) or m.get("name"), "content": m.get("content")}
      out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
    else: out.append(m)
  if tools is None or native is not None: return out
  if out and out[0].get("role") == "system":
    return [{"role": "system", "content": f"{out[0]['content']}\n\n{tools.system_prompt()}"}, *out[1:]]
  return [{"role": "system", "content": tools.system_prompt()}, *out]


def _calls(tool_calls: Any, bad_request: Callable[[str, str], Exception]) -> list[dict]:
  """An assistant message's OpenAI `tool_calls`, checked, as [{"id", "name", "arguments"}]: the arguments as an
  object where their JSON text parses (kept as the client's string otherwise)."""
  calls = []
  for c in tool_calls if isinstance(tool_calls, list) else [None]:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
       not isinstance(fn.get("arguments", "{}"), (str, dict)):
      raise bad_request("an assistant message's 'tool_calls' must be [{\"id\", \"type\": \"function\", "
                        "\"function\": {\"name\", \"arguments\"}}]", "messages")
    args = fn.get("arguments", "{}")
    try: args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError: pass
    calls.append({"id": c.get("id"), "name": fn["name"], "arguments": args})
  return calls


def stream_delta(message: dict, first: bool) -> dict[str, Any]:
  """A tool-calling reply (or what is left of it) as one stream delta (tool calls carry their index, as OpenAI
  streams them)."""
  delta: dict[str, Any] = {"role": "assistant"} if first else {}
  if message.get("content") is not None or not message.get("tool_calls"): delta["content"] = message.get("content")
  if message.get("tool_calls"):
    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
  return delta
