//! Tests of the ternary kernels: every ISA against the scalar reference bit for bit, all of them
//! against an exact f64 dot of the ternary weights, GEMM against GEMVs, threads against one thread,
//! the tables and the packing themselves, and the errors of bad inputs.

use super::{TernaryMatrix, TernaryTables, TernaryWeights, BLOCK_TRIPLES, DIGITS, PATTERNS};
use crate::rng::SplitMix64;
use crate::{Cpu, Grouping, Isa, KernelError};

const MS: [usize; 5] = [1, 7, 64, 576, 4128];
const KS: [usize; 4] = [32, 576, 2560, 6912];
const NS: [usize; 5] = [1, 2, 3, 8, 17];

/// Random ternary weights with per-row (or one per-tensor) scales.
struct Made {
    rows: usize,
    cols: usize,
    grouping: Grouping,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

impl Made {
    fn new(rng: &mut SplitMix64, rows: usize, cols: usize, grouping: Grouping) -> Made {
        let codes = (0..rows * cols)
            .map(|_| (rng.next_u64() % 3) as u8)
            .collect();
        let count = if grouping == Grouping::PerTensor {
            1
        } else {
            rows
        };
        let scales = (0..count).map(|_| 0.01 + 0.05 * rng.uniform()).collect();
        Made {
            rows,
            cols,
            grouping,
            codes,
            scales,
        }
    }

    fn weights(&self) -> TernaryWeights<'_> {
        TernaryWeights {
            rows: self.rows,
            cols: self.cols,
            grouping: self.grouping,
            codes: &self.codes,
            scales: &self.scales,
        }
    }

    fn pack(&self) -> TernaryMatrix {
        TernaryMatrix::pack(&self.weights()).unwrap()
    }

    fn weight(&self, r: usize, k: usize) -> f32 {
        let s = if self.grouping == Grouping::PerTensor {
            self.scales[0]
        } else {
            self.scales[r]
        };
        s * (f32::from(self.codes[r * self.cols + k]) - 1.0)
    }

    /// `y[n][r]` in f64 from the codes (not from the packed form), and `Σ (w·x)²`, the expected
    /// Σy² of a dot with random signs (a scale for errors that does not vanish with a few y ≈ 0).
    fn reference(&self, x: &[f32], tokens: usize) -> (Vec<f32>, f64) {
        let (rows, cols) = (self.rows, self.cols);
        let mut y = vec![0.0f32; tokens * rows];
        let mut energy = 0.0f64;
        for n in 0..tokens {
            for r in 0..rows {
                let mut dot = 0.0f64;
                for k in 0..cols {
                    let p = f64::from(self.weight(r, k)) * f64::from(x[n * cols + k]);
                    dot += p;
                    energy += p * p;
                }
                y[n * rows + r] = dot as f32;
            }
        }
        (y, energy)
    }
}

fn run(isa: Isa, threads: usize, m: &TernaryMatrix, x: &[f32], tokens: usize) -> Vec<f32> {
    let cpu = Cpu::with_isa(isa, threads).unwrap();
    let mut tables = TernaryTables::new(m.cols());
    tables.build(&cpu, x, tokens).unwrap();
    let mut out = vec![f32::NAN; tokens * m.rows()];
    m.matmul(&cpu, &tables, &mut out).unwrap();
    out
}

/// Gaussian activations with about 1 in 64 values 50× larger.
fn with_outliers(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.gaussian();
            if rng.next_u64().is_multiple_of(64) {
                50.0 * v
            } else {
                v
            }
        })
        .collect()
}

/// Σ(y − ŷ)² / Σŷ².
fn nmse(y: &[f32], exact: &[f32]) -> f64 {
    let err: f64 = y
        .iter()
        .zip(exact)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let norm: f64 = exact.iter().map(|&b| f64::from(b).powi(2)).sum();
    err / norm.max(1e-30)
}

