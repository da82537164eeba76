"""Jump-forward on the real model, one request at a time: decode tok/s of JSON answers to a few schemas with the
tokens the grammar forces checked in one step (engine/structured_output.py), against one token a step. Greedy; each
prompt runs once to warm up and once timed (speculative.py's `decode`). Also checks that both give the same tokens.

    python tinyvllm/benchmarks/scripts/jump_forward.py [json path]
"""
import json, statistics, sys
from tinyvllm import LLM, SamplingParams
from tinyvllm.benchmarks.report import machine_info
from tinyvllm.sampling_params import StructuredOutputsParams
from speculative import run

SCHEMAS = {
  "city": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "population": {"type": "integer", "minimum": 0}},
           "required": ["city", "population"]},
  "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "email": {"type": "string", "maxLength": 32}},
             "required": ["name", "age", "email"]},
  "point": {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                      "y": {"type": "number"}},
                                                       "required": ["x", "y"]},
                                             "label": {"type": "string", "maxLength": 12}},
            "required": ["point", "label"]},
  "order": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
              "type": "object", "properties": {"product": {"type": "string", "maxLength": 16},
                                               "quantity": {"type": "integer"}}, "required": ["product", "quantity"]}},
                                             "express_delivery": {"type": "boolean"}},
            "required": ["items", "express_delivery"]},
}
PROMPT = "Answer as JSON: describe a {}."


def main() -> None:
  path = sys.argv[1] if len(sys.argv) > 1 else None
  result = {"machine": machine_info("CPU"), "schemas": {}}
  on, off = LLM(max_model_len=2048), LLM(max_model_len=2048, jump_forward=False)
  tok = on.get_tokenizer()
  for name, schema in SCHEMAS.items():
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT.format(name)}]),
                        add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=128, output_kind="cumulative",
                            structured_outputs=StructuredOutputsParams(json=schema))
    before = on.engine.stats().jump_forward_tokens
    [(plain, plain_rate)], [(jumped, jumped_rate)] = run(off, [prompt], params), run(on, [prompt], params)
    forced = (on.engine.stats().jump_forward_tokens - before) / 2                       # warm-up and timed run
    result["schemas"][name] = {"tokens": len(plain), "forced_tokens": forced, "same_tokens": plain == jumped,
                               "decode_tok_s_plain": plain_rate, "decode_tok_s_jump_forward": jumped_rate,
                               "speedup": jumped_rate / plain_rate}
    print(f"{name}: {len(plain)} tokens, {forced:.0f} forced; {plain_rate:.1f} → {jumped_rate:.1f} tok/s "
          f"({jumped_rate / plain_rate:.2f}×); same tokens: {plain == jumped}", flush=True)
  result["speedup_median"] = statistics.median(r["speedup"] for r in result["schemas"].values())
  print(f"median speed-up {result['speedup_median']:.2f}×")
  if path: json.dump(result, open(path, "w"), indent=1)


if __name__ == "__main__": main()
