//! Tests of the LUT kernels: every ISA against the scalar reference on the same packed matrix and
//! tables, all of them against an exact f64 dot of the dequantized weights, GEMM against GEMVs,
//! threads against one thread, and the errors of bad inputs.

use crate::rng::SplitMix64;
use crate::{
    ActivationTables, Cpu, Grouping, Isa, KernelError, PackedMatrix, PlaneScales, QuantSpec,
    QuantizedWeights,
};

/// The shared splitmix64 stream with the helpers these tests use.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn gauss(&mut self) -> f32 {
        let u1 = (self.unit() + 1e-7).min(1.0);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    cols: usize,
    bits: u8,
    grouping: Grouping,
    planes: PlaneScales,
    offsets: bool,
    ternary: bool,
}

struct Made {
    codes: Vec<u8>,
    scales: Vec<f32>,
    offsets: Option<Vec<f32>>,
}

impl Made {
    fn weights(&self, case: &Case) -> QuantizedWeights<'_> {
        QuantizedWeights {
            spec: spec(case),
            codes: &self.codes,
            scales: &self.scales,
            offsets: self.offsets.as_deref(),
        }
    }
}

fn spec(case: &Case) -> QuantSpec {
    QuantSpec {
        rows: case.rows,
        cols: case.cols,
        bits: case.bits,
        grouping: case.grouping,
        plane_scales: case.planes,
    }
}

/// Random codes, positive scales, offsets centring the grid (the hard case: no large common term).
fn make(rng: &mut Rng, case: &Case) -> Made {
    let gs = match case.grouping {
        Grouping::Size(g) => g,
        _ => case.cols,
    };
    let count = match case.grouping {
        Grouping::PerTensor => 1,
        _ => case.rows * case.cols / gs,
    };
    let levels = if case.ternary { 3 } else { 1usize << case.bits };
    let codes = (0..case.rows * case.cols)
        .map(|_| rng.below(levels) as u8)
        .collect();
    let bits = usize::from(case.bits);
    let mut scales = Vec::new();
    let mut offsets = Vec::new();
    for _ in 0..count {
        let s = 0.01 + 0.05 * rng.unit();
        match case.planes {
            PlaneScales::Uniform => {
                scales.push(s);
                let centre = if case.ternary {
                    1.0
                } else {
                    ((levels - 1) as f32) / 2.0
                };
                offsets.push(-s * centre * (0.9 + 0.2 * rng.unit()));
            }
            PlaneScales::PerPlane => {
                let mut total = 0.0;
                for p in 0..bits {
                    let sp = s * (1 << p) as f32 * (0.7 + 0.6 * rng.unit());
                    total += sp;
                    scales.push(sp);
                }
                offsets.push(-total / 2.0);
            }
        }
    }
    Made {
        codes,
        scales,
        offsets: case.offsets.then_some(offsets),
    }
}

/// `y[n][r]` from the dequantized rows, in f64.
fn reference(m: &PackedMatrix, x: &[f32], tokens: usize) -> Vec<f32> {
    reference_and_energy(m, x, tokens).0
}

/// The reference and `Σ_n Σ_r Σ_k (w_rk·x_nk)²`, the expected Σŷ² of a dot with random signs: a scale
/// for the error that does not vanish when a few outputs happen to be near zero.
fn reference_and_energy(m: &PackedMatrix, x: &[f32], tokens: usize) -> (Vec<f32>, f64) {
    let (rows, cols) = (m.rows(), m.cols());
    let mut y = vec![0.0f32; tokens * rows];
    let mut energy = 0.0f64;
    let mut w = vec![0.0f32; cols];
    for r in 0..rows {
        m.dequantize_row(r, &mut w).unwrap();
        for n in 0..tokens {
            let xs = &x[n * cols..][..cols];
            let mut dot = 0.0f64;
            for (&a, &b) in w.iter().zip(xs) {
                let p = f64::from(a) * f64::from(b);
                dot += p;
                energy += p * p;
            }
            y[n * rows + r] = dot as f32;
        }
    }
    (y, energy)
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

fn gaussian(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gauss()).collect()
}

