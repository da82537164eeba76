"""The native tool-call formats (server/tool_formats.py): which template gets which, and replies read back into
calls. The server tests run them end to end."""
from pathlib import Path
import pytest
from tinyvllm.server.tool_formats import FORMATS, native_format

TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"


@pytest.mark.parametrize("template, name", [("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
                                            ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3_json"),
                                            ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
                                            ("google-gemma-2-2b-it.jinja", None)])
def test_a_template_gives_its_format_away(template, name):
  found = native_format((TEMPLATES / template).read_text())
  assert (found and found.name) == name
  assert native_format(None) is None


@pytest.mark.parametrize("name, text, expected", [
  ("hermes", 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n'
             '{"name": "g", "arguments": {}}\n</tool_call>', ("Let me look.", [("f", {"x": 1}), ("g", {})])),
  ("hermes", "<tool_call>\n{not json}\n</tool_call>", None),
  ("hermes", "No call here.", None),
  ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}', ("", [("f", {"x": 1})])),
  ("llama3_json", '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}', ("", [("f", {"x": 1}), ("g", {})])),
  ("llama3_json", "The answer is 4.", None),
  ("llama3_json", '{"name": "f"}', None),                           # no arguments
  ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}, "id": "abcdefghi"}]', ("", [("f", {"x": 1})])),
  ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": "x"}]', None),  # arguments not an object
  ("mistral", "Plain answer.", None),
])
def test_replies_are_read_back_into_calls(name, text, expected):
  fmt = next(f for f in FORMATS if f.name == name)
  parsed = fmt.parse(text)
  got = None if parsed is None else (parsed[0], [(c["name"], c["arguments"]) for c in parsed[1]])
  assert got == expected


@pytest.mark.parametrize("name, text, expected", [
  ("hermes", "It is sunny.", len("It is sunny.")),
  ("hermes", "Let me look.\n<tool_call>\n{", len("Let me look.\n")),
  ("hermes", "Let me look.\n<tool_", len("Let me look.\n")),         # may be the start of a call
  ("hermes", "a < b", len("a < b")),
  ("hermes", "a <", len("a ")),
  ("mistral", "[TOOL_CALLS][{", 0),
  ("mistral", "Sure [TOOL", len("Sure ")),
  ("llama3_json", "", 0),
  ("llama3_json", "  {\"name\"", 0),
  ("llama3_json", "<|python", 0),
  ("llama3_json", "The answer is {4}.", len("The answer is {4}.")),
])
def test_an_answer_streams_up_to_where_a_call_may_begin(name, text, expected):
  assert next(f for f in FORMATS if f.name == name).text_before_calls(text) == expected


def stream(name: str, reply: str, functions=({"name": "f", "parameters": {}},)) -> list[dict]:
  """The chunks a streamed `auto` reply in format `name` produces, fed to it a character at a time."""
  from tinyvllm.server.responses import Choice, Delta, ToolChatFormat
  from tinyvllm.server.tools import Tools
  fmt = ToolChatFormat(Tools(list(functions), answer_allowed=True, parallel=True,
                             native=next(f for f in FORMATS if f.name == name)))
  choice, chunks = Choice(0), []
  for i in range(1, len(reply) + 1):
    reason = "stop" if i == len(reply) else None
    choice.text, choice.finish_reason = reply[:i], reason
    chunk = fmt.stream_choice(choice, Delta(reply[i - 1], None, 0, reason, first=i == 1))
    if chunk is not None: chunks.append(chunk)
  return chunks


def test_a_streamed_answer_goes_out_as_it_comes_and_a_call_once_complete():
  answer = stream("hermes", "It is sunny in Paris <3, as <b>always</b>.")
  assert len(answer) > 10 and answer[0]["delta"]["role"] == "assistant"
  assert "".join(c["delta"].get("content") or "" for c in answer) == "It is sunny in Paris <3, as <b>always</b>."
  assert answer[-1]["finish_reason"] == "stop"
  call = stream("hermes", 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
  text, last = "".join(c["delta"].get("content") or "" for c in call), call[-1]
  assert text.strip() == "Let me look." and last["finish_reason"] == "tool_calls"
  assert [c["function"]["name"] for c in last["delta"]["tool_calls"]] == ["f"]
  assert all("tool_calls" not in c["delta"] for c in call[:-1])
  bare = stream("llama3_json", '{"name": "f", "parameters": {}}')             # a Llama 3.1 call is the whole reply
  assert len(bare) == 1 and bare[0]["delta"]["tool_calls"][0]["function"]["name"] == "f"
  not_a_call = stream("mistral", "[TOOL_CALLS] oops")                         # marker without calls: text after all
  assert "".join(c["delta"].get("content") or "" for c in not_a_call) == "[TOOL_CALLS] oops"
