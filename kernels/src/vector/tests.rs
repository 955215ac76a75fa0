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
            let rows = random(len * count, 70 + count as u64);
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
        // No rows: zero sums.
        let mut sum = vec![f32::NAN; 8];
        weighted_row_sum(&cpu, &mut sum, &[], &[]);
        assert_eq!(sum, vec![0.0; 8]);
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

type DotMatrix = Box<dyn Fn(&[f32], &[f32], usize, &mut [f32])>;
type RowSums = Box<dyn Fn(&mut [f32], &[f32], &[f32], usize)>;

/// The many-query forms to check: each ISA's dispatch, and on x86-64 the AVX2 forms on their own
/// (the dispatch takes the AVX-512 forms where the CPU has AVX-512 F).
fn many_query_forms() -> Vec<(String, DotMatrix, RowSums)> {
    let mut forms: Vec<(String, DotMatrix, RowSums)> = Vec::new();
    for isa in Isa::supported() {
        let (cpu, cpu2) = (
            Cpu::with_isa(isa, 1).unwrap(),
            Cpu::with_isa(isa, 1).unwrap(),
        );
        forms.push((
            format!("{isa:?}"),
            Box::new(move |a, b, len, out| dot_matrix(&cpu, a, b, len, out)),
            Box::new(move |out, w, rows, len| weighted_row_sums(&cpu2, out, w, rows, len)),
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.is_supported() {
        forms.push((
            "AVX2 forms".to_string(),
            // SAFETY: avx2 and fma were detected; the test passes whole rows of `len > 0` values
            // and outputs of the contracts' lengths.
            Box::new(|a, b, len, out| unsafe { avx2::dot_matrix(a, b, len, out) }),
            // SAFETY: as above.
            Box::new(|out, w, rows, len| unsafe { avx2::weighted_row_sums(out, w, rows, len) }),
        ));
    }
    forms
}

#[test]
fn many_query_forms_give_the_scalar_bits_on_every_isa() {
    for (form, dot_matrix, weighted_row_sums) in many_query_forms() {
        // Row lengths with and without a tail past 8 or 16, and past the AVX-512 form's longest;
        // query and key counts around the 2×4 and 8×4 tiles.
        for len in [64, 8, 13, 1, 40, 16, 24, 128, 264] {
            for (queries, keys) in [
                (1, 1),
                (2, 4),
                (3, 7),
                (5, 64),
                (64, 13),
                (4, 0),
                (0, 5),
                (8, 4),
                (9, 3),
                (17, 9),
                (33, 65),
            ] {
                let a = random(queries * len, 5 + (queries * len) as u64);
                let b = random(keys * len, 50 + (keys * len) as u64);
                let mut got = vec![f32::NAN; queries * keys];
                dot_matrix(&a, &b, len, &mut got);
                for i in 0..queries {
                    for j in 0..keys {
                        let want = scalar_pair_dot(&a[i * len..][..len], &b[j * len..][..len]);
                        let exact: f64 = a[i * len..][..len]
                            .iter()
                            .zip(&b[j * len..][..len])
                            .map(|(x, y)| f64::from(*x) * f64::from(*y))
                            .sum();
                        assert!((f64::from(want) - exact).abs() < 1e-5 * len as f64);
                        assert_eq!(
                            got[i * keys + j].to_bits(),
                            want.to_bits(),
                            "{form} dot_matrix len={len} {queries}×{keys} pair ({i}, {j})"
                        );
                    }
                }

                let w = random(queries * keys, 90 + keys as u64);
                let mut sums = vec![f32::NAN; queries * len];
                weighted_row_sums(&mut sums, &w, &b, len);
                for i in 0..queries {
                    let mut want = vec![0.0f32; len];
                    for (&wp, row) in w[i * keys..][..keys].iter().zip(b.chunks_exact(len)) {
                        scalar_axpy(&mut want, wp, row);
                    }
                    let got: Vec<u32> =
                        sums[i * len..][..len].iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(
                        got, want,
                        "{form} weighted_row_sums len={len} {queries}×{keys} row {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn segment_dots_give_the_scalar_pairs_bits_on_every_isa() {
    for isa in Isa::supported() {
        let cpu = Cpu::with_isa(isa, 1).unwrap();
        for len in [1, 7, 8, 9, 16, 32, 33, 64] {
            for segments in [0, 1, 7, 8, 9, 17, 24] {
                let a = random(segments * len, 7 + (segments * len) as u64);
                let b = random(segments * len, 70 + len as u64);
                let mut got = vec![f32::NAN; segments];
                segment_dots(&cpu, &a, &b, len, &mut got);
                for (s, got) in got.iter().enumerate() {
                    let span = s * len..(s + 1) * len;
                    let want = scalar_pair_dot(&a[span.clone()], &b[span.clone()]);
                    let exact: f64 = a[span.clone()]
                        .iter()
                        .zip(&b[span])
                        .map(|(x, y)| f64::from(*x) * f64::from(*y))
                        .sum();
                    assert!((f64::from(want) - exact).abs() < 1e-5 * len as f64);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{isa:?} segment_dots len={len} segments={segments} segment {s}"
                    );
                }
            }
        }
    }
}

#[test]
fn softmax_steps_give_the_scalar_bits_on_every_isa() {
    for isa in Isa::supported() {
        let cpu = Cpu::with_isa(isa, 1).unwrap();
        let sizes = [0, 1, 7, 8, 9, 15, 16, 17, 24, 25, 64, 67, 200];
        // Scores spread over the whole range exp sees, down to far below −87, and close
        // together (sums whose bits depend on the order of the additions).
        for (n, spread) in sizes.iter().flat_map(|&n| [(n, 60.0f32), (n, 2.0)]) {
            let x: Vec<f32> = random(n, 7 + n as u64).iter().map(|v| v * spread).collect();
            let (mut got, mut want) = (x.clone(), x.clone());
            let (m, m_ref) = (
                scale_max(&cpu, &mut got, 1.7),
                scalar_scale_max(&mut want, 1.7),
            );
            assert_eq!(m.to_bits(), m_ref.to_bits(), "{isa:?} scale_max n={n}");
            assert_eq!(got, want, "{isa:?} scale_max n={n}");
            if n > 0 {
                let top = x.iter().map(|v| v * 1.7).fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(m, top);
            }
            let (s, s_ref) = (exp_sum(&cpu, &mut got, m), scalar_exp_sum(&mut want, m));
            assert_eq!(s.to_bits(), s_ref.to_bits(), "{isa:?} exp_sum n={n}");
            let (g, w): (Vec<u32>, Vec<u32>) = (
                got.iter().map(|v| v.to_bits()).collect(),
                want.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(g, w, "{isa:?} exp_sum n={n}");
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2 {
                // The AVX2 form on its own (the dispatch takes AVX-512 where the CPU has it).
                let mut alone = x.iter().map(|v| v * 1.7).collect::<Vec<f32>>();
                // SAFETY: avx2 and fma were detected (`Isa::Avx2` is supported).
                let s = unsafe { avx2::exp_sum(&mut alone, m) };
                assert_eq!(s.to_bits(), s_ref.to_bits(), "AVX2 form exp_sum n={n}");
                let a: Vec<u32> = alone.iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, w, "AVX2 form exp_sum n={n}");
            }
        }
    }
}

#[test]
fn exp_is_within_two_ulps_and_sums_like_a_plain_loop() {
    let mut worst = 0.0f64;
    for i in 0..=200_000 {
        let x = -87.0 * i as f32 / 200_000.0;
        let want = (x as f64).exp();
        let got = exp(x) as f64;
        worst = worst.max((got - want).abs() / want);
    }
    // Two units in the last place of f32 are 2.4e-7 relative.
    assert!(worst < 2.4e-7, "worst relative error {worst}");
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(-1000.0) >= 0.0);
    for isa in Isa::supported() {
        let cpu = Cpu::with_isa(isa, 1).unwrap();
        let mut x: Vec<f32> = (0..37).map(|i| -0.37 * i as f32).collect();
        let plain: f64 = x.iter().map(|&v| ((v - 0.5) as f64).exp()).sum();
        let sum = exp_sum(&cpu, &mut x, 0.5);
        assert!(
            (sum as f64 - plain).abs() < 1e-6 * plain,
            "{isa:?}: {sum} vs {plain}"
        );
        assert!((x[3] as f64 - (-1.61f64).exp()).abs() < 1e-6);
    }
}

#[test]
fn gated_activations_give_the_scalar_bits_on_every_isa_and_follow_f64() {
    // 0.5·g·(1 + tanh(u)) in its sigmoid form, which f64 evaluates without cancellation.
    let gelu = |g: f64| {
        let u = 0.797_884_560_802_865_4 * (g + 0.044715 * g * g * g);
        g / (1.0 + (-2.0 * u).exp())
    };
    let silu = |g: f64| g / (1.0 + (-g).exp());
    for n in [0, 1, 7, 8, 9, 67, 200] {
        // Gates over the whole clamped range of exp and beyond, on both sides of 0, and tiny.
        let mut gate: Vec<f32> = random(n, 5 + n as u64).iter().map(|v| v * 120.0).collect();
        for (i, g) in gate.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
            *g = (i as f32 - 30.0) * 1e-3;
        }
        let up = random(n, 11 + n as u64);
        for is_gelu in [false, true] {
            let mut want = vec![0.0; n];
            if is_gelu {
                scalar_gated_mul::<true>(&mut want, &gate, &up);
            } else {
                scalar_gated_mul::<false>(&mut want, &gate, &up);
            }
            for (i, ((&w, &g), &u)) in want.iter().zip(&gate).zip(&up).enumerate() {
                let exact = if is_gelu {
                    gelu(g as f64)
                } else {
                    silu(g as f64)
                } * u as f64;
                // The exponent's argument z is rounded to f32 (relative 6e-8, so e^z moves by
                // 6e-8·|z| relative), then exp and the division add a few ulps.
                let g64 = g as f64;
                let z = if is_gelu {
                    1.6 * (g64 + 0.044715 * g64.powi(3))
                } else {
                    g64
                };
                assert!(
                    (w as f64 - exact).abs() <= 3e-7 * (1.0 + z.abs()) * exact.abs() + 1e-30,
                    "gelu {is_gelu} n={n} [{i}]: f({g})·{u} = {w}, exact {exact}"
                );
            }
            for isa in Isa::supported() {
                let cpu = Cpu::with_isa(isa, 1).unwrap();
                let mut got = vec![f32::NAN; n];
                if is_gelu {
                    gelu_tanh_mul(&cpu, &mut got, &gate, &up);
                } else {
                    silu_mul(&cpu, &mut got, &gate, &up);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa:?} gelu {is_gelu} n={n}");
            }
        }
    }
}
