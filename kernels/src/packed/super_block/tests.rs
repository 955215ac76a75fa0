//! Tests of super-block (K-quant) weights: dequantization bit-equal to ggml's (from the formula and
//! from real block bytes), every ISA and thread count bit-equal to the scalar reference, accuracy
//! against an exact f64 dot, 5 and 6 bit float-scale forms, and the errors of bad inputs.

use half::f16;

use crate::rng::SplitMix64;
use crate::test_util::{bits_of, nmse};
use crate::{
    ActivationTables, Cpu, Grouping, Isa, KernelError, PackedMatrix, PlaneScales, QuantSpec,
    QuantizedWeights, SuperBlockWeights, SUPER_BLOCK,
};

/// One llama.cpp K-quant type, as [`SuperBlockWeights`] describes it.
#[derive(Clone, Copy, Debug)]
struct KQuant {
    name: &'static str,
    bits: u8,
    group: usize,
    zero_point: u8,
    mins: bool,
    /// Inclusive range of the sub-scales.
    sc: (i32, i32),
    /// Largest sub-min.
    m_max: u8,
}

const Q2_K: KQuant = KQuant {
    name: "Q2_K",
    bits: 2,
    group: 16,
    zero_point: 0,
    mins: true,
    sc: (0, 15),
    m_max: 15,
};
const Q3_K: KQuant = KQuant {
    name: "Q3_K",
    bits: 3,
    group: 16,
    zero_point: 4,
    mins: false,
    sc: (-32, 31),
    m_max: 0,
};
const Q4_K: KQuant = KQuant {
    name: "Q4_K",
    bits: 4,
    group: 32,
    zero_point: 0,
    mins: true,
    sc: (0, 63),
    m_max: 63,
};
const Q5_K: KQuant = KQuant {
    name: "Q5_K",
    bits: 5,
    group: 32,
    zero_point: 0,
    mins: true,
    sc: (0, 63),
    m_max: 63,
};
const Q6_K: KQuant = KQuant {
    name: "Q6_K",
    bits: 6,
    group: 16,
    zero_point: 32,
    mins: false,
    sc: (-128, 127),
    m_max: 0,
};
/// No llama.cpp type: 6-bit codes with no zero point (`2c = 63`), whose half sums plus the centre
/// term pass int16, so AVX2 takes the general path for it.
const W6_MINS: KQuant = KQuant {
    name: "6-bit, groups of 16, mins",
    bits: 6,
    group: 16,
    zero_point: 0,
    mins: true,
    sc: (0, 15),
    m_max: 15,
};
const TYPES: [KQuant; 6] = [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, W6_MINS];

struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    /// f16 bits of a super-factor: mostly normal values of either sign, some subnormal, some zero.
    fn factor(&mut self) -> u16 {
        let sign = if self.below(4) == 0 { 0x8000 } else { 0 };
        match self.below(10) {
            0 => sign | (1 + self.below(0x3FF)) as u16,
            1 => 0,
            _ => sign | f16::from_f32(1e-4 + 0.02 * self.0.uniform()).to_bits(),
        }
    }
}

/// Decoded K-quant weights, owned.
struct Parts {
    t: KQuant,
    rows: usize,
    cols: usize,
    codes: Vec<u8>,
    sub_scales: Vec<i8>,
    sub_mins: Option<Vec<u8>>,
    d: Vec<u16>,
    dmin: Option<Vec<u16>>,
}

impl Parts {
    fn random(rng: &mut Rng, t: KQuant, rows: usize, cols: usize) -> Parts {
        let groups = rows * cols / t.group;
        let supers = rows * cols / SUPER_BLOCK;
        let span = (t.sc.1 - t.sc.0 + 1) as usize;
        Parts {
            t,
            rows,
            cols,
            codes: (0..rows * cols)
                .map(|_| rng.below(1 << t.bits) as u8)
                .collect(),
            sub_scales: (0..groups)
                .map(|_| (t.sc.0 + rng.below(span) as i32) as i8)
                .collect(),
            sub_mins: t.mins.then(|| {
                (0..groups)
                    .map(|_| rng.below(usize::from(t.m_max) + 1) as u8)
                    .collect()
            }),
            d: (0..supers).map(|_| rng.factor()).collect(),
            dmin: t.mins.then(|| (0..supers).map(|_| rng.factor()).collect()),
        }
    }

