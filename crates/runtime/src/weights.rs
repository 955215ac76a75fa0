//! One table from source tensor types (GGUF Q4_1, Q8_0, F16, GPTQ, ...) to what the kernels take:
//! low-bit codes + group scales + offsets, int8 codes + block scales, or dense f32.
//!
//! Every ggml type lutra reads is decoded here and nowhere else ([`decode_ggml`]); block layouts
//! follow llama.cpp's `ggml-common.h` / `ggml-quants.c` exactly. Nothing is requantized: each
//! variant reproduces the source values bit for bit (up to f16→f32 widening of the scales).

use half::{bf16, f16};

/// A decoded weight tensor of shape `[rows][cols]` (cols = K, the fastest-varying dimension).
#[derive(Clone, Debug, PartialEq)]
pub enum DecodedTensor {
    /// `w = scale·q + offset` per group of `group_size` elements along a row (Q4_0, Q4_1, ...).
    LowBit {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Bits per code (1..=4).
        bits: u8,
        /// Elements per group.
        group_size: usize,
        /// One code per element, row-major.
        codes: Vec<u8>,
        /// `[rows][cols / group_size]`.
        scales: Vec<f32>,
        /// `[rows][cols / group_size]`.
        offsets: Vec<f32>,
    },
    /// `w = scale·q` with int8 `q` and one scale per block of 32 (Q8_0, Q5_0, Q8_K, Q3_K, IQ4_NL,
    /// IQ4_XS).
    Int8 {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// One code per element, row-major.
        codes: Vec<i8>,
        /// `[rows][cols / 32]`.
        scales: Vec<f32>,
    },
    /// Dense values, row-major (F32, F16, BF16, and types kept exact that are not low-bit).
    Dense {
        /// Output features (1 for vectors).
        rows: usize,
        /// Input features.
        cols: usize,
        /// `rows·cols` values.
        values: Vec<f32>,
    },
}

impl DecodedTensor {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            DecodedTensor::LowBit { rows, .. }
            | DecodedTensor::Int8 { rows, .. }
            | DecodedTensor::Dense { rows, .. } => *rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            DecodedTensor::LowBit { cols, .. }
            | DecodedTensor::Int8 { cols, .. }
            | DecodedTensor::Dense { cols, .. } => *cols,
        }
    }

    /// All `rows·cols` values as f32, row-major (for reference paths, requantization and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            DecodedTensor::LowBit {
                group_size,
                codes,
                scales,
                offsets,
                ..
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    let g = i / group_size;
                    scales[g] * f32::from(q) + offsets[g]
                })
                .collect(),
            DecodedTensor::Int8 { codes, scales, .. } => codes
                .iter()
                .enumerate()
                .map(|(i, &q)| scales[i / 32] * f32::from(q))
                .collect(),
            DecodedTensor::Dense { values, .. } => values.clone(),
        }
    }
}

/// A ggml tensor type, as numbered in `ggml.h`.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// The K-quant super-block size.
const QK_K: usize = 256;

