//! Unit tests of `weights`.
use super::*;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn q4_0_matches_formula() {
    let mut block = Vec::new();
    block.extend(h(0.5));
    block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
    let t = decode_ggml(GgmlType::Q4_0, 1, 32, &block).unwrap();
    let w = t.dequantize();
    for j in 0..16 {
        assert_eq!(w[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(w[j + 16], 0.5 * ((15 - j) as f32 - 8.0));
    }
    assert!(matches!(
        t,
        DecodedTensor::LowBit {
            bits: 4,
            group_size: 32,
            ..
        }
    ));
}

#[test]
fn q4_1_matches_formula() {
    let mut data = Vec::new();
    for (d, m) in [(0.25f32, -1.5f32), (2.0, 3.0)] {
        data.extend(h(d));
        data.extend(h(m));
        data.extend((0..16u8).map(|i| (i * 7 % 16) | ((i * 3 % 16) << 4)));
    }
    let t = decode_ggml(GgmlType::Q4_1, 1, 64, &data).unwrap();
    let w = t.dequantize();
    for (blk, (d, m)) in [(0.25f32, -1.5f32), (2.0, 3.0)].into_iter().enumerate() {
        for i in 0..16 {
            assert_eq!(w[blk * 32 + i], d * ((i * 7 % 16) as f32) + m);
            assert_eq!(w[blk * 32 + 16 + i], d * ((i * 3 % 16) as f32) + m);
        }
    }
}

#[test]
fn q8_0_matches_formula() {
    let mut data = Vec::new();
    data.extend(h(0.125));
    data.extend((0..32).map(|i| (i as i8 * 4 - 64) as u8));
    let t = decode_ggml(GgmlType::Q8_0, 1, 32, &data).unwrap();
    let DecodedTensor::Int8 { codes, scales, .. } = &t else {
        panic!("not int8")
    };
    assert_eq!(scales, &[0.125]);
    assert_eq!(codes[5], 5 * 4 - 64);
    assert_eq!(t.dequantize()[31], 0.125 * (31.0 * 4.0 - 64.0));
}

#[test]
fn q5_0_matches_formula() {
    let mut data = Vec::new();
    data.extend(h(1.0));
    let qh: u32 = 0xA5A5_0F0F;
    data.extend(qh.to_le_bytes());
    data.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
    let w = decode_ggml(GgmlType::Q5_0, 1, 32, &data)
        .unwrap()
        .dequantize();
    for j in 0..16 {
        let hi0 = (qh >> j) & 1;
        let hi1 = (qh >> (j + 16)) & 1;
        assert_eq!(w[j], (j as u32 | hi0 << 4) as f32 - 16.0);
        assert_eq!(w[j + 16], ((15 - j) as u32 | hi1 << 4) as f32 - 16.0);
    }
}

#[test]
fn tq2_0_is_ternary() {
    let mut data = vec![0b10_01_00_10u8; 64];
    data.extend(h(3.0));
    let t = decode_ggml(GgmlType::TQ2_0, 1, 256, &data).unwrap();
    let w = t.dequantize();
    // Element 32·l + m takes bits 2l..2l+2 of byte m.
    assert_eq!(&w[0..1], &[3.0]);
    assert_eq!(w[32], -3.0);
    assert_eq!(w[64], 0.0);
    assert_eq!(w[96], 3.0);
}

#[test]
fn tq1_0_digits_roundtrip() {
    // Encode 5 base-3 digits per byte the way ggml's quantizer does and decode them back.
    let digits: Vec<u8> = (0..256).map(|i| ((i * 7 + i / 5) % 3) as u8).collect();
    let pack = |ds: &[u8]| -> u8 {
        let v = ds.iter().fold(0u16, |acc, &d| acc * 3 + u16::from(d));
        (v * 256).div_ceil(243) as u8
    };
    let mut qs = vec![0u8; 48];
    let mut qh = vec![0u8; 4];
    for m in 0..32 {
        qs[m] = pack(&(0..5).map(|n| digits[n * 32 + m]).collect::<Vec<_>>());
    }
    for m in 0..16 {
        qs[32 + m] = pack(&(0..5).map(|n| digits[160 + n * 16 + m]).collect::<Vec<_>>());
    }
    for j in 0..4 {
        let ds: Vec<u8> = (0..4).map(|n| digits[240 + n * 4 + j]).chain([0]).collect();
        qh[j] = pack(&ds);
    }
    assert_eq!(tq1_block(&qs, &qh), digits);
}

#[test]
fn q4_k_and_q2_k_decode_shapes_and_values() {
    // Q4_K: all scales 1 (j<4 low 6 bits) and mins 0: w = d·q.
    let mut b = Vec::new();
    b.extend(h(0.5));
    b.extend(h(0.0));
    b.extend([1, 1, 1, 1, 0, 0, 0, 0, 0x01, 0x01, 0x01, 0x01]);
    b.extend((0..128).map(|i| (i % 16) as u8 | (((i + 1) % 16) << 4) as u8));
    let t = decode_ggml(GgmlType::Q4_K, 1, 256, &b).unwrap();
    let w = t.dequantize();
    assert_eq!(w[3], 0.5 * 3.0);
    assert_eq!(w[32 + 3], 0.5 * 4.0);
    assert_eq!(w[64 + 5], 0.5 * 5.0); // second chunk, low nibble of byte 37
    assert!(matches!(
        t,
        DecodedTensor::SuperBlock {
            bits: 4,
            group: 32,
            zero_point: 0,
            sub_mins: Some(_),
            ..
        }
    ));
    // Q2_K: scale nibble 2, min nibble 1 everywhere: w = 2d·q − dmin.
    let mut b = vec![0x12u8; 16];
    b.extend((0..64).map(|i| (i % 4) as u8 * 0b01_01_01_01));
    b.extend(h(0.25));
    b.extend(h(1.0));
    let w = decode_ggml(GgmlType::Q2_K, 1, 256, &b)
        .unwrap()
        .dequantize();
    for (i, &x) in w.iter().enumerate() {
        let byte = (i / 128) * 32 + i % 32;
        assert_eq!(x, 0.5 * (byte % 4) as f32 - 1.0, "element {i}");
    }
}

/// Quantized levels `L` packed the way ggml's reference quantizers pack them; the decoders
/// must give back `L` through each type's formula.
fn levels(modulus: usize) -> Vec<usize> {
    (0..256).map(|j| (j * 7 + j / 16) % modulus).collect()
}

#[test]
fn q3_k_unpacks_ggml_layout() {
    let l = levels(8);
    let mut hmask = [0u8; 32];
    let mut qs = [0u8; 64];
    for (j, &v) in l.iter().enumerate() {
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
        }
    }
    for j in (0..256).step_by(128) {
        for i in 0..32 {
            let low = |k: usize| (l[j + i + 32 * k] & 3) as u8;
            qs[j / 4 + i] = low(0) | low(1) << 2 | low(2) << 4 | low(3) << 6;
        }
    }
    // Sub-block scale s (6-bit, stored +32): 45 → 13, packed as in `make_q3_quants`.
    let v: u8 = 45;
    let mut scales = [0u8; 12];
    for s in &mut scales[..8] {
        *s = (v & 0xF) | ((v & 0xF) << 4);
    }
    for s in &mut scales[8..] {
        let h = v >> 4;
        *s = h | h << 2 | h << 4 | h << 6;
    }
    let mut b = hmask.to_vec();
    b.extend(qs);
    b.extend(scales);
    b.extend(h(0.5));
    let t = decode_ggml(GgmlType::Q3_K, 1, 256, &b).unwrap();
    let DecodedTensor::SuperBlock {
        sub_scales,
        zero_point: 4,
        bits: 3,
        group: 16,
        ..
    } = &t
    else {
        panic!("Q3_K is not in the super-block form")
    };
    assert_eq!(sub_scales, &[13; 16]);
    for (j, (&w, &v)) in t.dequantize().iter().zip(&l).enumerate() {
        assert_eq!(w, 0.5 * 13.0 * (v as f32 - 4.0), "element {j}");
    }
}

#[test]
fn q3_k_extreme_scale_and_levels_are_exact() {
    // Every sub-block scale −32 (stored 0), every level 0 (q − 4 = −4), then every level 7.
    let mut b = vec![0u8; 32]; // hmask: high bits clear
    b.extend([0u8; 64]); // low bits 0
    b.extend([0u8; 12]); // scales 0 → −32
    b.extend(h(0.25));
    let t = decode_ggml(GgmlType::Q3_K, 1, 256, &b).unwrap();
    let DecodedTensor::SuperBlock { codes, .. } = &t else {
        panic!("Q3_K is not in the super-block form")
    };
    assert!(codes.iter().all(|&c| c == 0));
    assert!(t.dequantize().iter().all(|&w| w == 0.25 * -32.0 * -4.0));
    b[..32].fill(0xFF);
    b[32..96].fill(0xFF);
    let t = decode_ggml(GgmlType::Q3_K, 1, 256, &b).unwrap();
    assert!(t.dequantize().iter().all(|&w| w == 0.25 * -32.0 * 3.0));
}

#[test]
fn q5_k_and_q6_k_unpack_ggml_layout() {
    // Q5_K with every scale 1 and min 0: w = d·L.
    let l = levels(32);
    let mut qh = [0u8; 32];
    let mut ql = [0u8; 128];
    for (c, n) in (0..256).step_by(64).enumerate() {
        for j in 0..32 {
            let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= 1 << (2 * c);
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= 2 << (2 * c);
            }
            ql[32 * c + j] = l1 as u8 | (l2 as u8) << 4;
        }
    }
    let mut b = Vec::new();
    b.extend(h(0.25));
    b.extend(h(0.0));
    b.extend([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]);
    b.extend(qh);
    b.extend(ql);
    let w = decode_ggml(GgmlType::Q5_K, 1, 256, &b)
        .unwrap()
        .dequantize();
    for (j, (&w, &v)) in w.iter().zip(&l).enumerate() {
        assert_eq!(w, 0.25 * v as f32, "Q5_K element {j}");
    }
    // Q6_K with scales 2: w = 2d·(L − 32).
    let l = levels(64);
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (half, j) in (0..256).step_by(128).enumerate() {
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k] as u8;
            ql[64 * half + i] = (q(0) & 0xF) | (q(2) & 0xF) << 4;
            ql[64 * half + i + 32] = (q(1) & 0xF) | (q(3) & 0xF) << 4;
            qh[32 * half + i] = q(0) >> 4 | (q(1) >> 4) << 2 | (q(2) >> 4) << 4 | (q(3) >> 4) << 6;
        }
    }
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend([2u8; 16]);
    b.extend(h(0.5));
    let w = decode_ggml(GgmlType::Q6_K, 1, 256, &b)
        .unwrap()
        .dequantize();
    for (j, (&w, &v)) in w.iter().zip(&l).enumerate() {
        assert_eq!(w, (v as f32 - 32.0), "Q6_K element {j}");
    }
}

