"""Time to first token of a 1,500-token prompt whose first 1,480 tokens were served before, vs a fresh one
(a long prompt whose start was served before). Graphs are warmed first so neither side pays compilation. Usage: python tinyvllm/benchmarks/scripts/prefix_ttft.py"""
import json
import sys
import time
from pathlib import Path
from tinyvllm import LLM, SamplingParams

ref = json.loads((Path(__file__).parents[3] / "tests/data/smollm2_reference.json").read_text())
text = ref["greedy"][-1]["prompt_ids"]                      # 1,999 tokens of varied prose
llm = LLM(max_model_len=1600, enable_prefix_caching=True)
one = SamplingParams(temperature=0, max_tokens=1)


def ttft(prompt: list[int]) -> float:
  t0 = time.perf_counter()
  llm.generate({"prompt_token_ids": prompt}, one)
  return time.perf_counter() - t0


base = text[:1500]
ttft(base)                                                  # warm the prefill graphs, fill the cache
ttft(base[:1480] + text[1500:1520])                         # warm the short-suffix graph
fresh = [ttft(text[k:k + 1500]) for k in (3, 7)]            # unseen prefixes (shifted windows)
hit = [ttft(base[:1480] + text[k:k + 20]) for k in (1520, 1540)]
result = {"fresh_ttft_s": fresh, "hit_ttft_s": hit, "speedup": min(fresh) / max(hit)}
print(json.dumps(result, indent=1))
if len(sys.argv) > 1: Path(sys.argv[1]).write_text(json.dumps(result, indent=1))
