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

Checkpoints ship this formatting as a Jinja template (``tokenizer_config.json`` or GGUF
``tokenizer.chat_template``). We do not run Jinja: the templates in use fall into a few
families that differ only in their markers, so we recognize the family from markers in
the template text and render it in Python, reading the details that vary inside a family
(such as a default system prompt) out of the template itself.

Supported families: ``chatml``, ``llama3`` and ``llama2``. Any of these names may also be
given in place of a template string.
"""

from __future__ import annotations

import re
from datetime import date

FAMILIES = ("chatml", "llama3", "llama2")

Message = dict[str, str]


def detect_family(template: str | None) -> str:
    """Which family a chat template (or a family name) belongs to."""
    if template in FAMILIES:
        return template
    markers = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>", "llama2": "[INST]"}
    for family, marker in markers.items():
        if template and marker in template:
            return family
    what = "no chat template" if not template else f"an unrecognized chat template: {template[:120]!r}..."
    raise ValueError(
        f"The checkpoint has {what}. Supported families: {', '.join(FAMILIES)}. Set "
        "tokenizer.chat_template to one of those names, or format the prompt yourself and call encode()."
    )


def render(
    template: str | None,
    messages: list[Message],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}]) the way ``template`` would."""
    family = detect_family(template)
    if family == "chatml":
        return _render_chatml(template, messages, add_generation_prompt)
    if family == "llama3":
        return _render_llama3(template, messages, add_generation_prompt, bos_token)
    return _render_llama2(messages, bos_token, eos_token)


# --- ChatML: SmolLM2, Qwen2 ---


def _chatml_default_system(template: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none.

    It sits in the template as a literal string, e.g. SmolLM2's
    ``'<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n'``.
    Quotes and braces are excluded so that we skip the ``'<|im_start|>system\\n' + ...``
    of the branch that renders a given system message.
    """
    match = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", template)
    return match and match.group(1).replace("\\n", "\n")


def _render_chatml(template: str, messages: list[Message], add_generation_prompt: bool) -> str:
    default_system = _chatml_default_system(template)
    if messages and messages[0]["role"] != "system" and default_system is not None:
        messages = [{"role": "system", "content": default_system}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# --- Llama 3 ---


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _llama3_knowledge_preamble(template: str) -> str:
    """Llama 3.1+ templates open every prompt with a system turn stating dates.

    The cutoff is a literal in the template. The "today" date is ``strftime_now`` when
    the template asks for it (transformers supplies the real date), else its literal
    fallback.
    """
    cutoff = re.search(r"Cutting Knowledge Date: ([^\\\n\"']+)", template).group(1)
    fallback = re.search(r"date_string = \"([^\"]+)\"", template)
    today = date.today().strftime("%d %b %Y") if "strftime_now" in template or not fallback else fallback.group(1)
    return f"Cutting Knowledge Date: {cutoff}\nToday Date: {today}\n\n"


def _render_llama3(template: str, messages: list[Message], add_generation_prompt: bool, bos_token: str) -> str:
    text = bos_token
    if "Cutting Knowledge Date" in template:
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        text += _llama3_header("system") + _llama3_knowledge_preamble(template) + system + "<|eot_id|>"
    text += "".join(_llama3_header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in messages)
    return text + (_llama3_header("assistant") if add_generation_prompt else "")


# --- Llama 2 ---


def _render_llama2(messages: list[Message], bos_token: str, eos_token: str) -> str:
    """``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>...``

    Llama 2's template has no generation prompt: the prompt already ends in ``[/INST]``.
    """
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = ""
    for n, m in enumerate(messages):
        if (m["role"] == "user") != (n % 2 == 0):
            raise ValueError("Llama 2 conversations must alternate user/assistant/user/...")
        content = m["content"]
        if n == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            text += f"{bos_token}[INST] {content.strip()} [/INST]"
        else:
            text += f" {content.strip()} {eos_token}"
    return text
