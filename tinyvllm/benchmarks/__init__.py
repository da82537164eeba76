"""Benchmarks behind `python bench.py`, as vLLM's benchmark scripts define them.

  metrics.py    the definitions (TTFT, TPOT, ITL, E2EL, throughput): pure functions of timestamps
  workloads.py  seeded random-token requests: random lengths and sampling, shared prefix, multi-turn chat
  offline.py    latency / throughput / prefix: the engine stepped in this process
  serving.py    serve: a streaming /v1/completions client, request rate or fixed concurrency
  peers.py      llama.cpp, tinygrad.llm, HF transformers as subprocesses (workers/ holds the ones that stamp tokens)
  diffusion.py  diffusion: LLaDA vs Fast-dLLM decoding on one diffusion LM, with quality beside speed
  commands.py   one function per subcommand: tinyvllm, then the peers, as one result
  report.py     progress bar, table with tinyvllm/peer ratios, JSON with machine facts
"""