    fn weights(&self) -> SuperBlockWeights<'_> {
        SuperBlockWeights {
            rows: self.rows,
            cols: self.cols,
            bits: self.t.bits,
            group: self.t.group,
            zero_point: self.t.zero_point,
            codes: &self.codes,
            sub_scales: &self.sub_scales,
            sub_mins: self.sub_mins.as_deref(),
            d: &self.d,
            dmin: self.dmin.as_deref(),
        }
    }

    fn pack(&self) -> PackedMatrix {
        PackedMatrix::pack_super_blocks(&self.weights()).unwrap()
    }

    /// Weight `k` of row `r` as ggml's `dequantize_row_q*_K` computes it: `(d·sc)·(q − z) − dmin·m`.
    fn ggml(&self, r: usize, k: usize) -> f32 {
        let (groups, supers) = (self.cols / self.t.group, self.cols / SUPER_BLOCK);
        let (g, b) = (r * groups + k / self.t.group, r * supers + k / SUPER_BLOCK);
        let f = |h: u16| f16::from_bits(h).to_f32();
        let q = i32::from(self.codes[r * self.cols + k]) - i32::from(self.t.zero_point);
        let dl = f(self.d[b]) * f32::from(self.sub_scales[g]);
        match (&self.dmin, &self.sub_mins) {
            (Some(dmin), Some(m)) => dl * q as f32 - f(dmin[b]) * f32::from(m[g]),
            _ => dl * q as f32,
        }
    }
}

fn run(isa: Isa, threads: usize, m: &PackedMatrix, x: &[f32], tokens: usize) -> Vec<f32> {
    let cpu = Cpu::with_isa(isa, threads).unwrap();
    let mut tables = ActivationTables::new(m.cols());
    tables.build(&cpu, x, tokens).unwrap();
    let mut out = vec![f32::NAN; tokens * m.rows()];
    m.matmul(&cpu, &tables, &mut out).unwrap();
    out
}

/// `y[n][r]` from the dequantized rows in f64, and `Σ (w·x)²` (the error scale of the existing forms'
/// tests).
fn reference(m: &PackedMatrix, x: &[f32], tokens: usize) -> (Vec<f64>, f64) {
    let (rows, cols) = (m.rows(), m.cols());
    let mut y = vec![0.0f64; tokens * rows];
    let mut energy = 0.0;
    let mut w = vec![0.0f32; cols];
    for r in 0..rows {
        m.dequantize_row(r, &mut w).unwrap();
        for n in 0..tokens {
            let mut dot = 0.0f64;
            for (&a, &b) in w.iter().zip(&x[n * cols..][..cols]) {
                let p = f64::from(a) * f64::from(b);
                dot += p;
                energy += p * p;
            }
            y[n * rows + r] = dot;
        }
    }
    (y, energy)
}

#[test]
fn dequantize_row_is_the_ggml_formula_bit_for_bit() {
    let mut rng = Rng(SplitMix64::new(0x5B));
    for t in TYPES {
        for (rows, cols) in [(67, 256), (130, 512), (67, 1536), (1, 256)] {
            let parts = Parts::random(&mut rng, t, rows, cols);
            let m = parts.pack();
            assert_eq!((m.rows(), m.cols()), (rows, cols));
            assert_eq!(m.spec().bits, t.bits);
            assert_eq!(m.spec().grouping, Grouping::Size(t.group));
            // Planes, one byte per sub-scale and one per sub-min (one for both in groups of 16,
            // as in Q2_K's blocks), two per d (and dmin), per padded row.
            let padded = rows.div_ceil(64) * 64;
            let min_bytes = usize::from(t.mins && t.group != 16);
            let per_row = usize::from(t.bits) * cols / 8
                + cols / t.group * (1 + min_bytes)
                + 2 * cols / SUPER_BLOCK * (1 + usize::from(t.mins));
            assert_eq!(m.bytes(), padded * per_row, "{}", t.name);
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row).unwrap();
                let want: Vec<f32> = (0..cols).map(|k| parts.ggml(r, k)).collect();
                assert_eq!(bits_of(&row), bits_of(&want), "{} row {r}", t.name);
            }
        }
    }
}

// ggml's `dequantize_row_q*_K` of one block each, in ggml's order of operations and of elements.