#[test]
fn wrong_length_and_unsupported_are_errors() {
    assert!(matches!(
        decode_ggml(GgmlType::Q4_1, 1, 32, &[0; 19]),
        Err(DecodeError::BadShape(_))
    ));
    assert!(matches!(
        decode_ggml(GgmlType::Q4_1, 1, 30, &[0; 20]),
        Err(DecodeError::BadShape(_))
    ));
    assert_eq!(
        decode_ggml(GgmlType::MXFP4, 1, 32, &[0; 17]),
        Err(DecodeError::Unsupported(GgmlType::MXFP4))
    );
    assert_eq!(GgmlType::from_id(3), Some(GgmlType::Q4_1));
    assert_eq!(GgmlType::from_id(99), None);
}

#[test]
fn bf16_q5_1_and_q8_k_match_formulas() {
    let vals = [1.5f32, -0.25, 3.0e5, 0.0];
    let bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let w = decode_ggml(GgmlType::BF16, 2, 2, &bytes)
        .unwrap()
        .dequantize();
    let expected: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(w, expected);

    let mut data = Vec::new();
    data.extend(h(0.5));
    data.extend(h(-2.0));
    let qh: u32 = 0x0F0F_A5A5;
    data.extend(qh.to_le_bytes());
    data.extend((0..16u8).map(|i| (i * 5 % 16) | ((i * 11 % 16) << 4)));
    let w = decode_ggml(GgmlType::Q5_1, 1, 32, &data)
        .unwrap()
        .dequantize();
    for j in 0..16 {
        let q0 = (j * 5 % 16) as u32 | ((qh >> j) & 1) << 4;
        let q1 = (j * 11 % 16) as u32 | ((qh >> (j + 16)) & 1) << 4;
        assert_eq!(w[j], 0.5 * q0 as f32 - 2.0);
        assert_eq!(w[j + 16], 0.5 * q1 as f32 - 2.0);
    }

    let mut data = 0.125f32.to_le_bytes().to_vec();
    data.extend((0..256).map(|i| (i as u8).wrapping_mul(3)));
    data.extend([0u8; 32]);
    let t = decode_ggml(GgmlType::Q8_K, 1, 256, &data).unwrap();
    assert!(matches!(&t, DecodedTensor::Int8 { scales, .. } if scales.len() == 8));
    let w = t.dequantize();
    for (i, &x) in w.iter().enumerate() {
        assert_eq!(x, 0.125 * f32::from((i as u8).wrapping_mul(3) as i8));
    }
}

