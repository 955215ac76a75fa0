//! Tests of the dot GEMM: unpacking and multiply of every ISA (and both x86 instruction choices)
//! against the scalar reference bit for bit, the whole matmul against an exact f64 product of the
//! dequantized weights, threads and token blocks against one call, and the forms it refuses.

use super::*;
#[cfg(target_arch = "x86_64")]
use crate::int8::{BlockScale, Blocks, Codes};
use crate::rng::SplitMix64;
use crate::test_util::{bits_of, nmse};
use crate::{
    Cpu, Grouping, Int8Activations, Int8Matrix, KernelError, PackedMatrix, PlaneScales, QuantSpec,
    QuantizedWeights, SuperBlockWeights,
};

fn unit(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

/// Random codes, scales in [0.5, 1.5)/2^bits and offsets around minus half the grid.
fn random_matrix(
    rng: &mut SplitMix64,
    rows: usize,
    cols: usize,
    bits: u8,
    grouping: Grouping,
    offsets: bool,
) -> PackedMatrix {
    random_form(
        rng,
        (rows, cols),
        bits,
        grouping,
        PlaneScales::Uniform,
        offsets,
    )
}

/// [`random_matrix`] with `plane_scales`: per plane `p`, scales `2^p` times a group's scale
/// times [0.7, 1.3) (planes near a uniform grid, and off it).
fn random_form(
    rng: &mut SplitMix64,
    (rows, cols): (usize, usize),
    bits: u8,
    grouping: Grouping,
    plane_scales: PlaneScales,
    offsets: bool,
) -> PackedMatrix {
    let per_row = match grouping {
        Grouping::Size(g) => cols / g,
        Grouping::PerRow => 1,
        Grouping::PerTensor => 0,
    };
    let count = if per_row == 0 { 1 } else { rows * per_row };
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| (rng.next_u64() % (1u64 << bits)) as u8)
        .collect();
    let top = ((1u32 << bits) - 1) as f32;
    let scales: Vec<f32> = (0..count)
        .flat_map(|_| {
            let s = (0.5 + unit(rng)) / top;
            match plane_scales {
                PlaneScales::Uniform => vec![s],
                PlaneScales::PerPlane => (0..bits)
                    .map(|p| s * f32::from(1u8 << p) * (0.7 + 0.6 * unit(rng)))
                    .collect(),
            }
        })
        .collect();
    let offs: Vec<f32> = (0..count).map(|_| -0.5 - 0.1 * unit(rng)).collect();
    let spec = QuantSpec {
        rows,
        cols,
        bits,
        grouping,
        plane_scales,
    };
    PackedMatrix::pack(&QuantizedWeights {
        spec,
        codes: &codes,
        scales: &scales,
        offsets: offsets.then_some(&offs[..]),
    })
    .unwrap()
}

/// Activations with a few large values, like a transformer's.
fn random_acts(rng: &mut SplitMix64, cols: usize, tokens: usize) -> Vec<f32> {
    (0..cols * tokens)
        .map(|i| {
            let v = 2.0 * unit(rng) - 1.0;
            if i % 37 == 5 {
                8.0 * v
            } else {
                v
            }
        })
        .collect()
}

fn quantize(x: &[f32], cols: usize, tokens: usize) -> Int8Activations {
    let mut acts = Int8Activations::new(cols);
    acts.build(&Cpu::with_isa(Isa::Scalar, 1).unwrap(), x, tokens)
        .unwrap();
    acts
}

fn run(cpu: &Cpu, m: &PackedMatrix, acts: &Int8Activations) -> Vec<f32> {
    let mut out = vec![f32::NAN; acts.tokens() * m.rows()];
    m.matmul_dot(cpu, acts, &mut out).unwrap();
    out
}

