"""Batch-1 generation with tinygrad's own runner, `tinygrad.llm` (tinygrad 0.13.0), one timestamp per token.

Runs in that tinygrad's own venv (see ../shared/peers/tinygrad-llm-venv.sh), so it imports nothing from tinyvllm.
Reads a JSON spec on stdin: {"gguf", "max_context", "output_len", "prompts": [[ids]], "warmup": [[ids]]};
prints {"timings": [{"start", "chunk_times", "prompt_tokens", "output_tokens"}]} as its last line of stdout.
The warmup prompts compile and capture the JIT; prompts differ from their first token on, so `generate` never
reuses an earlier prompt's KV cache.
"""
import json
import pathlib
import sys
import time
from tinygrad import Tensor
from tinygrad.llm.model import Transformer


def timed_generate(model: Transformer, prompt: list[int], output_len: int) -> dict:
  start, chunk_times = time.perf_counter(), []
  for _ in model.generate(list(prompt)):
    chunk_times.append(time.perf_counter())
    if len(chunk_times) == output_len: break
  return {"start": start, "chunk_times": chunk_times, "prompt_tokens": len(prompt), "output_tokens": len(chunk_times)}


def main() -> None:
  spec = json.load(sys.stdin)
  model, _ = Transformer.from_gguf(Tensor(pathlib.Path(spec["gguf"])), spec["max_context"])
  for prompt in spec["warmup"]: timed_generate(model, prompt, 3)
  print(json.dumps({"timings": [timed_generate(model, p, spec["output_len"]) for p in spec["prompts"]]}))


if __name__ == "__main__": main()
