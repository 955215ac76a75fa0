//! Rotary position embeddings (RoPE), with cos/sin tables precomputed for every position.
//!
//! Pair `i` of a head (`i < rope_dims / 2`) is rotated by `pos · θ^(−2i/rope_dims) / factor_i`,
//! where the factors come from the model's [`RopeScaling`] (all 1 without scaling). Which two
//! elements form pair `i` depends on the source of the weights ([`RopeStyle`]): GGUF llama files
//! rotate adjacent elements `(2i, 2i+1)`, Hugging Face checkpoints and GGUF qwen2 rotate halves
//! `(i, i + rope_dims/2)`. Dimensions past `rope_dims` are left alone.

use crate::error::{Error, Result};

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs `(x[2i], x[2i+1])`: GGUF llama weights (the converter permutes q/k rows).
    Adjacent,
    /// Rotate halves `(x[i], x[i + d/2])`: Hugging Face checkpoints and GGUF qwen2.
    Halves,
}

/// How a model stretches RoPE over a longer context than it was pre-trained on: the frequency of
/// each rotated pair is divided by a factor (see [`Rope`]).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Frequencies `θ^(−2i/d)` as they are.
    None,
    /// Every frequency divided by `factor` (positions divided by `factor`): Hugging Face
    /// `rope_type: linear`, GGUF `rope.scaling.type = linear`.
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1/3.2's per-frequency scaling (Hugging Face `rope_type: llama3`): high frequencies
    /// kept, low ones divided by `factor`, a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original_context_length / low_freq_factor` are divided by `factor`.
        low_freq_factor: f32,
        /// Wavelengths below `original_context_length / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The pre-training context (`original_max_position_embeddings`).
        original_context_length: usize,
    },
    /// The frequency of pair `i` divided by `factors[i]`: GGUF's `rope_freqs.weight` (how
    /// llama.cpp's converter stores Llama 3.1's scaling), times any linear factor.
    Factors(Vec<f32>),
}

impl std::fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RopeScaling::None => write!(f, "none"),
            RopeScaling::Linear { factor } => write!(f, "linear ×{factor}"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context_length,
            } => write!(
                f,
                "llama3 ×{factor} (low {low_freq_factor}, high {high_freq_factor}, original \
                 context {original_context_length})"
            ),
            RopeScaling::Factors(factors) => {
                let (lo, hi) = factors
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                        (lo.min(x), hi.max(x))
                    });
                write!(f, "{} per-pair factors in [{lo}, {hi}]", factors.len())
            }
        }
    }
}

/// Precomputed rotations for positions `0..positions`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    style: RopeStyle,
    head_dim: usize,
    pairs: usize,
    positions: usize,
    /// `[position][pair]`.
    cos: Vec<f32>,
    /// `[position][pair]`.
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for heads of `head_dim` elements of which the first `rope_dims` (even, at most
    /// `head_dim`) are rotated, base frequency `theta`, frequencies scaled as `scaling` says,
    /// positions `0..positions`. Scaling the tables cannot use (a factor that is not a positive
    /// number, per-pair factors of the wrong length) is an [`Error::InvalidOption`].
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        rope_dims: usize,
        theta: f32,
        scaling: &RopeScaling,
        positions: usize,
    ) -> Result<Rope> {
        let rope_dims = rope_dims.min(head_dim) & !1;
        let pairs = rope_dims / 2;
        let factors = frequency_factors(scaling, theta, rope_dims)
            .map_err(|reason| Error::InvalidOption(format!("RoPE scaling: {reason}")))?;
        let too_large = || {
            Error::InvalidOption(format!(
                "RoPE tables for {positions} positions of {pairs} pairs do not fit in memory"
            ))
        };
        let len = positions.checked_mul(pairs).ok_or_else(too_large)?;
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        cos.try_reserve_exact(len).map_err(|_| too_large())?;
        sin.try_reserve_exact(len).map_err(|_| too_large())?;
        // Angles in f64: at position 100k an f32 product loses whole radians of phase.
        let freqs: Vec<f64> = (0..pairs)
            .map(|i| base_frequency(theta, i, rope_dims) / factors[i])
            .collect();
        for pos in 0..positions {
            for &f in &freqs {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Rope {
            style,
            head_dim,
            pairs,
            positions,
            cos,
            sin,
        })
    }

    /// Positions the tables cover.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Rotates every head in `x` (`[heads][head_dim]`) as for position `pos` (`< positions()`).
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.pairs..(pos + 1) * self.pairs];
        let sin = &self.sin[pos * self.pairs..(pos + 1) * self.pairs];
        for head in x.chunks_exact_mut(self.head_dim) {
            match self.style {
                RopeStyle::Adjacent => {
                    let pairs = head[..2 * self.pairs].chunks_exact_mut(2);
                    for ((pair, &c), &s) in pairs.zip(cos).zip(sin) {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * c - b * s;
                        pair[1] = a * s + b * c;
                    }
                }
                RopeStyle::Halves => {
                    let (lo, hi) = head[..2 * self.pairs].split_at_mut(self.pairs);
                    for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * c - x1 * s;
                        *b = x0 * s + x1 * c;
                    }
                }
            }
        }
    }
}