impl GgmlType {
    /// `(ggml id, type, elements per block, bytes per block)` for every type whose size is known,
    /// so that files holding types lutra cannot decode can still be opened and listed.
    const TABLE: [(u32, GgmlType, usize, usize); 32] = [
        (0, GgmlType::F32, 1, 4),
        (1, GgmlType::F16, 1, 2),
        (2, GgmlType::Q4_0, 32, 18),
        (3, GgmlType::Q4_1, 32, 20),
        (6, GgmlType::Q5_0, 32, 22),
        (7, GgmlType::Q5_1, 32, 24),
        (8, GgmlType::Q8_0, 32, 34),
        (9, GgmlType::Q8_1, 32, 36),
        (10, GgmlType::Q2_K, QK_K, 84),
        (11, GgmlType::Q3_K, QK_K, 110),
        (12, GgmlType::Q4_K, QK_K, 144),
        (13, GgmlType::Q5_K, QK_K, 176),
        (14, GgmlType::Q6_K, QK_K, 210),
        (15, GgmlType::Q8_K, QK_K, 292),
        (16, GgmlType::IQ2_XXS, QK_K, 66),
        (17, GgmlType::IQ2_XS, QK_K, 74),
        (18, GgmlType::IQ3_XXS, QK_K, 98),
        (19, GgmlType::IQ1_S, QK_K, 50),
        (20, GgmlType::IQ4_NL, 32, 18),
        (21, GgmlType::IQ3_S, QK_K, 110),
        (22, GgmlType::IQ2_S, QK_K, 82),
        (23, GgmlType::IQ4_XS, QK_K, 136),
        (24, GgmlType::I8, 1, 1),
        (25, GgmlType::I16, 1, 2),
        (26, GgmlType::I32, 1, 4),
        (27, GgmlType::I64, 1, 8),
        (28, GgmlType::F64, 1, 8),
        (29, GgmlType::IQ1_M, QK_K, 56),
        (30, GgmlType::BF16, 1, 2),
        (34, GgmlType::TQ1_0, QK_K, 54),
        (35, GgmlType::TQ2_0, QK_K, 66),
        (39, GgmlType::MXFP4, 32, 17),
    ];

    fn entry(self) -> (u32, GgmlType, usize, usize) {
        // The table covers every variant, so the search always succeeds.
        Self::TABLE
            .iter()
            .copied()
            .find(|e| e.1 == self)
            .unwrap_or((0, GgmlType::F32, 1, 4))
    }

    /// The type with ggml id `id`, if lutra knows its size.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::TABLE.iter().find(|e| e.0 == id).map(|e| e.1)
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        self.entry().0
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        self.entry().2
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.entry().3
    }

    /// The type's name as ggml spells it (`"Q4_1"`, `"F32"`, ...).
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    /// Whether [`decode_ggml`] can decode this type.
    pub fn is_decodable(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
                | TQ1_0
                | TQ2_0
                | IQ4_NL
                | IQ4_XS
        )
    }

    /// Bytes taken by `elems` elements, or `None` when `elems` is not a whole number of blocks.
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }
}

/// Why [`decode_ggml`] refused a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// lutra has no decoder for this type.
    Unsupported(GgmlType),
    /// A row is not a whole number of blocks, or the data has the wrong length.
    BadShape(String),
}

