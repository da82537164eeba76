"""Read GGUF files (llama.cpp's model format) and dequantize their tensors with numpy.

A GGUF file is one flat, little-endian byte stream in four parts:

    +--------------------------------------------------------------+
    | header      magic b"GGUF", version (u32), tensor count (u64), |
    |             metadata count (u64)                              |
    | metadata    key/value pairs: key string, value type (u32),    |
    |             value; e.g. "llama.block_count" = 30 (u32)        |
    | tensor info per tensor: name, n_dims, dims (innermost first), |
    |             ggml type (u32), byte offset into the data part   |
    | (padding)   up to `general.alignment` (default 32)            |
    | data        the tensors' bytes, each at an aligned offset     |
    +--------------------------------------------------------------+

Strings are a u64 length followed by UTF-8 bytes; arrays are an element type
(u32), a u64 count, then the elements. Because the data part is plain bytes at
known offsets we memory-map the file: reading a 100 MB model costs only the
parsing of its (small) header, and each tensor's bytes are paged in when it
is dequantized.

Quantized tensors are stored as rows of fixed-size *blocks*. A block holds a
few float16 scale factors and many small integers, one per weight. Q4_1, for
example, packs 32 weights into 20 bytes (5 bits per weight):

    byte  0     2     4                                    20
          | d   | m   | qs: 16 bytes, two 4-bit q per byte |
           f16   f16    qs[j] = q[j] | q[j + 16] << 4

    weight[i] = d * q[i] + m          (q in 0..15)

Q4_0 and Q5_0 drop `m` and centre q around zero instead, Q5_x keeps a 5th bit
of every q in a 32-bit mask, Q8_0 stores plain int8. The "K" types group
eight (Q4_K, Q5_K) or sixteen (Q6_K) sub-blocks into a 256-weight super-block
whose sub-block scales are themselves quantized to 6 or 8 bits. Every
dequantizer below takes all blocks of a tensor at once as a
(n_blocks, block_bytes) uint8 array and returns (n_blocks, block_size)
float32, with the same float operations in the same order as ggml's C code,
so results match it exactly.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32


class GGUFError(ValueError):
    """The file is not a GGUF file we can read; the message says why."""


# ---------------------------------------------------------------------------
# Dequantization: one function per ggml type, vectorized over all blocks.

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 stored at byte `at` of every block, as a (n_blocks, 1) float32 column."""
    return blocks[:, at:at + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Unpack bytes into 4-bit values: all low nibbles first, then all high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Bit i of a 4-byte little-endian mask is the 5th bit of weight i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _affine(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """q * scale + offset in float32. Done in place: allocating fresh arrays for each
    step costs more than the arithmetic, and q must become float32 before the math anyway."""
    x = q.astype(np.float32)
    x *= scale
    if offset is not None:
        x += offset
    return x


def _dequant_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32).copy()  # copy: never hand out a view of the read-only map


def _dequant_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:  # d, 32 x int8
    return _affine(blocks[:, 2:].view(np.int8), _f16(blocks, 0))


def quantize_q8_0(name: str, w: np.ndarray) -> GGUFTensor:
    """A float matrix as a Q8_0 tensor (llama.cpp's quantize_row_q8_0: per block of 32, d = max|x| / 127 stored as
    fp16, q = round(x / d)): how a merged adapter (model/loader.py) keeps its matrices packed."""
    x = np.ascontiguousarray(w, np.float32).reshape(-1, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    q = np.round(x / np.where(d == 0, 1, d)).astype(np.int8)
    raw = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return GGUFTensor(name, 8, "Q8_0", tuple(w.shape), raw.reshape(w.shape[0], -1, 34))   # rows of blocks, as
                                                                                        # gguf_to_hf_state_dict packs


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:  # d, 16 bytes of nibbles
    return _affine(_nibbles(blocks[:, 2:]).astype(np.int8) - 8, _f16(blocks, 0))


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:  # d, m, 16 bytes of nibbles
    return _affine(_nibbles(blocks[:, 4:]), _f16(blocks, 0), _f16(blocks, 2))


def _dequant_q5_0(blocks: np.ndarray) -> np.ndarray:  # d, 4-byte high-bit mask, nibbles
    q = _nibbles(blocks[:, 6:]) | _high_bits(blocks[:, 2:6]) << 4
    return _affine(q.astype(np.int8) - 16, _f16(blocks, 0))


def _dequant_q5_1(blocks: np.ndarray) -> np.ndarray:  # d, m, 4-byte high-bit mask, nibbles
    q = _nibbles(blocks[:, 8:]) | _high_bits(blocks[:, 4:8]) << 4
    return _affine(q, _f16(blocks, 0), _f16(blocks, 2))


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 8 six-bit (scale, min) pairs that Q4_K and Q5_K squeeze into 12 bytes.

    Sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
    sub-blocks 4-7 take 4 bits from bytes 8-11 and their top 2 bits from the
    otherwise unused high bits of bytes 0-7 (ggml's get_scale_min_k4).
    """
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | (s[:, 0:4] >> 6 << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6 << 4)], axis=1)
    return scales, mins


def _k_combine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: weight = d * scale[sub] * q - dmin * min[sub] for 8 sub-blocks of 32."""
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    d, dmin = _f16(blocks, 0) * scales, _f16(blocks, 2) * mins
    return _affine(q, d[..., None], -dmin[..., None]).reshape(len(blocks), 256)


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:  # d, dmin, scales[12], qs[128]
    # Each 32-byte chunk of qs holds two sub-blocks: low nibbles, then high nibbles.
    qs = blocks[:, 16:144].reshape(-1, 4, 32)
    return _k_combine(blocks, _nibbles(qs).reshape(-1, 8, 32))


def _dequant_q5_k(blocks: np.ndarray) -> np.ndarray:  # d, dmin, scales[12], qh[32], qs[128]
    low = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    # Bit j of qh[l] is the 5th bit of weight l in sub-block j.
    high = blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None] & 1
    return _k_combine(blocks, low | high << 4)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:  # ql[128], qh[64], int8 scales[16], d
    # Two halves of 128 weights, each made of four runs of 32 (k = 0..3): run k takes
    # the low (k < 2) or high nibble of ql[32 * (k % 2) + l] and bits 2k..2k+1 of qh[l].
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    high = qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None] & 3
    q = (low | high << 4).astype(np.int8) - 32
    d = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8)  # one scale per 16 weights
    return _affine(q.reshape(-1, 16, 16), d[..., None]).reshape(len(blocks), 256)


