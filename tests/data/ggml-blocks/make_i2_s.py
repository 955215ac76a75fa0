#!/usr/bin/env python3
"""Writes `i2_s.json`, the known-answer fixture of lutra's I2_S decoder (bitnet.cpp's type 36).

The `gguf` package has no I2_S, so this script encodes and decodes the layout itself, from
bitnet.cpp's sources (microsoft/BitNet `src/ggml-bitnet-mad.cpp` `quantize_i2_s`, x86 build with
`QK_I2_S` 128, and its ggml fork's `dequantize_row_i2_s`):

- codes 0, 1, 2 stand for -1, 0, +1; a block of 128 elements is 32 bytes, element 32*l + m of a
  block is bits 6 - 2*l .. 8 - 2*l of byte m (element 0 in the top bits of byte 0);
- the blocks of all rows come one after the other, then 32 bytes: the tensor's one scale as a
  little-endian f32, then 28 bytes of padding (left as they are by the C writer, zeros or copies
  of the scale by the Python ones; random here, so that a decoder reading them fails);
- w = scale * {-1, 0, +1, 0}[code]: code 3, which no writer emits, dequantizes to 0.

Before writing, the encoder is checked against a small example worked out by hand (the same one
`weights::tests::i2_s_hand_example` decodes). Pure Python, no package needed:

    python3 tests/data/ggml-blocks/make_i2_s.py

The output depends only on the seed below.
"""

import json
import pathlib
import random
import struct

SEED = 20261204
ROWS, COLS = 2, 256
QK_I2_S = 128
# Positions (row-major element indices) given code 3, which must decode to 0.
CODE_3_AT = [5, 77, 130, 300, 511]
MAP2BIT = [-1.0, 0.0, 1.0, 0.0]


def encode(codes: list[int]) -> bytes:
    """The blocks of `codes` (a multiple of 128 of them), as `quantize_i2_s` packs them."""
    out = bytearray()
    for start in range(0, len(codes), QK_I2_S):
        block = codes[start : start + QK_I2_S]
        for m in range(32):
            out.append(sum((block[32 * l + m] & 3) << (6 - 2 * l) for l in range(4)))
    return bytes(out)


def f32(x: float) -> float:
    """`x` rounded to the nearest f32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def check_hand_example() -> None:
    """Byte 0 of a block holds elements 0, 32, 64, 96 from its top bits down; byte 31 holds
    elements 31, 63, 95, 127."""
    codes = [1] * QK_I2_S
    codes[0], codes[32], codes[64], codes[96] = 2, 1, 0, 2  # 0b10_01_00_10 = 0x92
    codes[31], codes[63], codes[95], codes[127] = 0, 3, 2, 1  # 0b00_11_10_01 = 0x39
    packed = encode(codes)
    assert packed[0] == 0x92 and packed[31] == 0x39, packed.hex()
    assert all(b == 0x55 for b in packed[1:31]), packed.hex()


def main() -> None:
    check_hand_example()
    rng = random.Random(SEED)
    codes = [rng.randrange(3) for _ in range(ROWS * COLS)]
    for at in CODE_3_AT:
        codes[at] = 3
    scale = f32(rng.uniform(0.5, 2.0) / 128)
    padding = bytes(rng.randrange(256) for _ in range(28))
    data = encode(codes) + struct.pack("<f", scale) + padding
    assert len(data) == ROWS * COLS // 4 + 32
    values = [f32(scale * MAP2BIT[c]) for c in codes]
    fixture = {
        "reference": "make_i2_s.py: bitnet.cpp's quantize_i2_s layout (x86, QK_I2_S 128) and "
        "dequantize_row_i2_s",
        "type": "I2_S",
        "ggml_id": 36,
        "rows": ROWS,
        "cols": COLS,
        "data_hex": data.hex(),
        "expected_f32_le_hex": struct.pack(f"<{len(values)}f", *values).hex(),
    }
    path = pathlib.Path(__file__).resolve().parent / "i2_s.json"
    path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{path.name}: {ROWS}x{COLS}, {len(data)} bytes, scale {scale!r}")


if __name__ == "__main__":
    main()