/// One known-answer fixture of `tests/data/ggml-blocks` (written by its `make.py` with the
/// reference dequantizers of llama.cpp's gguf-py).
#[derive(serde::Deserialize)]
struct BlockFixture {
    #[serde(rename = "type")]
    type_name: String,
    ggml_id: u32,
    rows: usize,
    cols: usize,
    data_hex: String,
    expected_f32_le_hex: String,
}

fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex string");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("fixture hex digit"))
        .collect()
}

/// Decodes the fixture of `name` and asserts that its values equal the reference bit for bit;
/// returns the decoded tensor.
fn check_block_fixture(name: &str) -> DecodedTensor {
    let (tensor, expected) = decode_block_fixture(name);
    assert_same_values(name, &tensor.dequantize(), &expected);
    tensor
}

/// Asserts that `got` equals the reference values `expected` (f32 bit patterns) bit for bit.
fn assert_same_values(name: &str, got: &[f32], expected: &[u32]) {
    assert_eq!(got.len(), expected.len(), "{name}: value count");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let e = f32::from_bits(*e);
        // Zeros may differ in sign: the low-bit form computes `scale·q + offset`, which gives +0
        // where ggml's `d·(q − 8)` gives −0 (negative d).
        // A sum of products cannot see the difference.
        let same = g.to_bits() == e.to_bits() || (*g == 0.0 && e == 0.0);
        assert!(same, "{name} element {i}: decoded {g:?}, reference {e:?}");
    }
}