@dataclass(frozen=True)
class _GGMLType:
    name: str
    block_size: int  # weights per block
    block_bytes: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray]


_TYPES: dict[int, _GGMLType] = {
    0: _GGMLType("F32", 1, 4, _dequant_f32),
    1: _GGMLType("F16", 1, 2, _dequant_f16),
    2: _GGMLType("Q4_0", 32, 18, _dequant_q4_0),
    3: _GGMLType("Q4_1", 32, 20, _dequant_q4_1),
    6: _GGMLType("Q5_0", 32, 22, _dequant_q5_0),
    7: _GGMLType("Q5_1", 32, 24, _dequant_q5_1),
    8: _GGMLType("Q8_0", 32, 34, _dequant_q8_0),
    12: _GGMLType("Q4_K", 256, 144, _dequant_q4_k),
    13: _GGMLType("Q5_K", 256, 176, _dequant_q5_k),
    14: _GGMLType("Q6_K", 256, 210, _dequant_q6_k),
    30: _GGMLType("BF16", 1, 2, _dequant_bf16),
}
SUPPORTED_TYPES: dict[int, str] = {type_id: t.name for type_id, t in _TYPES.items()}

# Names of every ggml type id ("-" for retired ids), so errors can say which one we lack.
_ALL_TYPE_NAMES = dict(enumerate(
    "F32 F16 Q4_0 Q4_1 - - Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS "
    "IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16 - - - TQ1_0 TQ2_0 "
    "- - - MXFP4".split()))


def _ggml_type(type_id: int, tensor_name: str) -> _GGMLType:
    if type_id not in _TYPES:
        name = _ALL_TYPE_NAMES.get(type_id, "unknown")
        raise GGUFError(f"tensor {tensor_name!r} has ggml type {name} (id {type_id}), which tinyvllm "
                        f"cannot dequantize; supported types: {', '.join(SUPPORTED_TYPES.values())}")
    return _TYPES[type_id]


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]  # numpy order (GGUF dims reversed): a weight is (out_features, in_features)
    raw: np.ndarray  # uint8 view of the tensor's bytes in the file

    def dequantize(self) -> np.ndarray:
        """The tensor as float32 with shape `shape`."""
        t = _TYPES[self.ggml_type]
        return t.dequantize(self.raw.reshape(-1, t.block_bytes)).reshape(self.shape)