/// Q2_K, 84 bytes: `scales[16]`, `qs[64]`, `d`, `dmin`.
fn ggml_q2_k(block: &[u8]) -> Vec<f32> {
    let (scales, qs) = (&block[..16], &block[16..80]);
    let d = f16::from_le_bytes([block[80], block[81]]).to_f32();
    let min = f16::from_le_bytes([block[82], block[83]]).to_f32();
    let mut y = Vec::new();
    let mut is = 0;
    for q in qs.chunks_exact(32) {
        for shift in (0..8).step_by(2) {
            for half in q.chunks_exact(16) {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * f32::from(sc & 0xF), min * f32::from(sc >> 4));
                y.extend(
                    half.iter()
                        .map(|&b| dl * f32::from(((b >> shift) & 3) as i8) - ml),
                );
            }
        }
    }
    y
}

/// Q3_K, 110 bytes: `hmask[32]`, `qs[64]`, `scales[12]` (16 packed 6-bit values), `d`.
fn ggml_q3_k(block: &[u8]) -> Vec<f32> {
    let (hmask, qs) = (&block[..32], &block[32..96]);
    let d_all = f16::from_le_bytes([block[108], block[109]]).to_f32();
    let word = |i: usize| {
        u32::from_le_bytes([
            block[96 + 4 * i],
            block[97 + 4 * i],
            block[98 + 4 * i],
            block[99 + 4 * i],
        ])
    };
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let (k1, k2) = (0x0303_0303u32, 0x0F0F_0F0Fu32);
    let aux = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let scales: Vec<i8> = aux
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|b| b as i8)
        .collect();
    let mut y = Vec::new();
    let (mut is, mut m) = (0, 1u8);
    for q in qs.chunks_exact(32) {
        for shift in (0..8).step_by(2) {
            for h in 0..2 {
                let dl = d_all * f32::from(scales[is] - 32);
                is += 1;
                for l in 16 * h..16 * h + 16 {
                    let low = ((q[l] >> shift) & 3) as i8;
                    let high = if hmask[l] & m != 0 { 0 } else { 4 };
                    y.push(dl * f32::from(low - high));
                }
            }
            m <<= 1;
        }
    }
    y
}

/// Q4_K, 144 bytes: `d`, `dmin`, `scales[12]` (8 packed 6-bit pairs), `qs[128]`.
fn ggml_q4_k(block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let min = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let scales = &block[4..16];
    let mut y = Vec::new();
    for (c, q) in block[16..144].chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        y.extend(q.iter().map(|&b| d1 * f32::from(b & 0xF) - m1));
        y.extend(q.iter().map(|&b| d2 * f32::from(b >> 4) - m2));
    }
    y
}

/// Q5_K, 176 bytes: `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`.
fn ggml_q5_k(block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let min = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let (scales, qh) = (&block[4..16], &block[16..48]);
    let mut y = Vec::new();
    let (mut u1, mut u2) = (1u8, 2u8);
    for (c, ql) in block[48..176].chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let high = |h: u8, u: u8| if h & u != 0 { 16 } else { 0 };
        y.extend((0..32).map(|l| d1 * f32::from((ql[l] & 0xF) + high(qh[l], u1)) - m1));
        y.extend((0..32).map(|l| d2 * f32::from((ql[l] >> 4) + high(qh[l], u2)) - m2));
        u1 <<= 2;
        u2 <<= 2;
    }
    y
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of group `j` of a Q4_K/Q5_K block.
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