/// The decoded tensor of fixture `name` and the reference values (f32 bit patterns).
fn decode_block_fixture(name: &str) -> (DecodedTensor, Vec<u32>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/ggml-blocks")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let fixture: BlockFixture = serde_json::from_str(&text).expect("fixture JSON");
    let ty = GgmlType::from_id(fixture.ggml_id).expect("known ggml id");
    assert_eq!(ty.name(), fixture.type_name, "ggml id of {name}");
    let data = from_hex(&fixture.data_hex);
    let expected: Vec<u32> = from_hex(&fixture.expected_f32_le_hex)
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(expected.len(), fixture.rows * fixture.cols);
    let tensor = decode_ggml(ty, fixture.rows, fixture.cols, &data).expect("decodes");
    assert_eq!((tensor.rows(), tensor.cols()), (fixture.rows, fixture.cols));
    (tensor, expected)
}

/// IQ4_NL and IQ4_XS keep the file's 16 index bytes per 32 elements, with one scale per 32
/// (8 per IQ4_XS super-block).
#[test]
fn iq4_nl_and_iq4_xs_match_reference_as_nibbles() {
    for name in ["iq4_nl", "iq4_xs"] {
        let t = check_block_fixture(name);
        let DecodedTensor::Iq4 {
            nibbles, scales, ..
        } = &t
        else {
            panic!("{name} is not in the IQ4 nibble form")
        };
        assert_eq!(nibbles.len(), t.rows() * t.cols() / 2, "{name}");
        assert_eq!(scales.len(), t.rows() * t.cols() / 32, "{name}");
    }
}

/// Rows of an IQ4 tensor taken apart hold the same values as the whole tensor's rows.
#[test]
fn iq4_row_range_keeps_its_rows() {
    for name in ["iq4_nl", "iq4_xs"] {
        let (t, _) = decode_block_fixture(name);
        let all = t.dequantize();
        let cols = t.cols();
        let part = t.row_range(1, t.rows() - 1);
        assert!(matches!(part, DecodedTensor::Iq4 { .. }), "{name}");
        assert_eq!(part.dequantize(), all[cols..], "{name}");
    }
}