# ---------------------------------------------------------------------------
# Parsing.

# Metadata value types: id -> numpy dtype for the fixed-size ones.
_STRING, _ARRAY = 8, 9
_VALUE_DTYPES: dict[int, np.dtype] = {i: np.dtype(d) for i, d in {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
    10: "<u8", 11: "<i8", 12: "<f8"}.items()}


class _Cursor:
    """Walks a byte buffer front to back; running off its end means the file is truncated."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"truncated GGUF file: needed {n} bytes at offset {self.pos}, "
                            f"but the file is only {len(self.buf)} bytes long")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return str(self.take(self.u64()), "utf-8")

    def array(self, value_type: int, count: int) -> list:
        if value_type in _VALUE_DTYPES:
            dtype = _VALUE_DTYPES[value_type]
            return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
        if value_type == _STRING:
            return [self.string() for _ in range(count)]
        if value_type == _ARRAY:
            return [self.array(self.u32(), self.u64()) for _ in range(count)]
        raise GGUFError(f"unknown GGUF metadata value type {value_type} at offset {self.pos}")

    def value(self) -> Any:
        value_type = self.u32()
        if value_type == _ARRAY:
            return self.array(self.u32(), self.u64())
        return self.array(value_type, 1)[0]


def _open(path: str | Path) -> tuple[np.ndarray, _Cursor, int, int]:
    """Map the file and check its header; returns (map, cursor after header, n_tensors, n_kv)."""
    path = Path(path)
    if path.stat().st_size < 4:
        raise GGUFError(f"{path} is not a GGUF file: it is only {path.stat().st_size} bytes long")
    data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)  # plain arrays out, the map stays alive as .base
    cur = _Cursor(memoryview(data))
    magic = bytes(cur.take(4))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    version = cur.u32()
    if version not in (2, 3):  # v1 had 32-bit counts; a big-endian file shows up as a huge number
        raise GGUFError(f"{path}: unsupported GGUF version {version} (tinyvllm reads little-endian v2 and v3)")
    n_tensors, n_kv = cur.u64(), cur.u64()
    return data, cur, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    return {cur.string(): cur.value() for _ in range(n_kv)}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Only the metadata key/values of a GGUF file (keys as in the file, arrays as lists)."""
    _, cur, _, n_kv = _open(path)
    return _read_metadata(cur, n_kv)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """Metadata and tensors (by GGUF name) of a GGUF file. Tensors stay memory-mapped, undequantized."""
    data, cur, n_tensors, n_kv = _open(path)
    meta = _read_metadata(cur, n_kv)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.u64() for _ in range(cur.u32())]
        infos.append((name, tuple(reversed(dims)), cur.u32(), cur.u64()))
    alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-cur.pos // alignment) * alignment

    tensors = {}
    for name, shape, type_id, offset in infos:
        t = _ggml_type(type_id, name)
        n_weights = int(np.prod(shape))
        if shape and shape[-1] % t.block_size:
            raise GGUFError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                            f"{t.name} block size {t.block_size}")
        start = data_start + offset
        end = start + n_weights // t.block_size * t.block_bytes
        if end > len(data):
            raise GGUFError(f"truncated GGUF file: tensor {name!r} ends at byte {end}, "
                            f"but the file is only {len(data)} bytes long")
        tensors[name] = GGUFTensor(name, type_id, t.name, shape, data[start:end])
    return meta, tensors


# ---------------------------------------------------------------------------
# Writing (small files: test fixtures, tiny random models).

def _dtype_type(dtype: np.dtype) -> int:
    for type_id, d in _VALUE_DTYPES.items():
        if d == dtype.newbyteorder("<"):
            return type_id
    raise GGUFError(f"cannot store numpy {dtype} values as GGUF metadata")


