"""Structured outputs (engine/structured_output.py) on the real SmolLM2: sampled outputs of 20 schemas × 3 seeds parse
and validate against their schemas, choices and regexes hold, and unconstrained requests batched with them are
unchanged."""
import json
import re
import jsonschema
import pytest
from tinyvllm import SamplingParams
from tinyvllm.sampling_params import StructuredOutputsParams as Structured

SCHEMAS = [
  {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "population": {"type": "integer", "minimum": 0}},
   "required": ["city", "population"]},
  {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                    "email": {"type": "string", "maxLength": 32}},
   "required": ["name", "age"], "additionalProperties": False},
  {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
   "required": ["colour", "tags"], "additionalProperties": False},
  {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                             "y": {"type": "number"}},
                                              "required": ["x", "y"], "additionalProperties": False},
                                    "label": {"type": "string", "maxLength": 12}},
   "required": ["point"], "additionalProperties": False},
]
S = lambda n: {"type": "string", "maxLength": n}
SCHEMAS += [
  {"type": "object", "properties": {"title": S(20), "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                    "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "horror"]},
                                               "minItems": 1, "maxItems": 2}}, "required": ["title", "year", "genres"]},
  {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                    "in_stock": {"type": "boolean"}}, "required": ["sku", "in_stock"]},
  {"type": "object", "properties": {"user": {"type": "object", "properties": {
                                      "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                      "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]},
                                                "maxItems": 2}}, "required": ["id", "roles"]},
                                    "active": {"type": "boolean"}}, "required": ["user", "active"]},
  {"type": "object", "properties": {"status": {"const": "ok"}, "code": {"enum": [200, 201, 204]}},
   "required": ["status", "code"]},
  {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                                    "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
   "required": ["answer", "confidence"]},
  {"type": "object", "properties": {"steps": {"type": "array", "items": S(16), "minItems": 1, "maxItems": 3}},
   "required": ["steps"]},
  {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                                    "event": S(20)}, "required": ["date", "event"]},
  {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
                                      "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "maxItems": 3}}}, "required": ["matrix"]},
  {"type": "object", "properties": {"name": S(12), "nickname": {"anyOf": [S(12), {"type": "null"}]}},
   "required": ["name", "nickname"]},
  {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]},
                                    "size": {"type": "integer", "minimum": 1, "maximum": 50},
                                    "filled": {"type": "boolean"}, "label": S(10)}, "required": ["shape", "size"]},
  {"type": "object", "properties": {"order": {"type": "object", "properties": {
                                      "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
                                        "product": S(12), "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                                        "required": ["product", "qty"]}},
                                      "express": {"type": "boolean"}}, "required": ["items", "express"]}},
   "required": ["order"]},
  {"type": "object", "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}, "name": S(12)},
   "required": ["hex"]},
  {"type": "object", "properties": {"temperature": {"type": "integer", "minimum": -40, "maximum": 50},
                                    "unit": {"enum": ["C", "F"]}, "city": S(16)}, "required": ["temperature", "unit", "city"]},
  {"type": "object", "properties": {"keywords": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,8}$"},
                                                 "minItems": 2, "maxItems": 4}}, "required": ["keywords"]},
  {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": S(24),
                                    "recommend": {"type": "boolean"}}, "required": ["score", "recommend"]},
  {"type": "object", "properties": {"from": S(10), "to": S(10), "amount": {"type": "integer", "minimum": 0, "maximum": 1000},
                                    "currency": {"enum": ["EUR", "USD"]}}, "required": ["from", "to", "amount", "currency"]},
]
PROMPT = "Describe something as JSON."
# Strings are bounded: at temperature 0.8 a 135M model may write a free string until max_tokens runs out, which is
# a "length" finish (the grammar allowed more), not a broken one.


