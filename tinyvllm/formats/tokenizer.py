"""Tokenizers: turning text into token ids and back.

A language model reads and writes integers. The tokenizer is the fixed, learned
dictionary between text and those integers, and an engine must reproduce the one the
model was trained with *exactly*: a single differently split word is a prompt the model
has never seen. Two kinds of tokenizer cover almost every open checkpoint.

**Byte-level BPE** (GPT-2, SmolLM2, Llama-3, Qwen2; GGUF ``tokenizer.ggml.model ==
"gpt2"``). Text is first cut into "pre-tokens" by a regular expression (words with
their leading space, runs of digits, punctuation, whitespace). Each pre-token is turned
into UTF-8 bytes, and byte pair encoding then repeatedly fuses the adjacent pair of
pieces that was learned earliest in training (the ``merges`` list is that learned order)
until no learned pair is left. Because it starts from bytes, any string can be encoded
with no unknown token. Files store each byte as a printable stand-in character (GPT-2's
``bytes_to_unicode`` table: a space is ``Ġ``, a newline ``Ċ``), so the vocabulary reads
as text; we map those characters back to the bytes they stand for.

We hand the merging to **tiktoken**, OpenAI's Rust BPE, instead of writing the loop in
Python: it is the same algorithm, tens of times faster, and a small dependency. tiktoken
wants ``mergeable_ranks`` (token bytes -> merge priority) rather than a merges list, so
we rank the 256 single bytes first and every merge result after them, in merge order.
tiktoken then answers in ranks, and an array maps each rank to the checkpoint's own id.

**SentencePiece** (Llama-2, TinyLlama, Mistral; GGUF ``"llama"``). Spaces become ``▁``,
a space is prepended to the text ("dummy prefix"), and pieces are merged by score;
characters outside the vocabulary fall back to ``<0xNN>`` byte pieces. The
``sentencepiece`` library runs it from a ``.model`` file. A GGUF file carries only the
piece table, so we write that table back into the small protobuf a ``.model`` file is.

**Special tokens** (``<|im_start|>``, ``<|eot_id|>``, ``<s>``) are control words that
no text normally produces. Like Hugging Face, we cut their literal spellings out of the
input before tokenizing the text around them, so a rendered chat template encodes to
the ids the model was trained on.
"""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm
import tiktoken

from tinyvllm.formats import chat_template

# Pre-tokenizer regexes, as Hugging Face's tokenizer.json files spell them.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 runs Digits(individual_digits=True) *before* the GPT-2 regex, so every digit is
# its own pre-token and the GPT-2 regex only ever sees the text between digits. In one
# regex: digits stand alone, and a whitespace run ending at a digit is kept whole,
# because for HF it ends its chunk ("a  1" -> "a", "  ", "1", not "a", " ", " ", "1").
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# GGUF "tokenizer.ggml.pre" names (llama.cpp's) -> regex.
GGUF_PRETOKENIZERS = {
    "gpt-2": GPT2_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "qwen2": QWEN2_PATTERN,
}

# Control tokens that end a turn or a document; generation stops on any of them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>")

# GGUF tokenizer.ggml.token_type values (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table giving each byte a printable stand-in character.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...)
    are shifted to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


