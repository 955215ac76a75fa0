#!/usr/bin/env python3
"""Writes the reference quantizations that lutra's ggml grids are compared with.

For each type lutra writes (`quantize::ggml_types::GgmlTarget`), `quantize_ref_<type>.json` holds
a few rows of random weights (normal, with an all-zero block, a block of tiny values and an
outlier) as little-endian f32 bytes and the bytes llama.cpp's own quantizer gives for them
(`ggml_quantize_chunk` without an importance matrix, i.e. ggml's reference quantizers), so a test
can check that lutra's round-to-nearest is no worse than llama.cpp's on the same rows.

    GGML_LIB=<llama.cpp build>/bin/libggml-base.so python3 tests/data/ggml-blocks/make_quantize_ref.py

The output depends only on the seed below (and on the llama.cpp build).
"""

import ctypes
import json
import os
import pathlib

import numpy as np

SEED = 20261205
ROWS, COLS = 4, 512
# (name, ggml type id)
TYPES = [
    ("Q4_0", 2),
    ("Q5_0", 6),
    ("Q8_0", 8),
    ("Q2_K", 10),
    ("Q3_K", 11),
    ("Q4_K", 12),
    ("Q5_K", 13),
    ("Q6_K", 14),
    ("IQ4_NL", 20),
]


def rows(rng: np.random.Generator) -> np.ndarray:
    x = (rng.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)
    x[0, 32:64] = 0.0
    x[1, 64:96] *= np.float32(1e-3)
    x[2, 300] = np.float32(0.8)
    x[3] *= np.float32(50.0)
    return x


def main() -> None:
    lib = ctypes.CDLL(os.environ["GGML_LIB"])
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    x = np.ascontiguousarray(rows(np.random.default_rng(SEED)))
    out = pathlib.Path(__file__).parent
    for name, ty in TYPES:
        lib.ggml_quantize_init(ty)
        buf = np.zeros(ROWS * COLS * 2, dtype=np.uint8)
        n = lib.ggml_quantize_chunk(ty, x.ctypes.data, buf.ctypes.data, 0, ROWS, COLS, None)
        fixture = {
            "reference": "llama.cpp ggml_quantize_chunk (no importance matrix)",
            "type": name,
            "rows": ROWS,
            "cols": COLS,
            "rows_f32_le_hex": x.astype("<f4").tobytes().hex(),
            "ggml_hex": buf[:n].tobytes().hex(),
        }
        path = out / f"quantize_ref_{name.lower()}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