#[test]
fn every_isa_matches_scalar_bit_for_bit_on_every_shape() {
    let mut rng = SplitMix64::new(0x7E57);
    // Every (M, K) pair; N rotates through NS where M·K·N stays small, else 1 (the big GEMVs).
    let mut covered = Vec::new();
    for (i, &rows) in MS.iter().enumerate() {
        for (j, &cols) in KS.iter().enumerate() {
            let n = NS[(i + j) % NS.len()];
            let tokens = if rows * cols * n <= 3_000_000 { n } else { 1 };
            covered.push(tokens);
            let grouping = if (i + j) % 2 == 0 {
                Grouping::PerRow
            } else {
                Grouping::PerTensor
            };
            let made = Made::new(&mut rng, rows, cols, grouping);
            let m = made.pack();
            let x = rng.gaussians(tokens * cols);
            let scalar = run(Isa::Scalar, 1, &m, &x, tokens);
            let (exact, energy) = made.reference(&x, tokens);
            crate::test_util::assert_error_within_energy(
                &scalar,
                &exact,
                energy,
                &format!("M={rows} K={cols} N={tokens}"),
            );
            for isa in Isa::supported() {
                if isa != Isa::Scalar {
                    let fast = run(isa, 1, &m, &x, tokens);
                    assert!(
                        fast == scalar,
                        "{isa} differs from scalar: M={rows} K={cols} N={tokens}"
                    );
                }
            }
        }
    }
    for n in NS {
        assert!(covered.contains(&n), "N = {n} not covered");
    }
}

#[test]
fn accuracy_within_1e4_nmse_gaussian_and_outliers() {
    let mut rng = SplitMix64::new(11);
    for cols in [2560, 6912] {
        let made = Made::new(&mut rng, 64, cols, Grouping::PerRow);
        let m = made.pack();
        for outliers in [false, true] {
            let x = if outliers {
                with_outliers(&mut rng, 4 * cols)
            } else {
                rng.gaussians(4 * cols)
            };
            let (exact, _) = made.reference(&x, 4);
            for isa in [Isa::Scalar, Isa::best()] {
                let e = nmse(&run(isa, 1, &m, &x, 4), &exact);
                println!("ternary K={cols} outliers={outliers} {isa}: nmse {e:.3e}");
                assert!(e <= 1e-4, "{isa} K={cols} outliers={outliers}: nmse {e}");
            }
        }
    }
}

#[test]
fn gemm_equals_separate_gemvs_and_threads_agree() {
    let mut rng = SplitMix64::new(13);
    for (rows, cols, tokens) in [(200, 2560, 17), (130, 576, 40)] {
        let made = Made::new(&mut rng, rows, cols, Grouping::PerRow);
        let m = made.pack();
        let x = rng.gaussians(tokens * cols);
        for isa in Isa::supported() {
            let gemm = run(isa, 1, &m, &x, tokens);
            for n in 0..tokens {
                let gemv = run(isa, 1, &m, &x[n * cols..][..cols], 1);
                assert_eq!(&gemm[n * rows..][..rows], &gemv[..], "{isa} token {n}");
                if n > 0 {
                    // Different tokens must give different outputs (the TL2 batched-path trap).
                    assert_ne!(
                        &gemm[n * rows..][..rows],
                        &gemm[(n - 1) * rows..][..rows],
                        "{isa} tokens {n} and {}",
                        n - 1
                    );
                }
            }
            assert_eq!(run(isa, 2, &m, &x, tokens), gemm, "{isa}: 2 threads, GEMM");
            assert_eq!(
                run(isa, 2, &m, &x[..cols], 1),
                gemm[..rows],
                "{isa}: 2 threads, GEMV"
            );
        }
    }
}

#[test]
fn unit_inputs_read_back_every_weight_exactly() {
    // x = e_k makes every table entry ±127 or 0 with scale |x_k|/127, so y[r] = w[r][k] exactly:
    // this checks every column and row position of the layout, including the padded last chunk.
    let mut rng = SplitMix64::new(19);
    for (rows, cols) in [(70, 32), (3, 96)] {
        let made = Made::new(&mut rng, rows, cols, Grouping::PerRow);
        let m = made.pack();
        for isa in Isa::supported() {
            for k in 0..cols {
                let mut x = vec![0.0f32; cols];
                x[k] = 2.0;
                let y = run(isa, 1, &m, &x, 1);
                for (r, &v) in y.iter().enumerate() {
                    let expected = 2.0 * made.weight(r, k);
                    assert!(
                        (v - expected).abs() <= 1e-6 * expected.abs(),
                        "{isa} M={rows} K={cols} row {r} col {k}: {v} vs {expected}"
                    );
                }
            }
            assert!(run(isa, 1, &m, &vec![0.0; cols], 1)
                .iter()
                .all(|&v| v == 0.0));
        }
    }
}

