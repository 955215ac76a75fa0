#!/usr/bin/env python3
"""Writes the known-answer fixtures of lutra's ggml block decoders.

For each ggml type below, one JSON file `<type>.json` holds a few blocks of random bytes (every
f16 scale field replaced by a random finite f16) and the values the reference dequantizer of the
`gguf` Python package (llama.cpp's gguf-py, `gguf.quants.dequantize`) gives for them, as
little-endian f32 bytes so that a test can compare bit patterns.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf
    /tmp/gguf-venv/bin/python tests/data/ggml-blocks/make.py

The output depends only on the seed below (and on the reference package).
"""

import importlib.metadata
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

SEED = 20260520

# (type, byte offsets of the f16 fields in one block, blocks per row, rows)
TYPES = [
    (T.IQ4_NL, [0], 2, 3),
    (T.IQ4_XS, [0], 2, 2),
    (T.Q4_0, [0], 2, 2),
    (T.Q4_1, [0, 2], 2, 2),
    (T.Q5_0, [0], 2, 2),
    (T.Q5_1, [0, 2], 2, 2),
    (T.Q8_0, [0], 2, 2),
    (T.Q2_K, [80, 82], 2, 1),
    (T.Q3_K, [108], 2, 1),
    (T.Q4_K, [0, 2], 2, 1),
    (T.Q5_K, [0, 2], 2, 1),
    (T.Q6_K, [208], 2, 1),
]


def finite_f16(rng: np.random.Generator) -> bytes:
    """A random f16 bit pattern that is neither infinite nor NaN (subnormals included)."""
    while True:
        bits = int(rng.integers(0, 1 << 16))
        if bits & 0x7C00 != 0x7C00:
            return bits.to_bytes(2, "little")


def main() -> None:
    rng = np.random.default_rng(SEED)
    out_dir = pathlib.Path(__file__).resolve().parent
    for qtype, f16_fields, blocks_per_row, rows in TYPES:
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        data = bytearray()
        for _ in range(blocks_per_row * rows):
            block = bytearray(rng.integers(0, 256, size=block_bytes, dtype=np.uint8).tobytes())
            for at in f16_fields:
                block[at : at + 2] = finite_f16(rng)
            data += block
        raw = np.frombuffer(bytes(data), dtype=np.uint8).reshape(rows, blocks_per_row * block_bytes)
        values = quants.dequantize(raw, qtype).astype(np.float32)
        cols = blocks_per_row * block_elems
        assert values.shape == (rows, cols), values.shape
        assert np.all(np.isfinite(values)), qtype.name
        fixture = {
            "reference": f"gguf {importlib.metadata.version('gguf')} gguf.quants.dequantize",
            "type": qtype.name,
            "ggml_id": int(qtype),
            "rows": rows,
            "cols": cols,
            "data_hex": bytes(data).hex(),
            "expected_f32_le_hex": values.astype("<f4").tobytes().hex(),
        }
        path = out_dir / f"{qtype.name.lower()}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"{path.name}: {rows}x{cols}, {len(data)} bytes")


if __name__ == "__main__":
    main()
