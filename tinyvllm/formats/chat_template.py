"""Chat templates: how a list of messages becomes the one string a chat model reads.

An instruct model never sees "messages". It was fine-tuned on plain text in which every
turn is wrapped in marker tokens, e.g. for ChatML (SmolLM2, Qwen)::

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant

and the prompt ends with an open assistant header (the "generation prompt") so that
the model's next tokens are its reply. It stops by emitting the end-of-turn marker.
Formatting a prompt any other way gives worse or broken answers.

Every checkpoint ships this formatting as a Jinja template (GGUF ``tokenizer.chat_template``,
Hugging Face ``tokenizer_config.json`` or ``chat_template.jinja``), and this module runs it the
way Hugging Face transformers does, so a prompt is the one the model was trained on:

    messages, tools, add_generation_prompt, bos/eos  ──►  the model's template  ──►  prompt text
                                                         (jinja2, sandboxed)

- in jinja2's immutable sandbox: a template is code that came with a checkpoint, and may
  not reach Python's internals or change the objects it is given;
- with blocks trimmed (``trim_blocks``, ``lstrip_blocks``) and ``{% break %}``/``{% continue %}``,
  as transformers sets jinja2 up; the whitespace of a prompt depends on it;
- with the helpers templates call: ``raise_exception(message)`` (a template refusing a
  conversation, e.g. roles that do not alternate: a ValueError here, a 400 at the server),
  ``strftime_now(format)`` (today's date, for Llama 3.1's preamble), ``tojson`` without
  HTML escaping, and ``{% generation %}`` blocks (transformers uses them to find the
  assistant's tokens in training; here they render their body).

A checkpoint without a template gets ChatML (as llama.cpp does); ``--chat-template`` replaces
the checkpoint's with a file or a template string.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, Any]


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """jinja2's own `tojson` escapes <, >, & and ' for HTML: a prompt needs them as they are."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """A template's source compiled once (ValueError naming the problem if it is not valid Jinja)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None


def compile_checked(source: str) -> str:
    """``source``, once it has compiled (ValueError if it does not): a bad ``--chat-template`` stops the start."""
    compile_template(source)
    return source


def render(
    template: str | None,
    messages: list[Message],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """``messages`` ([{"role": ..., "content": ...}, ...]) rendered by ``template`` (ChatML if None).
    ``extra`` reaches the template as variables too (vLLM's ``chat_template_kwargs``, e.g.
    ``enable_thinking``). A template that refuses the conversation raises ValueError."""
    compiled = compile_template(template if template is not None else CHATML)
    try:
        return compiled.render(
            **extra,
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"the chat template tried something its sandbox forbids: {e}") from None
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"the chat template could not render these messages: {e}") from None


def load_override(value: str) -> str:
    """``--chat-template``'s value: a file holding a template, or the template itself."""
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return value