/// Q6_K, 210 bytes: `ql[128]`, `qh[64]`, `scales[16]` (int8), `d`.
fn ggml_q6_k(block: &[u8]) -> Vec<f32> {
    let sc: Vec<i8> = block[192..208].iter().map(|&b| b as i8).collect();
    let d = f16::from_le_bytes([block[208], block[209]]).to_f32();
    let mut y = vec![0.0f32; 256];
    for n in 0..2 {
        let (ql, qh) = (&block[64 * n..], &block[128 + 32 * n..]);
        let (sc, y) = (&sc[8 * n..], &mut y[128 * n..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * f32::from(sc[is]) * f32::from(q1);
            y[l + 32] = d * f32::from(sc[is + 2]) * f32::from(q2);
            y[l + 64] = d * f32::from(sc[is + 4]) * f32::from(q3);
            y[l + 96] = d * f32::from(sc[is + 6]) * f32::from(q4);
        }
    }
    y
}

/// One block split the way a loader hands it to [`SuperBlockWeights`]: 256 codes, the sub-scales
/// (and sub-mins) of its groups, and the f16 bits of `d` (and `dmin`).
struct Decoded {
    codes: Vec<u8>,
    sub_scales: Vec<i8>,
    sub_mins: Vec<u8>,
    d: u16,
    dmin: Option<u16>,
}

fn f16_at(block: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([block[i], block[i + 1]])
}

fn split_q2_k(b: &[u8]) -> Decoded {
    // Element 128n + 32j + 16h + l is bits 2j..2j+2 of qs[32n + 16h + l]; group = element / 16.
    let mut codes = vec![0u8; 256];
    for (e, c) in codes.iter_mut().enumerate() {
        let (n, j, rest) = (e / 128, e % 128 / 32, e % 32);
        *c = (b[16 + 32 * n + rest] >> (2 * j)) & 3;
    }
    Decoded {
        codes,
        sub_scales: b[..16].iter().map(|&s| (s & 0xF) as i8).collect(),
        sub_mins: b[..16].iter().map(|&s| s >> 4).collect(),
        d: f16_at(b, 80),
        dmin: Some(f16_at(b, 82)),
    }
}

fn split_q3_k(b: &[u8]) -> Decoded {
    // Code = low 2 bits + 4·(hmask bit 4n + j); ggml's value is code − 4, the zero point.
    let mut codes = vec![0u8; 256];
    for (e, c) in codes.iter_mut().enumerate() {
        let (n, j, rest) = (e / 128, e % 128 / 32, e % 32);
        let low = (b[32 + 32 * n + rest] >> (2 * j)) & 3;
        let high = (b[rest] >> (4 * n + j)) & 1;
        *c = low | high << 2;
    }
    // Scale g: low 4 bits from byte g (g < 8) or the high nibble of byte g − 8, high 2 bits from
    // byte 8 + g % 4 at bit 2·(g / 4); stored as sc − 32.
    let s = &b[96..108];
    let sub_scales = (0..16)
        .map(|g| {
            let low = if g < 8 { s[g] & 0xF } else { s[g - 8] >> 4 };
            let high = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
            (low | high << 4) as i8 - 32
        })
        .collect();
    Decoded {
        codes,
        sub_scales,
        sub_mins: Vec::new(),
        d: f16_at(b, 108),
        dmin: None,
    }
}

fn split_q4_k(b: &[u8]) -> Decoded {
    let mut codes = Vec::with_capacity(256);
    for chunk in b[16..144].chunks_exact(32) {
        codes.extend(chunk.iter().map(|q| q & 0xF));
        codes.extend(chunk.iter().map(|q| q >> 4));
    }
    let (sub_scales, sub_mins) = (0..8)
        .map(|j| scale_min_k4(j, &b[4..16]))
        .map(|(s, m)| (s as i8, m))
        .unzip();
    Decoded {
        codes,
        sub_scales,
        sub_mins,
        d: f16_at(b, 0),
        dmin: Some(f16_at(b, 2)),
    }
}

fn split_q5_k(b: &[u8]) -> Decoded {
    // Element 64c + 32h + l: nibble h of qs[32c + l], plus 16 from bit 2c + h of qh[l].
    let mut codes = vec![0u8; 256];
    for (e, c) in codes.iter_mut().enumerate() {
        let (chunk, h, l) = (e / 64, e % 64 / 32, e % 32);
        let low = (b[48 + 32 * chunk + l] >> (4 * h)) & 0xF;
        let high = (b[16 + l] >> (2 * chunk + h)) & 1;
        *c = low | high << 4;
    }
    let (sub_scales, sub_mins) = (0..8)
        .map(|j| scale_min_k4(j, &b[4..16]))
        .map(|(s, m)| (s as i8, m))
        .unzip();
    Decoded {
        codes,
        sub_scales,
        sub_mins,
        d: f16_at(b, 0),
        dmin: Some(f16_at(b, 2)),
    }
}

fn split_q6_k(b: &[u8]) -> Decoded {
    // Element 128n + 32k + l: nibble k / 2 of ql[64n + 32(k % 2) + l], plus bits 2k..2k+2 of
    // qh[32n + l] as bits 4..6; ggml's value is code − 32, the zero point.
    let mut codes = vec![0u8; 256];
    for (e, c) in codes.iter_mut().enumerate() {
        let (n, k, l) = (e / 128, e % 128 / 32, e % 32);
        let low = (b[64 * n + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0xF;
        let high = (b[128 + 32 * n + l] >> (2 * k)) & 3;
        *c = low | high << 4;
    }
    Decoded {
        codes,
        sub_scales: b[192..208].iter().map(|&s| s as i8).collect(),
        sub_mins: Vec::new(),
        d: f16_at(b, 208),
        dmin: None,
    }
}

/// A K-quant block format: its size, where its f16 factors sit, how a loader splits it, and ggml's
/// dequantization of it.
struct BlockFormat {
    t: KQuant,
    bytes: usize,
    factors: &'static [usize],
    split: fn(&[u8]) -> Decoded,
    ggml: fn(&[u8]) -> Vec<f32>,
}

const FORMATS: [BlockFormat; 5] = [
    BlockFormat {
        t: Q2_K,
        bytes: 84,
        factors: &[80, 82],
        split: split_q2_k,
        ggml: ggml_q2_k,
    },
    BlockFormat {
        t: Q3_K,
        bytes: 110,
        factors: &[108],
        split: split_q3_k,
        ggml: ggml_q3_k,
    },
    BlockFormat {
        t: Q4_K,
        bytes: 144,
        factors: &[0, 2],
        split: split_q4_k,
        ggml: ggml_q4_k,
    },
    BlockFormat {
        t: Q5_K,
        bytes: 176,
        factors: &[0, 2],
        split: split_q5_k,
        ggml: ggml_q5_k,
    },
    BlockFormat {
        t: Q6_K,
        bytes: 210,
        factors: &[208],
        split: split_q6_k,
        ggml: ggml_q6_k,
    },
];

#[test]
fn blocks_split_for_a_loader_dequantize_as_ggml() {
    let mut rng = Rng(SplitMix64::new(0x4B));
    let (rows, cols) = (67, 512);
    for format in FORMATS {
        let t = format.t;
        // Random bytes, with finite f16 factors (zero, subnormal, negative among them).
        let blocks: Vec<Vec<u8>> = (0..rows * cols / SUPER_BLOCK)
            .map(|_| {
                let mut b = rng.0.bytes(format.bytes);
                for &i in format.factors {
                    b[i..i + 2].copy_from_slice(&rng.factor().to_le_bytes());
                }
                b
            })
            .collect();
        let mut parts = Parts {
            t,
            rows,
            cols,
            codes: Vec::new(),
            sub_scales: Vec::new(),
            sub_mins: t.mins.then(Vec::new),
            d: Vec::new(),
            dmin: t.mins.then(Vec::new),
        };
        for block in &blocks {
            let decoded = (format.split)(block);
            assert_eq!(decoded.codes.len(), SUPER_BLOCK);
            assert_eq!(decoded.sub_scales.len(), SUPER_BLOCK / t.group);
            parts.codes.extend(decoded.codes);
            parts.sub_scales.extend(decoded.sub_scales);
            parts.d.push(decoded.d);
            if let (Some(mins), Some(dmin)) = (parts.sub_mins.as_mut(), parts.dmin.as_mut()) {
                mins.extend(decoded.sub_mins);
                dmin.extend(decoded.dmin);
            }
        }
        let want: Vec<f32> = blocks.iter().flat_map(|b| (format.ggml)(b)).collect();
        let m = parts.pack();
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut row).unwrap();
            assert_eq!(
                bits_of(&row),
                bits_of(&want[r * cols..][..cols]),
                "{} row {r}",
                t.name
            );
        }
    }
}

#[test]
fn every_isa_and_thread_count_matches_scalar_bit_for_bit() {
    let mut rng = Rng(SplitMix64::new(0x15A));
    for (i, t) in TYPES.into_iter().enumerate() {
        let (rows, cols) = [(67, 512), (130, 256), (67, 1536)][i % 3];
        let m = Parts::random(&mut rng, t, rows, cols).pack();
        for tokens in [1, 3, 17, 33] {
            let x = rng.0.gaussians(tokens * cols);
            let want = bits_of(&run(Isa::Scalar, 1, &m, &x, tokens));
            let (exact, energy) = reference(&m, &x, tokens);
            let err: f64 = run(Isa::Scalar, 1, &m, &x, tokens)
                .iter()
                .zip(&exact)
                .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                .sum();
            assert!(
                err <= 1e-3 * energy,
                "{} N={tokens}: {err} vs {energy}",
                t.name
            );
            for isa in Isa::supported() {
                for threads in [1, 2, 3] {
                    let got = bits_of(&run(isa, threads, &m, &x, tokens));
                    assert!(
                        got == want,
                        "{} {isa}, {threads} threads, N={tokens}",
                        t.name
                    );
                }
            }
            if tokens > 1 {
                // GEMM rows equal the GEMV of each token.
                for n in [0, tokens - 1] {
                    let gemv = run(Isa::best(), 1, &m, &x[n * cols..][..cols], 1);
                    assert_eq!(bits_of(&gemv), want[n * rows..][..rows], "{}", t.name);
                }
            }
        }
    }
}

#[test]
fn largest_integer_sums_match_scalar_bit_for_bit() {
    // Rows of all-top codes against equal activations (every table entry ±127) reach the largest
    // integer sums a group can have (6 planes: 63·127·8, past int16), in GEMV and in GEMM.
    let mut rng = Rng(SplitMix64::new(0x70B));
    for t in TYPES {
        let (rows, cols) = (70, 512);
        let mut parts = Parts::random(&mut rng, t, rows, cols);
        let top = (1u8 << t.bits) - 1;
        for (i, c) in parts.codes.iter_mut().enumerate() {
            match (i / cols) % 4 {
                0 => *c = top,
                1 => *c = 0,
                _ => {}
            }
        }
        for d in parts.d.iter_mut().chain(parts.dmin.iter_mut().flatten()) {
            *d = f16::from_f32(0.001 + 0.02 * rng.0.uniform()).to_bits();
        }
        let m = parts.pack();
        for tokens in [1, 3, 17] {
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| match i / cols {
                    0 => 1.0,
                    1 => -1.0,
                    _ => rng.0.gaussian(),
                })
                .collect();
            let want = run(Isa::Scalar, 1, &m, &x, tokens);
            let (exact, energy) = reference(&m, &x, tokens);
            let err: f64 = want
                .iter()
                .zip(&exact)
                .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                .sum();
            assert!(
                err <= 1e-4 * energy,
                "{} N={tokens}: {err} vs {energy}",
                t.name
            );
            for isa in Isa::supported() {
                for threads in [1, 3] {
                    let got = run(isa, threads, &m, &x, tokens);
                    assert!(
                        bits_of(&got) == bits_of(&want),
                        "{} {isa}, {threads} threads, N={tokens}",
                        t.name
                    );
                }
            }
        }
    }
}