#[test]
fn dequantize_row_and_bytes_match_the_codes() {
    let mut rng = SplitMix64::new(17);
    for (rows, cols, grouping) in [
        (70, 32, Grouping::PerRow),
        (65, 2560, Grouping::PerTensor),
        (3, 6912, Grouping::Size(6912)),
    ] {
        let made = Made::new(&mut rng, rows, cols, grouping);
        let m = made.pack();
        assert_eq!((m.rows(), m.cols()), (rows, cols));
        let expected_grouping = if grouping == Grouping::PerTensor {
            Grouping::PerTensor
        } else {
            Grouping::PerRow
        };
        assert_eq!(m.grouping(), expected_grouping);
        // 320 bytes per 64 rows × 24 columns (K padded to whole chunks), plus an f32 per row.
        assert_eq!(
            m.bytes(),
            rows.div_ceil(64) * cols.div_ceil(24) * 320 + 4 * rows
        );
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut row).unwrap();
            for (k, &w) in row.iter().enumerate() {
                assert_eq!(w, made.weight(r, k), "row {r} col {k}");
            }
        }
    }
    // Whole tiles of a BitNet shape: 5/3 bits per weight plus the row scales.
    let m = Made::new(&mut rng, 64, 6912, Grouping::PerRow).pack();
    let bpw = m.bits_per_weight();
    assert!((5.0 / 3.0..1.675).contains(&bpw), "{bpw}");
}

#[test]
fn tables_hold_the_pattern_dot_products() {
    // The 14 digit patterns are distinct, canonical (first nonzero digit +1) and number i.
    for (i, d) in DIGITS.iter().enumerate() {
        assert_eq!(
            9 * i32::from(d[0]) + 3 * i32::from(d[1]) + i32::from(d[2]),
            i as i32
        );
        assert!(d.iter().find(|&&v| v != 0).is_none_or(|&v| v == 1), "{d:?}");
    }
    assert_eq!(PATTERNS, 14);

    let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
    let mut x = vec![0.0f32; 64];
    x[..3].copy_from_slice(&[1.0, -2.0, 0.5]);
    x[3..6].copy_from_slice(&[0.25, 0.25, 0.25]);
    x[63] = -7.0; // in the second block (triples 16..), alone in the last, partial triple
    let mut t = TernaryTables::new(64);
    t.build(&cpu, &x, 1).unwrap();
    let v = t.view();
    assert_eq!((v.triples, v.tokens), (24, 1));
    assert_eq!(v.blocks, 24usize.div_ceil(BLOCK_TRIPLES));
    // Block 0's largest |x0|+|x1|+|x2| is 3.5; that of the block of triple 21 is 7; others are 0.
    for (b, &scale) in v.scales.iter().enumerate() {
        let expected = match b {
            0 => 3.5 / 127.0,
            b if b == 21 / BLOCK_TRIPLES => 7.0 / 127.0,
            _ => 0.0,
        };
        assert_eq!(scale, expected, "block {b}");
    }
    for (j, triple) in [[1.0f32, -2.0, 0.5], [0.25, 0.25, 0.25]].iter().enumerate() {
        let table = &v.tables[16 * j..][..16];
        for (i, d) in DIGITS.iter().enumerate() {
            let dot: f32 = triple.iter().zip(d).map(|(&x, &d)| x * f32::from(d)).sum();
            assert_eq!(
                table[i],
                (dot * 127.0 / 3.5).round() as i8,
                "triple {j} entry {i}"
            );
        }
        assert_eq!(&table[14..], &[0, 0]);
    }
    // Element 63 is digit 0 of triple 21 (columns 63, 64, 65; the last two are padding).
    let last = &v.tables[16 * 21..][..16];
    for (i, d) in DIGITS.iter().enumerate() {
        assert_eq!(last[i], -127 * d[0], "entry {i}");
    }
    assert!(v.tables[16 * 22..].iter().all(|&q| q == 0));

    // Rebuilding for fewer tokens reuses the buffers; zero input gives zero tables and scales.
    t.build(&cpu, &vec![1.0; 3 * 64], 3).unwrap();
    let ptr = t.tables.as_ptr();
    t.build(&cpu, &[0.0; 64], 1).unwrap();
    assert_eq!(t.tables.as_ptr(), ptr);
    assert_eq!(t.tokens(), 1);
    assert!(t.tables.iter().all(|&q| q == 0) && t.scales.iter().all(|&s| s == 0.0));

    // Threads build the same tables.
    let mut rng = SplitMix64::new(23);
    let x = rng.gaussians(4 * 6912);
    let mut a = TernaryTables::new(6912);
    let mut b = TernaryTables::new(6912);
    a.build(&cpu, &x, 4).unwrap();
    b.build(&Cpu::with_isa(Isa::Scalar, 2).unwrap(), &x, 4)
        .unwrap();
    assert_eq!(a.tables, b.tables);
    assert_eq!(a.scales, b.scales);
}