/// `Σ_k w·x` in f64 over the `rows` dequantized rows of `cols` values (`row(r, w)` writes row
/// `r` into `w`) and the unquantized activations.
fn exact(
    rows: usize,
    cols: usize,
    mut row: impl FnMut(usize, &mut [f32]),
    x: &[f32],
    tokens: usize,
) -> Vec<f64> {
    let mut w = vec![0.0f32; cols];
    let mut out = vec![0.0f64; rows * tokens];
    for r in 0..rows {
        row(r, &mut w);
        for n in 0..tokens {
            out[n * rows + r] = w
                .iter()
                .zip(&x[n * cols..(n + 1) * cols])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
        }
    }
    out
}

/// The scalar reference's `product` (`[tokens][rows]`) is within an nmse of 2e-4 of `exact`,
/// and every ISA, on 1 and 3 threads, gives its bits; `what` names the case.
fn check_every_isa(what: &str, exact: &[f64], mut product: impl FnMut(&Cpu) -> Vec<f32>) {
    let want = product(&Cpu::with_isa(Isa::Scalar, 1).unwrap());
    let error = nmse(&want, exact);
    assert!(error < 2e-4, "{what}: nmse {error}");
    for isa in Isa::supported() {
        for threads in [1, 3] {
            let cpu = Cpu::with_isa(isa, threads).unwrap();
            assert_eq!(
                bits_of(&product(&cpu)),
                bits_of(&want),
                "{isa:?} x{threads}, {what}"
            );
        }
    }
}

/// [`check_every_isa`] for the product of `rows` rows of `cols` weights (`row(r, w)` writes the
/// dequantized row `r`; `product` multiplies on a CPU) with random activations of `tokens` tokens.
fn check_random_product(
    what: &str,
    (rows, cols): (usize, usize),
    row: impl FnMut(usize, &mut [f32]),
    mut product: impl FnMut(&Cpu, &Int8Activations) -> Vec<f32>,
    rng: &mut SplitMix64,
    tokens: usize,
) {
    let x = random_acts(rng, cols, tokens);
    let acts = quantize(&x, cols, tokens);
    let sums = exact(rows, cols, row, &x, tokens);
    check_every_isa(what, &sums, |cpu| product(cpu, &acts));
}

/// [`check_random_product`] for the dot GEMM of the packed matrix `m`.
fn check_packed_product(what: &str, m: &PackedMatrix, rng: &mut SplitMix64, tokens: usize) {
    check_random_product(
        what,
        (m.rows(), m.cols()),
        |r, w| m.dequantize_row(r, w).unwrap(),
        |cpu, acts| run(cpu, m, acts),
        rng,
        tokens,
    );
}

/// Uniform and per-plane (HLQ, one pass per plane) scales of every code width, in weight groups
/// of 32, 64, a row and the tensor, with and without offsets.
#[test]
fn every_isa_gives_the_scalar_bits_and_the_exact_product() {
    let shapes = [(5, 32), (67, 96), (130, 160), (64, 576)];
    let uniform = [
        (1, Grouping::Size(32), false),
        (2, Grouping::Size(64), true),
        (3, Grouping::PerRow, true),
        (4, Grouping::Size(32), true),
        (4, Grouping::PerTensor, false),
        (5, Grouping::Size(32), true),
        (6, Grouping::Size(32), false),
    ];
    let per_plane = [
        (1, Grouping::Size(32), true),
        (2, Grouping::Size(32), true),
        (2, Grouping::Size(64), false),
        (3, Grouping::PerRow, true),
        (4, Grouping::Size(32), true),
        (4, Grouping::PerTensor, false),
        (5, Grouping::Size(32), true),
        (6, Grouping::Size(32), false),
    ];
    let kinds = [
        (PlaneScales::Uniform, &uniform[..], 11),
        (PlaneScales::PerPlane, &per_plane[..], 13),
    ];
    for (planes, forms, seed) in kinds {
        let mut rng = SplitMix64::new(seed);
        for (s, &(rows, cols)) in shapes.iter().enumerate() {
            for (f, &(bits, grouping, offsets)) in forms.iter().enumerate() {
                if let Grouping::Size(g) = grouping {
                    if cols % g != 0 {
                        continue;
                    }
                }
                let m = random_form(&mut rng, (rows, cols), bits, grouping, planes, offsets);
                assert!(m.has_dot_form());
                let tokens = [1, 3, 17, 70][(s + f) % 4];
                check_packed_product(
                    &format!("{rows}x{cols} {bits}-bit {planes:?} {grouping:?}, {tokens} tokens"),
                    &m,
                    &mut rng,
                    tokens,
                );
            }
        }
    }
}