def _value_type(value: Any) -> int:
    """GGUF type id for a Python/numpy value. Python ints become UINT32 (INT64 if they don't
    fit) and floats FLOAT32, the types llama.cpp expects for hyperparameters; pass numpy
    scalars or arrays to pick another type."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return _ARRAY
    if isinstance(value, (bool, np.bool_)):
        return 7
    if isinstance(value, np.generic):
        return _dtype_type(value.dtype)
    if isinstance(value, int):
        return 4 if 0 <= value < 2**32 else 11
    if isinstance(value, float):
        return 6
    if isinstance(value, str):
        return _STRING
    raise GGUFError(f"cannot store {type(value).__name__} {value!r} as GGUF metadata")


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_payload(value: Any, value_type: int) -> bytes:
    """A value's bytes after its type id."""
    if value_type == _STRING:
        return _pack_string(value)
    if value_type != _ARRAY:
        return np.asarray(value, _VALUE_DTYPES[value_type]).tobytes()
    if isinstance(value, np.ndarray):
        elem_type = _dtype_type(value.dtype)
    else:
        elem_type = _value_type(value[0]) if len(value) else 4
    head = struct.pack("<IQ", elem_type, len(value))
    if elem_type in _VALUE_DTYPES:  # one numpy call, not one per element: token lists are long
        return head + np.asarray(value, _VALUE_DTYPES[elem_type]).tobytes()
    return head + b"".join(_pack_payload(v, elem_type) for v in value)


def _pack_value(value: Any) -> bytes:
    value_type = _value_type(value)
    return struct.pack("<I", value_type) + _pack_payload(value, value_type)


def _tensor_bytes(name: str, t: np.ndarray | GGUFTensor) -> tuple[int, tuple[int, ...], bytes]:
    """(ggml type, numpy shape, data) of a tensor to write."""
    if isinstance(t, GGUFTensor):
        return t.ggml_type, t.shape, t.raw.tobytes()
    if t.dtype not in (np.float32, np.float16):
        raise GGUFError(f"tensor {name!r}: write_gguf stores float32/float16 arrays, got {t.dtype}")
    return (0 if t.dtype == np.float32 else 1), t.shape, np.ascontiguousarray(t).tobytes()


def write_gguf(path: str | Path, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray | GGUFTensor]) -> None:
    """Write a GGUF v3 file. float32/float16 arrays are stored as F32/F16; a GGUFTensor keeps
    its type and raw bytes, so quantized tensors can be copied from another file."""
    alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
    blobs, infos, offset = [], [], 0
    for name, t in tensors.items():
        type_id, shape, data = _tensor_bytes(name, t)
        dims = struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape))
        infos.append(_pack_string(name) + dims + struct.pack("<IQ", type_id, offset))
        blobs.append(data + bytes(-len(data) % alignment))
        offset += len(blobs[-1])
    header = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(meta))
    header += b"".join(_pack_string(k) + _pack_value(v) for k, v in meta.items()) + b"".join(infos)
    with open(path, "wb") as f:
        f.write(header + bytes(-len(header) % alignment))
        f.writelines(blobs)


# ---------------------------------------------------------------------------
# GGUF -> Hugging Face (transformers) names, layout and config.

# arch -> (HF class, HF model_type, whether llama.cpp permuted the q/k rows for its RoPE)
_ARCHS = {"llama": ("LlamaForCausalLM", "llama", True), "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
          "qwen3": ("Qwen3ForCausalLM", "qwen3", False), "gemma3": ("Gemma3ForCausalLM", "gemma3_text", False)}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 3 normalizes each sub-block's output too: four norms a layer, and `ffn_norm` is the one before the MLP
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {"ffn_norm": "pre_feedforward_layernorm",
                                     "post_attention_norm": "post_attention_layernorm",
                                     "post_ffw_norm": "post_feedforward_layernorm"}


