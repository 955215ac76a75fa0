//! Rotary position embeddings (RoPE), with cos/sin tables precomputed for every position.
//!
//! Pair `i` of a head (`i < rope_dims / 2`) is rotated by `pos · θ^(−2i/rope_dims)`. Which two
//! elements form pair `i` depends on the source of the weights ([`RopeStyle`]): GGUF llama files
//! rotate adjacent elements `(2i, 2i+1)`, Hugging Face checkpoints and GGUF qwen2 rotate halves
//! `(i, i + rope_dims/2)`. Dimensions past `rope_dims` are left alone.

use crate::config::RopeStyle;

/// Precomputed rotations for positions `0..positions`.
#[derive(Clone, Debug)]
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
    /// `head_dim`) are rotated, base frequency `theta`, positions `0..positions`.
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        rope_dims: usize,
        theta: f32,
        positions: usize,
    ) -> Rope {
        let rope_dims = rope_dims.min(head_dim) & !1;
        let pairs = rope_dims / 2;
        let mut cos = Vec::with_capacity(positions * pairs);
        let mut sin = Vec::with_capacity(positions * pairs);
        // Angles in f64: at position 100k an f32 product loses whole radians of phase.
        let freqs: Vec<f64> = (0..pairs)
            .map(|i| (theta as f64).powf(-2.0 * i as f64 / rope_dims as f64))
            .collect();
        for pos in 0..positions {
            for &f in &freqs {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rope {
            style,
            head_dim,
            pairs,
            positions,
            cos,
            sin,
        }
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
            let rope = Rope::new(style, 16, 16, 10000.0, 4);
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
            let rope = Rope::new(style, 32, 32, 10000.0, 64);
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
        let adjacent = Rope::new(RopeStyle::Adjacent, d, rope_dims, 500.0, 10);
        let halves = Rope::new(RopeStyle::Halves, d, rope_dims, 500.0, 10);
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
}
