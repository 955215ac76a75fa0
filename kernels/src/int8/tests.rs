//! Tests of the int8 kernels, and the seeded random data the crate's tests share.

use super::*;

pub(crate) use crate::rng::SplitMix64 as TestRng;

/// Gaussian activations with a few outliers `factor` times larger, as real hidden states have.
fn outlier_activations(rng: &mut TestRng, n: usize, factor: f32) -> Vec<f32> {
    let mut x = rng.gaussians(n);
    for i in (0..n).step_by(97) {
        x[i] *= factor;
    }
    x
}

/// How the scales of a random test matrix are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ScaleForm {
    /// One f16 scale per block.
    F16,
    /// One f32 scale per block (almost none an f16 value).
    F32,
    /// One f32 scale per 16 elements.
    Halves,
}

const SCALE_FORMS: [ScaleForm; 3] = [ScaleForm::F16, ScaleForm::F32, ScaleForm::Halves];

/// Random codes in [-128, 127] (−128 included on purpose) and positive scales in `form`.
fn random_matrix_with(rng: &mut TestRng, rows: usize, cols: usize, form: ScaleForm) -> Int8Matrix {
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.next_u64() as i8).collect();
    let per_scale = if form == ScaleForm::Halves { 16 } else { BLOCK };
    let scales: Vec<f32> = (0..rows * cols / per_scale)
        .map(|_| {
            let s = 0.001 + rng.uniform() * 0.01;
            if form == ScaleForm::F16 {
                f16::from_f32(s).to_f32()
            } else {
                s
            }
        })
        .collect();
    let m = if form == ScaleForm::Halves {
        Int8Matrix::with_half_block_scales(rows, cols, &codes, &scales).unwrap()
    } else {
        Int8Matrix::new(rows, cols, &codes, &scales).unwrap()
    };
    assert_eq!(m.has_f16_scales(), form == ScaleForm::F16);
    assert_eq!(
        matches!(m.blocks, Blocks::Split(_)),
        form == ScaleForm::Halves
    );
    m
}

/// A random matrix with f16 scales (the GGUF Q8_0 case).
fn random_matrix(rng: &mut TestRng, rows: usize, cols: usize) -> Int8Matrix {
    random_matrix_with(rng, rows, cols, ScaleForm::F16)
}

/// Scales of the two 16-element halves and codes of block `b` of row `r`.
fn block_of(m: &Int8Matrix, r: usize, b: usize) -> ([f32; 2], [i8; BLOCK]) {
    let i = block_index(m.rows, m.cols / BLOCK, r, b);
    with_blocks!(&m.blocks, w => (w[i].d.halves(), w[i].q.codes()))
}

/// Quantizes f32 weights Q8_0-style, as a GGUF file would hold them.
fn quantize_weights(w: &[f32], rows: usize, cols: usize) -> Int8Matrix {
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::new();
    for block in w.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        scales.push(d);
        codes.extend(
            block
                .iter()
                .map(|v| if d > 0.0 { (v / d).round() as i8 } else { 0 }),
        );
    }
    Int8Matrix::new(rows, cols, &codes, &scales).unwrap()
}

fn run(isa: Isa, threads: usize, m: &Int8Matrix, x: &[f32], tokens: usize) -> Vec<f32> {
    let cpu = Cpu::with_isa(isa, threads).unwrap();
    let mut acts = Int8Activations::new(m.cols());
    acts.build(&cpu, x, tokens).unwrap();
    let mut out = vec![f32::NAN; tokens * m.rows()];
    m.matmul(&cpu, &acts, &mut out).unwrap();
    out
}

/// Every kernel this CPU can run, by name, with its products of `m` and the `tokens` vectors of
/// `x`: each supported ISA, and AVX2's `maddubs` lane sums where `vpdpbusd` is its default.
fn every_kernel(m: &Int8Matrix, x: &[f32], tokens: usize) -> Vec<(String, Vec<f32>)> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut runs: Vec<(String, Vec<f32>)> = Isa::supported()
        .into_iter()
        .map(|isa| (isa.to_string(), run(isa, 1, m, x, tokens)))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.is_supported() && crate::isa::has_avx512_vnni() {
        let cpu = Cpu::with_isa(Isa::Avx2, 1).unwrap();
        let mut acts = Int8Activations::new(m.cols());
        acts.build(&cpu, x, tokens).unwrap();
        let mut out = vec![f32::NAN; tokens * m.rows()];
        m.matmul_madd(&cpu, &acts, &mut out);
        runs.push(("avx2 maddubs".into(), out));
    }
    runs
}