/// Token blocks are of one size and, where the tiles do not share out over the threads, as many
/// as the threads (or a multiple).
#[test]
fn token_blocks_share_a_prompt_evenly() {
    let block = |tiles, tokens, threads| dot_split(tiles, tokens, threads).token_block;
    // One block of every token when the tiles share out, or on one thread.
    assert_eq!(block(10, 128, 2), 128);
    assert_eq!(block(9, 128, 1), 128);
    // Too few tokens to share.
    assert_eq!(block(9, 15, 2), 15);
    // 9 tiles on 2 threads: each thread takes half of the tokens through every tile.
    assert_eq!(block(9, 128, 2), 64);
    assert_eq!(block(9, 129, 2), 65);
    // Past one block of NB tokens, blocks of one size (not NB and the rest).
    assert_eq!(block(10, 300, 2), 150);
    assert_eq!(block(10, 512, 2), 256);
    assert_eq!(block(10, 513, 2), 171);
    // 3 blocks on 2 threads with 9 tiles: 27 units do not share out, so 4 blocks.
    assert_eq!(block(9, 600, 2), 150);
    assert_eq!(block(2, 300, 3), 100);
}

/// Prompts longer than a token block, split into equal blocks shared with the tiles over the
/// threads, give the scalar bits on every ISA and thread count.
#[test]
fn long_prompts_give_the_scalar_bits_on_any_thread_count() {
    let mut rng = SplitMix64::new(29);
    for (rows, tokens) in [(67, 300), (130, 520)] {
        let cols = 96;
        let m = random_matrix(&mut rng, rows, cols, 4, Grouping::Size(32), true);
        check_packed_product(
            &format!("{rows}x{cols} 4-bit, {tokens} tokens"),
            &m,
            &mut rng,
            tokens,
        );
    }
}

/// Codes centred on a zero point (no stored offsets) give, on every ISA, the scalar bits and
/// the exact product of the weights they dequantize to.
#[test]
fn zero_point_codes_give_the_exact_product() {
    for (i, &(bits, z, rows, cols, tokens)) in [
        (4u8, 8u8, 70, 576, 5),
        (5, 16, 130, 160, 17),
        (2, 1, 7, 32, 1),
        (6, 32, 64, 96, 3),
    ]
    .iter()
    .enumerate()
    {
        let (m, _) = crate::test_util::zero_point_pair(100 + i as u64, rows, cols, bits, z);
        check_packed_product(
            &format!("{rows}x{cols} {bits}-bit codes centred on {z}, {tokens} tokens"),
            &m,
            &mut SplitMix64::new(i as u64),
            tokens,
        );
    }
}

/// A random two-level (K-quant-like) matrix: integer sub-scales (signed without mins), f16
/// super-block scales, groups of `group`.
fn random_super(
    rng: &mut SplitMix64,
    rows: usize,
    cols: usize,
    bits: u8,
    zero_point: u8,
    mins: bool,
    group: usize,
) -> PackedMatrix {
    let groups = cols / group;
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| (rng.next_u64() % (1u64 << bits)) as u8)
        .collect();
    // Groups of 16 with mins (Q2_K's form) keep 4-bit sub-scales and sub-mins.
    let top = if mins && group == 16 { 16 } else { 64 };
    let sub_scales: Vec<i8> = (0..rows * groups)
        .map(|_| (rng.next_u64() % (top - 1)) as i8 - if mins { 0 } else { 31 })
        .collect();
    let sub_mins: Vec<u8> = (0..rows * groups)
        .map(|_| (rng.next_u64() % top) as u8)
        .collect();
    let supers = rows * cols / 256;
    let d: Vec<u16> = (0..supers)
        .map(|_| half::f16::from_f32(0.001 + 0.01 * unit(rng)).to_bits())
        .collect();
    let dmin: Vec<u16> = (0..supers)
        .map(|_| half::f16::from_f32(0.002 * unit(rng)).to_bits())
        .collect();
    PackedMatrix::pack_super_blocks(&SuperBlockWeights {
        rows,
        cols,
        bits,
        group,
        zero_point,
        codes: &codes,
        sub_scales: &sub_scales,
        sub_mins: mins.then_some(&sub_mins[..]),
        d: &d,
        dmin: mins.then_some(&dmin[..]),
    })
    .unwrap()
}

