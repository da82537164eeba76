"""Chat templates run as Hugging Face transformers runs them: real templates of five model families render the
prompts transformers renders (tests/data/chat_templates/reference.json, made by make_chat_template_reference.py;
SmolLM2's own in test_tokenizer.py), and a template cannot reach past its sandbox."""
import json
from pathlib import Path
import pytest
from tinyvllm.formats import chat_template

DATA = Path(__file__).parents[1] / "data" / "chat_templates"
CASES = json.loads((DATA / "reference.json").read_text(encoding="utf-8"))
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['template'].split('-')[0]}-{c['case']}-"
                                                     f"{'prompt' if c['add_generation_prompt'] else 'closed'}")
def test_real_templates_render_what_transformers_renders(case):
  text = chat_template.render((DATA / case["template"]).read_text(encoding="utf-8"), case["messages"],
                              tools=case["tools"], add_generation_prompt=case["add_generation_prompt"],
                              bos_token=case["bos_token"] or "", eos_token=case["eos_token"])
  assert text == case["text"]


def test_a_template_refusing_a_conversation_raises_its_message():
  gemma = (DATA / "google-gemma-2-2b-it.jinja").read_text(encoding="utf-8")
  with pytest.raises(ValueError, match="System role not supported"):
    chat_template.render(gemma, [{"role": "system", "content": "x"}] + USER)


@pytest.mark.parametrize("template", ["{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}",
                                      "{{ messages.append(1) }}", "{% set _ = messages[0].update(role='x') %}"])
def test_the_sandbox_keeps_a_template_from_python_internals_and_from_changing_its_inputs(template):
  messages = [dict(m) for m in USER]
  with pytest.raises(ValueError, match="sandbox"):
    chat_template.render(template, messages)
  assert messages == USER


def test_a_checkpoint_without_a_template_gets_chatml():
  assert chat_template.render(None, USER) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_helpers_templates_call():
  template = ("{{ strftime_now('%Y') }}|{{ tools | tojson }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}"
              "{% endif %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}|{{ enable_thinking }}")
  year, tools, content, extra = chat_template.render(template, USER * 2, tools=[{"a": "<&>"}],
                                                     enable_thinking=False).split("|")
  assert int(year) >= 2024 and tools == '[{"a": "<&>"}]' and content == "hi" and extra == "False"


def test_bad_templates_and_overrides_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="line 1"):
    chat_template.render("{% for m in messages %}", USER)
  with pytest.raises(ValueError, match="could not render"):
    chat_template.render("{{ messages[5]['content'] + 1 }}", USER)
  path = tmp_path / "t.jinja"
  path.write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
  assert chat_template.load_override(str(path)) == "{{ messages[0]['content'] }}!"
  assert chat_template.load_override("{{ 'inline' }}") == "{{ 'inline' }}"
  with pytest.raises(ValueError, match="neither a file nor"):
    chat_template.load_override(str(tmp_path / "missing.jinja"))
