"""`bench.py diffusion`: LLaDA decoding against Fast-dLLM's threshold decoding and its prefix KV cache.

Each mode generates the same prompts (batched through the engine, greedy, ignore_eos so every request makes
gen_length tokens) and reports tokens/s, model calls per generated token (forward passes each sequence took: LLaDA
with steps = gen_length makes 1.0) and quality: the model's own log-likelihood of what it wrote (left to right, see
`log_likelihood`) and the share of tokens equal to the LLaDA baseline's. "llada" and "threshold" recompute the whole
sequence every step (engine/denoising.py's recompute mode: LLaDA's algorithm), "threshold+cache" keeps the prompt's
and finished blocks' K/V (Fast-dLLM's prefix cache). `--warmup` runs of the same prompts come first: they capture
the graphs the measured run takes.
"""
from __future__ import annotations
import dataclasses
import time
import numpy as np
from tinygrad import Tensor
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine_args import EngineArgs
from tinyvllm.diffusion.llada import MaskedDiffusionLM, load_diffusion_model
from tinyvllm.model.loader import resolve
from tinyvllm.sampling_params import SamplingParams

PROMPTS = ["from django.db import models\n\n\nclass Book(models.Model):\n", "    def test_str(self):\n",
           "from django.urls import path\n\nfrom . import views\n\nurlpatterns = [\n",
           "class Migration(migrations.Migration):\n", "from django.test import TestCase\n\n\nclass",
           "def get_version(version=None):\n",
           "    def __init__(self, *args, **kwargs):\n", "        self.assertEqual(response.status_code, "]
MODES = {"llada": (False, False), "threshold": (True, False), "threshold+cache": (True, True)}  # threshold?, cache?


def log_likelihood(model: MaskedDiffusionLM, prompt: list[int], gen: list[int]) -> float:
  """Mean log p of the generated tokens read left to right: token i scored with the prompt and tokens < i visible
  and every later one masked (a masked diffusion model is also an any-order autoregressive model; this is its
  left-to-right order). Tokens committed together but incoherent, say "str" four times where one belongs, score
  low here even though each was likely on its own. One forward pass, a row per token."""
  mask, n = model.config.mask_token_id, len(gen)
  rows = np.array([prompt + gen[:i] + [mask] * (n - i) for i in range(n)])
  logp = model(Tensor(rows)).log_softmax(-1).numpy()
  return float(np.mean([logp[i, len(prompt) + i, gen[i]] for i in range(n)]))


def run_mode(engine: LLMEngine, prompts: list[str], gen_length: int, block_length: int,
             threshold: float | None) -> tuple[list, float, int]:
  sp = SamplingParams(max_tokens=gen_length, temperature=0, ignore_eos=True)
  sp.block_length, sp.threshold = block_length, threshold          # SamplingParams' diffusion knobs
  ids = [engine.add_request(p, sp) for p in prompts]
  done, t0, steps = {}, time.perf_counter(), 0
  while engine.has_unfinished_requests():
    steps += 1
    for out in engine.step():
      if out.finished: done[out.request_id] = out
  return [done[i] for i in ids], time.perf_counter() - t0, steps


def bench_diffusion(engine_args: EngineArgs, num_prompts: int = 8, gen_length: int = 64, block_length: int = 16,
                    threshold: float = 0.9, warmup: int = 2) -> dict[str, dict]:
  """One column of metrics per mode, each on a fresh engine (recompute or cache is an engine argument) whose step
  holds every prompt whole."""
  prompts = (PROMPTS * (num_prompts // len(PROMPTS) + 1))[:num_prompts]
  columns, baseline = {}, None
  scorer = load_diffusion_model(resolve(engine_args.model or "diffusion"))[0]
  for name, (use_threshold, cache) in MODES.items():
    budget = max(engine_args.max_num_batched_tokens or 0, num_prompts * (32 + gen_length))   # prompts: < 32 tokens
    engine = LLMEngine(dataclasses.replace(engine_args, diffusion_recompute=not cache, max_num_batched_tokens=budget,
                                           max_num_seqs=max(engine_args.max_num_seqs or 0, num_prompts)))
    t = threshold if use_threshold else None
    for _ in range(warmup): run_mode(engine, prompts, gen_length, block_length, t)
    outs, seconds, steps = run_mode(engine, prompts, gen_length, block_length, t)
    tokens = [o.outputs[0].token_ids for o in outs]
    n = sum(len(t) for t in tokens)
    baseline = baseline or tokens
    agree = np.mean([a == b for x, y in zip(tokens, baseline) for a, b in zip(x, y)])
    loglik = np.mean([log_likelihood(scorer, o.prompt_token_ids, t) for o, t in zip(outs, tokens)])
    columns[name] = {"tokens_per_s": n / seconds, "model_calls_per_token": sum(o.metrics["model_calls"]
                     for o in outs) / n, "batched_forwards": steps,
                     "agreement_with_llada": float(agree), "log_likelihood_per_token": float(loglik),
                     "seconds": seconds, "tokens": n, "text": [o.outputs[0].text for o in outs]}
  return columns