/// The unscaled frequency of pair `i`: `θ^(−2i/rope_dims)`.
fn base_frequency(theta: f32, i: usize, rope_dims: usize) -> f64 {
    (theta as f64).powf(-2.0 * i as f64 / rope_dims as f64)
}

/// What the frequency of each of the `rope_dims / 2` pairs is divided by under `scaling`, or why
/// the scaling cannot be used (a factor that is not a positive number, a list of the wrong
/// length, Llama 3 bands that are empty or reversed).
///
/// Llama 3 scaling (transformers' `_compute_llama3_parameters`, and the `rope_freqs.weight` that
/// llama.cpp's converter writes): with `wavelen = 2π / freq`, pairs with
/// `wavelen < original / high_freq_factor` keep their frequency, pairs with
/// `wavelen > original / low_freq_factor` are divided by `factor`, and the band between
/// interpolates `freq' = (1 − s)·freq/factor + s·freq` with
/// `s = (original / wavelen − low_freq_factor) / (high_freq_factor − low_freq_factor)`.
pub(crate) fn frequency_factors(
    scaling: &RopeScaling,
    theta: f32,
    rope_dims: usize,
) -> std::result::Result<Vec<f64>, String> {
    let pairs = rope_dims / 2;
    let positive = |name: &str, v: f32| match v.is_finite() && v > 0.0 {
        true => Ok(v as f64),
        false => Err(format!("{name} is {v}; it must be a positive number")),
    };
    match scaling {
        RopeScaling::None => Ok(vec![1.0; pairs]),
        RopeScaling::Linear { factor } => Ok(vec![positive("factor", *factor)?; pairs]),
        RopeScaling::Factors(factors) => {
            if factors.len() != pairs {
                return Err(format!(
                    "{} frequency factors for {pairs} rotated pairs",
                    factors.len()
                ));
            }
            factors
                .iter()
                .enumerate()
                .map(|(i, &f)| positive(&format!("factor {i}"), f))
                .collect()
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context_length,
        } => {
            let factor = positive("factor", *factor)?;
            let low = positive("low_freq_factor", *low_freq_factor)?;
            let high = positive("high_freq_factor", *high_freq_factor)?;
            if high <= low {
                return Err(format!(
                    "high_freq_factor {high} must be greater than low_freq_factor {low}"
                ));
            }
            if *original_context_length == 0 {
                return Err("original context length is 0".into());
            }
            let original = *original_context_length as f64;
            let (short, long) = (original / high, original / low);
            Ok((0..pairs)
                .map(|i| {
                    let wavelen = 2.0 * std::f64::consts::PI / base_frequency(theta, i, rope_dims);
                    if wavelen < short {
                        1.0
                    } else if wavelen > long {
                        factor
                    } else {
                        let s = (original / wavelen - low) / (high - low);
                        1.0 / ((1.0 - s) / factor + s)
                    }
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503))
                    % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn position_zero_is_identity() {
        for style in [RopeStyle::Adjacent, RopeStyle::Halves] {
            let rope = Rope::new(style, 16, 16, 10000.0, &RopeScaling::None, 4).unwrap();
            let x = vector(32, 1);
            let mut y = x.clone();
            rope.apply(&mut y, 0);
            assert_eq!(x, y);
            // A later position does change it.
            rope.apply(&mut y, 3);
            assert!(x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3));
        }
    }

    #[test]
    fn dot_products_depend_only_on_relative_position() {
        for style in [RopeStyle::Adjacent, RopeStyle::Halves] {
            let rope = Rope::new(style, 32, 32, 10000.0, &RopeScaling::None, 64).unwrap();
            let (q, k) = (vector(32, 2), vector(32, 3));
            let rotated_dot = |m: usize, n: usize| {
                let (mut qm, mut kn) = (q.clone(), k.clone());
                rope.apply(&mut qm, m);
                rope.apply(&mut kn, n);
                dot(&qm, &kn)
            };
            let base = rotated_dot(7, 3);
            assert!((rotated_dot(40, 36) - base).abs() < 1e-3);
            assert!((rotated_dot(4, 0) - base).abs() < 1e-3);
            assert!((rotated_dot(7, 7) - dot(&q, &k)).abs() < 1e-3);
            // A different offset gives a different product (the test could fail).
            assert!((rotated_dot(9, 3) - base).abs() > 1e-3);
        }
    }

    #[test]
    fn adjacent_and_halves_agree_after_permutation() {
        // Halves pairs (i, i + d/2); adjacent pairs (2i, 2i+1). Interleaving the halves maps one
        // onto the other, which is the permutation llama.cpp's converter applies to q/k rows.
        let (d, rope_dims) = (16, 12);
        let none = RopeScaling::None;
        let adjacent = Rope::new(RopeStyle::Adjacent, d, rope_dims, 500.0, &none, 10).unwrap();
        let halves = Rope::new(RopeStyle::Halves, d, rope_dims, 500.0, &none, 10).unwrap();
        let x = vector(d, 5);
        let half = rope_dims / 2;
        let mut perm: Vec<usize> = (0..half).flat_map(|i| [i, i + half]).collect();
        perm.extend(rope_dims..d);
        let permute = |v: &[f32]| perm.iter().map(|&i| v[i]).collect::<Vec<f32>>();
        for pos in [1, 5, 9] {
            let mut h = x.clone();
            halves.apply(&mut h, pos);
            let mut a = permute(&x);
            adjacent.apply(&mut a, pos);
            for (u, v) in permute(&h).iter().zip(&a) {
                assert!((u - v).abs() < 1e-5, "{u} vs {v}");
            }
            // Unrotated tail stays put.
            assert_eq!(&h[rope_dims..], &x[rope_dims..]);
        }
    }

    /// Llama 3.2's `rope_scaling` (1B/3B: θ 500000, head dim 64).
    const LLAMA32: RopeScaling = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context_length: 8192,
    };

    #[test]
    fn llama3_factors_keep_short_waves_divide_long_ones_and_blend_between() {
        let f = frequency_factors(&LLAMA32, 500000.0, 64).unwrap();
        assert_eq!(f.len(), 32);
        // Wavelength 2π·500000^(i/32) crosses 8192/4 = 2048 after pair 14 and 8192 after pair 17.
        assert!(f[..15].iter().all(|&x| x == 1.0), "{f:?}");
        assert!(f[18..].iter().all(|&x| x == 32.0), "{f:?}");
        let middle = &f[15..18];
        assert!(middle.iter().all(|&x| x > 1.0 && x < 32.0), "{middle:?}");
        assert!(middle.windows(2).all(|w| w[0] < w[1]), "{middle:?}");
        // The same three by hand: s = (8192/wavelen − 1)/(4 − 1), factor = 1/((1 − s)/32 + s).
        for (i, &got) in f.iter().enumerate().take(18).skip(15) {
            let wavelen = 2.0 * std::f64::consts::PI * 500000f64.powf(i as f64 / 32.0);
            let s = (8192.0 / wavelen - 1.0) / 3.0;
            let by_hand = 1.0 / ((1.0 - s) / 32.0 + s);
            assert!(
                (got - by_hand).abs() < 1e-9 * by_hand,
                "pair {i}: {got} vs {by_hand}"
            );
        }
        // And as printed by Python from llama.cpp's converter formula.
        for (i, want) in [
            (15, 1.6513292457638984),
            (16, 3.2922621029408843),
            (17, 9.666728978753293),
        ] {
            assert!((f[i] - want).abs() < 1e-9, "pair {i}: {} vs {want}", f[i]);
        }
    }

    #[test]
    fn scaled_tables_divide_the_frequencies() {
        let (d, positions) = (16, 40);
        let plain = Rope::new(
            RopeStyle::Halves,
            d,
            d,
            10000.0,
            &RopeScaling::None,
            positions,
        )
        .unwrap();
        let linear = RopeScaling::Linear { factor: 2.0 };
        let halved = Rope::new(RopeStyle::Halves, d, d, 10000.0, &linear, positions).unwrap();
        // Linear scaling by 2 at position 2p is the plain rotation at p.
        let x = vector(d, 7);
        for p in [1, 7, 19] {
            let (mut a, mut b) = (x.clone(), x.clone());
            plain.apply(&mut a, p);
            halved.apply(&mut b, 2 * p);
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-5, "position {p}: {u} vs {v}");
            }
        }
        // Per-pair factors: pair i turns at θ^(−2i/d) / factor_i.
        let factors: Vec<f32> = (0..d / 2).map(|i| 1.0 + i as f32).collect();
        let scaling = RopeScaling::Factors(factors.clone());
        let rope = Rope::new(RopeStyle::Halves, d, d, 10000.0, &scaling, positions).unwrap();
        let pos = 33;
        for (i, &f) in factors.iter().enumerate() {
            let angle = pos as f64 * 10000f64.powf(-2.0 * i as f64 / d as f64) / f as f64;
            let mut unit = vec![0.0; d];
            unit[i] = 1.0;
            rope.apply(&mut unit, pos);
            assert!((unit[i] - angle.cos() as f32).abs() < 1e-6, "pair {i}");
            assert!(
                (unit[i + d / 2] - angle.sin() as f32).abs() < 1e-6,
                "pair {i}"
            );
        }
    }

    #[test]
    fn invalid_scaling_is_an_error() {
        let style = RopeStyle::Adjacent;
        let short = RopeScaling::Factors(vec![1.0; 7]);
        let err = Rope::new(style, 16, 16, 10000.0, &short, 4).unwrap_err();
        assert!(
            err.to_string().contains("7 frequency factors for 8"),
            "{err}"
        );
        for bad in [
            RopeScaling::Linear { factor: 0.0 },
            RopeScaling::Factors(vec![f32::NAN; 8]),
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 4.0,
                high_freq_factor: 1.0,
                original_context_length: 8192,
            },
        ] {
            assert!(
                Rope::new(style, 16, 16, 10000.0, &bad, 4).is_err(),
                "{bad:?}"
            );
        }
    }
}
