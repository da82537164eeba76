"""Prompt-lookup speculative decoding on the real model, one request at a time: decode tok/s with and without it, on
chats whose answers copy their prompt (fix a typo, repeat a list with a change, quote) and on chats with nothing to
copy (a poem, an explanation). Greedy, stopping at the model's end of turn; each prompt is run once to warm up (its
graphs captured) and once timed, decode rate = (tokens - 1) / (last token - first token). Also checks that both
engines answer with the same tokens.

    python tinyvllm/benchmarks/scripts/speculative.py [json path] [speculative config JSON]
"""
import json, statistics, sys, time
from tinyvllm import LLM, SamplingParams
from tinyvllm.benchmarks.commands import speculative_metrics
from tinyvllm.benchmarks.report import machine_info

CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(valeus)


def variance(values):
    m = mean(values)
    return sum((value - m) ** 2 for value in values) / len(values)
"""
TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
        "great lens and wrote the weather in a leather logbook. Ships passed far out on the grey water, and none of "
        "them ever knew his name, but each of them found the harbour safely because of the light he kept.")
COPY = ["Fix the typo in this code. Reply with the whole corrected code only.\n\n" + CODE,
        "Repeat this list exactly, one item per line, but replace pears with plums:\napples\nbananas\ncherries\n"
        "dates\nfigs\ngrapes\nkiwis\nlemons\nmangoes\npears\noranges\npeaches",
        "Rewrite this paragraph exactly, changing only 'lighthouse keeper' to 'old sailor':\n\n" + TEXT,
        "Add a docstring to each function and print the whole code:\n\n" + CODE]
FRESH = ["Write a short poem about the sea.", "Explain in a few sentences why the sky is blue.",
         "Give three tips for learning to cook."]


def decode(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
  engine = llm.engine
  engine.add_request(prompt, params)
  first = tokens = None
  while engine.has_unfinished_requests():
    for out in engine.step():
      if first is None and out.outputs[0].token_ids: first = time.perf_counter()
      tokens = out.outputs[0].token_ids
  return tokens, (len(tokens) - 1) / (time.perf_counter() - first)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], float]]:
  for p in prompts: decode(llm, p, params)                                     # graphs of every shape captured
  return [decode(llm, p, params) for p in prompts]


def main() -> None:
  path = sys.argv[1] if len(sys.argv) > 1 else None
  config = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {"method": "ngram", "num_speculative_tokens": 3,
                                                                "prompt_lookup_max": 4, "prompt_lookup_min": 2}
  params = SamplingParams(temperature=0, max_tokens=256, output_kind="cumulative")
  result = {"speculative_config": config, "machine": machine_info("CPU"), "workloads": {}}
  plain, spec = LLM(max_model_len=2048), LLM(max_model_len=2048, speculative_config=config)
  tok = plain.get_tokenizer()
  for name, texts in (("copy", COPY), ("nothing to copy", FRESH)):
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               for t in texts]
    before = spec.engine.stats()
    off, on = run(plain, prompts, params), run(spec, prompts, params)
    after = spec.engine.stats()
    stats = type(after)(**{f: getattr(after, f) - getattr(before, f) for f in ("spec_drafts", "spec_draft_tokens",
                                                                              "spec_accepted_tokens")})
    ratios = [b / a for (_, a), (_, b) in zip(off, on)]
    result["workloads"][name] = {
      "tokens": [len(t) for t, _ in off], "same_tokens": all(a == b for (a, _), (b, _) in zip(off, on)),
      "decode_tok_s_plain": [r for _, r in off], "decode_tok_s_speculative": [r for _, r in on],
      "speedup_per_prompt": ratios, "speedup_median": statistics.median(ratios),
      "speculative": speculative_metrics(stats)}     # both runs of each prompt (warm-up included)
    w = result["workloads"][name]
    print(f"{name}: speed-up median {w['speedup_median']:.2f}× (per prompt {', '.join(f'{r:.2f}' for r in ratios)}), "
          f"plain {statistics.median(w['decode_tok_s_plain']):.1f} tok/s, speculative "
          f"{statistics.median(w['decode_tok_s_speculative']):.1f}; acceptance "
          f"{w['speculative']['acceptance_rate']:.2f}, mean accepted length "
          f"{w['speculative']['mean_accepted_length']:.2f}; same tokens: {w['same_tokens']}", flush=True)
  if path: json.dump(result, open(path, "w"), indent=1)


if __name__ == "__main__": main()
