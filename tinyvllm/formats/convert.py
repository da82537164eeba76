"""Convert a GGUF model file into a Hugging Face model directory.

    python -m tinyvllm.formats.convert model.gguf out_dir [--dtype float16] [--max-shard-size 50MB]

writes into out_dir
    config.json             gguf_to_hf_config
    model.safetensors       weights dequantized to float32 (or float16), HF names and layout;
                            with --max-shard-size, model-0000i-of-0000n.safetensors shards
                            plus model.safetensors.index.json instead
    tokenizer.json          the byte-level BPE vocab and merges in HF "tokenizers" format
    tokenizer_config.json   special tokens and the chat template
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from tinyvllm.formats.gguf import GGUFError, gguf_to_hf_config, iter_hf_tensors, read_gguf

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _split_then_bytes(regex: str) -> dict[str, Any]:
    """Split on `regex`, then map bytes to unicode without ByteLevel's own (GPT-2) regex."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}


_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> HF pre_tokenizer (the split rules llama.cpp's llama-vocab.cpp uses for it)
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "default": _BYTE_LEVEL,  # GPT-2's regex
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": _split_then_bytes(_LLAMA3_REGEX),
    "qwen2": _split_then_bytes(_LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")),
}


def hf_tokenizer(meta: Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer.json for a GGUF byte-level BPE ("gpt2") vocabulary."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"can only convert byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2'), "
                        f"not {meta.get('tokenizer.ggml.model')!r}")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"unknown tokenizer.ggml.pre {pre!r}; known: {', '.join(PRE_TOKENIZERS)}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t == _CONTROL}
             for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {**_BYTE_LEVEL, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": meta.get("tokenizer.ggml.merges", [])},
    }


def _special_token(meta: Mapping[str, Any], kind: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{kind}_token_id")
    return None if token_id is None else meta["tokenizer.ggml.tokens"][token_id]


def hf_tokenizer_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _special_token(meta, "bos"),
        "eos_token": _special_token(meta, "eos"),
        "unk_token": _special_token(meta, "unknown"),
        "pad_token": _special_token(meta, "padding"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": meta.get(f"{meta['general.architecture']}.context_length"),
        "clean_up_tokenization_spaces": False,
    }


def parse_size(size: str) -> int:
    """'50MB' -> 50_000_000 (HF's decimal units); a plain number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}; use e.g. 500MB, 2GB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_safetensors(state: Mapping[str, np.ndarray], out_dir: Path, max_shard_size: int | None = None) -> None:
    """model.safetensors, or shards of at most max_shard_size bytes (a bigger tensor gets
    its own shard) plus HF's model.safetensors.index.json mapping each tensor to its file."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, w in state.items():
        if max_shard_size is not None and shards[-1] and size + w.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    if max_shard_size is None:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": sum(w.nbytes for w in state.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32",
            max_shard_size: int | None = None) -> None:
    meta, tensors = read_gguf(gguf_path)
    # Everything that can reject the file comes before the slow part.
    config, tokenizer = gguf_to_hf_config(meta, tensors), hf_tokenizer(meta)
    tokenizer_config = hf_tokenizer_config(meta)
    config["torch_dtype"] = dtype
    state = {name: w.astype(dtype, copy=False) for name, w in iter_hf_tensors(meta, tensors)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out_dir, max_shard_size)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "tokenizer.json", tokenizer)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tinyvllm.formats.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", help="input .gguf file")
    parser.add_argument("out_dir", help="output directory (created if missing)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--max-shard-size", type=parse_size,
                        help="split the weights into files of at most this size, e.g. 50MB")
    args = parser.parse_args(argv)
    try:
        convert(args.gguf, args.out_dir, args.dtype, args.max_shard_size)
    except GGUFError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