/// Decodes `rows·cols` elements of type `ty` from `data` (exactly the tensor's bytes).
///
/// `cols` is GGUF's `ne0` (fastest varying), `rows` the product of the other dimensions.
pub fn decode_ggml(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
) -> Result<DecodedTensor, DecodeError> {
    if !ty.is_decodable() {
        return Err(DecodeError::Unsupported(ty));
    }
    if !cols.is_multiple_of(ty.block_elems()) {
        return Err(DecodeError::BadShape(format!(
            "row length {cols} is not a multiple of the {} block of {} elements",
            ty.name(),
            ty.block_elems()
        )));
    }
    let expected = rows
        .checked_mul(cols)
        .and_then(|n| ty.bytes_for(n))
        .ok_or_else(|| DecodeError::BadShape(format!("{rows}x{cols} elements overflow")))?;
    if data.len() != expected {
        return Err(DecodeError::BadShape(format!(
            "{rows}x{cols} {} needs {expected} bytes, got {}",
            ty.name(),
            data.len()
        )));
    }
    let blocks = data.chunks_exact(ty.block_bytes());
    let n = rows * cols;
    Ok(match ty {
        GgmlType::F32 => dense(
            rows,
            cols,
            blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => dense(rows, cols, blocks.map(|b| f16_at(b, 0))),
        GgmlType::BF16 => dense(
            rows,
            cols,
            blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / 32);
            for b in blocks {
                scales.push(f16_at(b, 0));
                codes.extend(b[2..34].iter().map(|&q| q as i8));
            }
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
            }
        }
        GgmlType::Q8_K => {
            // One f32 scale per 256; the Int8 variant wants one per 32, so repeat it (exact).
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / 32);
            for b in blocks {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                scales.extend([d; QK_K / 32]);
                codes.extend(b[4..4 + QK_K].iter().map(|&q| q as i8));
            }
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
            }
        }
        GgmlType::Q5_0 => {
            // w = d·(q − 16) with q in 0..32: exact as int8 codes q − 16.
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / 32);
            for b in blocks {
                scales.push(f16_at(b, 0));
                let q = q5_block(&b[2..6], &b[6..22]);
                codes.extend(q.iter().map(|&q| q as i8 - 16));
            }
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
            }
        }
        GgmlType::IQ4_NL => {
            // w = d·kvalues[idx]: the codebook entries are the int8 codes, d the block scale.
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / 32);
            for b in blocks {
                scales.push(f16_at(b, 0));
                codes.extend(iq4_nl_codes(&b[2..18]));
            }
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
            }
        }
        GgmlType::IQ4_XS => {
            // Each 32-element sub-block is an IQ4_NL block with scale dl = d·(ls − 32), computed
            // in f32 as `dequantize_row_iq4_xs` does (exact: an f16 times a 6-bit integer).
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / 32);
            for b in blocks {
                let d = f16_at(b, 0);
                let scales_h = u16::from_le_bytes([b[2], b[3]]);
                let (scales_l, qs) = (&b[4..8], &b[8..136]);
                for (ib, sub) in qs.chunks_exact(16).enumerate() {
                    let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
                    let high = ((scales_h >> (2 * ib)) & 3) as u8;
                    let ls = i32::from(low | (high << 4));
                    scales.push(d * (ls - 32) as f32);
                    codes.extend(iq4_nl_codes(sub));
                }
            }
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
            }
        }
        GgmlType::Q5_1 => {
            let mut values = Vec::with_capacity(n);
            for b in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let q = q5_block(&b[4..8], &b[8..24]);
                values.extend(q.iter().map(|&q| d * f32::from(q) + m));
            }
            DecodedTensor::Dense { rows, cols, values }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let mut lb = LowBitBuilder::new(n, 32);
            for b in blocks {
                let (d, m, qs) = if ty == GgmlType::Q4_0 {
                    let d = f16_at(b, 0);
                    (d, -8.0 * d, &b[2..18])
                } else {
                    (f16_at(b, 0), f16_at(b, 2), &b[4..20])
                };
                // Low nibbles hold elements 0..16, high nibbles 16..32.
                let mut codes = [0u8; 32];
                for (j, &q) in qs.iter().enumerate().take(16) {
                    codes[j] = q & 0xF;
                    codes[j + 16] = q >> 4;
                }
                lb.group_codes(d, m, &codes);
            }
            lb.finish(rows, cols, 4)
        }
        GgmlType::Q2_K => {
            let mut lb = LowBitBuilder::new(n, 16);
            for b in blocks {
                let (sc, qs) = (&b[0..16], &b[16..80]);
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                let mut is = 0;
                for half in qs.chunks_exact(32) {
                    for shift in (0..8).step_by(2) {
                        for sub in half.chunks_exact(16) {
                            let s = sc[is];
                            is += 1;
                            let scale = d * f32::from(s & 0xF);
                            lb.group(
                                scale,
                                -dmin * f32::from(s >> 4),
                                sub.iter().map(|&q| (q >> shift) & 3),
                            );
                        }
                    }
                }
            }
            lb.finish(rows, cols, 2)
        }
        GgmlType::Q3_K => {
            // w = d·sc·(q − 4) with 6-bit signed sc (−32..31) and 3-bit q, per 16 elements: exact
            // as int8 codes −sc·(q − 4) (in −128..=124) with scale −d for every 32.
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / 32);
            for b in blocks {
                let (hmask, qs) = (&b[0..32], &b[32..96]);
                let sc = q3k_scales(&b[96..108]);
                scales.extend([-f16_at(b, 108); QK_K / 32]);
                let (mut is, mut m) = (0, 1u8);
                for half in qs.chunks_exact(32) {
                    for shift in (0..8).step_by(2) {
                        for (k, sub) in half.chunks_exact(16).enumerate() {
                            let s = i16::from(sc[is]);
                            is += 1;
                            let hm = &hmask[16 * k..16 * k + 16];
                            // q − 4 = low2 − (high bit clear ? 4 : 0).
                            codes.extend(sub.iter().zip(hm).map(|(&q, &h)| {
                                let low = i16::from((q >> shift) & 3);
                                let v = if h & m != 0 { low } else { low - 4 };
                                (-s * v) as i8
                            }));
                        }
                        m <<= 1;
                    }
                }
            }
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
            }
        }
        GgmlType::Q4_K => {
            let mut lb = LowBitBuilder::new(n, 32);
            for b in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, qs) = (&b[4..16], &b[16..144]);
                for (j, chunk) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * j, sc);
                    let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                    lb.group(
                        d * f32::from(s1),
                        -dmin * f32::from(m1),
                        chunk.iter().map(|&q| q & 0xF),
                    );
                    lb.group(
                        d * f32::from(s2),
                        -dmin * f32::from(m2),
                        chunk.iter().map(|&q| q >> 4),
                    );
                }
            }
            lb.finish(rows, cols, 4)
        }
        GgmlType::Q5_K => {
            let mut values = Vec::with_capacity(n);
            for b in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
                for (j, chunk) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * j, sc);
                    let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                    let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                    let (d1, d2) = (d * f32::from(s1), d * f32::from(s2));
                    let (o1, o2) = (dmin * f32::from(m1), dmin * f32::from(m2));
                    values.extend(chunk.iter().zip(qh).map(|(&q, &h)| {
                        d1 * f32::from((q & 0xF) + if h & u1 != 0 { 16 } else { 0 }) - o1
                    }));
                    values.extend(chunk.iter().zip(qh).map(|(&q, &h)| {
                        d2 * f32::from((q >> 4) + if h & u2 != 0 { 16 } else { 0 }) - o2
                    }));
                }
            }
            DecodedTensor::Dense { rows, cols, values }
        }
        GgmlType::Q6_K => {
            let mut values = vec![0.0f32; n];
            for (b, y) in blocks.zip(values.chunks_exact_mut(QK_K)) {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                    let sc = &sc[8 * half..];
                    let y = &mut y[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * f32::from(sc[is + k] as i8);
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
            DecodedTensor::Dense { rows, cols, values }
        }
        GgmlType::TQ2_0 => {
            // Ternary as 2-bit codes {0,1,2}: w = d·(q − 1), one group per 256-block (its d).
            let mut lb = LowBitBuilder::new(n, QK_K);
            for b in blocks {
                let (qs, d) = (&b[0..64], f16_at(b, 64));
                let mut codes = [0u8; QK_K];
                // Element 128·h + 32·l + m is bits 2l..2l+2 of byte 32·h + m.
                for (h, chunk) in qs.chunks_exact(32).enumerate() {
                    for l in 0..4 {
                        let out = &mut codes[128 * h + 32 * l..][..32];
                        for (c, &q) in out.iter_mut().zip(chunk) {
                            *c = (q >> (2 * l)) & 3;
                        }
                    }
                }
                lb.group_codes(d, -d, &codes);
            }
            lb.finish(rows, cols, 2)
        }
        GgmlType::TQ1_0 => {
            let mut lb = LowBitBuilder::new(n, QK_K);
            for b in blocks {
                let (qs, qh, d) = (&b[0..48], &b[48..52], f16_at(b, 52));
                lb.group_codes(d, -d, &tq1_block(qs, qh));
            }
            lb.finish(rows, cols, 2)
        }
        _ => return Err(DecodeError::Unsupported(ty)),
    })
}