/// A 4-bit two-level matrix in groups of 32 whose sub-scales and sub-mins cycle through the ends
/// of their byte ranges (−128 and 127; 255 and 128).
#[cfg(target_arch = "x86_64")]
fn extreme_super(rows: usize, cols: usize) -> PackedMatrix {
    let groups = rows * cols / 32;
    let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 16) as u8).collect();
    let sub_scales: Vec<i8> = (0..groups).map(|g| [-128, 127, -1, 0, 63][g % 5]).collect();
    let sub_mins: Vec<u8> = (0..groups).map(|g| [255, 128, 0, 7][g % 4]).collect();
    let supers = rows * cols / 256;
    let f16s = |v: f32| vec![half::f16::from_f32(v).to_bits(); supers];
    let (d, dmin) = (f16s(0.003), f16s(0.0007));
    PackedMatrix::pack_super_blocks(&SuperBlockWeights {
        rows,
        cols,
        bits: 4,
        group: 32,
        zero_point: 0,
        codes: &codes,
        sub_scales: &sub_scales,
        sub_mins: Some(&sub_mins),
        d: &d,
        dmin: Some(&dmin),
    })
    .unwrap()
}

#[test]
fn two_level_scales_follow_the_dequantized_weights() {
    let mut rng = SplitMix64::new(5);
    let (rows, cols, tokens) = (70, 512, 9);
    // Q4_K-like (mins) and Q5_K-like groups of 32, and a zero-point form without mins; groups of
    // 16 like Q6_K and Q3_K (zero points) and Q2_K (mins).
    for (bits, zero_point, mins, group) in [
        (4u8, 0u8, true, 32),
        (5, 0, true, 32),
        (3, 4, false, 32),
        (6, 32, false, 16),
        (3, 4, false, 16),
        (2, 0, true, 16),
    ] {
        let m = random_super(&mut rng, rows, cols, bits, zero_point, mins, group);
        assert!(m.has_dot_form());
        let x = random_acts(&mut rng, cols, tokens);
        let acts = quantize(&x, cols, tokens);
        let want = run(&Cpu::with_isa(Isa::Scalar, 1).unwrap(), &m, &acts);
        let sums = exact(
            rows,
            cols,
            |r, w| m.dequantize_row(r, w).unwrap(),
            &x,
            tokens,
        );
        let error = nmse(&want, &sums);
        assert!(error < 2e-4, "{bits}-bit two-level g{group}: nmse {error}");
        for isa in Isa::supported() {
            let got = run(&Cpu::with_isa(isa, 2).unwrap(), &m, &acts);
            assert_eq!(
                bits_of(&got),
                bits_of(&want),
                "{isa:?} {bits}-bit two-level g{group}"
            );
        }
    }
}