#[test]
fn accuracy_within_1e4_nmse_for_every_type() {
    let mut rng = Rng(SplitMix64::new(0xACC));
    for t in TYPES {
        let mut parts = Parts::random(&mut rng, t, 64, 2048);
        // Normal-sized factors only: a tensor of mostly subnormal scales has no signal to measure.
        for d in parts.d.iter_mut().chain(parts.dmin.iter_mut().flatten()) {
            *d = f16::from_f32(0.001 + 0.02 * rng.0.uniform()).to_bits();
        }
        let m = parts.pack();
        for outliers in [false, true] {
            let x: Vec<f32> = (0..4 * 2048)
                .map(|_| {
                    let v = rng.0.gaussian();
                    if outliers && rng.below(64) == 0 {
                        50.0 * v
                    } else {
                        v
                    }
                })
                .collect();
            let (exact, _) = reference(&m, &x, 4);
            for isa in [Isa::Scalar, Isa::best()] {
                let e = nmse(&run(isa, 1, &m, &x, 4), &exact);
                assert!(e <= 1e-4, "{} {isa} outliers={outliers}: nmse {e}", t.name);
            }
        }
    }
}

#[test]
fn a_non_finite_activation_gives_nan_rows() {
    // A NaN or infinite input makes every output NaN, on every ISA, in GEMV and GEMM, as the exact
    // product would (groups of 16 use Σx in table units, which the tables' NaN scale carries).
    let mut rng = Rng(SplitMix64::new(0x4A4));
    for t in TYPES {
        let m = Parts::random(&mut rng, t, 70, 512).pack();
        for bad in [f32::NAN, f32::INFINITY] {
            for tokens in [1, 3] {
                let mut x = rng.0.gaussians(tokens * 512);
                x[(tokens - 1) * 512 + 100] = bad;
                for isa in Isa::supported() {
                    let y = run(isa, 1, &m, &x, tokens);
                    let last = &y[(tokens - 1) * 70..];
                    assert!(
                        last.iter().all(|v| v.is_nan()),
                        "{} {isa} x = {bad}, N={tokens}",
                        t.name
                    );
                }
            }
        }
    }
}

