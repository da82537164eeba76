"""Offline batched generation with vLLM's API: python examples/offline_generate.py"""
from tinyvllm import LLM, SamplingParams

llm = LLM()   # the embedded SmolLM2-135M-Instruct; pass a GGUF path or a Hugging Face directory for your own
prompts = ["The capital of France is", "def fibonacci(n):\n", "Three things to pack for a hike:"]
for out in llm.generate(prompts, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=40, seed=0)):
  print(repr(out.prompt), "->", repr(out.outputs[0].text), f"({out.outputs[0].finish_reason})")

reply = llm.chat([{"role": "user", "content": "Name a river in Egypt."}], SamplingParams(temperature=0, max_tokens=30))
print(reply[0].outputs[0].text)
