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
