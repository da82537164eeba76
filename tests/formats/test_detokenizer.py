"""Streamed text only grows, never shows half a character or half a stop string (SmolLM2's real tokenizer)."""
import pytest
from tinyvllm.formats.detokenizer import update_text
from tinyvllm.formats.gguf import read_gguf_metadata
from tinyvllm.model.loader import default_model_path
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine.sequence import Sequence


@pytest.fixture(scope="module")
def tok() -> Tokenizer: return Tokenizer.from_gguf_metadata(read_gguf_metadata(default_model_path()))


def stream(tok, token_ids, **params) -> tuple[list[str], bool]:
  """Feed tokens one at a time as the engine does; returns the text after each step and whether a stop hit."""
  seq, texts = Sequence("r", [1], SamplingParams(**params)), []
  for i, t in enumerate(token_ids):
    seq.output_token_ids.append(t)
    hit = update_text(seq, tok, finished=i == len(token_ids) - 1)
    texts.append(seq.output_text)
    if hit: return texts, True
  return texts, False


def test_stop_string_split_across_tokens_is_caught_and_never_shown(tok):
  ids = tok.encode("Hello there ##") + tok.encode("# the end")
  texts, hit = stream(tok, ids, stop=["###"])
  assert hit and texts[-1] == "Hello there "
  assert all("#" not in t for t in texts)
  assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_include_stop_str_in_output(tok):
  texts, hit = stream(tok, tok.encode("one, two. three"), stop=["."], include_stop_str_in_output=True)
  assert hit and texts[-1] == "one, two."


def test_multibyte_characters_are_held_until_complete(tok):
  text = "Grüße 👋🏽 日本語"
  ids = tok.encode(text)
  assert len(ids) > len(text.split())                 # some characters span several tokens
  texts, hit = stream(tok, ids)
  assert not hit and texts[-1] == text
  assert all("\ufffd" not in t for t in texts)
  assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