#[test]
fn iq4_xs_sub_block_scales_follow_the_layout() {
    // d = 1, scales_l = 0x21 0x43 0x65 0x87, scales_h = 0b11_10_01_00_11_10_01_00: sub-block ib
    // has ls = low nibble ib of scales_l | (bits 2ib..2ib+2 of scales_h) << 4.
    let mut b = Vec::new();
    b.extend(h(1.0));
    b.extend(0b1110_0100_1110_0100u16.to_le_bytes());
    b.extend([0x21, 0x43, 0x65, 0x87]);
    // Element j < 16 of each sub-block takes index 8 (code 1), element j ≥ 16 index 0 (−127).
    b.extend([0x08u8; 128]);
    let t = decode_ggml(GgmlType::IQ4_XS, 1, 256, &b).unwrap();
    let w = t.dequantize();
    for ib in 0..8 {
        let ls = (ib as i32 + 1) | (((ib as i32) % 4) << 4);
        assert_eq!(w[32 * ib], (ls - 32) as f32, "sub-block {ib}");
        assert_eq!(w[32 * ib + 16], -127.0 * (ls - 32) as f32, "sub-block {ib}");
    }
}

#[test]
fn iq2_xxs_and_iq3_xxs_match_reference_as_int8() {
    for (name, grid_values) in [
        ("iq2_xxs", &[8, 25, 43][..]),
        ("iq3_xxs", &[4, 12, 20, 28, 36, 44, 52, 62][..]),
    ] {
        let t = check_block_fixture(name);
        let DecodedTensor::Int8 { codes, scales, .. } = &t else {
            panic!("{name} is not in the int8 form")
        };
        assert_eq!(scales.len(), t.rows() * t.cols() / 32, "{name}");
        for &c in codes {
            assert!(grid_values.contains(&c.unsigned_abs()), "{name}: code {c}");
        }
        // Random sign patterns give both signs.
        assert!(codes.iter().any(|&c| c < 0) && codes.iter().any(|&c| c > 0));
    }
}

#[test]
fn iq2_xs_and_iq2_s_match_reference_as_int8_with_half_block_scales() {
    for name in ["iq2_xs", "iq2_s"] {
        let t = check_block_fixture(name);
        let DecodedTensor::Int8 {
            block: 16,
            codes,
            scales,
            ..
        } = &t
        else {
            panic!("{name} is not in the int8 form with a scale per 16")
        };
        assert_eq!(scales.len(), t.rows() * t.cols() / 16, "{name}");
        assert!(codes
            .iter()
            .all(|c| [8, 25, 43].contains(&c.unsigned_abs())));
        // Random scale nibbles: some sub-block has two different half scales.
        assert!(scales.chunks_exact(2).any(|p| p[0] != p[1]), "{name}");
    }
}

#[test]
fn iq2_s_index_high_bits_and_signs_follow_the_layout() {
    // d = 4, scales 0x10 (ls 0 then 1: db = 0.5, 1.5). Index 0x3FF (qh bits 2l..2l+2 all set)
    // for every group; sign byte 0x01 negates element 0 of each group of 8.
    let mut b = Vec::new();
    b.extend(h(4.0));
    b.extend([0xFFu8; 32]);
    b.extend([0x01u8; 32]);
    b.extend([0xFFu8; 8]);
    b.extend([0x10u8; 8]);
    let w = decode_ggml(GgmlType::IQ2_S, 1, 256, &b)
        .unwrap()
        .dequantize();
    let grid = IQ2S_GRID[0x3FF].to_le_bytes();
    for (i, &x) in w.iter().enumerate() {
        let db = if i % 32 < 16 { 0.5 } else { 1.5 };
        let sign = if i % 8 == 0 { -1.0 } else { 1.0 };
        assert_eq!(x, db * f32::from(grid[i % 8]) * sign, "element {i}");
    }
}

#[test]
fn iq3_s_matches_reference_as_super_blocks_with_mins() {
    let t = check_block_fixture("iq3_s");
    let DecodedTensor::SuperBlock {
        bits: 4,
        group: 32,
        zero_point: 8,
        sub_scales,
        sub_mins: Some(sub_mins),
        d,
        dmin: Some(dmin),
        ..
    } = &t
    else {
        panic!("IQ3_S is not in the 4-bit super-block form with mins")
    };
    for (&sc, &m) in sub_scales.iter().zip(sub_mins) {
        assert_eq!(i16::from(sc), 2 * i16::from(m));
        assert!(m % 2 == 1 && m <= 31);
    }
    for (&d, &dmin) in d.iter().zip(dmin) {
        assert_eq!(f16::from_bits(dmin).to_f32(), -f16::from_bits(d).to_f32());
    }
}

