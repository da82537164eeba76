"""What a speculative step costs: the wall time of a decode step in which every sequence brings k draft tokens to
check, against a plain decode step, at a few batch sizes. It is the number that decides when speculation pays: with
acceptance rate a, a step that checks k drafts commits 1 + a + a² + ... + a^k tokens, so it pays where that mean
exceeds the step's cost ratio.

    python tinyvllm/benchmarks/scripts/verify_cost.py [json path] [--shape llama-1b] [--batch 1 64] [--k 1 2 4 8]
    python tinyvllm/benchmarks/scripts/verify_cost.py [json path] --model default ...     (the embedded SmolLM2)

Random weights (`--load-format dummy`) unless --model names real ones: a proposer that always proposes k tokens
stands in for a real one, and almost every draft is rejected, so each measured step checks k drafts and commits one
token, the step's worst case. Steps are synchronous (async scheduling waits for a step that checks drafts); the
plain step is measured both ways, synchronous and with async scheduling, since the latter is what a batch gets
without speculation. Each configuration runs in a fresh engine whose graphs for it are captured first (untimed); the
median of the timed steps is reported.
"""
import argparse, gc, itertools, json, statistics, time
import numpy as np
from tinyvllm import EngineArgs, LLMEngine, SamplingParams            # first: it turns tinygrad's queue runtime on
from tinygrad import Device
from tinyvllm.benchmarks.report import machine_info
from tinyvllm.engine.speculative import Proposer


class AlwaysK(Proposer):
  """Proposes k tokens for every decoding sequence (its last token, repeated): the proposer's own cost is nil."""
  def propose_all(self, seqs) -> dict:
    return {seq: [seq.token_ids[-1]] * self.config.num_speculative_tokens for seq in seqs}


def step_ms(batch: int, k: int, async_scheduling: bool, opts: argparse.Namespace) -> dict:
  spec = {"method": "ngram", "num_speculative_tokens": k, "disable_by_batch_size": 1 << 20} if k else None
  weights = dict(load_format="dummy", shape=opts.shape) if opts.model is None else \
    dict(model=None if opts.model == "default" else opts.model)
  engine = LLMEngine(EngineArgs(**weights, max_model_len=opts.input_len + 512,
                                max_num_seqs=max(256, batch * (k + 1)), async_scheduling=async_scheduling,
                                speculative_config=json.dumps(spec) if spec else None))
  if k: engine.drafts.proposer = AlwaysK(engine.drafts.proposer.config)
  rng = np.random.default_rng(0)
  vocab = engine.model_config.vocab_size
  for _ in range(batch):
    engine.add_request(rng.integers(0, vocab, opts.input_len).tolist(),
                       SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
  times, drafts = [], []
  while len(times) < opts.warmup + opts.steps:
    before = engine.stats().spec_draft_tokens
    t0 = time.perf_counter()
    engine.step()
    t = time.perf_counter() - t0
    decoding = all(s.num_computed_tokens >= opts.input_len for s in engine.scheduler.running)
    if decoding and len(engine.scheduler.running) == batch:
      times.append(t)
      drafts.append(engine.stats().spec_draft_tokens - before)
  times, drafts = times[opts.warmup:], drafts[opts.warmup:]
  del engine
  gc.collect()
  return {"batch": batch, "k": k, "async_scheduling": async_scheduling, "step_ms": statistics.median(times) * 1e3,
          "draft_tokens_per_step": statistics.median(drafts)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("json", nargs="?")
  p.add_argument("--shape", default="llama-1b")
  p.add_argument("--model", help="real weights instead of a random shape: a path, or `default` for the embedded model")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
  p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--input-len", type=int, default=128)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--warmup", type=int, default=10)
  opts = p.parse_args()
  rows = []
  def save():                                                    # after every row: a cut-short run keeps what it measured
    if opts.json:
      with open(opts.json, "w") as f:
        json.dump({"shape": opts.shape if opts.model is None else opts.model, "input_len": opts.input_len,
                   "machine": machine_info(Device.DEFAULT), "rows": rows}, f, indent=1)
  print(f"{'batch':>5} {'k':>3} {'step ms':>8} {'× plain':>8} {'× plain async':>14} {'drafts/step':>12}")
  for batch in opts.batch:
    plain = step_ms(batch, 0, False, opts)
    overlapped = step_ms(batch, 0, True, opts)
    for r in itertools.chain([plain, overlapped], (step_ms(batch, k, False, opts) for k in opts.k)):
      r["vs_plain"], r["vs_plain_async"] = r["step_ms"] / plain["step_ms"], r["step_ms"] / overlapped["step_ms"]
      rows.append(r)
      save()
      label = f"{r['k']}" if r["k"] or not r["async_scheduling"] else "0a"
      print(f"{batch:>5} {label:>3} {r['step_ms']:>8.2f} {r['vs_plain']:>8.2f} {r['vs_plain_async']:>14.2f} "
            f"{r['draft_tokens_per_step']:>12.0f}", flush=True)


if __name__ == "__main__": main()