/// (K, rows, tokens) covering the awkward sizes without running every combination.
const SHAPES: [(usize, usize, usize); 9] = [
    (32, 1, 1),
    (32, 577, 3),
    (576, 7, 17),
    (576, 577, 1),
    (1536, 7, 2),
    (1536, 1, 8),
    (11008, 7, 3),
    (11008, 1, 1),
    (64, 9, 17),
];

#[test]
fn every_isa_matches_scalar_bit_for_bit() {
    let mut rng = TestRng::new(1);
    for ((cols, rows, tokens), form) in SHAPES.into_iter().flat_map(|s| SCALE_FORMS.map(|f| (s, f)))
    {
        let m = random_matrix_with(&mut rng, rows, cols, form);
        let x = outlier_activations(&mut rng, cols * tokens, 40.0);
        let reference = run(Isa::Scalar, 1, &m, &x, tokens);
        assert!(reference.iter().all(|v| v.is_finite()));
        for (isa, got) in every_kernel(&m, &x, tokens) {
            for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{isa} K={cols} rows={rows} N={tokens} {form:?} scales at {i}: {a} vs \
                     {b}"
                );
            }
        }
    }
}

#[test]
fn two_threads_equal_one_thread() {
    let mut rng = TestRng::new(2);
    for (cols, rows, tokens) in [(576, 577, 3), (1536, 37, 8), (32, 5, 17)] {
        let m = random_matrix(&mut rng, rows, cols);
        let x = rng.gaussians(cols * tokens);
        for isa in Isa::supported() {
            assert_eq!(
                run(isa, 1, &m, &x, tokens),
                run(isa, 2, &m, &x, tokens),
                "{isa}"
            );
        }
    }
}

/// The scalar reference equals the block formula computed independently in f64.
#[test]
fn scalar_follows_the_block_formula() {
    let mut rng = TestRng::new(3);
    let (rows, cols) = (5, 576);
    for form in SCALE_FORMS {
        let m = random_matrix_with(&mut rng, rows, cols, form);
        let x = rng.gaussians(cols);
        let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
        let mut acts = Int8Activations::new(cols);
        acts.build(&cpu, &x, 1).unwrap();
        let mut out = vec![0.0; rows];
        m.matmul(&cpu, &acts, &mut out).unwrap();
        for (r, &got) in out.iter().enumerate() {
            let mut expected = 0.0f64;
            let mut magnitude = 0.0f64;
            for (b, xb) in acts.blocks().iter().enumerate() {
                let (d, q) = block_of(&m, r, b);
                for (h, (q, x)) in q.chunks_exact(16).zip(xb.q.chunks_exact(16)).enumerate() {
                    let dot: i64 = q
                        .iter()
                        .zip(x)
                        .map(|(&a, &b)| i64::from(a) * i64::from(b))
                        .sum();
                    let scale = f64::from(d[h]) * f64::from(xb.d);
                    expected += scale * dot as f64;
                    magnitude += scale * dot.abs() as f64;
                }
            }
            assert!(
                (f64::from(got) - expected).abs() <= 1e-6 * magnitude,
                "row {r} ({form:?} scales): {got} vs {expected}"
            );
        }
    }
}

/// Scales that f16 cannot hold are kept exactly as f32 (36-byte blocks); f16 values keep the
/// 34-byte Q8_0 block.
#[test]
fn scales_are_kept_exactly() {
    // 1 + 2^-12 needs 13 significant bits; 1e6 overflows f16; 2^-20 is an f16 subnormal.
    let scales = [1.0f32 + 1.0 / 4096.0, 1e6, 0.5, 1.0 / 1_048_576.0];
    let codes: Vec<i8> = (0..128).map(|i| (i as i8).wrapping_mul(7)).collect();
    let m = Int8Matrix::new(2, 64, &codes, &scales).unwrap();
    assert!(!m.has_f16_scales());
    assert_eq!(m.bytes(), 4 * 36);
    let mut row = vec![0.0; 64];
    for r in 0..2 {
        m.dequantize_row(r, &mut row).unwrap();
        for (k, &v) in row.iter().enumerate() {
            let expected = scales[2 * r + k / 32] * f32::from(codes[64 * r + k]);
            assert_eq!(v.to_bits(), expected.to_bits(), "row {r} element {k}");
        }
    }
    let half = Int8Matrix::new(2, 64, &codes, &[0.5, 2.0, 1.0 / 1_048_576.0, -3.0]).unwrap();
    assert!(half.has_f16_scales());
    assert_eq!(half.bytes(), 4 * 34);
}

