"""`bench.py chat-decoding`: SmolLM2 and the diffusion LM made from it answer the same chat prompts, by each decoder.

    ar            SmolLM2 alone, greedy, one token a step: the reference row
    diffusion     the diffusion LM (tinyvllm/diffusion/smollm2-diffusion), one token a step in blocks of B
    threshold T   the diffusion LM with Fast-dLLM's threshold decoding: every mask at confidence >= T commits
    apd R         SmolLM2 checking the diffusion LM's blocks of k in one step (APD; mixture weight R)

Requests run one at a time (batch 1, the latency a chat user meets), greedy, after a warm-up that captures every
graph. The prompts: the 50 of chat_prompts.json, written apart from the adaptation's training prompts.

Quality is judged by SmolLM2 itself: its mean log-likelihood per token of each decoder's answers given the chat
prompt (prompt logprobs of prompt + answer, nats), so the ar row is SmolLM2's own answers and a drop below it is
what a decoder gives up. Speed: output tokens per second of wall time, and tokens per forward pass of each model:
SmolLM2's (tokens / its steps: 1 alone, more where drafts are kept) and the diffusion LM's (tokens / its forwards).
"""
from __future__ import annotations
import json
import time
from pathlib import Path
import numpy as np
from tinyvllm.llm import LLM
from tinyvllm.sampling_params import SamplingParams

CHAT_PROMPTS = json.loads((Path(__file__).parent / "chat_prompts.json").read_text())


def decoders(block_length: int, thresholds: list[float], apd_tokens: int, mixture_weights: list[float]) -> dict:
  """name → (model, engine arguments, diffusion sampling fields)."""
  rows = {"ar": (None, {}, {}), f"diffusion B{block_length}": ("diffusion", {}, {"block_length": block_length})}
  rows |= {f"threshold {t}": ("diffusion", {}, {"block_length": block_length, "threshold": t}) for t in thresholds}
  rows |= {f"apd R{r} k{apd_tokens}": (None, {"speculative_config": {"method": "apd", "model": "diffusion",
                                                                     "num_speculative_tokens": apd_tokens,
                                                                     "mixture_weight": r}}, {})
           for r in mixture_weights}
  return rows


def run_decoder(model: str | None, engine_args: dict, fields: dict, prompts: list[list[int]], max_tokens: int,
                max_model_len: int) -> tuple[list[list[int]], dict]:
  llm = LLM(model, max_model_len=max_model_len, **engine_args)
  params = SamplingParams(temperature=0, max_tokens=max_tokens, **fields)
  for prompt in prompts[:2]: llm.generate([{"prompt_token_ids": prompt}], params)          # capture the graphs
  before = llm.engine.stats()
  answers, t0 = [], time.perf_counter()
  for prompt in prompts: answers.append(list(llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids))
  seconds, after = time.perf_counter() - t0, llm.engine.stats()
  tokens = sum(map(len, answers))
  accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
  forwards = after.diffusion_forwards - before.diffusion_forwards
  diffusion_alone = model is not None
  metrics = {"output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
             "ar_tokens_per_forward": None if diffusion_alone else tokens / max(1, tokens - accepted),
             "diffusion_tokens_per_forward": tokens / forwards if forwards else None,
             "diffusion_forwards": forwards}
  if not diffusion_alone and "speculative_config" in engine_args:
    drafted = after.spec_draft_tokens - before.spec_draft_tokens
    rounds = after.spec_drafts - before.spec_drafts
    metrics |= {"acceptance_rate": accepted / max(1, drafted), "mean_accepted_length": 1 + accepted / max(1, rounds)}
  return answers, metrics


def smollm2_log_likelihood(scorer: LLM, prompts: list[list[int]], answers: list[list[int]]) -> float:
  """SmolLM2's mean log-probability of each answer token given the prompt and the answer before it (nats)."""
  logprobs = []
  for prompt, answer in zip(prompts, answers):
    if not answer: continue
    out = scorer.generate([{"prompt_token_ids": prompt + answer}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    logprobs += [entry[token] for entry, token in zip(out.prompt_logprobs[len(prompt):], answer)]
  return float(np.mean(logprobs))


def bench_chat_decoding(num_prompts: int, max_tokens: int, block_length: int, thresholds: list[float],
                        apd_tokens: int, mixture_weights: list[float]) -> tuple[dict, dict]:
  """One column per decoder, and five answers of each (text) for reading."""
  scorer = LLM(None, max_model_len=1024)
  tok = scorer.get_tokenizer()
  texts = CHAT_PROMPTS[:num_prompts]
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False) for t in texts]
  max_model_len = max(map(len, prompts)) + max_tokens + 2 * max(block_length, apd_tokens)
  columns, samples = {}, {}
  for name, (model, engine_args, fields) in decoders(block_length, thresholds, apd_tokens, mixture_weights).items():
    answers, metrics = run_decoder(model, engine_args, fields, prompts, max_tokens, max_model_len)
    metrics["smollm2_log_likelihood_per_token"] = smollm2_log_likelihood(scorer, prompts, answers)
    columns[name] = metrics
    samples[name] = [{"prompt": t, "answer": tok.decode(a, skip_special_tokens=True)} for t, a in zip(texts[:5], answers)]
    print(f"{name}: {metrics['tokens_per_s']:.1f} tok/s, loglik {metrics['smollm2_log_likelihood_per_token']:.3f}",
          flush=True)
  reference = columns["ar"]["smollm2_log_likelihood_per_token"]
  for metrics in columns.values():
    metrics["quality_drop_vs_ar"] = reference - metrics["smollm2_log_likelihood_per_token"]
    metrics["speed_vs_ar"] = metrics["tokens_per_s"] / columns["ar"]["tokens_per_s"]
  return columns, samples
