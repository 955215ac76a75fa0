use super::*;
use crate::rng::SplitMix64;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
}

#[test]
fn every_isa_gives_the_scalar_bits() {
    for isa in Isa::supported() {
        let cpu = Cpu::with_isa(isa, 1).unwrap();
        for n in [0, 1, 7, 8, 15, 16, 17, 31, 64, 100, 128, 577] {
            let (a, b) = (random(n, 1 + n as u64), random(n, 1000 + n as u64));
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let (got, want) = (dot(&cpu, &a, &b), scalar_dot(&a, &b));
            let tol = 1e-5 * (n as f64).max(1.0);
            assert!(
                (f64::from(got) - exact).abs() < tol,
                "{isa:?} dot n={n}: {got} vs {exact}"
            );
            assert!(
                (got - want).abs() < tol as f32,
                "{isa:?} dot n={n}: {got} vs {want}"
            );

            let (mut y, mut y_ref) = (a.clone(), a.clone());
            axpy(&cpu, &mut y, 0.37, &b);
            scalar_axpy(&mut y_ref, 0.37, &b);
            assert_eq!(y, y_ref, "{isa:?} axpy n={n}");
            if n > 0 {
                assert!((y[n - 1] - (a[n - 1] + 0.37 * b[n - 1])).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn many_row_forms_give_the_bits_of_one_row_at_a_time() {
    for isa in Isa::supported() {
        let cpu = Cpu::with_isa(isa, 1).unwrap();
        for (len, count) in [
            (64, 1),
            (64, 7),
            (64, 129),
            (1, 5),
            (7, 6),
            (20, 9),
            (100, 3),
            (136, 4),
        ] {
            let a = random(len, 3 + len as u64);
            let rows = random(len * count, 70 + count as u64);
            let mut got = vec![f32::NAN; count];
            dot_rows(&cpu, &a, &rows, &mut got);
            for (p, row) in rows.chunks_exact(len).enumerate() {
                assert_eq!(
                    got[p],
                    scalar_dot(&a, row),
                    "{isa:?} dot_rows len={len} row {p}"
                );
            }

            let w = random(count, 9 + count as u64);
            let mut sum = vec![f32::NAN; len];
            weighted_row_sum(&cpu, &mut sum, &w, &rows);
            let mut want = vec![0.0f32; len];
            for (&wp, row) in w.iter().zip(rows.chunks_exact(len)) {
                scalar_axpy(&mut want, wp, row);
            }
            assert_eq!(sum, want, "{isa:?} weighted_row_sum len={len} rows={count}");
            let exact: f64 = w
                .iter()
                .zip(rows.chunks_exact(len))
                .map(|(&wp, row)| f64::from(wp) * f64::from(row[len - 1]))
                .sum();
            assert!((f64::from(sum[len - 1]) - exact).abs() < 1e-5 * count as f64);
        }
        // No rows: zero sums; empty vectors: zero dots.
        let mut sum = vec![f32::NAN; 8];
        weighted_row_sum(&cpu, &mut sum, &[], &[]);
        assert_eq!(sum, vec![0.0; 8]);
        let mut dots = vec![f32::NAN; 3];
        dot_rows(&cpu, &[], &[], &mut dots);
        assert_eq!(dots, vec![0.0; 3]);
    }
}

#[test]
#[should_panic(expected = "different lengths")]
fn mismatched_lengths_are_a_caller_bug() {
    let cpu = Cpu::with_isa(Isa::Scalar, 1).unwrap();
    dot(&cpu, &[1.0, 2.0], &[1.0]);
}

#[test]
fn widening_f16_is_exact_on_every_isa() {
    // Every f16 bit pattern except NaNs (whose payload bits may differ), plus a tail past 8.
    let src: Vec<half::f16> = (0..=u16::MAX)
        .map(half::f16::from_bits)
        .filter(|h| !h.is_nan())
        .chain([half::f16::from_f32(1.5); 5])
        .collect();
    let want: Vec<u32> = src.iter().map(|h| h.to_f32().to_bits()).collect();
    for isa in Isa::supported() {
        let cpu = Cpu::with_isa(isa, 1).unwrap();
        for len in [src.len(), 7, 8, 9, 0] {
            let mut dst = vec![f32::NAN; len];
            widen_f16(&cpu, &src[..len], &mut dst);
            let got: Vec<u32> = dst.iter().map(|v| v.to_bits()).collect();
            assert!(got == want[..len], "{isa:?}, {len} values");
        }
        let mut nan = [0.0f32; 9];
        widen_f16(&cpu, &[half::f16::NAN; 9], &mut nan);
        assert!(nan.iter().all(|v| v.is_nan()), "{isa:?}");
    }
}