/// Normalized MSE of the int8 result against dequantized weights times the exact f32 input.
fn nmse_against_f32(x: &[f32], tokens: usize, rows: usize, cols: usize, seed: u64) -> f64 {
    let mut rng = TestRng::new(seed);
    let w = rng.gaussians(rows * cols);
    let m = quantize_weights(&w, rows, cols);
    let mut dequant = vec![0.0; rows * cols];
    for (r, row) in dequant.chunks_exact_mut(cols).enumerate() {
        m.dequantize_row(r, row).unwrap();
    }
    let got = run(Isa::best(), 1, &m, x, tokens);
    let (mut err, mut power) = (0.0f64, 0.0f64);
    for n in 0..tokens {
        for r in 0..rows {
            let exact: f64 = dequant[r * cols..(r + 1) * cols]
                .iter()
                .zip(&x[n * cols..(n + 1) * cols])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            err += (f64::from(got[n * rows + r]) - exact).powi(2);
            power += exact * exact;
        }
    }
    err / power
}

#[test]
fn close_to_exact_f32_for_gaussian_and_outlier_inputs() {
    let (rows, cols, tokens) = (64, 1536, 2);
    let mut rng = TestRng::new(4);
    let gaussian = rng.gaussians(cols * tokens);
    // Outliers 10x the typical size; at 20-40x one block's step grows enough that the NMSE
    // reaches about 1.4e-4 (inherent to Q8_0's per-32 absmax scale, llama.cpp's too).
    let outliers = outlier_activations(&mut rng, cols * tokens, 10.0);
    let nmse_g = nmse_against_f32(&gaussian, tokens, rows, cols, 5);
    let nmse_o = nmse_against_f32(&outliers, tokens, rows, cols, 6);
    assert!(nmse_g <= 1e-4, "gaussian nmse {nmse_g}");
    assert!(nmse_o <= 1e-4, "outlier nmse {nmse_o}");
    // A real error exists (the check would catch a kernel that ignored quantization scales).
    assert!(nmse_g > 0.0);
}

#[test]
fn dequantize_row_is_code_times_scale() {
    let codes: Vec<i8> = (0..128).map(|i| (i as i8).wrapping_mul(5)).collect();
    let scales = [0.5f32, 0.25, 2.0, 1.0];
    let m = Int8Matrix::new(2, 64, &codes, &scales).unwrap();
    let mut row = vec![0.0; 64];
    m.dequantize_row(1, &mut row).unwrap();
    for k in 0..64 {
        let scale = scales[2 + k / 32];
        assert_eq!(row[k], f32::from(codes[64 + k]) * scale);
    }
    assert_eq!(m.bytes(), 4 * 34);
}

#[test]
fn half_block_scales_apply_to_their_sixteen_elements() {
    let codes: Vec<i8> = (0..128).map(|i| (i as i8).wrapping_mul(5)).collect();
    let scales = [0.5f32, 0.25, 2.0, 1.0, 3.0, 0.125, 4.0, 4.0];
    let m = Int8Matrix::with_half_block_scales(2, 64, &codes, &scales).unwrap();
    assert!(!m.has_f16_scales());
    assert_eq!(m.bytes(), 4 * 40);
    let mut row = vec![0.0; 64];
    for r in 0..2 {
        m.dequantize_row(r, &mut row).unwrap();
        for k in 0..64 {
            assert_eq!(
                row[k],
                f32::from(codes[64 * r + k]) * scales[4 * r + k / 16]
            );
        }
    }
    // Equal halves everywhere: the one-scale-per-block matrix.
    let equal = [0.5f32, 0.5, 0.25, 0.25, 2.0, 2.0, 1.0, 1.0];
    let m = Int8Matrix::with_half_block_scales(2, 64, &codes, &equal).unwrap();
    assert!(m.has_f16_scales());
    assert!(Int8Matrix::with_half_block_scales(2, 64, &codes, &scales[..7]).is_err());
    let mut bad = scales;
    bad[3] = f32::NAN;
    assert!(Int8Matrix::with_half_block_scales(2, 64, &codes, &bad).is_err());
}

