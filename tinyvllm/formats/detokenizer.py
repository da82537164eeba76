"""Output text as it grows: never half a UTF-8 character, never half a stop string.

Streaming sends the difference between the text after this step and the text after the last one, so the text must
only ever grow at its end. Two things could break that:

  * a token can end in the middle of a multi-byte character ("é" is two bytes, an emoji four, and byte-level BPE
    may split them across tokens): the undecodable tail shows up as U+FFFD and is held back until it completes;
  * a stop string may be arriving piece by piece ("###" as "#", "##"): the last len(longest stop) - 1 characters
    are held back until they cannot be the start of a stop string any more (or the request finishes).

When a stop string appears, the text is cut before it (or after it, with `include_stop_str_in_output`).
"""
from __future__ import annotations
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.engine.sequence import Sequence


def _complete_prefix(text: str) -> str:
  """Drop a trailing run of U+FFFD: the bytes of a character whose remaining bytes have not been generated yet."""
  return text.rstrip("\ufffd")


def update_text(seq: Sequence, tokenizer: Tokenizer, finished: bool) -> bool:
  """Refresh `seq.output_text` (what may be shown so far); returns True when a stop string was found."""
  p = seq.params
  text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=p.skip_special_tokens)
  for stop in p.stop:
    at = text.find(stop, max(0, len(seq.output_text) - len(stop) + 1))
    if at >= 0:
      seq.output_text = text[:at + len(stop)] if p.include_stop_str_in_output else text[:at]
      return True
  if finished:
    seq.output_text = text
    return False
  hold = max((len(s) for s in p.stop), default=1) - 1
  seq.output_text = max(seq.output_text, _complete_prefix(text)[:len(text) - hold], key=len)
  return False