class _Backend(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_bytes(self, i: int) -> bytes: ...


class ByteLevelBPE:
    """Byte-level BPE on tiktoken. ``vocab`` maps the GPT-2-escaped token strings to ids;
    ``added`` maps literal strings (special tokens) to ids that are cut out of the text."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        added: dict[str, int],
        pattern: str,
        normalization: str | None = None,
    ):
        self._normalization = normalization  # e.g. "NFC" for Qwen2, applied before splitting
        to_bytes = unicode_to_bytes()
        ranked: dict[bytes, int] = {}  # token bytes -> id, in rank order
        # A vocabulary may lack a few bytes that its training text never held (SmolLM2
        # has no 0x04, no 0xF1, ...). tiktoken needs every byte, so those get id -1 and
        # are dropped from the output: Hugging Face's BPE also silently drops them.
        for b, char in bytes_to_unicode().items():
            ranked[bytes([b])] = vocab.get(char, -1)
        for left, right in merges:
            # Several merges may spell the same token; tiktoken ranks by bytes, so the first wins.
            ranked.setdefault(bytes(to_bytes[c] for c in left + right), vocab[left + right])
        rank_to_id = [*ranked.values(), *added.values()]
        self._rank_to_id = np.array(rank_to_id, dtype=np.int64)
        self._encoding = tiktoken.Encoding(
            name="tinyvllm-bpe",
            pat_str=pattern,
            mergeable_ranks={tok: rank for rank, tok in enumerate(ranked)},
            special_tokens={text: len(ranked) + k for k, text in enumerate(added)},
        )
        # Added tokens are spelled literally, not in the byte table (and may hold characters outside it).
        self._bytes = {i: text.encode() for text, i in added.items()}
        for tok, i in vocab.items():
            self._bytes.setdefault(i, bytes(to_bytes[c] for c in tok))
        self.vocab_size = max(rank_to_id + list(vocab.values())) + 1

    def encode(self, text: str) -> list[int]:
        if self._normalization:
            text = unicodedata.normalize(self._normalization, text)
        ids = self._rank_to_id[self._encoding.encode(text, allowed_special="all")]
        return ids[ids >= 0].tolist()

    def decode(self, ids: list[int]) -> str:
        # "replace" as HF does: a cut-off multi-byte character becomes U+FFFD.
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]


class SentencePiece:
    """A SentencePiece model, plus cutting control-token literals out of the text, and the `literal` pieces too: a GGUF
    file's user-defined pieces with spaces (Gemma's runs of spaces), which llama.cpp and transformers match in the raw
    text, where SentencePiece would first turn the spaces into ▁ and never match them."""

    def __init__(self, processor: spm.SentencePieceProcessor, literal: tuple[int, ...] = ()):
        self.sp = processor
        self.vocab_size = processor.get_piece_size()
        self.control = {processor.id_to_piece(i): i for i in range(self.vocab_size) if processor.is_control(i)}
        self.control |= {processor.id_to_piece(i): i for i in literal}
        longest_first = sorted(self.control, key=len, reverse=True)
        self._control_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if self.control else None

    def encode(self, text: str) -> list[int]:
        if self._control_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        # re.split with a group yields text, literal, text, ...; HF's (legacy) Llama
        # tokenizer likewise encodes each text chunk on its own, dummy prefix included.
        for n, chunk in enumerate(self._control_re.split(text)):
            if n % 2:
                ids.append(self.control[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def decode(self, ids: list[int]) -> str:
        # SentencePiece renders control ids as "", so spell them out between decoded runs.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_bytes(self, i: int) -> bytes:
        if self.sp.is_byte(i):
            return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])  # "<0x0A>" -> b"\n"
        return self.sp.id_to_piece(i).replace("▁", " ").encode()


class Tokenizer:
    """Text <-> ids for one checkpoint, plus its special tokens and chat template.

    Build one with :meth:`from_gguf_metadata`, :meth:`from_hf_dir` or
    :meth:`from_sentencepiece`. Attributes:

    - ``bos_id``, ``eos_id``: begin/end-of-sequence ids, or None.
    - ``stop_ids``: EOS plus the end-of-turn tokens; generation stops on any of them.
    - ``special_ids``: control tokens, which ``decode(..., skip_special_tokens=True)`` drops.
    - ``add_bos``: whether ``encode(..., add_special_tokens=True)`` prepends BOS.
    - ``chat_template``: the checkpoint's Jinja template, or None (ChatML is used then).
    - ``vocab_size``: one more than the largest token id.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        special_ids: set[int],
        add_bos: bool,
        chat_template: str | None,
        extra_stop_ids: Iterable[int] = (),
    ):
        self._backend = backend
        self.vocab_size = backend.vocab_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.special_ids = set(special_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        named_stops = {
            i for i in self.special_ids if self.id_to_bytes(i).decode(errors="replace") in END_OF_TURN_TOKENS
        }
        self.stop_ids = named_stops | set(extra_stop_ids) | ({eos_id} if eos_id is not None else set())

    # --- encoding and decoding ---

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token literals in it become their ids.

        ``add_special_tokens`` prepends BOS when the checkpoint wants one (``add_bos``).
        A rendered chat template already holds its BOS: encode it with ``False``.
        """
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; bytes that do not form whole characters become U+FFFD."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._backend.decode(list(ids))

    def id_to_bytes(self, i: int) -> bytes:
        """The raw bytes of one token. A token may hold part of a UTF-8 character, so a
        streamer should buffer bytes and emit only complete characters."""
        return self._backend.token_bytes(i)

    def _token_text(self, i: int | None) -> str:
        """The literal spelling of a token ("" for None), e.g. for BOS in a template."""
        return "" if i is None else self.id_to_bytes(i).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``[{"role": ..., "content": ...}, ...]`` into the prompt text the model
        was trained on, with the checkpoint's own template (chat_template.py); ``kwargs``
        (``tools``, template variables) go to the template. Encode the result with
        ``add_special_tokens=False``."""
        return chat_template.render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_id),
            eos_token=self._token_text(self.eos_id),
            **kwargs,
        )

    # --- constructors ---

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from a GGUF file's ``tokenizer.*`` metadata keys."""
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
        kind = meta["tokenizer.ggml.model"]
        if kind == "gpt2":
            backend: _Backend = _gguf_byte_level(meta, tokens, types)
        elif kind == "llama":
            # user-defined pieces with spaces: SentencePiece would escape the spaces first and never match them
            spaced = tuple(i for i, t in enumerate(types) if t == USER_DEFINED and " " in tokens[i])
            backend = SentencePiece(_gguf_sentencepiece(meta, tokens, types), spaced)
        else:
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r}: expected 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)"
            )
        extra_stops = {meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta}
        return cls(
            backend,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            special_ids={i for i, t in enumerate(types) if t == CONTROL},
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_stop_ids=extra_stops,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face model folder: ``tokenizer.json`` (byte-level BPE) or
        ``tokenizer.model`` (SentencePiece), with ``tokenizer_config.json`` beside it."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        template = _hf_chat_template(path, config)
        tokenizer_json = _read_json(path / "tokenizer.json")
        if _is_byte_level(tokenizer_json):
            return _hf_byte_level(tokenizer_json, config, template)
        if (path / "tokenizer.model").exists():
            return cls.from_sentencepiece(path / "tokenizer.model", chat_template=template,
                                          add_bos=config.get("add_bos_token", True))
        raise ValueError(f"{path}: no byte-level BPE tokenizer.json and no tokenizer.model")

    @classmethod
    def from_sentencepiece(cls, model_path: str | Path, chat_template: str | None = None,
                           add_bos: bool = True) -> Tokenizer:
        """Build from a SentencePiece ``.model`` file. Llama-2 and kin start every prompt with <s>; a checkpoint
        trained without it says ``add_bos_token: false`` in its tokenizer_config.json."""
        backend = SentencePiece(spm.SentencePieceProcessor(model_file=str(model_path)))
        return cls(
            backend,
            bos_id=_optional_id(backend.sp.bos_id()),
            eos_id=_optional_id(backend.sp.eos_id()),
            special_ids=set(backend.control.values()),
            add_bos=add_bos,
            chat_template=chat_template,
        )


# --- GGUF ---


def _gguf_byte_level(meta: dict[str, Any], tokens: list[str], types: list[int]) -> ByteLevelBPE:
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in GGUF_PRETOKENIZERS:
        raise ValueError(f"unsupported pre-tokenizer {pre!r}; supported: {', '.join(GGUF_PRETOKENIZERS)}")
    added = {t: i for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    return ByteLevelBPE({t: i for i, t in enumerate(tokens)}, merges, added, GGUF_PRETOKENIZERS[pre])


def _gguf_sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]) -> spm.SentencePieceProcessor:
    """Rebuild a SentencePiece model from a GGUF piece table.

    A ``.model`` file is a protobuf ``ModelProto``. The ``protobuf`` package is not a
    dependency, so we write the few fields that matter by hand: the pieces, a BPE
    trainer spec (llama.cpp merges by score, as SentencePiece BPE does) and an identity
    normalizer with the dummy-prefix setting the GGUF records.
    """
    scores = meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, tok.encode()) + _pb_float(2, score) + _pb_int(3, kind))
        for tok, score, kind in zip(tokens, scores, types)
    )
    # TrainerSpec: model_type = BPE, vocab_size, byte_fallback.
    trainer = _pb_int(3, 2) + _pb_int(4, len(tokens)) + _pb_int(35, BYTE in types)
    # NormalizerSpec: name, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces.
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    normalizer = _pb_bytes(1, b"identity") + _pb_int(3, add_prefix) + _pb_int(4, False) + _pb_int(5, True)
    proto = pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
    return spm.SentencePieceProcessor(model_proto=proto)


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _pb_int(field: int, value: int) -> bytes:  # varint (int, bool, enum) field
    return _pb_varint(field << 3) + _pb_varint(int(value))


