"""Structured outputs: a sequence whose output must match a JSON schema, a regex, a list of choices or a grammar.

The grammar is compiled by llguidance (the engine vLLM, SGLang and llama.cpp use), which walks it token by token:

    request ──► grammar (json schema / regex / choice / Lark / GBNF) ──► a matcher per sequence
    each step:  matcher ──► allowed tokens, a bitmask of vocab/32 words ──► the sampler drops the others (-inf)
                sampled token ──► matcher.consume_token ──► stopped (the grammar is complete) ends the sequence

The mask is computed on the host, from the matcher's state after the token the last step sampled. With async
scheduling the next step is prepared before that token is known: its constrained rows get their masks at launch,
once the token is read back (`allowed_after([token])`: consumed, masked, rolled back; the engine consumes it for
good as it finishes the step). The sampler's sampled and general plans read the masks (runner/sampler.py: a row's
"constrained" field says whether its mask applies; a batch without a grammar sends none). EOS is allowed only where
the grammar may end.

Jump-forward: where the grammar leaves one way to go on (a schema's next key, its quotes and colon), the tokens it
forces are known before the model runs. They go into the next step as drafts, the multi-token step speculative
decoding uses (engine/speculative.py): the step computes them like a short prompt chunk, each row is sampled under
the grammar's mask after the drafts before it (`MatcherAfter`), and the engine keeps the drafts the model sampled.
So the output is token for token what one token a step gives, in fewer steps:

    output so far: {"name": "Ada", "age                 forced next: ["\"", ":", " "]
    one step computes  [age | " : ␠]  and samples 4 rows  →  " : ␠ 3   (4 tokens for one step)
"""
from __future__ import annotations
import functools
import json
import re
import numpy as np
import llguidance
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.sampling_params import StructuredOutputsParams


# JSON is written on one line, as json.dumps writes it: left free, whitespace is a way for a small model to wander off
# (SmolLM2 random-walking a schema: '{"name":\n        \n   \n\n               "...')
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def closed(schema):
  """The schema with `additionalProperties: false` wherever an object lists its properties and says nothing of
  others, as OpenAI's strict schemas and xgrammar (vLLM's default) read them: an object open to any key lets a model
  add keys until max_tokens runs out (SmolLM2 asked for a city: '{"city": "New York", "population": 21, "habits":
  [{"name": "Tapir", ...')."""
  if isinstance(schema, list): return [closed(s) for s in schema]
  if not isinstance(schema, dict): return schema
  out = {k: (closed(v) if k not in ("enum", "const", "default", "examples", "required") else v) for k, v in schema.items()}
  if "properties" in schema and "additionalProperties" not in schema: out["additionalProperties"] = False
  return out


def mask_words(vocab_size: int) -> int:
  """int32 words of one row's bitmask."""
  return -(-vocab_size // 32)


def grammar_of(params: StructuredOutputsParams) -> str:
  """llguidance's grammar for the request's constraint."""
  kind, value = params.kind, getattr(params, params.kind)
  if kind in ("json", "json_object"):
    schema = {"type": "object"} if kind == "json_object" else json.loads(value) if isinstance(value, str) else value
    return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_LAYOUT)
  if kind == "regex": return llguidance.LLMatcher.grammar_from_regex(value)
  if kind == "choice": return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in value))
  lark = llguidance.gbnf_to_lark(value) if "::=" in value else value           # llama.cpp's GBNF, or Lark
  return llguidance.LLMatcher.grammar_from_lark(lark)


class _Vocabulary:
  """What llguidance needs of a tokenizer (llguidance.TokenizerWrapper's fields): each token's bytes, EOS, and
  a way to encode text."""
  def __init__(self, tokenizer: Tokenizer, vocab_size: int):
    self.tokenizer = tokenizer
    self.tokens = [tokenizer.id_to_bytes(i) if i < tokenizer.vocab_size else b"" for i in range(vocab_size)]
    self.eos_token_id = tokenizer.eos_id
    self.bos_token_id = tokenizer.bos_id
    self.special_token_ids = sorted(tokenizer.special_ids)
    self.is_tokenizer_wrapper = True

  def __call__(self, text: str | bytes) -> list[int]:
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    return self.tokenizer.encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=4)
def _grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
  """Built once per tokenizer (it indexes the whole vocabulary); every stop token counts as EOS."""
  eos = sorted(tokenizer.stop_ids) or None
  return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size)), n_vocab=vocab_size,
                                eos_token=eos)


class Matcher:
  """One sequence's place in its grammar."""
  def __init__(self, tokenizer: Tokenizer, vocab_size: int, grammar: str):
    self.matcher = llguidance.LLMatcher(_grammar_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
    self.words = mask_words(vocab_size)

  def allowed(self) -> np.ndarray:
    """The tokens the grammar allows next, as [words] int32 bits (token t: bit t % 32 of word t // 32)."""
    mask = np.zeros(self.words, np.int32)
    self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    return mask

  def allowed_after(self, tokens: list[int]) -> np.ndarray:
    """`allowed()` once `tokens` are consumed, leaving the matcher where it is: a step prepared while the step before
    was sampling a token learns it only at launch, before the engine consumes it (engine/overlap.py); a row that
    checks a draft follows the drafts before it."""
    if not tokens: return self.allowed()
    self.matcher.consume_tokens(tokens)
    mask = self.allowed()
    self.matcher.rollback(len(tokens))
    return mask

  def consume(self, token: int) -> None: self.matcher.consume_token(token)

  def forced(self, limit: int) -> list[int]:
    """Up to `limit` tokens the grammar forces from here (jump-forward's drafts): [] where the model has a choice."""
    return self.matcher.compute_ff_tokens()[:limit] if limit > 0 else []

  @property
  def done(self) -> bool:
    """The grammar is complete (or broken): nothing but EOS may follow."""
    return self.matcher.is_stopped()


class MatcherAfter:
  """A matcher as it would be after `tokens` (drafts the step checks before this row): what the sampler asks of a
  row's matcher, its mask."""
  def __init__(self, matcher: Matcher, tokens: list[int]): self.matcher, self.tokens = matcher, tokens
  def allowed(self) -> np.ndarray: return self.matcher.allowed_after(self.tokens)


def check(params: StructuredOutputsParams, tokenizer: Tokenizer | None, vocab_size: int) -> str:
  """The grammar, once it is known to compile (ValueError with llguidance's message if not)."""
  if tokenizer is None: raise ValueError("structured_outputs: this model has no tokenizer")
  try: grammar = grammar_of(params)
  except (ValueError, TypeError, json.JSONDecodeError) as e: raise ValueError(f"structured_outputs: {e}") from None
  is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, _grammar_tokenizer(tokenizer, vocab_size))
  if is_error: raise ValueError(f"structured_outputs: invalid {params.kind}: {messages[0]}")
  return grammar