fn dense(rows: usize, cols: usize, values: impl Iterator<Item = f32>) -> DecodedTensor {
    DecodedTensor::Dense {
        rows,
        cols,
        values: values.collect(),
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Collects groups of codes with their scale and offset, in order.
struct LowBitBuilder {
    codes: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
    group_size: usize,
}

impl LowBitBuilder {
    fn new(n: usize, group_size: usize) -> Self {
        LowBitBuilder {
            codes: Vec::with_capacity(n),
            scales: Vec::with_capacity(n / group_size),
            offsets: Vec::with_capacity(n / group_size),
            group_size,
        }
    }

    fn group(&mut self, scale: f32, offset: f32, codes: impl Iterator<Item = u8>) {
        self.codes.extend(codes);
        self.scales.push(scale);
        self.offsets.push(offset);
        debug_assert_eq!(self.codes.len(), self.scales.len() * self.group_size);
    }

    fn group_codes(&mut self, scale: f32, offset: f32, codes: &[u8]) {
        self.codes.extend_from_slice(codes);
        self.scales.push(scale);
        self.offsets.push(offset);
        debug_assert_eq!(self.codes.len(), self.scales.len() * self.group_size);
    }

    fn finish(self, rows: usize, cols: usize, bits: u8) -> DecodedTensor {
        DecodedTensor::LowBit {
            rows,
            cols,
            bits,
            group_size: self.group_size,
            codes: self.codes,
            scales: self.scales,
            offsets: self.offsets,
        }
    }
}

/// The non-uniform 4-bit codebook of IQ4_NL and IQ4_XS (`kvalues_iq4nl` in `ggml-common.h`).
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The 32 int8 codes of an IQ4_NL block (or IQ4_XS sub-block) from its 16 bytes of indices:
/// low nibbles are elements 0..16, high nibbles 16..32.
fn iq4_nl_codes(qs: &[u8]) -> impl Iterator<Item = i8> + '_ {
    let code = |i: u8| KVALUES_IQ4NL[usize::from(i & 0xF)];
    qs.iter()
        .map(move |&q| code(q))
        .chain(qs.iter().map(move |&q| code(q >> 4)))
}

/// The 32 unsigned 5-bit values of a Q5_0/Q5_1 block (`qh` as a little-endian u32).
fn q5_block(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut out = [0u8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        out[j] = (qs[j] & 0xF) | h0;
        out[j + 16] = (qs[j] >> 4) | h1;
    }
    out
}

/// The 16 signed 6-bit sub-block scales of a Q3_K block (already minus 32).
fn q3k_scales(packed: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, s) in out.iter_mut().enumerate() {
        let low = if j < 8 {
            packed[j] & 0xF
        } else {
            packed[j - 8] >> 4
        };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        *s = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 256 ternary codes (0, 1, 2) of a TQ1_0 block, in element order: five base-3 digits per
/// byte, stored as fixed-point fractions (`dequantize_row_tq1_0`).
fn tq1_block(qs: &[u8], qh: &[u8]) -> Vec<u8> {
    const POW3: [u8; 6] = [1, 3, 9, 27, 81, 243];
    let digit = |byte: u8, n: usize| ((u16::from(byte.wrapping_mul(POW3[n])) * 3) >> 8) as u8;
    let mut out = Vec::with_capacity(QK_K);
    for part in [&qs[0..32], &qs[32..48]] {
        for n in 0..5 {
            out.extend(part.iter().map(|&q| digit(q, n)));
        }
    }
    for n in 0..4 {
        out.extend(qh.iter().map(|&q| digit(q, n)));
    }
    out
}

#[cfg(test)]
mod tests;