/// Gaussian activations with about 1 in 64 values 50× larger.
fn with_outliers(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.gauss();
            if rng.below(64) == 0 {
                50.0 * v
            } else {
                v
            }
        })
        .collect()
}

fn run(isa: Isa, threads: usize, m: &PackedMatrix, x: &[f32], tokens: usize) -> Vec<f32> {
    let cpu = Cpu::with_isa(isa, threads).unwrap();
    let mut tables = ActivationTables::new(m.cols());
    tables.build(&cpu, x, tokens).unwrap();
    let mut out = vec![f32::NAN; tokens * m.rows()];
    m.matmul(&cpu, &tables, &mut out).unwrap();
    out
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * (x.abs() + y.abs()) + 1e-30,
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

const MS: [usize; 5] = [1, 7, 576, 1536, 4096 + 32];
const KS: [usize; 5] = [32, 576, 1536, 4096, 11008];
const NS: [usize; 5] = [1, 2, 3, 8, 17];
const GROUPINGS: [Grouping; 6] = [
    Grouping::Size(32),
    Grouping::Size(64),
    Grouping::Size(128),
    Grouping::Size(256),
    Grouping::PerRow,
    Grouping::PerTensor,
];

fn fits(grouping: Grouping, cols: usize) -> bool {
    match grouping {
        Grouping::Size(g) => cols.is_multiple_of(g),
        _ => true,
    }
}

/// Sampled cases: every value of every axis appears (checked), and the work per case stays small
/// except for a few large single-token shapes.
fn sampled_cases() -> Vec<(Case, usize)> {
    let mut rng = Rng(SplitMix64::new(0x1u64 << 40 | 2026));
    let mut cases = Vec::new();
    for i in 0..48 {
        let grouping = GROUPINGS[i % 6];
        let bits = 1 + (i % 4) as u8;
        let planes = if (i / 12) % 2 == 0 {
            PlaneScales::Uniform
        } else {
            PlaneScales::PerPlane
        };
        let offsets = (i / 24) % 2 == 0;
        let ternary = bits == 2 && planes == PlaneScales::Uniform && i % 3 == 0;
        // Small budget of M·K·N lookups: pick among the shapes that fit it.
        let options: Vec<(usize, usize, usize)> = MS
            .iter()
            .flat_map(|&m| {
                KS.iter()
                    .flat_map(move |&k| NS.iter().map(move |&n| (m, k, n)))
            })
            .filter(|&(m, k, n)| fits(grouping, k) && m * k * n <= 600_000)
            .collect();
        let (rows, cols, tokens) = options[rng.below(options.len())];
        cases.push((
            Case {
                rows,
                cols,
                bits,
                grouping,
                planes,
                offsets,
                ternary,
            },
            tokens,
        ));
    }
    // Large shapes, one token.
    let big = [
        (576, 576, 4, Grouping::Size(32), PlaneScales::Uniform),
        (1536, 576, 1, Grouping::Size(64), PlaneScales::Uniform),
        (576, 1536, 3, Grouping::Size(128), PlaneScales::PerPlane),
        (
            4096 + 32,
            4096,
            2,
            Grouping::Size(128),
            PlaneScales::Uniform,
        ),
        (1536, 11008, 2, Grouping::PerRow, PlaneScales::PerPlane),
    ];
    for (rows, cols, bits, grouping, planes) in big {
        cases.push((
            Case {
                rows,
                cols,
                bits,
                grouping,
                planes,
                offsets: true,
                ternary: false,
            },
            1,
        ));
    }
    for m in MS {
        assert!(
            cases.iter().any(|(c, _)| c.rows == m),
            "M = {m} not covered"
        );
    }
    for k in KS {
        assert!(
            cases.iter().any(|(c, _)| c.cols == k),
            "K = {k} not covered"
        );
    }
    for n in NS {
        assert!(cases.iter().any(|&(_, t)| t == n), "N = {n} not covered");
    }
    cases
}

/// The scalar kernel's product of `m` and `x`, asserted within 1e-3 of the reference's energy.
fn scalar_near_reference(m: &PackedMatrix, x: &[f32], tokens: usize, what: &str) -> Vec<f32> {
    let scalar = run(Isa::Scalar, 1, m, x, tokens);
    let (exact, energy) = reference_and_energy(m, x, tokens);
    crate::test_util::assert_error_within_energy(&scalar, &exact, energy, what);
    scalar
}

#[test]
fn every_isa_matches_scalar_and_the_reference() {
    let mut rng = Rng(SplitMix64::new(7));
    for (case, tokens) in sampled_cases() {
        let made = make(&mut rng, &case);
        let m = PackedMatrix::pack(&made.weights(&case)).unwrap();
        let x = gaussian(&mut rng, tokens * case.cols);
        let scalar = scalar_near_reference(&m, &x, tokens, &format!("{case:?} N={tokens}"));
        for isa in Isa::supported() {
            if isa != Isa::Scalar {
                let fast = run(isa, 1, &m, &x, tokens);
                assert_close(
                    &fast,
                    &scalar,
                    &format!("{isa} vs scalar, {case:?} N={tokens}"),
                );
            }
        }
    }
}

#[test]
fn accuracy_within_1e4_nmse_for_every_bit_width() {
    let mut rng = Rng(SplitMix64::new(11));
    let isa = Isa::best();
    for (bits, ternary) in [(1, false), (2, false), (3, false), (4, false), (2, true)] {
        for planes in [PlaneScales::Uniform, PlaneScales::PerPlane] {
            let case = Case {
                rows: 64,
                cols: 2048,
                bits,
                grouping: Grouping::Size(128),
                planes,
                offsets: true,
                ternary: ternary && planes == PlaneScales::Uniform,
            };
            let made = make(&mut rng, &case);
            let m = PackedMatrix::pack(&made.weights(&case)).unwrap();
            for outliers in [false, true] {
                let x = if outliers {
                    with_outliers(&mut rng, 4 * 2048)
                } else {
                    gaussian(&mut rng, 4 * 2048)
                };
                let exact = reference(&m, &x, 4);
                for isa in [Isa::Scalar, isa] {
                    let e = nmse(&run(isa, 1, &m, &x, 4), &exact);
                    assert!(e <= 1e-4, "{isa} {case:?} outliers={outliers}: nmse {e}");
                }
            }
        }
    }
}

#[test]
fn gemm_equals_separate_gemvs_and_threads_agree() {
    let mut rng = Rng(SplitMix64::new(13));
    let cases = [
        Case {
            rows: 200,
            cols: 1536,
            bits: 2,
            grouping: Grouping::Size(64),
            planes: PlaneScales::Uniform,
            offsets: true,
            ternary: false,
        },
        Case {
            rows: 130,
            cols: 576,
            bits: 3,
            grouping: Grouping::PerRow,
            planes: PlaneScales::PerPlane,
            offsets: false,
            ternary: false,
        },
    ];
    for case in cases {
        let made = make(&mut rng, &case);
        let m = PackedMatrix::pack(&made.weights(&case)).unwrap();
        let tokens = 17;
        let x = gaussian(&mut rng, tokens * case.cols);
        for isa in Isa::supported() {
            let gemm = run(isa, 1, &m, &x, tokens);
            for n in 0..tokens {
                let gemv = run(isa, 1, &m, &x[n * case.cols..][..case.cols], 1);
                assert_eq!(
                    &gemm[n * case.rows..][..case.rows],
                    &gemv[..],
                    "{isa} token {n}"
                );
            }
            assert_eq!(run(isa, 2, &m, &x, tokens), gemm, "{isa}: 2 threads, GEMM");
            assert_eq!(
                run(isa, 2, &m, &x[..case.cols], 1),
                gemm[..case.rows],
                "{isa}: 2 threads, GEMV"
            );
        }
    }
}

#[test]
fn matmul_many_equals_separate_matmuls() {
    let mut rng = Rng(SplitMix64::new(19));
    let cols = 512;
    let case = |rows, bits, grouping| Case {
        rows,
        cols,
        bits,
        grouping,
        planes: PlaneScales::Uniform,
        offsets: true,
        ternary: false,
    };
    // A q/k/v-like set (576, 192, 192 rows: 9 + 3 + 3 tiles), odd row counts, one to five
    // matrices (five is more than one dispatch takes).
    let sets: [&[Case]; 4] = [
        &[
            case(576, 4, Grouping::Size(32)),
            case(192, 4, Grouping::Size(32)),
            case(192, 4, Grouping::Size(32)),
        ],
        &[
            case(7, 2, Grouping::Size(64)),
            case(300, 3, Grouping::Size(128)),
        ],
        &[case(1, 1, Grouping::PerRow)],
        &[
            case(64, 2, Grouping::Size(32)),
            case(65, 4, Grouping::Size(64)),
            case(130, 3, Grouping::PerTensor),
            case(640, 2, Grouping::Size(256)),
            case(9, 1, Grouping::Size(32)),
        ],
    ];
    for set in sets {
        let mats: Vec<PackedMatrix> = set
            .iter()
            .map(|c| PackedMatrix::pack(&make(&mut rng, c).weights(c)).unwrap())
            .collect();
        let refs: Vec<&PackedMatrix> = mats.iter().collect();
        // 40 tokens: three token blocks, cut mid-block between threads.
        for tokens in [1, 3, 17, 40] {
            let x = gaussian(&mut rng, tokens * cols);
            for isa in Isa::supported() {
                let separate: Vec<Vec<f32>> =
                    mats.iter().map(|m| run(isa, 1, m, &x, tokens)).collect();
                for threads in [1, 2, 3] {
                    let cpu = Cpu::with_isa(isa, threads).unwrap();
                    let mut tables = ActivationTables::new(cols);
                    tables.build(&cpu, &x, tokens).unwrap();
                    let mut outs: Vec<Vec<f32>> = mats
                        .iter()
                        .map(|m| vec![f32::NAN; tokens * m.rows()])
                        .collect();
                    let mut slices: Vec<&mut [f32]> =
                        outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    PackedMatrix::matmul_many(&cpu, &tables, &refs, &mut slices).unwrap();
                    assert_eq!(outs, separate, "{isa}, {threads} threads, N={tokens}");
                }
            }
        }
    }
    // Mismatched inputs are errors: a missing output, a wrong length, another K.
    let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
    let c = case(64, 2, Grouping::Size(32));
    let m = PackedMatrix::pack(&make(&mut rng, &c).weights(&c)).unwrap();
    let mut tables = ActivationTables::new(cols);
    tables.build(&cpu, &gaussian(&mut rng, cols), 1).unwrap();
    let mut out = vec![0.0; 64];
    assert!(matches!(
        PackedMatrix::matmul_many(&cpu, &tables, &[&m, &m], &mut [&mut out]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        PackedMatrix::matmul_many(&cpu, &tables, &[&m], &mut [&mut out[..63]]),
        Err(KernelError::LengthMismatch { .. })
    ));
    let mut other = ActivationTables::new(64);
    other.build(&cpu, &gaussian(&mut rng, 64), 1).unwrap();
    assert!(matches!(
        PackedMatrix::matmul_many(&cpu, &other, &[&m], &mut [&mut out]),
        Err(KernelError::ShapeMismatch { .. })
    ));
}

#[test]
fn dequantize_row_matches_the_codes() {
    let mut rng = Rng(SplitMix64::new(17));
    for planes in [PlaneScales::Uniform, PlaneScales::PerPlane] {
        let case = Case {
            rows: 70,
            cols: 256,
            bits: 3,
            grouping: Grouping::Size(64),
            planes,
            offsets: true,
            ternary: false,
        };
        let made = make(&mut rng, &case);
        let m = PackedMatrix::pack(&made.weights(&case)).unwrap();
        assert_eq!(m.rows(), 70);
        assert_eq!(m.cols(), 256);
        assert_eq!(m.spec(), &spec(&case));
        // 2 tiles of 64 rows: 3 planes of 256·64/8 bytes, plus f16 scales (3 planes or 1) and offsets.
        let nps = if planes == PlaneScales::PerPlane {
            3
        } else {
            1
        };
        assert_eq!(m.bytes(), 2 * (3 * 256 * 64 / 8 + 4 * 64 * 2 * (nps + 1)));
        let f = |v: f32| half::f16::from_f32(v).to_f32();
        let mut row = vec![0.0; 256];
        for r in 0..70 {
            m.dequantize_row(r, &mut row).unwrap();
            for (k, &w) in row.iter().enumerate() {
                let g = r * 4 + k / 64;
                let q = made.codes[r * 256 + k];
                let off = f(made.offsets.as_ref().unwrap()[g]);
                let expected = match planes {
                    PlaneScales::Uniform => f(made.scales[g]) * f32::from(q) + off,
                    PlaneScales::PerPlane => {
                        (0..3)
                            .filter(|p| q >> p & 1 == 1)
                            .map(|p| f(made.scales[g * 3 + p]))
                            .sum::<f32>()
                            + off
                    }
                };
                assert!(
                    (w - expected).abs() <= 1e-6 * expected.abs(),
                    "row {r} col {k}: {w} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn per_tensor_scale_and_zero_input() {
    let codes: Vec<u8> = (0..40 * 64).map(|i| (i % 16) as u8).collect();
    let case = Case {
        rows: 40,
        cols: 64,
        bits: 4,
        grouping: Grouping::PerTensor,
        planes: PlaneScales::Uniform,
        offsets: true,
        ternary: false,
    };
    let w = QuantizedWeights {
        spec: spec(&case),
        codes: &codes,
        scales: &[0.25],
        offsets: Some(&[-1.0]),
    };
    let m = PackedMatrix::pack(&w).unwrap();
    for isa in Isa::supported() {
        // x = e_5: y[r] = w[r][5] = 0.25·((64r + 5) mod 16) − 1, exactly representable.
        let mut x = vec![0.0f32; 64];
        x[5] = 1.0;
        let y = run(isa, 1, &m, &x, 1);
        for (r, &v) in y.iter().enumerate() {
            let expected = 0.25 * ((64 * r + 5) % 16) as f32 - 1.0;
            assert!(
                (v - expected).abs() < 1e-2,
                "{isa} row {r}: {v} vs {expected}"
            );
        }
        assert!(run(isa, 1, &m, &[0.0; 64], 1).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn invalid_inputs_are_errors() {
    let base = Case {
        rows: 3,
        cols: 64,
        bits: 2,
        grouping: Grouping::Size(32),
        planes: PlaneScales::Uniform,
        offsets: true,
        ternary: false,
    };
    let codes = vec![1u8; 3 * 64];
    let scales = vec![0.5f32; 6];
    let offsets = vec![0.1f32; 6];
    let pack = |case: Case, codes: &[u8], scales: &[f32], offsets: Option<&[f32]>| {
        PackedMatrix::pack(&QuantizedWeights {
            spec: spec(&case),
            codes,
            scales,
            offsets,
        })
        .err()
    };
    assert!(pack(base, &codes, &scales, Some(&offsets)).is_none());
    let k48 = Case { cols: 48, ..base };
    assert!(matches!(
        pack(k48, &codes[..144], &scales, None),
        Some(KernelError::KNotMultipleOf32(48))
    ));
    for bits in [0, 7, 8] {
        let c = Case { bits, ..base };
        assert!(
            matches!(pack(c, &codes, &scales, None), Some(KernelError::UnsupportedBits(b)) if b == bits)
        );
    }
    for g in [16, 48, 128, 512] {
        let c = Case {
            grouping: Grouping::Size(g),
            ..base
        };
        assert!(
            matches!(
                pack(c, &codes, &scales, None),
                Some(KernelError::BadGroupSize { .. })
            ),
            "group {g}"
        );
    }
    assert!(matches!(
        pack(base, &codes[1..], &scales, None),
        Some(KernelError::LengthMismatch { what: "codes", .. })
    ));
    assert!(matches!(
        pack(base, &codes, &scales[1..], None),
        Some(KernelError::LengthMismatch { what: "scales", .. })
    ));
    assert!(matches!(
        pack(base, &codes, &scales, Some(&offsets[..5])),
        Some(KernelError::LengthMismatch {
            what: "offsets",
            ..
        })
    ));
    let per_plane = Case {
        planes: PlaneScales::PerPlane,
        ..base
    };
    assert!(matches!(
        pack(per_plane, &codes, &scales, None),
        Some(KernelError::LengthMismatch { what: "scales", .. })
    ));
    assert!(pack(per_plane, &codes, &[0.5; 12], None).is_none());
    let mut bad = codes.clone();
    bad[70] = 4;
    assert!(matches!(
        pack(base, &bad, &scales, None),
        Some(KernelError::CodeOutOfRange {
            code: 4,
            index: 70,
            bits: 2
        })
    ));
    for v in [f32::NAN, f32::INFINITY, 1e6] {
        let mut s = scales.clone();
        s[3] = v;
        assert!(matches!(
            pack(base, &codes, &s, None),
            Some(KernelError::ScaleOutOfRange { index: 3, .. })
        ));
    }

    let m = PackedMatrix::pack(&QuantizedWeights {
        spec: spec(&base),
        codes: &codes,
        scales: &scales,
        offsets: None,
    })
    .unwrap();
    let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
    let mut other = ActivationTables::new(96);
    other.build(&cpu, &[1.0; 96], 1).unwrap();
    let mut out = vec![0.0; 3];
    assert!(matches!(
        m.matmul(&cpu, &other, &mut out),
        Err(KernelError::ShapeMismatch {
            matrix: 64,
            activations: 96
        })
    ));
    let mut tables = ActivationTables::new(64);
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

/// Codes centred on a zero point (Q4_0's `d·(q − 8)`, Q5_0's `d·(q − 16)`, a ternary `s·(q − 1)`)
/// hold no offsets: they dequantize to the weights of the form with offsets `−z·s`, take fewer
/// bytes, and every ISA gives the scalar result, which is the exact product within the tables'
/// rounding.
#[test]
fn zero_point_codes_match_their_offset_form() {
    let cases = [
        (4u8, 8u8, 70, 576, 1),
        (4, 8, 7, 32, 3),
        (5, 16, 130, 1536, 2),
        (5, 16, 64, 96, 17),
        (2, 1, 65, 576, 1),
        (6, 32, 9, 64, 3),
    ];
    let mut rng = Rng(SplitMix64::new(19));
    for (i, &(bits, z, rows, cols, tokens)) in cases.iter().enumerate() {
        let what = format!("{bits}-bit codes centred on {z}, {rows}x{cols}, {tokens} tokens");
        let (centred, offset) = crate::test_util::zero_point_pair(i as u64, rows, cols, bits, z);
        assert!(centred.bytes() < offset.bytes(), "{what}");
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in 0..rows {
            centred.dequantize_row(r, &mut a).unwrap();
            offset.dequantize_row(r, &mut b).unwrap();
            assert_eq!(a, b, "{what}: row {r}");
        }
        let x = gaussian(&mut rng, tokens * cols);
        let scalar = scalar_near_reference(&centred, &x, tokens, &what);
        for isa in Isa::supported() {
            for threads in [1, 2] {
                let fast = run(isa, threads, &centred, &x, tokens);
                assert_close(&fast, &scalar, &format!("{isa} x{threads}, {what}"));
            }
        }
    }
}

#[test]
fn halves_combine_takes_the_finest_units_that_fit_int16() {
    use super::HalvesCombine;
    // (bits, 2c) of Q2_K, Q3_K, Q6_K and of 6-bit codes with no zero point.
    let q2_k = HalvesCombine::new(2, 3);
    let q3_k = HalvesCombine::new(3, -1);
    let q6_k = HalvesCombine::new(6, -1);
    let w6 = HalvesCombine::new(6, 63);
    assert_eq!((q2_k.shift, q2_k.fits_int16), (3, true));
    assert_eq!((q3_k.shift, q3_k.fits_int16), (3, true));
    assert_eq!((q6_k.shift, q6_k.fits_int16), (0, true));
    assert_eq!((w6.shift, w6.fits_int16), (0, false));
    // Units of 1/8 table scale: kept at shift 3, rounded (halves up) to whole scales at shift 0.
    assert_eq!(q2_k.units(-4088), -4088);
    for (u, whole) in [
        (4088, 511),
        (-4088, -511),
        (12, 2),
        (11, 1),
        (-12, -1),
        (-13, -2),
    ] {
        assert_eq!(q6_k.units(u), whole, "{u}");
    }
    assert_eq!(q2_k.factors(0.75), (0.75 / 16.0, 0.75 / 8.0));
    assert_eq!(q6_k.factors(0.75), (0.375, 0.75));
}
