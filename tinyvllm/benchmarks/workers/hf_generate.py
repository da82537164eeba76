"""Hugging Face transformers' `generate` with a static KV cache, as a benchmark peer (needs torch + transformers).

Reads a JSON spec on stdin and prints one JSON line on stdout:
  {"mode": "latency", "prompts": [[ids]], "warmup": [[ids]], "output_len": n, ...}
      → {"timings": [{"start", "chunk_times", "prompt_tokens", "output_tokens"}]}   one prompt at a time; a streamer
        stamps every token as `generate` hands it over (it copies each to the host, so the stamp follows the GPU)
  {"mode": "throughput", "prompts": [[ids]], "output_lens": [n], ...}
      → {"duration", "num_requests", "prompt_tokens", "output_tokens"}   one left-padded batch; every row generates
        max(output_lens) tokens (padding work counts as none), as vLLM's HF throughput backend does
The model is {"config": {...}} (random weights of that Llama shape), or {"model": path} (a Hugging Face directory or a
GGUF file); {"dtype": "float16", "device": "cuda"}. Generation is greedy with `min_new_tokens` = `max_new_tokens`,
so EOS never ends a row early (vLLM's `ignore_eos`).
"""
import json
import sys
import time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


class TokenStamps:
  """A `generate` streamer: `put` gets the prompt once, then each new token; we keep the time of each token."""
  def __init__(self): self.times, self.seen_prompt = [], False

  def put(self, _value) -> None:
    if self.seen_prompt: self.times.append(time.perf_counter())
    self.seen_prompt = True

  def end(self) -> None: pass


def load(spec: dict) -> torch.nn.Module:
  dtype, device = getattr(torch, spec["dtype"]), torch.device(spec["device"])
  if spec.get("config"):
    torch.set_default_dtype(dtype)
    with device: return LlamaForCausalLM(LlamaConfig(**spec["config"])).eval()
  path = Path(spec["model"])
  source, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
  return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra).to(device).eval()


def sync(device: str) -> None:
  if device.startswith("cuda"): torch.cuda.synchronize()


@torch.inference_mode()
def generate(model, prompts: list[list[int]], new_tokens: int, streamer=None) -> None:
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
  model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                 cache_implementation="static", streamer=streamer, pad_token_id=0)


def latency(model, spec: dict) -> dict:
  for prompt in spec["warmup"]: generate(model, [prompt], spec["output_len"])
  timings = []
  for prompt in spec["prompts"]:
    stamps = TokenStamps()
    sync(spec["device"])
    start = time.perf_counter()
    generate(model, [prompt], spec["output_len"], stamps)
    timings.append({"start": start, "chunk_times": stamps.times, "prompt_tokens": len(prompt),
                    "output_tokens": len(stamps.times)})
  return {"timings": timings}


def throughput(model, spec: dict) -> dict:
  prompts, new_tokens = spec["prompts"], max(spec["output_lens"])
  generate(model, prompts, new_tokens)       # warmup: the same shapes
  sync(spec["device"])
  start = time.perf_counter()
  generate(model, prompts, new_tokens)
  sync(spec["device"])
  return {"duration": time.perf_counter() - start, "num_requests": len(prompts),
          "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(spec["output_lens"])}


def main() -> None:
  spec = json.load(sys.stdin)
  model = load(spec)
  print(json.dumps({"latency": latency, "throughput": throughput}[spec["mode"]](model, spec)))


if __name__ == "__main__": main()