def test_sampled_outputs_match_their_schemas_and_the_unconstrained_rows_are_unchanged(smollm2):
  tok = smollm2.get_tokenizer()
  chat = lambda text: {"prompt_token_ids": tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                                                      add_special_tokens=False)}
  free = [SamplingParams(temperature=0.8, seed=s, max_tokens=24) for s in (7, 8)]
  constrained = [SamplingParams(temperature=0.8, seed=seed, max_tokens=96, structured_outputs=Structured(json=schema))
                 for schema in SCHEMAS for seed in (0, 1, 2)]
  constrained += [SamplingParams(temperature=0.8, seed=3, max_tokens=8, structured_outputs=Structured(choice=["yes", "no"])),
                  SamplingParams(temperature=0.8, seed=4, max_tokens=16,
                                 structured_outputs=Structured(regex=r"[0-9]{3}-[0-9]{4}")),
                  SamplingParams(temperature=0.8, seed=5, max_tokens=64, structured_outputs=Structured(json_object=True))]
  alone = [o.outputs[0].token_ids for o in smollm2.generate([chat("Tell me a story.")] * 2, free)]
  outs = smollm2.generate([chat("Tell me a story.")] * 2 + [chat(PROMPT)] * len(constrained), free + constrained)
  assert [o.outputs[0].token_ids for o in outs[:2]] == alone                   # unconstrained rows: as if alone
  for out, params in zip(outs[2:], constrained):
    text, kind = out.outputs[0].text, params.structured_outputs.kind
    assert out.outputs[0].finish_reason == "stop", (text, kind)             # the grammar ended it, not max_tokens
    if kind == "json": jsonschema.validate(json.loads(text), params.structured_outputs.json)
    elif kind == "json_object": assert isinstance(json.loads(text), dict)
    elif kind == "choice": assert text in ("yes", "no")
    else: assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)


@pytest.mark.parametrize("spec, message", [({"regex": "("}, "invalid regex"), ({"json": {"type": "nonsense"}}, "invalid json"),
                                           ({"grammar": "start: x\nx: y"}, "invalid grammar")])
def test_a_constraint_that_does_not_compile_is_refused_before_it_runs(smollm2, spec, message):
  with pytest.raises(ValueError, match=message):
    smollm2.engine.add_request("hi", SamplingParams(structured_outputs=Structured(**spec)))
  assert not smollm2.engine.has_unfinished_requests()


def test_exactly_one_constraint():
  with pytest.raises(ValueError, match="exactly one"): Structured()
  with pytest.raises(ValueError, match="exactly one"): Structured(regex="a", choice=["a"])


def test_async_scheduling_gives_a_constrained_row_the_tokens_of_a_plain_step(smollm2, monkeypatch):
  """With async scheduling a constrained row's mask is computed at launch, from the token just read back; the
  tokens must be those of steps run one after another."""
  params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=48, structured_outputs=Structured(json=SCHEMAS[2]))
            for seed in range(3)] + [SamplingParams(temperature=0.8, seed=9, max_tokens=24)]
  prompts = [PROMPT] * 4
  assert smollm2.engine.overlap is not None
  overlapped = [o.outputs[0].token_ids for o in smollm2.generate(prompts, params)]
  monkeypatch.setattr(smollm2.engine, "overlap", None)
  assert [o.outputs[0].token_ids for o in smollm2.generate(prompts, params)] == overlapped


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_jump_forward_checks_forced_tokens_in_one_step_and_gives_the_same_tokens(smollm2, monkeypatch, temperature):
  """Tokens the grammar forces (a schema's keys, quotes, colons) are checked as drafts of one multi-token step: the
  output is the one-token-a-step output, token for token, in fewer steps."""
  engine = smollm2.engine
  params = SamplingParams(temperature=temperature, seed=5, max_tokens=64, structured_outputs=Structured(json=SCHEMAS[1]))
  def run(jump_forward: bool) -> tuple[list[int], int, int]:
    monkeypatch.setattr(engine.drafts, "jump_forward", jump_forward)
    before = engine.stats().jump_forward_tokens
    engine.add_request(PROMPT, params, request_id=f"jump-{jump_forward}-{temperature}")
    steps, tokens = 0, None
    while engine.has_unfinished_requests():
      steps += 1
      for out in engine.step():
        if out.finished: tokens = out.outputs[0].token_ids
    return tokens, steps, engine.stats().jump_forward_tokens - before
  plain, plain_steps, none = run(False)
  jumped, jumped_steps, forced = run(True)
  assert none == 0 and forced >= 5                      # "name", "age" and their quotes and colons at least
  assert jumped == plain
  assert jumped_steps <= plain_steps - forced