def _arch(meta: Mapping[str, Any]) -> tuple[str, tuple[str, str, bool]]:
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"unsupported architecture {arch!r}; tinyvllm converts {', '.join(_ARCHS)}")
    return arch, _ARCHS[arch]


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts, layer_names = gguf_name.split("."), _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    if gguf_name == "rope_freqs.weight":  # how llama.cpp stores Llama 3.1+ "llama3" RoPE scaling
        raise GGUFError("llama3-style RoPE scaling (tensor 'rope_freqs.weight') is not supported")
    raise GGUFError(f"don't know the Hugging Face name of GGUF tensor {gguf_name!r}")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (LlamaModel.permute in convert_hf_to_gguf.py).

    HF's rotate_half RoPE pairs dimension i of a head with i + head_dim/2; ggml's
    "normal" RoPE pairs 2i with 2i+1. The converter therefore reorders each head's
    rows from [x0..x_{h/2-1}, y0..y_{h/2-1}] to [x0, y0, x1, y1, ...] via
        w.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2)
    and we apply the inverse: split rows as (n_heads, head_dim // 2, 2) and swap back.
    """
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_hf_tensors(meta: Mapping[str, Any], tensors: Mapping[str, GGUFTensor],
                    keep_packed: tuple[str, ...] = ()) -> Iterator[tuple[str, np.ndarray | GGUFTensor]]:
    """(HF name, float32 weight in HF layout) for each tensor, dequantized one at a time; matrices of a type in
    `keep_packed` stay GGUFTensors whose raw bytes are (rows, blocks, block bytes), rows in HF order. Gemma's RMSNorm
    gains are 1 + w: llama.cpp's converter stores 1 + w, Hugging Face w, as transformers' GGUF reader does (the loader
    adds the 1 back: for Gemma-3-270M's gains, −132 to 1,657, 1 + (g − 1) gives every g back exactly)."""
    arch, (_, _, permuted) = _arch(meta)
    n_heads = meta[f"{arch}.attention.head_count"]
    n_kv_heads = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    for name, t in tensors.items():
        packed = t.type_name in keep_packed and len(t.shape) == 2
        t_type = _TYPES[t.ggml_type]
        w = t.raw.reshape(t.shape[0], -1, t_type.block_bytes) if packed else t.dequantize()
        if permuted and ".attn_q." in name:  # a row permutation: the same for packed blocks
            w = unpermute_qk(w, n_heads)
        elif permuted and ".attn_k." in name:
            w = unpermute_qk(w, n_kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1)
        yield hf_name(name, arch), GGUFTensor(name, t.ggml_type, t.type_name, t.shape, w) if packed else w


def gguf_to_hf_state_dict(meta: Mapping[str, Any], tensors: Mapping[str, GGUFTensor],
                          keep_packed: tuple[str, ...] = ()) -> dict[str, np.ndarray | GGUFTensor]:
    """Every tensor under its HF Llama/Qwen2 name, in HF layout: dequantized to float32, or still packed for the
    types in `keep_packed`.

    There is no lm_head.weight when the file has no output.weight (tied embeddings).
    """
    return dict(iter_hf_tensors(meta, tensors, keep_packed))


def _f32_to_py(x: float) -> float:
    """Shortest decimal that is the same float32, so 9.999999747378752e-06 prints as 1e-05."""
    return float(str(np.float32(x)))


def gguf_to_hf_config(meta: Mapping[str, Any], tensors: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Hugging Face config.json dict for a GGUF file's model.

    Whether the output projection is tied to the embeddings is not in the metadata, only in
    which tensors exist: pass `tensors` to decide it; without them it is assumed tied.
    """
    arch, (hf_class, model_type, _) = _arch(meta)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    vocab_size = get("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": get("attention.key_length", hidden // n_heads),
        "hidden_act": "silu",
        "rms_norm_eps": _f32_to_py(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32_to_py(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tensors is None or "output.weight" not in tensors,
        "attention_bias": arch == "qwen2" or (tensors is not None and "blk.0.attn_q.bias" in tensors),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "gemma3":  # what llama.cpp assumes of every Gemma 3 file (llama-model.cpp): not in its metadata
        config.update(hidden_activation="gelu_pytorch_tanh", sliding_window=get("attention.sliding_window"),
                      sliding_window_pattern=get("attention.sliding_window_pattern", 6),   # or one flag a layer
                      rope_local_base_freq=_f32_to_py(get("rope.freq_base_swa", 10000.0)),
                      final_logit_softcapping=get("final_logit_softcapping"),
                      # 27B (62 layers) scales its queries by hidden / heads, the others by head_dim
                      query_pre_attn_scalar=hidden // n_heads if get("block_count") == 62 else config["head_dim"])
        del config["hidden_act"]
        if isinstance(pattern := config.pop("sliding_window_pattern"), list):
            config["layer_types"] = ["sliding_attention" if slides else "full_attention" for slides in pattern]
        else:
            config["sliding_window_pattern"] = pattern
    # Linear/YaRN scaling is metadata; llama3-style scaling is a tensor instead (see hf_name).
    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": _f32_to_py(get("rope.scaling.factor"))}
        if (original := get("rope.scaling.original_context_length")) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config
