"""`bench.py diffusion`: LLaDA decoding against Fast-dLLM's threshold decoding and its prefix KV cache.

Each mode generates the same prompts (batched through the engine, greedy, ignore_eos so every request makes
gen_length tokens) and reports tokens/s, model calls per generated token (forward passes each sequence took: LLaDA
with steps = gen_length makes 1.0) and quality: the model's own log-likelihood of what it wrote (left to right, see
`log_likelihood`) and the share of tokens equal to the LLaDA baseline's. "llada" and "threshold" recompute the whole
sequence every step (engine/denoising.py's recompute mode: LLaDA's algorithm), "threshold+cache" keeps the prompt's
and finished blocks' K/V (Fast-dLLM's prefix cache), "cache" is LLaDA's fixed schedule with that cache. `--warmup`
runs of the same prompts come first: they capture the graphs the measured run takes.

With random weights of a --shape (`--load-format dummy --shape llada-8b`) the prompts are random token ids and only
speed is measured; the `torch` peer (workers/torch_diffusion.py) runs Fast-dLLM's prefix-cache loop on the same
prompts and shape, against the "cache" mode at the same fixed number of tokens per step (`--diffusion-steps`).
"""
from __future__ import annotations
import dataclasses
import time
import numpy as np
from tinygrad import Device, Tensor
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine_args import SHAPES, EngineArgs
from tinyvllm.diffusion.llada import MaskedDiffusionLM, load_diffusion_model
from tinyvllm.model.loader import resolve
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.tinygrad_internals import release_device_memory

PROMPTS = ["from django.db import models\n\n\nclass Book(models.Model):\n", "    def test_str(self):\n",
           "from django.urls import path\n\nfrom . import views\n\nurlpatterns = [\n",
           "class Migration(migrations.Migration):\n", "from django.test import TestCase\n\n\nclass",
           "def get_version(version=None):\n",
           "    def __init__(self, *args, **kwargs):\n", "        self.assertEqual(response.status_code, "]
MODES = {"llada": (False, False), "threshold": (True, False), "threshold+cache": (True, True),     # threshold?, cache?
         "cache": (False, True)}


def diffusion_prompts(engine_args: EngineArgs, num_prompts: int, input_len: int, seed: int) -> list[str] | list[list[int]]:
  """The shipped model's code prompts, or (random weights of a --shape) random token ids of input_len each."""
  if engine_args.load_format == "dummy":
    below_mask = SHAPES[engine_args.shape]["mask_token_id"]
    return np.random.default_rng(seed).integers(0, below_mask, (num_prompts, input_len)).tolist()
  return (PROMPTS * (num_prompts // len(PROMPTS) + 1))[:num_prompts]


def log_likelihood(model: MaskedDiffusionLM, prompt: list[int], gen: list[int]) -> float:
  """Mean log p of the generated tokens read left to right: token i scored with the prompt and tokens < i visible
  and every later one masked (a masked diffusion model is also an any-order autoregressive model; this is its
  left-to-right order). Tokens committed together but incoherent, say "str" four times where one belongs, score
  low here even though each was likely on its own. One forward pass, a row per token."""
  mask, n = model.config.mask_token_id, len(gen)
  rows = np.array([prompt + gen[:i] + [mask] * (n - i) for i in range(n)])
  logp = model(Tensor(rows)).log_softmax(-1).numpy()
  return float(np.mean([logp[i, len(prompt) + i, gen[i]] for i in range(n)]))


def run_mode(engine: LLMEngine, prompts: list, gen_length: int, block_length: int, threshold: float | None,
             steps: int | None = None) -> tuple[list, float, int]:
  sp = SamplingParams(max_tokens=gen_length, temperature=0, ignore_eos=True)
  sp.block_length, sp.threshold, sp.diffusion_steps = block_length, threshold, steps   # the diffusion knobs
  ids = [engine.add_request(p, sp) for p in prompts]
  done, t0, steps = {}, time.perf_counter(), 0
  while engine.has_unfinished_requests():
    steps += 1
    for out in engine.step():
      if out.finished: done[out.request_id] = out
  return [done[i] for i in ids], time.perf_counter() - t0, steps


def bench_diffusion(engine_args: EngineArgs, prompts: list, gen_length: int = 64, block_length: int = 16,
                    threshold: float = 0.9, warmup: int = 2, modes: tuple[str, ...] = ("llada", "threshold",
                    "threshold+cache"), steps: int | None = None) -> dict[str, dict]:
  """One column of metrics per mode, each on a fresh engine (recompute or cache is an engine argument) whose step
  holds every prompt whole. `steps`: forward passes per sequence of the fixed-schedule modes (None: one per token).
  Quality (log-likelihood, agreement) is measured for real weights only."""
  columns, baseline = {}, None
  dummy = engine_args.load_format == "dummy"
  scorer = None if dummy else load_diffusion_model(resolve(engine_args.model or "diffusion"))[0]
  prompt_len = max(len(p) for p in prompts) if dummy else 32                        # the code prompts: < 32 tokens
  for name in modes:
    use_threshold, cache = MODES[name]
    budget = max(engine_args.max_num_batched_tokens or 0, len(prompts) * (prompt_len + gen_length))
    engine = LLMEngine(dataclasses.replace(engine_args, diffusion_recompute=not cache, max_num_batched_tokens=budget,
                                           max_num_seqs=max(engine_args.max_num_seqs or 0, len(prompts))))
    t = threshold if use_threshold else None
    for _ in range(warmup): run_mode(engine, prompts, gen_length, block_length, t, steps)
    outs, seconds, forwards = run_mode(engine, prompts, gen_length, block_length, t, steps)
    tokens = [o.outputs[0].token_ids for o in outs]
    n = sum(len(t) for t in tokens)
    columns[name] = {"tokens_per_s": n / seconds, "model_calls_per_token": sum(o.metrics["model_calls"]
                     for o in outs) / n, "batched_forwards": forwards, "step_ms": 1000 * seconds / forwards,
                     "seconds": seconds, "tokens": n}
    if scorer is not None:
      baseline = baseline or tokens
      columns[name] |= {
        "agreement_with_llada": float(np.mean([a == b for x, y in zip(tokens, baseline) for a, b in zip(x, y)])),
        "log_likelihood_per_token": float(np.mean([log_likelihood(scorer, o.prompt_token_ids, t)
                                                   for o, t in zip(outs, tokens)])),
        "text": [o.outputs[0].text for o in outs]}
    del engine
    release_device_memory(engine_args.device or Device.DEFAULT)   # the next mode's engine and the peers need it
  return columns
