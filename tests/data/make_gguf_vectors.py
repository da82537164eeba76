"""Make the GGUF test vectors in tests/data with llama.cpp's own `gguf` Python package.

tinyvllm does not depend on `gguf`; this script only produces reference data
that tests/formats/test_gguf.py checks our reader and dequantizers against. Run it in a
throwaway virtual environment:

    python -m venv /tmp/ggufvenv && /tmp/ggufvenv/bin/pip install gguf numpy
    /tmp/ggufvenv/bin/python tests/data/make_gguf_vectors.py

It writes
  gguf_vectors.npz   for every quant type: `{TYPE}_raw` (uint8 blocks, one row per
                     tensor row) and `{TYPE}_expected` (gguf's float32 dequantization)
  gguf_vectors.gguf  the same tensors plus one metadata value of every GGUF type,
                     written by gguf.GGUFWriter
"""
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

HERE = Path(__file__).parent
ROWS, COLS = 4, 256  # 256: a whole K-quant super-block per row

# Types gguf can quantize: quantize a fixed random matrix.
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
# Types gguf can only dequantize: random bytes, with sane float16 super-block scales
# (random bytes there could be inf/nan). Byte offsets of those float16 fields:
K_QUANT_F16_FIELDS = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}

METADATA = {  # key -> (value, type)
    "test.uint8": (200, gguf.GGUFValueType.UINT8),
    "test.int8": (-100, gguf.GGUFValueType.INT8),
    "test.uint16": (60000, gguf.GGUFValueType.UINT16),
    "test.int16": (-30000, gguf.GGUFValueType.INT16),
    "test.uint32": (4_000_000_000, gguf.GGUFValueType.UINT32),
    "test.int32": (-2_000_000_000, gguf.GGUFValueType.INT32),
    "test.uint64": (2**40 + 1, gguf.GGUFValueType.UINT64),
    "test.int64": (-(2**40) - 1, gguf.GGUFValueType.INT64),
    "test.float32": (0.1, gguf.GGUFValueType.FLOAT32),
    "test.float64": (1 / 3, gguf.GGUFValueType.FLOAT64),
    "test.bool": (True, gguf.GGUFValueType.BOOL),
    "test.string": ("héllo, wörld ✓", gguf.GGUFValueType.STRING),
}
ARRAYS = {
    "test.array.int32": [1, -2, 3],
    "test.array.float32": [0.5, -1.25],
    "test.array.bool": [True, False, True],
    "test.array.string": ["a", "", "Ġ t"],
    "test.array.nested": [[1, 2], [3]],
}


def make_raw(qtype: T, rng: np.random.Generator) -> np.ndarray:
    if qtype in QUANTIZABLE:
        x = rng.standard_normal((ROWS, COLS)).astype(np.float32) * rng.uniform(0.01, 2, (ROWS, 1)).astype(np.float32)
        return gguf.quants.quantize(x, qtype).view(np.uint8)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (ROWS, COLS // block_size, type_size), dtype=np.uint8)
    for at in K_QUANT_F16_FIELDS[qtype]:
        scale = rng.uniform(0.001, 0.05, raw.shape[:2]).astype(np.float16)
        raw[:, :, at:at + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(ROWS, -1)


def main() -> None:
    rng = np.random.default_rng(1234)
    writer = gguf.GGUFWriter(HERE / "gguf_vectors.gguf", arch="test")
    for key, (value, vtype) in METADATA.items():
        writer.add_key_value(key, value, vtype)
    for key, value in ARRAYS.items():
        writer.add_array(key, value)

    vectors = {}
    for qtype in QUANTIZABLE + list(K_QUANT_F16_FIELDS):
        raw = make_raw(qtype, rng)
        vectors[f"{qtype.name}_raw"] = raw
        vectors[f"{qtype.name}_expected"] = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        writer.add_tensor(f"{qtype.name.lower()}.weight", raw, raw_dtype=qtype)
    # A 3-d tensor, to check that dimensions come back in numpy order.
    cube = np.arange(2 * 3 * 32, dtype=np.float32).reshape(2, 3, 32)
    writer.add_tensor("cube", cube)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    np.savez_compressed(HERE / "gguf_vectors.npz", **vectors)


if __name__ == "__main__":
    main()