#[test]
fn iq1_s_matches_reference_as_super_blocks_with_mins() {
    let t = check_block_fixture("iq1_s");
    let DecodedTensor::SuperBlock {
        bits: 2,
        group: 32,
        zero_point: 1,
        codes,
        sub_scales,
        sub_mins: Some(sub_mins),
        ..
    } = &t
    else {
        panic!("IQ1_S is not in the 2-bit super-block form with mins")
    };
    assert!(codes.iter().all(|&q| q < 4));
    for (&sc, &m) in sub_scales.iter().zip(sub_mins) {
        assert!(
            m == sc as u8 || m == 7 * sc as u8,
            "sub-scale {sc}, sub-min {m}"
        );
    }
}

#[test]
fn iq1_m_matches_reference_as_super_blocks() {
    let t = check_block_fixture("iq1_m");
    let DecodedTensor::SuperBlock {
        bits: 5,
        group: 16,
        zero_point: 9,
        codes,
        sub_scales,
        sub_mins: None,
        ..
    } = &t
    else {
        panic!("IQ1_M is not in the 5-bit super-block form")
    };
    assert!(codes.iter().all(|q| [0, 2, 8, 10, 16, 18].contains(q)));
    assert!(sub_scales
        .iter()
        .all(|&s| s % 2 == 1 && (1..=15).contains(&s)));
}

#[test]
fn iq1_s_and_iq1_m_with_a_scale_whose_eighth_is_not_f16_are_int8() {
    for (name, per_scale) in [("iq1_s_subnormal_scale", 32), ("iq1_m_subnormal_scale", 16)] {
        let t = check_block_fixture(name);
        let DecodedTensor::Int8 { block, codes, .. } = &t else {
            panic!("{name} is not in the int8 form")
        };
        assert_eq!(*block, per_scale, "{name}");
        assert!(codes.iter().all(|c| [1, 7, 9].contains(&c.unsigned_abs())));
    }
}

#[test]
fn iq1_s_uses_the_grid_shift_sign() {
    // d = 1, every index 0 (grid entry all −1), s = 2 (dl = 5): shift +1/8 in the first 32,
    // −1/8 in the next 32 (bit 15 of qh).
    let mut b = Vec::new();
    b.extend(h(1.0));
    b.extend([0u8; 32]);
    for ib in 0..8u16 {
        b.extend((2 << 12 | (ib % 2) << 15).to_le_bytes());
    }
    let w = decode_ggml(GgmlType::IQ1_S, 1, 256, &b)
        .unwrap()
        .dequantize();
    assert_eq!(w[0], 5.0 * (-1.0 + 0.125));
    assert_eq!(w[32], 5.0 * (-1.0 - 0.125));
}

#[test]
fn q8_0_q5_0_q5_1_match_reference() {
    for name in ["q8_0", "q5_0", "q5_1"] {
        check_block_fixture(name);
    }
}

#[test]
fn q4_0_and_q4_1_match_reference() {
    for name in ["q4_0", "q4_1"] {
        check_block_fixture(name);
    }
}

#[test]
fn k_quants_match_reference_as_super_blocks() {
    for name in ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] {
        let t = check_block_fixture(name);
        assert!(matches!(t, DecodedTensor::SuperBlock { .. }), "{name}");
    }
}

/// The LUT kernel matrix built from each low-bit, K-quant and super-block i-quant type holds the reference values
/// exactly: the weights the kernel multiplies are ggml's.
#[test]
fn lut_kernel_form_holds_reference_values() {
    use crate::linear::Linear;
    for (name, bits) in [
        ("q4_0", 4),
        ("q4_1", 4),
        ("q5_0", 5),
        ("q5_1", 5),
        ("q2_k", 2),
        ("q3_k", 3),
        ("q4_k", 4),
        ("q5_k", 5),
        ("q6_k", 6),
        ("iq3_s", 4),
        ("iq1_s", 2),
        ("iq1_m", 5),
    ] {
        let (tensor, expected) = decode_block_fixture(name);
        let m = Linear::from_decoded(&tensor, false).unwrap();
        let Linear::Lut(lut) = &m else {
            panic!("{name} became {}", m.kind())
        };
        assert_eq!(lut.spec().bits, bits, "{name}");
        let mut values = vec![0.0; tensor.rows() * tensor.cols()];
        for (r, row) in values.chunks_exact_mut(tensor.cols()).enumerate() {
            m.row(r, row).unwrap();
        }
        assert_same_values(name, &values, &expected);
    }
}

