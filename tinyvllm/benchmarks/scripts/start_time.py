"""Start-up: seconds from `LLM(...)` to the first generated token. Run it twice:
the first run with an empty tinygrad cache is the cold start (CACHEDB=/tmp/empty.db), the second the warm one.

    python tinyvllm/benchmarks/scripts/start_time.py [engine args as key=value ...]  e.g. load_format=dummy shape=llama-1b
"""
import sys, time
t0 = time.perf_counter()
from tinyvllm import LLM, SamplingParams     # noqa: E402  (timed: the import is part of a start)
extra = {k: (int(v) if v.isdigit() else v) for k, v in (a.split("=") for a in sys.argv[1:])}
t1 = time.perf_counter()
llm = LLM(**extra)
t2 = time.perf_counter()
llm.generate({"prompt_token_ids": [1, 2, 3, 4, 5]}, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
t3 = time.perf_counter()
print(f"import {t1 - t0:.1f} s, LLM() {t2 - t1:.1f} s, first token {t3 - t2:.1f} s, in all {t3 - t0:.1f} s")