#[test]
fn unit_inputs_read_back_each_weight() {
    // x = e_k picks column k: a group-of-16 form that mixed up its halves would read the other
    // half's scale and Σx. A weight `s·q − m` near zero is the difference of two larger terms,
    // each rounded relative to its own size: the tolerance is relative to the row's largest weight.
    let mut rng = Rng(SplitMix64::new(0xE1));
    for t in TYPES {
        let parts = Parts::random(&mut rng, t, 70, 256);
        let m = parts.pack();
        let row_max: Vec<f32> = (0..70)
            .map(|r| {
                (0..256)
                    .map(|k| parts.ggml(r, k).abs())
                    .fold(1e-3, f32::max)
            })
            .collect();
        for k in [0, 15, 16, 31, 40, 255] {
            let mut x = vec![0.0f32; 256];
            x[k] = 1.0;
            for isa in Isa::supported() {
                let y = run(isa, 1, &m, &x, 1);
                for (r, &v) in y.iter().enumerate() {
                    let w = parts.ggml(r, k);
                    assert!(
                        (v - w).abs() <= 1e-5 * w.abs() + 1e-6 * row_max[r],
                        "{} {isa} row {r} col {k}: {v} vs {w}",
                        t.name
                    );
                }
            }
        }
    }
}

#[test]
fn five_and_six_bit_float_scale_forms_match_scalar_and_the_reference() {
    let mut rng = Rng(SplitMix64::new(0x56));
    for bits in [5u8, 6] {
        for (planes, grouping) in [
            (PlaneScales::Uniform, Grouping::Size(32)),
            (PlaneScales::Uniform, Grouping::Size(128)),
            (PlaneScales::PerPlane, Grouping::Size(64)),
            (PlaneScales::PerPlane, Grouping::PerRow),
        ] {
            let (rows, cols) = (67, 512);
            let gs = match grouping {
                Grouping::Size(g) => g,
                _ => cols,
            };
            let groups = rows * cols / gs;
            let nps = if planes == PlaneScales::PerPlane {
                usize::from(bits)
            } else {
                1
            };
            // Every fourth row all at the top code: with equal activations (every table entry ±127)
            // the largest integer sums the kernels can meet, past int16.
            let codes: Vec<u8> = (0..rows * cols)
                .map(|i| {
                    if (i / cols) % 4 == 0 || i % 3 == 0 {
                        (1u8 << bits) - 1
                    } else {
                        rng.below(1 << bits) as u8
                    }
                })
                .collect();
            let scales: Vec<f32> = (0..groups * nps)
                .map(|_| 0.001 + 0.01 * rng.0.uniform())
                .collect();
            let offsets: Vec<f32> = (0..groups).map(|_| -0.1 * rng.0.uniform()).collect();
            let weights = QuantizedWeights {
                spec: QuantSpec {
                    rows,
                    cols,
                    bits,
                    grouping,
                    plane_scales: planes,
                },
                codes: &codes,
                scales: &scales,
                offsets: Some(&offsets),
            };
            let m = PackedMatrix::pack(&weights).unwrap();
            for tokens in [1, 3, 17, 33] {
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|i| if i < cols { 1.0 } else { rng.0.gaussian() })
                    .collect();
                let want = run(Isa::Scalar, 1, &m, &x, tokens);
                let (exact, _) = reference(&m, &x, tokens);
                let e = nmse(&want, &exact);
                assert!(e <= 1e-4, "{bits} bits {planes:?} {grouping:?}: nmse {e}");
                for isa in Isa::supported() {
                    for threads in [1, 2, 3] {
                        let got = run(isa, threads, &m, &x, tokens);
                        assert!(
                            bits_of(&got) == bits_of(&want),
                            "{bits} bits {planes:?} {grouping:?} {isa} {threads} threads N={tokens}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn invalid_super_block_inputs_are_errors() {
    let mut rng = Rng(SplitMix64::new(0xBAD));
    let parts = Parts::random(&mut rng, Q4_K, 3, 512);
    let base = parts.weights();
    let err = |w: SuperBlockWeights<'_>| PackedMatrix::pack_super_blocks(&w).err();
    assert!(err(base).is_none());
    for cols in [0, 32, 320, 768 + 32] {
        let codes = vec![0u8; 3 * cols];
        let w = SuperBlockWeights {
            cols,
            codes: &codes,
            ..base
        };
        let e = err(w);
        assert!(
            matches!(e, Some(KernelError::KNotMultipleOfSuperBlock { cols: c, super_block: 256 }) if c == cols),
            "K = {cols}: {e:?}"
        );
        assert!(e.unwrap().to_string().contains("super-block"));
    }
    for bits in [0, 7, 8] {
        assert!(matches!(
            err(SuperBlockWeights { bits, ..base }),
            Some(KernelError::UnsupportedBits(b)) if b == bits
        ));
    }
    for group in [8, 64, 256] {
        assert!(matches!(
            err(SuperBlockWeights { group, ..base }),
            Some(KernelError::SuperBlockGroup(g)) if g == group
        ));
    }
    // Q4_K's codes are 4 bits: a zero point of 16 or more is no code.
    assert!(err(SuperBlockWeights {
        zero_point: 15,
        ..base
    })
    .is_none());
    for zero_point in [16, 255] {
        assert!(matches!(
            err(SuperBlockWeights { zero_point, ..base }),
            Some(KernelError::UnsupportedForm(_))
        ));
    }
    assert!(matches!(
        err(SuperBlockWeights { dmin: None, ..base }),
        Some(KernelError::MinsWithoutSuperMins)
    ));
    assert!(matches!(
        err(SuperBlockWeights {
            sub_mins: None,
            ..base
        }),
        Some(KernelError::MinsWithoutSuperMins)
    ));
    let short = |what: &str, e: Option<KernelError>| {
        assert!(
            matches!(e, Some(KernelError::LengthMismatch { what: w, .. }) if w == what),
            "{what}: {e:?}"
        )
    };
    short(
        "codes",
        err(SuperBlockWeights {
            codes: &parts.codes[1..],
            ..base
        }),
    );
    short(
        "sub-scales",
        err(SuperBlockWeights {
            sub_scales: &parts.sub_scales[1..],
            ..base
        }),
    );
    let mins = parts.sub_mins.as_deref().unwrap();
    short(
        "sub-mins",
        err(SuperBlockWeights {
            sub_mins: Some(&mins[1..]),
            ..base
        }),
    );
    short(
        "d",
        err(SuperBlockWeights {
            d: &parts.d[1..],
            ..base
        }),
    );
    let dmin = parts.dmin.as_deref().unwrap();
    short(
        "dmin",
        err(SuperBlockWeights {
            dmin: Some(&dmin[..1]),
            ..base
        }),
    );
    for bad in [f16::NAN, f16::INFINITY, f16::NEG_INFINITY] {
        let mut d = parts.d.clone();
        d[4] = bad.to_bits();
        assert!(matches!(
            err(SuperBlockWeights { d: &d, ..base }),
            Some(KernelError::ScaleOutOfRange { index: 4, .. })
        ));
        let mut dm = dmin.to_vec();
        dm[2] = bad.to_bits();
        assert!(matches!(
            err(SuperBlockWeights {
                dmin: Some(&dm),
                ..base
            }),
            Some(KernelError::ScaleOutOfRange { index: 2, .. })
        ));
    }
    let mut codes = parts.codes.clone();
    codes[600] = 16;
    assert!(matches!(
        err(SuperBlockWeights {
            codes: &codes,
            ..base
        }),
        Some(KernelError::CodeOutOfRange {
            code: 16,
            index: 600,
            bits: 4
        })
    ));
    // Group 16 is for super-block weights only.
    let codes = vec![0u8; 64];
    let plain = QuantizedWeights {
        spec: QuantSpec {
            rows: 1,
            cols: 64,
            bits: 4,
            grouping: Grouping::Size(16),
            plane_scales: PlaneScales::Uniform,
        },
        codes: &codes,
        scales: &[1.0; 4],
        offsets: None,
    };
    assert!(matches!(
        PackedMatrix::pack(&plain),
        Err(KernelError::BadGroupSize { group: 16, .. })
    ));
}

/// Groups of 16 with mins keep a sub-scale and its sub-min in one byte: values that do not fit 4
/// bits are an error naming the group, not a silently wrapped weight.
#[test]
fn q2_k_sub_scales_past_4_bits_are_errors() {
    let mut rng = Rng(SplitMix64::new(0x2B));
    let parts = Parts::random(&mut rng, Q2_K, 3, 512);
    let base = parts.weights();
    assert!(PackedMatrix::pack_super_blocks(&base).is_ok());
    let mins = parts.sub_mins.as_deref().unwrap();
    for (index, sc, m) in [(5, 16i8, 0u8), (7, -1, 3), (9, 2, 16)] {
        let (mut scales, mut mins) = (parts.sub_scales.clone(), mins.to_vec());
        (scales[index], mins[index]) = (sc, m);
        let e = PackedMatrix::pack_super_blocks(&SuperBlockWeights {
            sub_scales: &scales,
            sub_mins: Some(&mins),
            ..base
        })
        .err();
        assert!(
            matches!(e, Some(KernelError::SubScaleOutOfRange { index: i, sub_scale, sub_min }) if i == index && sub_scale == sc && sub_min == m),
            "{e:?}"
        );
    }
}