/// The int8 kernel matrix built from each int8-form type holds the reference values exactly
/// (f16 block scales where they are f16 values, f32 where they are not; IQ4 types as 4-bit
/// codebook indices).
#[test]
fn int8_kernel_form_holds_reference_values() {
    use crate::linear::Linear;
    for (name, f16_scales, nibbles) in [
        ("iq4_nl", true, true),
        ("iq4_xs", false, true),
        ("q8_0", true, false),
        ("iq2_xxs", false, false),
        ("iq3_xxs", false, false),
        ("iq1_s_subnormal_scale", false, false),
        ("iq1_m_subnormal_scale", false, false),
        ("iq2_xs", false, false),
        ("iq2_s", false, false),
    ] {
        let (tensor, expected) = decode_block_fixture(name);
        let m = Linear::from_decoded(&tensor, false).unwrap();
        let Linear::Int8(int8) = &m else {
            panic!("{name} became {}", m.kind())
        };
        assert_eq!(int8.has_f16_scales(), f16_scales, "{name}");
        assert_eq!(int8.has_nibble_codes(), nibbles, "{name}");
        // 18-byte IQ4_NL blocks as in the file; 20 bytes for IQ4_XS's f32 sub-block scales.
        if nibbles {
            let block_bytes = if f16_scales { 18 } else { 20 };
            assert_eq!(
                m.bytes(),
                tensor.rows() * tensor.cols() / 32 * block_bytes,
                "{name}"
            );
        }
        let mut values = vec![0.0; tensor.rows() * tensor.cols()];
        for (r, row) in values.chunks_exact_mut(tensor.cols()).enumerate() {
            m.row(r, row).unwrap();
        }
        assert_same_values(name, &values, &expected);
    }
}

#[test]
fn type_table_has_one_entry_per_type_and_id() {
    // One entry per type: every variant has exactly one entry.
    let mut seen = std::collections::HashSet::new();
    for t in TYPES.iter() {
        assert!(seen.insert(t.ty), "{:?} twice", t.ty);
        assert_eq!(GgmlType::from_id(t.id), Some(t.ty));
        assert_eq!(t.ty.id(), t.id);
        assert!(t.block_elems > 0 && t.block_bytes > 0);
    }
    assert_eq!(seen.len(), TYPES.len());
    assert!(
        GgmlType::from_id(4).is_none(),
        "ids 4 and 5 were removed from ggml"
    );
}

#[test]
fn row_ranges_of_every_form_dequantize_to_the_same_rows() {
    let (rows, cols) = (6, 256);
    let low = DecodedTensor::LowBit {
        rows,
        cols,
        bits: 4,
        group_size: 32,
        codes: (0..rows * cols).map(|i| (i * 7 % 16) as u8).collect(),
        scales: (0..rows * 8).map(|i| 0.5 + i as f32).collect(),
        offsets: (0..rows * 8).map(|i| -(i as f32)).collect(),
    };
    let int8 = DecodedTensor::Int8 {
        rows,
        cols,
        block: 32,
        codes: (0..rows * cols).map(|i| (i * 13 % 255) as i8).collect(),
        scales: (0..rows * 8).map(|i| 0.25 * (i + 1) as f32).collect(),
    };
    let f16 = |x: f32| half::f16::from_f32(x).to_bits();
    let super_block = DecodedTensor::SuperBlock {
        rows,
        cols,
        bits: 4,
        group: 32,
        zero_point: 0,
        codes: (0..rows * cols).map(|i| (i * 5 % 16) as u8).collect(),
        sub_scales: (0..rows * 8).map(|i| (i % 60) as i8).collect(),
        sub_mins: Some((0..rows * 8).map(|i| (i * 3 % 64) as u8).collect()),
        d: (0..rows).map(|r| f16(0.01 * (r + 1) as f32)).collect(),
        dmin: Some((0..rows).map(|r| f16(0.002 * (r + 2) as f32)).collect()),
    };
    let dense = DecodedTensor::Dense {
        rows,
        cols,
        values: (0..rows * cols).map(|i| i as f32 * 0.1).collect(),
    };
    for t in [low, int8, super_block, dense] {
        let all = t.dequantize();
        let mut start = 0;
        for count in [1, 3, 2] {
            let part = t.row_range(start, count);
            assert_eq!(part.rows(), count);
            assert_eq!(part.dequantize(), all[start * cols..(start + count) * cols]);
            start += count;
        }
    }
}

