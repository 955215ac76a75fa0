#!/usr/bin/env python3
"""Writes the known-answer fixtures of lutra's ggml block decoders.

For each ggml type below, one JSON file `<type>.json` holds a few blocks of random bytes (every
f16 scale field replaced by a random finite f16; the IQ1_S/IQ1_M scales of
`DRAWN_SCALE_FIXTURES` drawn by their rule) and the values the reference dequantizer of the
`gguf` Python package (llama.cpp's gguf-py, `gguf.quants.dequantize`) gives for them, as
little-endian f32 bytes so that a test can compare bit patterns.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf==0.19.0
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
    (T.IQ2_XXS, [0], 2, 2),
    (T.IQ3_XXS, [0], 2, 2),
    (T.IQ3_S, [0], 2, 2),
    (T.IQ1_S, [0], 2, 2),
    (T.IQ2_XS, [0], 2, 2),
    (T.IQ2_S, [0], 2, 2),
]

# IQ1_M keeps its f16 scale `d` in the high nibbles of its four little-endian scale words (bytes
# 48..56).
IQ1_M_SCALE_AT = 48


def large_scale(rng: np.random.Generator) -> int:
    """f16 bits of a finite d with |d| >= 2^-11, so that d/8 is an f16 value."""
    return normal_f16(rng, min_exponent=4)


def subnormal_scale(rng: np.random.Generator) -> int:
    """f16 bits of a tiny d (|d| < 2^-13) with low bits set, so that d/8 is not an f16 value."""
    return int(rng.integers(0, 256)) << 3 | int(rng.integers(1, 8))


# Fixtures whose f16 scale is drawn by a given rule (lutra's form of IQ1_S and IQ1_M depends on
# whether d/8 is an f16): name -> (type, draw d, write d into a block). 2 blocks per row, 2 rows.
DRAWN_SCALE_FIXTURES = {
    "iq1_s_subnormal_scale": (T.IQ1_S, subnormal_scale, lambda block, d: write_f16(block, 0, d)),
    "iq1_m": (T.IQ1_M, large_scale, lambda block, d: scatter_iq1_m_scale(block, d)),
    "iq1_m_subnormal_scale": (
        T.IQ1_M,
        subnormal_scale,
        lambda block, d: scatter_iq1_m_scale(block, d),
    ),
}


def finite_f16(rng: np.random.Generator) -> bytes:
    """A random f16 bit pattern that is neither infinite nor NaN (subnormals included)."""
    while True:
        bits = int(rng.integers(0, 1 << 16))
        if bits & 0x7C00 != 0x7C00:
            return bits.to_bytes(2, "little")


def normal_f16(rng: np.random.Generator, min_exponent: int) -> int:
    """A random finite f16 bit pattern whose exponent field is at least `min_exponent`."""
    while True:
        bits = int(rng.integers(0, 1 << 16))
        if min_exponent <= (bits >> 10) & 0x1F < 0x1F:
            return bits


def write_f16(block: bytearray, at: int, bits: int) -> None:
    """Writes the f16 bits `bits` at byte offset `at` of a block."""
    block[at : at + 2] = bits.to_bytes(2, "little")


def scatter_iq1_m_scale(block: bytearray, d_bits: int) -> None:
    """Writes the f16 bits `d_bits` into the high nibbles of an IQ1_M block's scale words."""
    for i in range(4):
        at = IQ1_M_SCALE_AT + 2 * i
        word = int.from_bytes(block[at : at + 2], "little")
        word = (word & 0x0FFF) | (((d_bits >> (4 * i)) & 0xF) << 12)
        block[at : at + 2] = word.to_bytes(2, "little")


def write_fixture(out_dir: pathlib.Path, name: str, qtype: T, rows: int, data: bytes) -> None:
    """Dequantizes `data` (`rows` rows) with the reference and writes fixture `name`."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(data, dtype=np.uint8).reshape(rows, len(data) // rows)
    values = quants.dequantize(raw, qtype).astype(np.float32)
    cols = len(data) // rows // block_bytes * block_elems
    assert values.shape == (rows, cols), values.shape
    assert np.all(np.isfinite(values)), name
    fixture = {
        "reference": f"gguf {importlib.metadata.version('gguf')} gguf.quants.dequantize",
        "type": qtype.name,
        "ggml_id": int(qtype),
        "rows": rows,
        "cols": cols,
        "data_hex": data.hex(),
        "expected_f32_le_hex": values.astype("<f4").tobytes().hex(),
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{path.name}: {rows}x{cols}, {len(data)} bytes")


def main() -> None:
    rng = np.random.default_rng(SEED)
    out_dir = pathlib.Path(__file__).resolve().parent
    for qtype, f16_fields, blocks_per_row, rows in TYPES:
        _, block_bytes = GGML_QUANT_SIZES[qtype]
        data = bytearray()
        for _ in range(blocks_per_row * rows):
            block = bytearray(rng.integers(0, 256, size=block_bytes, dtype=np.uint8).tobytes())
            for at in f16_fields:
                block[at : at + 2] = finite_f16(rng)
            data += block
        write_fixture(out_dir, qtype.name.lower(), qtype, rows, bytes(data))
    for name, (qtype, draw, write) in DRAWN_SCALE_FIXTURES.items():
        _, block_bytes = GGML_QUANT_SIZES[qtype]
        blocks_per_row, rows = 2, 2
        data = bytearray()
        for _ in range(blocks_per_row * rows):
            block = bytearray(rng.integers(0, 256, size=block_bytes, dtype=np.uint8).tobytes())
            write(block, draw(rng))
            data += block
        write_fixture(out_dir, name, qtype, rows, bytes(data))


if __name__ == "__main__":
    main()
