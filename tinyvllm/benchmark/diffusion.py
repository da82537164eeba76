"""`bench.py diffusion`: LLaDA decoding against Fast-dLLM's threshold decoding and its prefix KV cache.

Each mode generates the same prompts (batched through DiffusionEngine, greedy, ignore_eos so every request makes
gen_length tokens) and reports tokens/s, model calls per generated token (forward passes each sequence took: LLaDA
with steps = gen_length makes 1.0) and quality: the model's own log-likelihood of what it wrote (block by block: a
block's tokens scored with the prompt and earlier blocks visible, later ones masked) and the share of tokens equal
to the LLaDA baseline's.
"""
from __future__ import annotations
import time
import numpy as np
from tinygrad import Tensor
from tinyvllm.config import EngineArgs
from tinyvllm.diffusion_engine import DiffusionEngine
from tinyvllm.model.llada import MaskedDiffusionLM
from tinyvllm.sampling_params import SamplingParams

PROMPTS = ["ROMEO.\n", "KING.\nMy lords, ", "HAMLET.\nTo be, or not to be", "First Citizen.\n",
           "JULIET.\nO Romeo, Romeo!", "Enter a Messenger.\n\nMESSENGER.\n", "LADY MACBETH.\n", "DUKE.\nWhat news"]
MODES = {"llada": (None, False), "threshold": ("t", False), "threshold+cache": ("t", True)}


def block_log_likelihood(model: MaskedDiffusionLM, prompt: list[int], gen: list[int], block_length: int) -> float:
  """Mean log p of the generated tokens, one block at a time given the prompt and the blocks before it."""
  mask, total = model.config.mask_token_id, 0.0
  for start in range(0, len(gen), block_length):
    x = prompt + gen[:start] + [mask] * (len(gen) - start)
    logp = model(Tensor([x])).log_softmax(-1).numpy()[0]
    pos = np.arange(len(prompt) + start, len(prompt) + start + block_length)
    total += logp[pos, gen[start:start + block_length]].sum()
  return total / len(gen)


def run_mode(engine: DiffusionEngine, prompts: list[str], gen_length: int, block_length: int,
             threshold: float | None) -> tuple[list, float]:
  sp = SamplingParams(max_tokens=gen_length, temperature=0, ignore_eos=True)
  sp.block_length, sp.threshold = block_length, threshold          # SamplingParams' diffusion knobs
  ids = [engine.add_request(p, sp) for p in prompts]
  done, t0 = {}, time.perf_counter()
  while engine.has_unfinished_requests():
    for out in engine.step():
      if out.finished: done[out.request_id] = out
  return [done[i] for i in ids], time.perf_counter() - t0


def bench_diffusion(model: str | None = None, num_prompts: int = 8, gen_length: int = 64, block_length: int = 16,
                    threshold: float = 0.9, **engine_args) -> list[dict]:
  prompts = (PROMPTS * (num_prompts // len(PROMPTS) + 1))[:num_prompts]
  rows, baseline = [], None
  for name, (use_threshold, cache) in MODES.items():
    engine = DiffusionEngine(EngineArgs(model=model or "diffusion", enable_prefix_caching=cache, **engine_args))
    t = threshold if use_threshold else None
    run_mode(engine, prompts[:1], gen_length, block_length, t)            # warm-up: kernels compiled outside timing
    calls0 = engine.model_calls
    outs, seconds = run_mode(engine, prompts, gen_length, block_length, t)
    tokens = [o.outputs[0].token_ids for o in outs]
    n = sum(len(t) for t in tokens)
    baseline = baseline or tokens
    agree = np.mean([a == b for x, y in zip(tokens, baseline) for a, b in zip(x, y)])
    loglik = np.mean([block_log_likelihood(engine.model, o.prompt_token_ids, t, block_length)
                      for o, t in zip(outs, tokens)])
    rows.append({"mode": name, "tokens_per_s": n / seconds, "model_calls_per_token": sum(o.metrics["model_calls"]
                 for o in outs) / n, "batched_forwards": engine.model_calls - calls0, "agreement_with_llada": agree,
                 "log_likelihood_per_token": loglik, "seconds": seconds, "tokens": n})
  return rows


def format_rows(rows: list[dict]) -> str:
  head = f"{'mode':<16} {'tok/s':>8} {'calls/tok':>9} {'forwards':>8} {'agree':>6} {'loglik':>7}"
  lines = [f"{r['mode']:<16} {r['tokens_per_s']:8.1f} {r['model_calls_per_token']:9.3f} {r['batched_forwards']:8d} "
           f"{r['agreement_with_llada']:6.2f} {r['log_likelihood_per_token']:7.3f}" for r in rows]
  return "\n".join([head, *lines])


if __name__ == "__main__":
  import argparse
  import json
  ap = argparse.ArgumentParser(description="diffusion decoding benchmark")
  ap.add_argument("--model", default=None)
  ap.add_argument("--num-prompts", type=int, default=8)
  ap.add_argument("--gen-length", type=int, default=64)
  ap.add_argument("--block-length", type=int, default=16)
  ap.add_argument("--threshold", type=float, default=0.9)
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  result = bench_diffusion(a.model, a.num_prompts, a.gen_length, a.block_length, a.threshold)
  print(format_rows(result))
  if a.json: open(a.json, "w").write(json.dumps(result, indent=2, default=float))
