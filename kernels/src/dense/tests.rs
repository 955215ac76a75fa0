use super::*;
use crate::int8::tests::TestRng;

fn run(isa: Isa, threads: usize, m: &DenseMatrix, x: &[f32], tokens: usize) -> Vec<f32> {
    let cpu = Cpu::with_isa(isa, threads).unwrap();
    let mut out = vec![f32::NAN; tokens * m.rows()];
    m.matmul(&cpu, x, tokens, &mut out).unwrap();
    out
}

#[test]
fn every_isa_matches_f64_reference() {
    let mut rng = TestRng::new(11);
    for (cols, rows, tokens) in [
        (13, 7, 3),
        (576, 577, 1),
        (1536, 7, 17),
        (11008, 5, 2),
        (32, 1, 8),
        (8, 3, 1),
    ] {
        let m = DenseMatrix::new(rows, cols, rng.gaussians(rows * cols)).unwrap();
        let x = rng.gaussians(cols * tokens);
        for isa in Isa::supported() {
            let got = run(isa, 1, &m, &x, tokens);
            for n in 0..tokens {
                for r in 0..rows {
                    let pairs = m.row(r).iter().zip(&x[n * cols..(n + 1) * cols]);
                    let exact: f64 = pairs
                        .clone()
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    let magnitude: f64 = pairs.map(|(&a, &b)| f64::from(a * b).abs()).sum();
                    let v = f64::from(got[n * rows + r]);
                    assert!(
                        (v - exact).abs() <= 1e-6 * magnitude + 1e-30,
                        "{isa} {rows}x{cols} N={tokens}: {v} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn two_threads_equal_one_thread() {
    let mut rng = TestRng::new(12);
    let (rows, cols, tokens) = (577, 96, 3);
    let m = DenseMatrix::new(rows, cols, rng.gaussians(rows * cols)).unwrap();
    let x = rng.gaussians(cols * tokens);
    for isa in Isa::supported() {
        assert_eq!(
            run(isa, 1, &m, &x, tokens),
            run(isa, 2, &m, &x, tokens),
            "{isa}"
        );
    }
}

#[test]
fn empty_rows_give_zeros() {
    let m = DenseMatrix::new(3, 0, Vec::new()).unwrap();
    for isa in Isa::supported() {
        assert_eq!(run(isa, 1, &m, &[], 2), vec![0.0; 6]);
    }
}

#[test]
fn from_f16_and_shape_errors() {
    let data: Vec<f16> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let m = DenseMatrix::from_f16(2, 3, &data).unwrap();
    assert_eq!(m.row(1), &[4.0, 5.0, 6.0]);
    assert_eq!(m.bytes(), 24);
    assert!(matches!(
        DenseMatrix::new(2, 3, vec![0.0; 5]),
        Err(KernelError::LengthMismatch { .. })
    ));
    let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
    let mut out = [0.0; 2];
    assert!(matches!(
        m.matmul(&cpu, &[1.0; 4], 1, &mut out),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        m.matmul(&cpu, &[1.0; 3], 1, &mut out[..1]),
        Err(KernelError::LengthMismatch { .. })
    ));
    m.matmul(&cpu, &[1.0; 3], 1, &mut out).unwrap();
    assert_eq!(out, [6.0, 15.0]);
}