def _pb_float(field: int, value: float) -> bytes:  # 32-bit float field
    return _pb_varint(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field: int, data: bytes) -> bytes:  # length-delimited field (string, bytes, message)
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def _optional_id(i: int) -> int | None:
    return None if i < 0 else i  # SentencePiece says -1 for "none"


# --- Hugging Face folders ---


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    if (path / "chat_template.jinja").exists():  # newer transformers save it on its own
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _is_byte_level(tokenizer_json: dict[str, Any]) -> bool:
    return tokenizer_json.get("decoder", {}).get("type") == "ByteLevel"


def _hf_pretokenizer_pattern(pre: dict[str, Any]) -> str:
    """The one regex equivalent to a tokenizer.json pre_tokenizer, for the shapes in use."""
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    shape = [s["type"] for s in steps]
    if any(s["type"] == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise ValueError("ByteLevel(add_prefix_space=True) pre-tokenizers are not supported")
    if shape == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if shape == ["Digits", "ByteLevel"] and steps[0]["individual_digits"] and steps[1].get("use_regex", True):
        return SMOLLM_PATTERN
    if shape == ["Split", "ByteLevel"] and steps[0]["behavior"] == "Isolated" and not steps[1].get("use_regex", True):
        return steps[0]["pattern"]["Regex"]  # Llama-3, Qwen2: the regex is spelled out
    raise ValueError(f"unsupported pre_tokenizer {json.dumps(pre)[:200]}")


def _hf_added_token_id(config_value: Any, added: dict[str, int], vocab: dict[str, int]) -> int | None:
    """tokenizer_config.json names bos/eos as a string or {"content": ...}."""
    text = config_value.get("content") if isinstance(config_value, dict) else config_value
    return added.get(text, vocab.get(text)) if text else None


def _hf_adds_bos(tokenizer_json: dict[str, Any]) -> bool:
    """Llama-3 style: BOS comes from a TemplateProcessing post-processor."""
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", [post])
    return any(s.get("type") == "TemplateProcessing" and "SpecialToken" in s["single"][0] for s in steps)


def _hf_byte_level(tokenizer_json: dict[str, Any], config: dict[str, Any], template: str | None) -> Tokenizer:
    model = tokenizer_json["model"]
    if model["type"] != "BPE":
        raise ValueError(f"expected a BPE model in tokenizer.json, got {model['type']!r}")
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"unsupported normalizer {normalizer!r}")
    added_tokens = tokenizer_json.get("added_tokens", [])
    added = {t["content"]: t["id"] for t in added_tokens}
    vocab = model["vocab"]
    # Merges are "a b" strings in older files and ["a", "b"] pairs in newer ones.
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = ByteLevelBPE(vocab, merges, added, _hf_pretokenizer_pattern(tokenizer_json["pre_tokenizer"]), normalizer)
    bos = _hf_added_token_id(config.get("bos_token"), added, vocab)
    return Tokenizer(
        backend,
        bos_id=bos,
        eos_id=_hf_added_token_id(config.get("eos_token"), added, vocab),
        special_ids={t["id"] for t in added_tokens if t.get("special")},
        add_bos=config.get("add_bos_token", _hf_adds_bos(tokenizer_json)),
        chat_template=template,
    )


def tokenize_prompt(prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
  """A prompt (text or token ids) as validated token ids; ValueError with a message for the user."""
  if isinstance(prompt, str):
    if tokenizer is None: raise ValueError("this model has no tokenizer: pass prompt token ids")
    token_ids = tokenizer.encode(prompt)
  else: token_ids = list(prompt)
  if not token_ids: raise ValueError("the prompt is empty")
  if not all(isinstance(t, int) and 0 <= t < vocab_size for t in token_ids):
    raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
  return token_ids
