"""Writes chat_templates/reference.json: conversations rendered by Hugging Face transformers' chat-template code
(render_jinja_template) with the real templates in chat_templates/, the expected prompts of
tests/formats/test_chat_template.py. Offline, in a throwaway venv:

    python -m venv /tmp/hf && /tmp/hf/bin/pip install transformers jinja2
    /tmp/hf/bin/python tests/data/make_chat_template_reference.py

The templates are the models' own (each vendor's tokenizer_config.json, as llama.cpp keeps them in models/templates):
Llama 3.1 8B Instruct, Qwen2.5 7B Instruct, Mistral Nemo Instruct 2407, Gemma 2 2B it.
"""
import json
from pathlib import Path
from transformers.utils.chat_template_utils import render_jinja_template

HERE = Path(__file__).parent / "chat_templates"
WEATHER = {"type": "function", "function": {
  "name": "get_weather", "description": "The weather in a city now.",
  "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Paris"},
                                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                 "required": ["city"]}}}
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? <tags> & \"quotes\" stay as they are."}]
SYSTEM = [{"role": "system", "content": "You answer in one word."}] + CHAT
TOOL_CALL = [{"role": "user", "content": "How warm is it in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
               {"id": "call00001", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "{\"temp\": 21}"}]
MODELS = {  # template file: (bos, eos, conversations (name, messages, tools))
  "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>",
    [("chat", CHAT, None), ("system", SYSTEM, None), ("tools", TOOL_CALL[:1], [WEATHER]),
     ("tool_result", TOOL_CALL, [WEATHER])]),
  "Qwen-Qwen2.5-7B-Instruct.jinja": (None, "<|im_end|>",
    [("chat", CHAT, None), ("system", SYSTEM, None), ("tools", TOOL_CALL[:1], [WEATHER]),
     ("tool_result", TOOL_CALL, [WEATHER])]),
  "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>",
    [("chat", CHAT, None), ("system", SYSTEM, None), ("tools", TOOL_CALL[:1], [WEATHER]),
     ("tool_result", TOOL_CALL, [WEATHER])]),
  "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>", [("chat", CHAT, None)]),
}

cases = []
for name, (bos, eos, conversations) in MODELS.items():
  template = (HERE / name).read_text(encoding="utf-8")
  for case, messages, tools in conversations:
    for add_generation_prompt in (True, False):
      texts, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                       add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
      cases.append({"template": name, "case": case, "messages": messages, "tools": tools, "bos_token": bos,
                    "eos_token": eos, "add_generation_prompt": add_generation_prompt, "text": texts[0]})
(HERE / "reference.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
print(len(cases), "cases")
