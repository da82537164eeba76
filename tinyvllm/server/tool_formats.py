"""The tool-call formats models are trained on, for models whose chat template renders tools itself.

A model that was trained to call tools writes its calls in one format, and its chat template (Jinja, run by
formats/chat_template.py) describes the tools and renders earlier calls and results in that same format. The
template gives the format away; three families cover most open models (vLLM's `hermes`, `llama3_json` and
`mistral` tool parsers read the same ones):

    hermes       Qwen2.5/3, Hermes     <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>   (one or more)
    llama3_json  Llama 3.1 – 3.3       {"name": "f", "parameters": {...}}                              (one)
    mistral      Mistral, Mixtral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]

With such a template the tools go to the template (OpenAI's `tools` as they came), earlier calls and results stay
as the client sent them, and the reply is read in the model's format (server/tools.py decides which format is used).
With `tool_choice` "required" or a named function the reply is constrained to calls in that format (a Lark grammar
whose calls are JSON schemas: llguidance's `%json`), so it always parses; with "auto" the model writes freely, as
vLLM lets it, and a reply that holds no well-formed call is an answer.
"""
from __future__ import annotations
import json
import re
from dataclasses import dataclass
from tinyvllm.engine.structured_output import JSON_LAYOUT, closed
from tinyvllm.formats.tokenizer import Tokenizer


@dataclass(frozen=True)
class CallFormat:
  name: str
  marker: str            # a string only this family's templates hold
  arguments_key: str     # the key of a call's arguments: "arguments" or "parameters"
  parallel: bool         # whether a reply may hold several calls

  def grammar(self, call: dict, parallel: bool, tokenizer: Tokenizer) -> str:
    """A Lark grammar (llguidance's dialect) of a reply that is calls only; `call`: the JSON schema of one call."""
    call = {**closed(call), "x-guidance": JSON_LAYOUT}      # as structured outputs write JSON: objects closed, one line
    if self.name == "hermes":
      newline = '"\\n"'                                      # Lark's string of one newline
      block = f'{_literal("<tool_call>", tokenizer)} {newline} call {newline} {_literal("</tool_call>", tokenizer)}'
      more = f" ({newline} block)*" if parallel else ""
      return f"start: block{more}\nblock: {block}\ncall: %json {json.dumps(call)}"
    if self.name == "llama3_json": return f"start: call\ncall: %json {json.dumps(call)}"
    calls = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1}),
             "x-guidance": JSON_LAYOUT}
    return f'start: {_literal("[TOOL_CALLS]", tokenizer)} calls\ncalls: %json {json.dumps(calls)}'

  def text_before_calls(self, text: str) -> int:
    """How much of a reply so far is surely an answer's text: all of it up to where a call begins or may begin (a
    streamed `auto` reply sends that much before it is complete). A Llama 3.1 call is the whole reply."""
    if self.name == "llama3_json":
      head = text.lstrip()
      return 0 if any(start.startswith(head[:len(start)]) for start in ("{", "<|python_tag|>")) else len(text)
    if (at := text.find(self.marker)) >= 0: return at
    return len(text) - next((k for k in range(min(len(self.marker) - 1, len(text)), 0, -1)
                             if text.endswith(self.marker[:k])), 0)   # the marker's first characters, maybe

  def parse(self, text: str) -> tuple[str, list[dict]] | None:
    """(the text before the calls, [{"name", "arguments"}]) if the reply holds well-formed calls, else None."""
    try:
      if self.name == "hermes":
        blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
        before, calls = text.split("<tool_call>")[0], [json.loads(b) for b in blocks]
      elif self.name == "llama3_json":
        before, body = "", text.strip().removeprefix("<|python_tag|>")
        calls = [json.loads(part) for part in body.split(";")] if body.startswith("{") else []
      else:
        before, _, body = text.partition("[TOOL_CALLS]")
        calls = json.loads(body) if body else []
    except json.JSONDecodeError: return None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and
                            isinstance(c.get(self.arguments_key, c.get("arguments")), dict) for c in calls): return None
    return before.strip(), [{"name": c["name"], "arguments": c.get(self.arguments_key, c.get("arguments"))} for c in calls]


FORMATS = (CallFormat("mistral", "[TOOL_CALLS]", "arguments", True),
           CallFormat("hermes", "<tool_call>", "arguments", True),
           CallFormat("llama3_json", "dictionary of argument name", "parameters", False))


def native_format(template: str | None) -> CallFormat | None:
  """The format a chat template renders tools in, or None (no template, or one that knows no tools)."""
  return next((f for f in FORMATS if template and f.marker in template), None)


def _literal(text: str, tokenizer: Tokenizer) -> str:
  """`text` in a Lark grammar: the token it is, if the tokenizer has it as one special token (which plain text
  never produces), else the string."""
  ids = tokenizer.encode(text, add_special_tokens=False)
  return f"<[{ids[0]}]>" if len(ids) == 1 and ids[0] in tokenizer.special_ids else json.dumps(text)