#[test]
fn simd_unpacking_and_every_x86_multiply_equal_the_scalar_steps() {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.is_supported() {
        let mut rng = SplitMix64::new(3);
        let cols = 256 * 2;
        // Groups of 32 with offsets; at 4 bits also groups of 128 (four activation groups share
        // one group's scales) and groups without offsets.
        let forms = (1..=6u8).map(|bits| (bits, 32, true));
        let uniform =
            forms
                .chain([(4, 128, true), (4, 32, false)])
                .map(|(bits, group, offsets)| {
                    let m = random_matrix(&mut rng, 64, cols, bits, Grouping::Size(group), offsets);
                    (bits, m)
                });
        let mut rng2 = SplitMix64::new(4);
        // Groups of 16 (each activation block in two halves): Q6_K-like and Q2_K-like.
        let halves = [(6u8, 32u8, false), (2, 0, true)]
            .map(|(bits, z, mins)| (bits, random_super(&mut rng2, 64, cols, bits, z, mins, 16)));
        // Two-level groups of 32 with mins (Q4_K-like), and with the widest sub-scales and
        // sub-mins a byte holds (sign and zero extension).
        let q4k = random_super(&mut rng2, 64, cols, 4, 0, true, 32);
        let extremes = extreme_super(64, cols);
        let super32 = [(4, q4k), (4, extremes)];
        let forms = uniform.collect::<Vec<_>>().into_iter().chain(halves);
        for (bits, m) in forms.chain(super32) {
            let w = m.view();
            let tile = w.tile(0);
            let per_row = cols / crate::lut::layout::ACT;
            for tokens in [1, 2, 5, 7, 37, 64] {
                let x = random_acts(&mut rng, cols, tokens);
                let acts = quantize(&x, cols, tokens);
                for a0 in [0, 5, 14] {
                    let count = CHUNK.min(per_row - a0);
                    let (mut want, mut got) = (Unpacked::new(), Unpacked::new());
                    unpack_scalar(&tile, a0, count, &mut want);
                    avx2::unpack_checked(&tile, a0, count, &mut got);
                    assert_eq!(want.codes, got.codes, "{bits}-bit unpack at {a0}");
                    if avx2::has_gfni() {
                        let mut gfni = Unpacked::new();
                        avx2::unpack_gfni_checked(&tile, a0, count, &mut gfni);
                        assert_eq!(want.codes, gfni.codes, "{bits}-bit GFNI unpack at {a0}");
                    }
                    unpack_scales(&tile, a0, count, &mut want);
                    avx2::unpack_scales_checked(&tile, a0, count, &mut got);
                    for (what, w, g) in [
                        ("scales", &want.scale, &got.scale),
                        ("offsets", &want.offset, &got.offset),
                    ] {
                        let (w, g) = (w.as_flattened(), g.as_flattened());
                        assert_eq!(bits_of(w), bits_of(g), "{bits}-bit {what} at {a0}");
                    }
                    assert_eq!(
                        (want.top, want.factor, want.halves),
                        (got.top, got.factor, got.halves)
                    );
                    let chunk = Chunk {
                        x: acts.blocks(),
                        per_row,
                        a0,
                        count,
                    };
                    let mut reference: [[f32; TILE]; NB] = [[0.5; TILE]; NB];
                    multiply_scalar(&want, chunk, &mut reference);
                    let madd: (_, MultiplyFn) = ("maddubs", avx2::multiply_madd_checked);
                    for (choice, multiply) in [madd].into_iter().chain(avx512_multiplies()) {
                        let mut acc: [[f32; TILE]; NB] = [[0.5; TILE]; NB];
                        multiply(&want, chunk, &mut acc);
                        for n in 0..tokens {
                            assert_eq!(
                                bits_of(&acc[n]),
                                bits_of(&reference[n]),
                                "{choice} {bits}-bit, {tokens} tokens, token {n}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_largest_codes_times_the_largest_activations_stay_exact() {
    // Every code at the top of its range (or at 0) times activations of ±127 with the sign of
    // the block: the int16 partial sums of `maddubs` are as large as they get.
    let (rows, cols) = (64, 256);
    for bits in 1..=6u8 {
        for top in [true, false] {
            let code = if top { (1u8 << bits) - 1 } else { 0 };
            let codes = vec![code; rows * cols];
            let scales = vec![1.0; rows * cols / 32];
            let m = PackedMatrix::pack(&QuantizedWeights {
                spec: QuantSpec {
                    rows,
                    cols,
                    bits,
                    grouping: Grouping::Size(32),
                    plane_scales: PlaneScales::Uniform,
                },
                codes: &codes,
                scales: &scales,
                offsets: None,
            })
            .unwrap();
            let tokens = 6;
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| {
                    if (i / 32 + i / cols) % 3 == 0 {
                        -1.0
                    } else {
                        1.0
                    }
                })
                .collect();
            let acts = quantize(&x, cols, tokens);
            let want = run(&Cpu::with_isa(Isa::Scalar, 1).unwrap(), &m, &acts);
            // Each row's weights are all `code`: the product is `code` times the activations' sum.
            for (n, row) in want.chunks_exact(rows).enumerate() {
                let sum: f32 = x[n * cols..(n + 1) * cols].iter().sum();
                let want_row = f32::from(code) * sum;
                assert!(
                    row.iter().all(|&v| (v - want_row).abs() < 1e-3),
                    "{bits} bits: {} against {want_row}",
                    row[0]
                );
            }
            for isa in Isa::supported() {
                let got = run(&Cpu::with_isa(isa, 1).unwrap(), &m, &acts);
                assert_eq!(
                    bits_of(&got),
                    bits_of(&want),
                    "{isa:?}, {bits} bits, top {top}"
                );
            }
        }
    }
}

#[test]
fn many_matrices_in_one_call_equal_one_call_each() {
    let mut rng = SplitMix64::new(9);
    let cols = 128;
    let a = random_matrix(&mut rng, 40, cols, 4, Grouping::Size(32), true);
    let b = random_matrix(&mut rng, 100, cols, 2, Grouping::Size(64), false);
    let x = random_acts(&mut rng, cols, 6);
    let acts = quantize(&x, cols, 6);
    let cpu = Cpu::new(2).unwrap();
    let (mut oa, mut ob) = (vec![0.0; 6 * 40], vec![0.0; 6 * 100]);
    PackedMatrix::matmul_many_dot(&cpu, &acts, &[&a, &b], &mut [&mut oa, &mut ob]).unwrap();
    assert_eq!(bits_of(&oa), bits_of(&run(&cpu, &a, &acts)));
    assert_eq!(bits_of(&ob), bits_of(&run(&cpu, &b, &acts)));
}

#[test]
fn bad_shapes_are_refused() {
    let mut rng = SplitMix64::new(1);
    let cols = 64;
    let acts = quantize(&random_acts(&mut rng, cols, 2), cols, 2);
    let mut out = vec![0.0; 16];
    let m = random_matrix(&mut rng, 8, cols, 4, Grouping::Size(32), true);
    let mut short = vec![0.0; 15];
    assert!(matches!(
        m.matmul_dot(&Cpu::new(1).unwrap(), &acts, &mut short),
        Err(KernelError::LengthMismatch { .. })
    ));
    let wide = quantize(&random_acts(&mut rng, 96, 2), 96, 2);
    assert!(matches!(
        m.matmul_dot(&Cpu::new(1).unwrap(), &wide, &mut out),
        Err(KernelError::ShapeMismatch { .. })
    ));
}

/// Int8 matrices of every block form: int8 codes (all of −128..=127) with f16, f32 and per-half
/// scales, and IQ4 codebook indices with f16 and f32 scales.
fn random_int8_forms(
    rng: &mut SplitMix64,
    rows: usize,
    cols: usize,
) -> Vec<(&'static str, Int8Matrix)> {
    let blocks = rows * cols / 32;
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.next_u64() as i8).collect();
    let nibbles: Vec<u8> = (0..blocks * 16).map(|_| rng.next_u64() as u8).collect();
    let f16_scales: Vec<f32> = (0..blocks)
        .map(|_| half::f16::from_f32(0.01 * (0.5 + unit(rng))).to_f32())
        .collect();
    let f32_scales: Vec<f32> = (0..blocks)
        .map(|_| 0.01 * (0.5 + unit(rng)) + 1e-9)
        .collect();
    let half_scales: Vec<f32> = (0..2 * blocks).map(|_| 0.01 * (0.5 + unit(rng))).collect();
    let forms = vec![
        ("int8 f16", Int8Matrix::new(rows, cols, &codes, &f16_scales)),
        ("int8 f32", Int8Matrix::new(rows, cols, &codes, &f32_scales)),
        (
            "int8 halves",
            Int8Matrix::with_half_block_scales(rows, cols, &codes, &half_scales),
        ),
        (
            "iq4 f16",
            Int8Matrix::from_iq4_nibbles(rows, cols, &nibbles, &f16_scales),
        ),
        (
            "iq4 f32",
            Int8Matrix::from_iq4_nibbles(rows, cols, &nibbles, &f32_scales),
        ),
    ];
    forms
        .into_iter()
        .map(|(name, m)| (name, m.unwrap()))
        .collect()
}

#[test]
fn int8_matrices_on_every_isa_give_the_scalar_bits_and_the_exact_product() {
    let mut rng = SplitMix64::new(21);
    for (s, &(rows, cols)) in [(5, 32), (67, 96), (130, 576), (64, 160)]
        .iter()
        .enumerate()
    {
        for (f, (name, m)) in random_int8_forms(&mut rng, rows, cols)
            .into_iter()
            .enumerate()
        {
            assert_eq!(m.has_f16_scales(), name.ends_with("f16"), "{name}");
            // 300 tokens cross a token block (NB).
            let tokens = [1, 3, 17, 70, 300][(s + f) % 5];
            check_random_product(
                &format!("{name} {rows}x{cols}, {tokens} tokens"),
                (rows, cols),
                |r, w| m.dequantize_row(r, w).unwrap(),
                |cpu, acts| {
                    let mut out = vec![f32::NAN; tokens * rows];
                    m.matmul_dot(cpu, acts.blocks(), &mut out);
                    out
                },
                &mut rng,
                tokens,
            );
        }
    }
}

#[test]
fn int8_prompt_tokens_take_the_dot_gemm_where_the_cpu_has_it_and_the_rest_the_int8_kernel() {
    let mut rng = SplitMix64::new(22);
    let (rows, cols, tokens) = (70, 96, 9);
    let cpu = Cpu::new(2).unwrap();
    for (name, m) in random_int8_forms(&mut rng, rows, cols) {
        let x = random_acts(&mut rng, cols, tokens);
        let acts = quantize(&x, cols, tokens);
        for prompt in [0, 4, tokens, tokens + 3] {
            let mut got = vec![f32::NAN; tokens * rows];
            m.matmul_prompt(&cpu, &acts, prompt, &mut got).unwrap();
            let head = match Int8Matrix::dot_instruction(&cpu) {
                Some(_) => prompt.min(tokens),
                None => 0,
            };
            let mut want = vec![f32::NAN; tokens * rows];
            let (want_head, want_tail) = want.split_at_mut(head * rows);
            m.matmul_dot(&cpu, &acts.blocks()[..head * cols / 32], want_head);
            let tail_acts = quantize(&x[head * cols..], cols, tokens - head);
            m.matmul(&cpu, &tail_acts, want_tail).unwrap();
            assert_eq!(
                bits_of(&got),
                bits_of(&want),
                "{name}, {prompt} prompt tokens"
            );
        }
    }
    let acts = quantize(&random_acts(&mut rng, 64, 2), 64, 2);
    let (_, m) = random_int8_forms(&mut rng, 8, cols).swap_remove(0);
    assert!(matches!(
        m.matmul_prompt(&cpu, &acts, 2, &mut [0.0; 16]),
        Err(KernelError::ShapeMismatch { .. })
    ));
}

/// The AVX2 unpacking of tiles `0..2` of `m` equals the scalar one, offset and signed, and the
/// A multiply of the dot path, as the dispatch holds it.
#[cfg(target_arch = "x86_64")]
type MultiplyFn = fn(&Unpacked, Chunk<'_>, &mut Acc);

/// The 512-bit multiplies this CPU runs on unsigned codes, by instruction: `vpdpbusd` where it has
/// AVX-512 VNNI, and the AMX tiles where it has them and Linux grants them.
#[cfg(target_arch = "x86_64")]
fn avx512_multiplies() -> Vec<(&'static str, MultiplyFn)> {
    let mut multiplies: Vec<(&'static str, MultiplyFn)> = Vec::new();
    if crate::isa::has_avx512_vnni() {
        multiplies.push(("vpdpbusd", avx2::multiply_vnni_checked));
    }
    #[cfg(target_os = "linux")]
    if super::amx::has_amx() {
        multiplies.push(("tdpbssd", super::amx::multiply_amx_checked));
    }
    multiplies
}

/// x86 multiplies of each code form give the scalar reference's bits on `tokens` tokens.
#[cfg(target_arch = "x86_64")]
fn check_int8_unpacking<S: BlockScale, C: Codes>(
    m: &super::int8_tiles::Int8Tiles<'_, S, C>,
    name: &str,
    acts: &Int8Activations,
) {
    let tokens = acts.tokens();
    for signed in [false, true] {
        for t in 0..2 {
            for a0 in [0, 5] {
                let (mut want, mut got) = (Unpacked::new(), Unpacked::new());
                (want.signed, got.signed) = (signed, signed);
                let rows = TILE * t..TILE * (t + 1);
                int8_tiles::unpack_scalar(m, rows.clone(), a0, CHUNK - 1, &mut want);
                avx2::unpack_int8_checked(m, rows, a0, CHUNK - 1, &mut got);
                assert_eq!(want.codes, got.codes, "{name}, tile {t}, groups from {a0}");
            }
            let mut u = Unpacked::new();
            u.signed = signed;
            let choices = match signed {
                true => vec![(
                    "maddubs signed",
                    avx2::multiply_madd_signed_checked as MultiplyFn,
                )],
                false => avx512_multiplies(),
            };
            m.each_chunk(t, m.act_groups, &mut u, |u, a0, count| {
                let chunk = Chunk {
                    x: acts.blocks(),
                    per_row: m.act_groups,
                    a0,
                    count,
                };
                let mut reference: [[f32; TILE]; NB] = [[0.5; TILE]; NB];
                multiply_scalar(u, chunk, &mut reference);
                assert!(reference[..tokens].iter().flatten().any(|&v| v != 0.5));
                for &(choice, multiply) in &choices {
                    let mut acc: [[f32; TILE]; NB] = [[0.5; TILE]; NB];
                    multiply(u, chunk, &mut acc);
                    assert_eq!(
                        bits_of(acc[..tokens].as_flattened()),
                        bits_of(reference[..tokens].as_flattened()),
                        "{name}, {choice}, tile {t}, groups from {a0}"
                    );
                }
            });
        }
    }
}

#[test]
fn simd_int8_unpacking_and_multiplies_equal_the_scalar_steps() {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.is_supported() {
        let mut rng = SplitMix64::new(23);
        // 77 rows: the second tile has one whole group of eight rows, five rows and padding.
        let (rows, cols) = (77, 256);
        // Codes of every value times activations of ±127 and mixed signs: the largest sums.
        // 21 tokens: a whole tile of 16 for AMX and 5 more.
        let mut x = random_acts(&mut rng, cols, 21);
        x[..2 * cols].iter_mut().for_each(|v| *v = v.signum());
        let acts = quantize(&x, cols, 21);
        for (name, m) in random_int8_forms(&mut rng, rows, cols) {
            let act_groups = cols / 32;
            macro_rules! check {
                ($blocks:expr) => {
                    check_int8_unpacking(
                        &super::int8_tiles::Int8Tiles {
                            blocks: $blocks,
                            rows,
                            act_groups,
                            unpack: int8_tiles::unpack_scalar,
                        },
                        name,
                        &acts,
                    )
                };
            }
            match &m.blocks {
                Blocks::Half(b) => check!(b),
                Blocks::Single(b) => check!(b),
                Blocks::Split(b) => check!(b),
                Blocks::NibbleHalf(b) => check!(b),
                Blocks::NibbleSingle(b) => check!(b),
            }
        }
    }
}