/// The bytes of a one-block I2_S tensor worked out by hand (the example `make_i2_s.py` checks
/// its encoder against), with scale 0.5 and padding that is not zero.
fn i2_s_hand_tensor() -> Vec<u8> {
    // Byte m of a block holds elements m, 32 + m, 64 + m, 96 + m from its top bits down;
    // 0x55 = 0b01_01_01_01 is four zeros.
    let mut data = vec![0x55u8; 32];
    data[0] = 0b10_01_00_10; // elements 0, 32, 64, 96: +1, 0, −1, +1
    data[31] = 0b00_11_10_01; // elements 31, 63, 95, 127: −1, code 3 (= 0), +1, 0
    data.extend(0.5f32.to_le_bytes());
    data.extend([0xFF; 28]); // NaN bits, were they read as scales
    data
}

#[test]
fn i2_s_hand_example() {
    let t = decode_ggml(GgmlType::I2_S, 1, 128, &i2_s_hand_tensor()).unwrap();
    let w = t.dequantize();
    let mut want = vec![0.0f32; 128];
    for (at, v) in [(0, 0.5), (64, -0.5), (96, 0.5), (31, -0.5), (95, 0.5)] {
        want[at] = v;
    }
    assert_eq!(w, want);
    // One group per row with offset −scale: the form the ternary kernel takes.
    let DecodedTensor::LowBit {
        bits: 2,
        group_size: 128,
        codes,
        scales,
        offsets,
        ..
    } = &t
    else {
        panic!("I2_S is not in the per-row 2-bit form: {t:?}")
    };
    assert_eq!(
        (scales.as_slice(), offsets.as_slice()),
        (&[0.5][..], &[-0.5][..])
    );
    assert!(codes.iter().all(|&q| q <= 2), "code 3 is kept");
    // The fixture writer's encoder packs the same codes into the same bytes.
    let packed = crate::fixtures::i2_s_tensor(codes, 0.5);
    let mut hand = i2_s_hand_tensor();
    hand[31] = 0b00_01_10_01; // code 3 decoded as 0, which the encoder writes as 1
    assert_eq!(packed[..36], hand[..36]);
}

#[test]
fn i2_s_matches_reference_in_the_ternary_form() {
    let t = check_block_fixture("i2_s");
    let DecodedTensor::LowBit {
        group_size, scales, ..
    } = &t
    else {
        panic!("I2_S is not low-bit")
    };
    // The tensor's one scale on every row.
    assert_eq!(*group_size, t.cols());
    assert_eq!(scales.len(), t.rows());
    assert!(scales.iter().all(|&s| s == scales[0] && s > 0.0));
}

#[test]
fn i2_s_sizes_count_the_scale_after_the_blocks() {
    assert_eq!(GgmlType::from_id(36), Some(GgmlType::I2_S));
    // 2 rows of 256: 2·256/4 bytes of codes, then 32 bytes (f32 scale and padding).
    assert_eq!(GgmlType::I2_S.tensor_bytes(512), Some(128 + 32));
    assert_eq!(GgmlType::I2_S.bytes_for(256), Some(64));
    assert_eq!(
        GgmlType::Q4_0.tensor_bytes(64),
        GgmlType::Q4_0.bytes_for(64)
    );
    let bad = |rows, cols, len| match decode_ggml(GgmlType::I2_S, rows, cols, &vec![0; len]) {
        Err(DecodeError::BadShape(reason)) => reason,
        other => panic!("{rows}x{cols} in {len} bytes: {other:?}"),
    };
    // The blocks alone (no scale), one byte short, and rows that are not whole blocks.
    assert!(bad(1, 128, 32).contains("needs 64 bytes"));
    assert!(bad(2, 128, 95).contains("needs 96 bytes"));
    assert!(bad(1, 64, 48).contains("not a multiple of the I2_S block of 128"));
    // Rows decoded apart need the tensor's tail beside their blocks.
    assert!(matches!(
        decode_ggml_rows(GgmlType::I2_S, 1, 128, &[0x55; 32], &[]),
        Err(DecodeError::BadShape(_))
    ));
    let data = i2_s_hand_tensor();
    let rows = decode_ggml_rows(GgmlType::I2_S, 1, 128, &data[..32], &data[32..]).unwrap();
    assert_eq!(rows, decode_ggml(GgmlType::I2_S, 1, 128, &data).unwrap());
}