#[test]
fn zero_input_gives_zero_output() {
    let mut rng = TestRng::new(7);
    let m = random_matrix(&mut rng, 9, 64);
    for isa in Isa::supported() {
        assert!(run(isa, 1, &m, &[0.0; 128], 2).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn invalid_inputs_are_errors() {
    let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
    assert!(matches!(
        Int8Matrix::new(1, 48, &[0; 48], &[1.0]),
        Err(KernelError::KNotMultipleOf32(48))
    ));
    assert!(matches!(
        Int8Matrix::new(2, 32, &[0; 32], &[1.0; 2]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        Int8Matrix::new(1, 32, &[0; 32], &[1.0; 2]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        Int8Matrix::new(1, 32, &[0; 32], &[f32::INFINITY]),
        Err(KernelError::ScaleOutOfRange { .. })
    ));
    assert!(matches!(
        Int8Matrix::new(1, 32, &[0; 32], &[f32::NAN]),
        Err(KernelError::ScaleOutOfRange { .. })
    ));

    let mut bad = Int8Activations::new(40);
    assert!(matches!(
        bad.build(&cpu, &[0.0; 40], 1),
        Err(KernelError::KNotMultipleOf32(40))
    ));
    let mut acts = Int8Activations::new(64);
    assert!(matches!(
        acts.build(&cpu, &[0.0; 100], 2),
        Err(KernelError::LengthMismatch { .. })
    ));
    acts.build(&cpu, &[1.0; 128], 2).unwrap();
    assert_eq!(acts.tokens(), 2);

    let m = Int8Matrix::new(3, 32, &[1; 96], &[1.0; 3]).unwrap();
    let mut out = vec![0.0; 6];
    assert!(matches!(
        m.matmul(&cpu, &acts, &mut out),
        Err(KernelError::ShapeMismatch {
            matrix: 32,
            activations: 64
        })
    ));
    let mut acts32 = Int8Activations::new(32);
    acts32.build(&cpu, &[1.0; 64], 2).unwrap();
    assert!(matches!(
        m.matmul(&cpu, &acts32, &mut out[..5]),
        Err(KernelError::LengthMismatch { .. })
    ));
    m.matmul(&cpu, &acts32, &mut out).unwrap();
    assert!(out.iter().all(|&v| (v - 32.0).abs() < 1e-3), "{out:?}");

    let mut row = vec![0.0; 32];
    assert!(matches!(
        m.dequantize_row(3, &mut row),
        Err(KernelError::RowOutOfRange { row: 3, rows: 3 })
    ));
    assert!(matches!(
        m.dequantize_row(0, &mut row[..31]),
        Err(KernelError::LengthMismatch { .. })
    ));
}

#[test]
fn rebuilding_with_fewer_tokens_reuses_buffers() {
    let mut rng = TestRng::new(8);
    let m = random_matrix(&mut rng, 7, 96);
    let cpu = Cpu::with_isa(Isa::best(), 1).unwrap();
    let mut acts = Int8Activations::new(96);
    let x = rng.gaussians(96 * 5);
    acts.build(&cpu, &x, 5).unwrap();
    let mut all = vec![0.0; 5 * 7];
    m.matmul(&cpu, &acts, &mut all).unwrap();
    acts.build(&cpu, &x[96 * 2..96 * 3], 1).unwrap();
    let mut one = vec![0.0; 7];
    m.matmul(&cpu, &acts, &mut one).unwrap();
    assert_eq!(one, all[14..21]);
}

/// Random IQ4 indices `[rows][cols/32][16]` and positive scales, f16 values when `f16_scales`
/// (IQ4_NL) else f32 (IQ4_XS's `d·(ls − 32)`, almost never an f16 value).
fn random_iq4(
    rng: &mut TestRng,
    rows: usize,
    cols: usize,
    f16_scales: bool,
) -> (Vec<u8>, Vec<f32>) {
    let nibbles = (0..rows * cols / 2).map(|_| rng.next_u64() as u8).collect();
    let scales = (0..rows * cols / BLOCK)
        .map(|_| {
            let s = 0.0001 + rng.uniform() * 0.001;
            if f16_scales {
                f16::from_f32(s).to_f32()
            } else {
                s
            }
        })
        .collect();
    (nibbles, scales)
}

/// The int8 codes that IQ4 indices stand for, row-major.
fn iq4_codes(nibbles: &[u8]) -> Vec<i8> {
    nibbles
        .chunks_exact(BLOCK / 2)
        .flat_map(|qs| {
            let lookup = |i: u8| KVALUES_IQ4NL[usize::from(i & 0xF)];
            let low = qs.iter().map(move |&q| lookup(q));
            low.chain(qs.iter().map(move |&q| lookup(q >> 4)))
        })
        .collect()
}

/// Nibble storage computes bit for bit what int8 storage of the looked-up codes computes, on
/// every ISA (against the scalar int8 reference) and thread count, at 4.5 or 5 bits per weight.
#[test]
fn iq4_nibbles_equal_int8_codes_bit_for_bit() {
    let mut rng = TestRng::new(9);
    for (cols, rows) in [(96, 67), (576, 130), (32, 5)] {
        for f16_scales in [true, false] {
            let (nibbles, scales) = random_iq4(&mut rng, rows, cols, f16_scales);
            let codes = iq4_codes(&nibbles);
            let packed = Int8Matrix::from_iq4_nibbles(rows, cols, &nibbles, &scales).unwrap();
            let wide = Int8Matrix::new(rows, cols, &codes, &scales).unwrap();
            assert!(packed.has_nibble_codes() && !wide.has_nibble_codes());
            assert_eq!(packed.has_f16_scales(), f16_scales);
            assert_eq!(wide.has_f16_scales(), f16_scales);
            let block_bytes = if f16_scales { 18 } else { 20 };
            assert_eq!(packed.bytes(), rows * cols / BLOCK * block_bytes);

            let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
            for r in [0, rows / 2, rows - 1] {
                packed.dequantize_row(r, &mut a).unwrap();
                wide.dequantize_row(r, &mut b).unwrap();
                assert_eq!(a, b, "row {r}");
            }

            for tokens in [1, 3, 17, 33] {
                let x = outlier_activations(&mut rng, cols * tokens, 40.0);
                let reference = run(Isa::Scalar, 1, &wide, &x, tokens);
                for isa in Isa::supported() {
                    for threads in 1..=3 {
                        let got = run(isa, threads, &packed, &x, tokens);
                        let same = got
                            .iter()
                            .zip(&reference)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{isa} {threads} threads K={cols} rows={rows} N={tokens} \
                             f16 scales {f16_scales}"
                        );
                    }
                }
                for (kernel, got) in every_kernel(&packed, &x, tokens) {
                    let same = got
                        .iter()
                        .zip(&reference)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kernel} K={cols} rows={rows} N={tokens}");
                }
            }
        }
    }
}

/// Every index reaches its codebook entry, in ggml's nibble order.
#[test]
fn iq4_nibbles_follow_the_ggml_block_layout() {
    // Block byte j = (15 - j) << 4 | j: element j has index j, element j + 16 index 15 - j.
    let nibbles: Vec<u8> = (0..16u8).map(|j| (15 - j) << 4 | j).collect();
    let m = Int8Matrix::from_iq4_nibbles(1, 32, &nibbles, &[0.5]).unwrap();
    let mut row = vec![0.0; 32];
    m.dequantize_row(0, &mut row).unwrap();
    for j in 0..16 {
        assert_eq!(row[j], 0.5 * f32::from(KVALUES_IQ4NL[j]), "element {j}");
        assert_eq!(
            row[j + 16],
            0.5 * f32::from(KVALUES_IQ4NL[15 - j]),
            "element {}",
            j + 16
        );
    }
    assert!(matches!(
        Int8Matrix::from_iq4_nibbles(1, 32, &nibbles[..15], &[0.5]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        Int8Matrix::from_iq4_nibbles(1, 32, &nibbles, &[f32::NAN]),
        Err(KernelError::ScaleOutOfRange { .. })
    ));
    assert!(matches!(
        Int8Matrix::from_iq4_nibbles(1, 16, &nibbles[..8], &[0.5]),
        Err(KernelError::KNotMultipleOf32(16))
    ));
}

/// The largest f32 below 0.5: it rounds to 0 where 0.5 rounds to 1.
const BELOW_HALF: f32 = 0.499_999_97;
/// The largest f32 below 1.5: it rounds to 1 where 1.5 rounds to 2.
const BELOW_ONE_AND_HALF: f32 = 1.499_999_9;

/// 32-value blocks that stress the quantizer: exact ties after scaling (max 127 gives `1/d = 1`,
/// max 254 gives `1/d = 0.5`), values just below a tie, zeros, all-equal blocks, huge and tiny
/// magnitudes (a scale that underflows to 0, one whose inverse overflows to ∞), NaN and ±∞ (with
/// sums ∞ − ∞ in both halves), large values of both signs, and values near ties of random scales.
fn awkward_blocks(rng: &mut TestRng) -> Vec<[f32; BLOCK]> {
    let with = |first: &[f32], rest: &mut dyn FnMut(usize) -> f32| -> [f32; BLOCK] {
        std::array::from_fn(|i| first.get(i).copied().unwrap_or_else(|| rest(i)))
    };
    let ties = [
        127.0,
        0.5,
        -0.5,
        1.5,
        -1.5,
        2.5,
        -2.5,
        126.5,
        -126.5,
        BELOW_HALF,
        -BELOW_HALF,
        BELOW_ONE_AND_HALF,
        -BELOW_ONE_AND_HALF,
        0.500_000_06,
        0.0,
        -0.0,
        1e-30,
        -127.0,
    ];
    let mut blocks = vec![
        with(&ties, &mut |i| i as f32 - 15.5),
        with(&[254.0], &mut |i| (2 * i) as f32 - 33.0),
        [0.0; BLOCK],
        [-0.0; BLOCK],
        [3.7; BLOCK],
        [-0.1; BLOCK],
        with(&[f32::MAX, -f32::MAX, 1e38], &mut |i| i as f32 * 1e36),
        with(&[f32::from_bits(1)], &mut |i| {
            if i % 2 == 0 {
                0.0
            } else {
                -0.0
            }
        }),
        with(&[1e-38, -5e-39, 0.0, -0.0, f32::from_bits(1)], &mut |i| {
            (i as f32 - 16.0) * 1e-40
        }),
        with(&[127.0, f32::NAN, -1.0], &mut |_| rng.gaussian()),
        [f32::NAN; BLOCK],
        with(&[f32::INFINITY, 1.0, -2.0], &mut |_| rng.gaussian()),
        with(&[0.0, f32::NEG_INFINITY, f32::NAN], &mut |_| rng.gaussian()),
    ];
    let mut last = with(&[], &mut |_| rng.gaussian());
    last[BLOCK - 1] = f32::NAN;
    blocks.push(last);
    blocks.push(with(
        &[
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            1.0,
            2.0,
        ],
        &mut |i| match i {
            16 => f32::INFINITY,
            17 => f32::NEG_INFINITY,
            _ => 0.5,
        },
    ));
    // Large values of both signs beside small ones: other summation orders round differently.
    blocks.push(with(&[], &mut |i| {
        let big = ((i * 7919) % 32) as f32 * 1e5;
        0.1 * i as f32 + if (i + i / 8) % 2 == 0 { big } else { -big }
    }));
    for _ in 0..6 {
        // Values (k + ½)·d for a random d: after scaling by 1/d, ties or just off them.
        let d = 1e-3 + rng.uniform();
        let mut block = with(&[127.0 * d], &mut |i| (i as f32 - 16.5) * d);
        block[1] = -127.0 * d;
        blocks.push(block);
    }
    blocks
}

/// Whether `a` and `b` are the same f32 bits, or both NaN (Rust leaves a NaN's sign and payload
/// unspecified, e.g. for ∞ − ∞ or a sum of two NaNs, so only NaN-ness is compared).
fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// The scalar reference's blocks for `x`, one per 32 values.
fn reference_blocks(x: &[f32]) -> Vec<ActBlock> {
    x.chunks_exact(BLOCK)
        .map(|xs| {
            let mut block = ActBlock::default();
            quantize_block(xs, &mut block);
            block
        })
        .collect()
}

/// The reference rounds half away from zero, leaves NaN out of the scale and codes it 0, clamps
/// ±∞ to ±127, and sums its codes.
#[test]
fn reference_quantizer_rounds_half_away_from_zero() {
    let blocks = awkward_blocks(&mut TestRng::new(12));
    let got = reference_blocks(blocks.as_flattened());
    for (block, xs) in got.iter().zip(&blocks) {
        let sum: i32 = block.q.iter().map(|&q| i32::from(q)).sum();
        let sum_lo: i32 = block.q[..BLOCK / 2].iter().map(|&q| i32::from(q)).sum();
        assert_eq!((block.sum, block.sum_lo), (sum, sum_lo));
        assert!(same_bits(block.xsum, block_sum(xs)));
        assert!(same_bits(block.xsum_halves[0], half_sums(xs)[0]));
        assert!(same_bits(block.xsum_halves[1], half_sums(xs)[1]));
    }
    // Small integers sum exactly: 254 + Σ (2i − 33) over i = 1..16, and over i = 16..32.
    assert_eq!((got[1].xsum, got[1].xsum_halves), (223.0, [-1.0, 224.0]));
    // ∞ − ∞ is NaN.
    assert!(got[14].xsum.is_nan() && got[14].xsum_halves.iter().all(|s| s.is_nan()));
    let ties = &got[0];
    assert_eq!(ties.d, 1.0);
    assert_eq!(
        ties.q[..18],
        [127, 1, -1, 2, -2, 3, -3, 127, -127, 0, 0, 1, -1, 1, 0, 0, 0, -127]
    );
    assert_eq!(got[1].d, 2.0);
    assert_eq!(got[1].q[1..5], [-16, -15, -14, -13]);
    assert_eq!(got[1].q[16..19], [-1, 1, 2]);
    for zero in &got[2..4] {
        assert_eq!((zero.q, zero.d, zero.sum), ([0; BLOCK], 0.0, 0));
    }
    assert_eq!((got[4].q, got[5].q), ([127; BLOCK], [-127; BLOCK]));
    assert_eq!(got[6].q[..3], [127, -127, 37]);
    // max 2^-149: the scale underflows to 0, every code is 0.
    assert_eq!((got[7].q, got[7].d), ([0; BLOCK], 0.0));
    // max 1e-38: the scale is subnormal and its inverse ∞, so non-zero values saturate.
    assert!(got[8].d > 0.0 && 1.0 / got[8].d == f32::INFINITY);
    assert_eq!(got[8].q[..5], [127, -127, 0, 0, 127]);
    assert_eq!(got[9].d, 1.0);
    assert_eq!(got[9].q[..3], [127, 0, -1]);
    assert_eq!((got[10].q, got[10].d), ([0; BLOCK], 0.0));
    // An infinite max gives d = ∞ and 1/d = 0: finite values code 0, ∞·0 is NaN and codes 0.
    for inf in &got[11..13] {
        assert_eq!((inf.q, inf.d), ([0; BLOCK], f32::INFINITY));
    }
    assert_eq!(got[13].q[BLOCK - 1], 0);
}

/// Every ISA quantizes activations exactly as the scalar reference (codes, scale, code sums and
/// value sums), on the awkward blocks and random ones with outliers, one block per token
/// (K = 32) and 18.
#[test]
fn every_isa_quantizes_like_scalar_bit_for_bit() {
    let mut rng = TestRng::new(11);
    let awkward = awkward_blocks(&mut rng);
    let mut values = awkward.as_flattened().to_vec();
    values.extend(outlier_activations(&mut rng, 576 * 7, 40.0));
    for (cols, tokens) in [(32, awkward.len()), (32, 1), (576, 1), (576, 8)] {
        let x = &values[..cols * tokens];
        let expected = reference_blocks(x);
        for isa in Isa::supported() {
            for threads in [1, 3] {
                let cpu = Cpu::with_isa(isa, threads).unwrap();
                let mut acts = Int8Activations::new(cols);
                acts.build(&cpu, x, tokens).unwrap();
                assert_eq!(acts.blocks().len(), expected.len());
                for (i, (got, want)) in acts.blocks().iter().zip(&expected).enumerate() {
                    let context = format!(
                        "{isa} K={cols} N={tokens} {threads} threads, block {i} of input {:?}",
                        &x[i * BLOCK..(i + 1) * BLOCK]
                    );
                    assert_eq!(
                        (got.q, got.d.to_bits(), got.sum, got.sum_lo),
                        (want.q, want.d.to_bits(), want.sum, want.sum_lo),
                        "{context}"
                    );
                    let sums = |b: &ActBlock| [b.xsum, b.xsum_halves[0], b.xsum_halves[1]];
                    for (g, w) in sums(got).into_iter().zip(sums(want)) {
                        assert!(
                            same_bits(g, w),
                            "{context}: sums {:?} {:?}",
                            sums(got),
                            sums(want)
                        );
                    }
                }
            }
        }
    }
}