#[test]
fn per_tensor_scale_equals_the_same_scale_per_row() {
    let mut rng = SplitMix64::new(29);
    let mut made = Made::new(&mut rng, 100, 576, Grouping::PerTensor);
    let per_tensor = made.pack();
    made.grouping = Grouping::PerRow;
    made.scales = vec![made.scales[0]; 100];
    let per_row = made.pack();
    let x = rng.gaussians(3 * 576);
    for isa in Isa::supported() {
        assert_eq!(
            run(isa, 1, &per_tensor, &x, 3),
            run(isa, 1, &per_row, &x, 3)
        );
    }
}

#[test]
fn invalid_inputs_are_errors() {
    let codes = vec![1u8; 3 * 64];
    let scales = [0.5f32; 3];
    fn w<'a>(
        rows: usize,
        cols: usize,
        grouping: Grouping,
        codes: &'a [u8],
        scales: &'a [f32],
    ) -> TernaryWeights<'a> {
        TernaryWeights {
            rows,
            cols,
            grouping,
            codes,
            scales,
        }
    }
    let pack = |w: TernaryWeights<'_>| TernaryMatrix::pack(&w).err();
    assert!(pack(w(3, 64, Grouping::PerRow, &codes, &scales)).is_none());
    assert!(pack(w(3, 64, Grouping::PerTensor, &codes, &scales[..1])).is_none());
    assert!(matches!(
        pack(w(4, 48, Grouping::PerRow, &codes, &[0.5; 4])),
        Some(KernelError::KNotMultipleOf32(48))
    ));
    assert!(matches!(
        pack(w(3, 64, Grouping::PerRow, &codes[1..], &scales)),
        Some(KernelError::LengthMismatch { got: 191, .. })
    ));
    assert!(matches!(
        pack(w(3, 64, Grouping::PerRow, &codes, &scales[..2])),
        Some(KernelError::LengthMismatch {
            expected: 3,
            got: 2,
            ..
        })
    ));
    assert!(matches!(
        pack(w(3, 64, Grouping::PerTensor, &codes, &scales)),
        Some(KernelError::LengthMismatch {
            expected: 1,
            got: 3,
            ..
        })
    ));
    for g in [32, 128] {
        assert!(matches!(
            pack(w(3, 64, Grouping::Size(g), &codes, &scales)),
            Some(KernelError::TernaryGrouping { group, cols: 64 }) if group == g
        ));
    }
    for bad in [3u8, 255] {
        let mut c = codes.clone();
        c[70] = bad;
        assert!(matches!(
            pack(w(3, 64, Grouping::PerRow, &c, &scales)),
            Some(KernelError::TernaryCodeOutOfRange { code, index: 70 }) if code == bad
        ));
    }
    for v in [f32::NAN, f32::INFINITY] {
        assert!(matches!(
            pack(w(3, 64, Grouping::PerRow, &codes, &[0.5, v, 0.5])),
            Some(KernelError::ScaleOutOfRange { index: 1, .. })
        ));
    }

    let m = TernaryMatrix::pack(&w(3, 64, Grouping::PerRow, &codes, &scales)).unwrap();
    let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
    let mut other = TernaryTables::new(96);
    other.build(&cpu, &[1.0; 96], 1).unwrap();
    let mut out = vec![0.0; 3];
    assert!(matches!(
        m.matmul(&cpu, &other, &mut out),
        Err(KernelError::ShapeMismatch {
            matrix: 64,
            activations: 96
        })
    ));
    let mut tables = TernaryTables::new(64);
    assert!(matches!(
        tables.build(&cpu, &[1.0; 100], 2),
        Err(KernelError::LengthMismatch {
            expected: 128,
            got: 100,
            ..
        })
    ));
    assert!(matches!(
        TernaryTables::new(40).build(&cpu, &[1.0; 40], 1),
        Err(KernelError::KNotMultipleOf32(40))
    ));
    tables.build(&cpu, &[1.0; 128], 2).unwrap();
    assert!(matches!(
        m.matmul(&cpu, &tables, &mut out),
        Err(KernelError::LengthMismatch {
            expected: 6,
            got: 3,
            ..
        })
    ));
    let mut row = vec![0.0; 64];
    assert!(matches!(
        m.dequantize_row(3, &mut row),
        Err(KernelError::RowOutOfRange { row: 3, rows: 3 })
    ));
    assert!(matches!(
        m.dequantize_row(0, &mut row[..63]),
        Err(KernelError::LengthMismatch { .. })
    ));
}
