#!/usr/bin/env python3
"""Writes the known-answer fixtures of lutra's ggml block encoders (`quantize::ggml_types`).

For Q4_0 and Q8_0, one JSON file `encode_<type>.json` holds a row of random f32 weights (with an
all-zero block, a block of tiny values and an outlier) as little-endian f32 bytes, and the bytes
that the reference quantizer of llama.cpp's gguf-py (`gguf.quants.quantize`, a port of ggml's
`quantize_row_*_ref`) gives for it. A test quantizes the row the reference way and encodes it
with lutra's encoder: the bytes must be equal.

    PYTHONPATH=<llama.cpp>/gguf-py python3 tests/data/ggml-blocks/make_encode.py

The output depends only on the seed below (and on the reference package).
"""

import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

SEED = 20261204
COLS = 256


def row(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(COLS).astype(np.float32) * np.float32(0.02)
    x[32:64] = 0.0
    x[64:96] *= np.float32(1e-3)
    x[100] = np.float32(0.9)
    x[130] = np.float32(-0.75)
    return x


def main() -> None:
    rng = np.random.default_rng(SEED)
    x = row(rng)
    out = pathlib.Path(__file__).parent
    for ty in (T.Q4_0, T.Q8_0):
        data = quants.quantize(x.reshape(1, COLS), ty)
        fixture = {
            "reference": "llama.cpp gguf-py gguf.quants.quantize",
            "type": ty.name,
            "cols": COLS,
            "row_f32_le_hex": x.astype("<f4").tobytes().hex(),
            "expected_hex": data.tobytes().hex(),
        }
        path = out / f"encode_{ty.name.lower()}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
