//! Orthogonal rotations of a matrix's input features (incoherence processing, as in QuIP# and
//! QuaRot): a matrix stored as `W·Rᵀ` multiplies the rotated input `R·x` and gives `W·x`. Spread
//! over every feature by the rotation, a few large weights or inputs no longer decide a group's
//! grid, which lowers the error of 2-bit grids.
//!
//! `R = (M ⊗ H_b)·S`: random signs `S` per feature, a Walsh–Hadamard transform `H_b` (normalized,
//! `b` a power of two) within each run of `b` features, and an orthogonal `m × m` matrix `M`
//! (`m = cols / b`) mixing the runs. Applying it costs `cols·(log₂ b + m)` operations per vector,
//! a few percent of a matrix-vector product with the `cols`-wide input.
//!
//! In a GGUF file (written by `lutra quantize`) the rotation of an input that block `N` reads is
//! the f32 tensor `blk.N.{input}_rotation` ([`ROTATION_TENSOR`]): the `cols` signs followed by `M`
//! row-major.

use faer::Mat;
use lutra_kernels::{vector, Cpu, SplitMix64};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Suffix of the GGUF tensor holding a block input's rotation (`blk.N.attn_in_rotation`).
pub const ROTATION_TENSOR: &str = "_rotation";

/// Largest Hadamard run [`InputRotation::random`] uses.
pub const MAX_HADAMARD: usize = 64;

/// Smallest Hadamard run of a rotation: with shorter runs the mix `M` (`m²` values, `m·cols`
/// operations per vector) would approach a dense `cols × cols` matrix.
pub const MIN_HADAMARD: usize = 16;

/// Float types a rotation is applied to (f32 activations; f64 weights and Hessians when
/// quantizing).
pub trait RotationFloat:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
{
    /// The value of an f32.
    fn of(v: f32) -> Self;
    /// Zero.
    fn zero() -> Self;
}

impl RotationFloat for f32 {
    fn of(v: f32) -> f32 {
        v
    }
    fn zero() -> f32 {
        0.0
    }
}

impl RotationFloat for f64 {
    fn of(v: f32) -> f64 {
        f64::from(v)
    }
    fn zero() -> f64 {
        0.0
    }
}

/// `R = (M ⊗ H_b)·S` on vectors of `cols` features (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct InputRotation {
    /// Hadamard run `b`.
    block: usize,
    /// `±1` per feature.
    signs: Vec<f32>,
    /// `M`, `[m][m]` row-major.
    mix: Vec<f32>,
}

impl InputRotation {
    /// A rotation with Hadamard runs of `block` (a power of two, at least [`MIN_HADAMARD`],
    /// dividing `signs.len()`), signs of
    /// ±1 and a mixing matrix `mix` of `m × m` (`m = signs.len() / block`), which must be
    /// orthogonal to within f32 rounding.
    pub fn new(block: usize, signs: Vec<f32>, mix: Vec<f32>) -> Result<InputRotation> {
        let cols = signs.len();
        if block < MIN_HADAMARD
            || !block.is_power_of_two()
            || cols == 0
            || !cols.is_multiple_of(block)
        {
            return Err(Error::InvalidOption(format!(
                "a rotation of {cols} features in Hadamard runs of {block} (a power of two from \
                 {MIN_HADAMARD} dividing the features)"
            )));
        }
        let m = cols / block;
        if mix.len() != m * m {
            return Err(Error::InvalidOption(format!(
                "a rotation of {cols} features in runs of {block} mixes {m} runs with a {m}x{m} \
                 matrix, not {} values",
                mix.len()
            )));
        }
        if let Some(i) = signs.iter().position(|&s| s != 1.0 && s != -1.0) {
            return Err(Error::InvalidOption(format!(
                "rotation sign {i} is {}, not ±1",
                signs[i]
            )));
        }
        // Orthogonality: M·Mᵀ = I, with room for f32 rounding of the stored values.
        for i in 0..m {
            for j in 0..m {
                let dot: f64 = (0..m)
                    .map(|t| f64::from(mix[i * m + t]) * f64::from(mix[j * m + t]))
                    .sum();
                let want = if i == j { 1.0 } else { 0.0 };
                if !dot.is_finite() || (dot - want).abs() > 1e-4 {
                    return Err(Error::InvalidOption(format!(
                        "the {m}x{m} mixing matrix of a rotation is not orthogonal (row {i} · \
                         row {j} = {dot})"
                    )));
                }
            }
        }
        Ok(InputRotation { block, signs, mix })
    }

    /// A random rotation of `cols` features (seeded): Hadamard runs of the largest power of two
    /// up to [`MAX_HADAMARD`] that divides `cols`, random signs, and a random orthogonal mix (the
    /// Q factor of a Gaussian matrix, signs fixed so that it is uniformly distributed). `None`
    /// when no run of at least [`MIN_HADAMARD`] divides `cols`.
    pub fn random(cols: usize, seed: u64) -> Option<InputRotation> {
        let block = (MIN_HADAMARD.trailing_zeros()..=MAX_HADAMARD.trailing_zeros())
            .rev()
            .map(|p| 1usize << p)
            .find(|&b| cols > 0 && cols.is_multiple_of(b))?;
        let m = cols / block;
        let mut rng = SplitMix64::new(seed);
        let signs = (0..cols)
            .map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 })
            .collect();
        let gauss = Mat::<f64>::from_fn(m, m, |_, _| f64::from(rng.gaussian()));
        let qr = gauss.qr();
        let (q, r) = (qr.compute_Q(), qr.R());
        let mix = (0..m * m)
            .map(|i| {
                let (row, col) = (i / m, i % m);
                let sign = if r[(col, col)] < 0.0 { -1.0 } else { 1.0 };
                (q[(row, col)] * sign) as f32
            })
            .collect();
        InputRotation::new(block, signs, mix).ok()
    }

    /// Reads a rotation of `cols` features from its stored values (signs, then the mix).
    pub fn from_values(cols: usize, values: &[f32]) -> Result<InputRotation> {
        let extra = values.len().checked_sub(cols).ok_or_else(|| {
            Error::InvalidOption(format!(
                "{} values cannot hold the {cols} signs of a rotation",
                values.len()
            ))
        })?;
        let m = (extra as f64).sqrt().round() as usize;
        if m == 0 || m * m != extra || !cols.is_multiple_of(m) {
            return Err(Error::InvalidOption(format!(
                "a rotation of {cols} features needs its signs and an m x m mix with m dividing \
                 {cols}; {extra} values follow the signs"
            )));
        }
        InputRotation::new(cols / m, values[..cols].to_vec(), values[cols..].to_vec())
    }

    /// The stored values: the signs, then the mix.
    pub fn values(&self) -> Vec<f32> {
        let mut v = self.signs.clone();
        v.extend_from_slice(&self.mix);
        v
    }

    /// Features.
    pub fn cols(&self) -> usize {
        self.signs.len()
    }

    /// Replaces each row of `rows` (`[n][cols]`) by `R·row`, using `scratch` (at least `cols`
    /// values); plain loops, for weights and Hessians.
    pub fn rotate_rows<T: RotationFloat>(&self, rows: &mut [T], scratch: &mut [T]) -> Result<()> {
        let (b, m) = self.check(rows.len(), scratch.len(), self.cols())?;
        let y = &mut scratch[..self.cols()];
        for row in rows.chunks_exact_mut(self.cols()) {
            y.copy_from_slice(row);
            self.spread(y);
            for (a, out) in row.chunks_exact_mut(b).enumerate() {
                out.fill(T::zero());
                for (c, run) in y.chunks_exact(b).enumerate() {
                    let w = T::of(self.mix[a * m + c]);
                    for (o, &v) in out.iter_mut().zip(run) {
                        *o += w * v;
                    }
                }
            }
        }
        Ok(())
    }

    /// [`InputRotation::rotate_rows`] of activations `[n][cols]`, rows spread over the `cpu`'s
    /// threads and the mix of the runs on its vector unit
    /// ([`lutra_kernels::vector::weighted_row_sums`]); `buffer` holds at least as many values as
    /// `rows`.
    pub fn rotate_activations(
        &self,
        cpu: &Cpu,
        rows: &mut [f32],
        buffer: &mut [f32],
    ) -> Result<()> {
        let (b, _) = self.check(rows.len(), buffer.len(), rows.len())?;
        let cols = self.cols();
        // Rows per hand-over to the threads: a few thousand values each.
        let chunk = (4096 / cols).max(1) * cols;
        let spread = &mut buffer[..rows.len()];
        spread.copy_from_slice(rows);
        cpu.for_each_chunk(spread, chunk, |_, part| {
            part.chunks_exact_mut(cols).for_each(|y| self.spread(y));
        });
        let spread = &*spread;
        cpu.for_each_chunk(rows, chunk, |start, part| {
            for (row, y) in part
                .chunks_exact_mut(cols)
                .zip(spread[start..].chunks_exact(cols))
            {
                vector::weighted_row_sums(cpu, row, &self.mix, y, b);
            }
        });
        Ok(())
    }

    /// `(b, m)` when `len` values are whole rows and `scratch` holds at least `need`.
    fn check(&self, len: usize, scratch: usize, need: usize) -> Result<(usize, usize)> {
        let cols = self.cols();
        if !len.is_multiple_of(cols) || scratch < need {
            return Err(Error::InvalidOption(format!(
                "rotating rows of {cols}: {len} values, {scratch} of scratch"
            )));
        }
        Ok((self.block, cols / self.block))
    }

    /// `y ← (I ⊗ H_b)·S·y`: signs, then the normalized Walsh–Hadamard transform of each run.
    fn spread<T: RotationFloat>(&self, y: &mut [T]) {
        let norm = 1.0 / (self.block as f32).sqrt();
        for (y, &s) in y.iter_mut().zip(&self.signs) {
            *y = *y * T::of(s * norm);
        }
        for run in y.chunks_exact_mut(self.block) {
            walsh_hadamard(run);
        }
    }

    /// `R·A·Rᵀ` of a `[cols][cols]` matrix `a`, in place: a Hessian `Σ x·xᵀ` of the inputs
    /// becomes that of the rotated inputs, and cross sums `Σ y·xᵀ` those of rotated `y` and `x`.
    pub fn conjugate(&self, a: &mut [f64]) -> Result<()> {
        let cols = self.cols();
        if a.len() != cols * cols {
            return Err(Error::InvalidOption(format!(
                "conjugating a matrix of {} values by a rotation of {cols}",
                a.len()
            )));
        }
        // Rows in parallel (on the current rayon pool), a few at a time with their own scratch.
        let rotate = |a: &mut [f64]| {
            a.par_chunks_mut(cols * 8)
                .try_for_each_init(|| vec![0.0f64; cols], |s, rows| self.rotate_rows(rows, s))
        };
        // Rotating the rows of A gives A·Rᵀ; rotating the rows of its transpose R·Aᵀ gives
        // R·Aᵀ·Rᵀ, the transpose of R·A·Rᵀ.
        rotate(a)?;
        transpose_square(a, cols);
        rotate(a)?;
        transpose_square(a, cols);
        Ok(())
    }
}

/// In-place unnormalized Walsh–Hadamard transform of a power-of-two run (each stage as
/// element-wise sums and differences of two halves, which the compiler vectorizes).
fn walsh_hadamard<T: RotationFloat>(v: &mut [T]) {
    let mut h = 1;
    while h < v.len() {
        for pair in v.chunks_exact_mut(2 * h) {
            let (a, b) = pair.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = (*x, *y);
                *x = p + q;
                *y = p - q;
            }
        }
        h *= 2;
    }
}

fn transpose_square(a: &mut [f64], n: usize) {
    for i in 0..n {
        for j in i + 1..n {
            a.swap(i * n + j, j * n + i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `R` as a dense matrix, built from its definition `(M ⊗ H_b)·S`.
    fn dense(r: &InputRotation) -> Vec<f64> {
        let (cols, b) = (r.cols(), r.block);
        let m = cols / b;
        let h = |i: usize, j: usize| {
            let s = if (i & j).count_ones().is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            s / (b as f64).sqrt()
        };
        let mut out = vec![0.0; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                out[i * cols + j] =
                    f64::from(r.mix[(i / b) * m + j / b]) * h(i % b, j % b) * f64::from(r.signs[j]);
            }
        }
        out
    }

    #[test]
    fn rotation_is_its_definition_and_orthogonal() {
        // 576 = 9 runs of 64; 96 = 3 runs of 32; 48 = 3 runs of 16; 64: one run, no mix.
        for (cols, block) in [(576, 64), (96, 32), (48, 16), (64, 64)] {
            let r = InputRotation::random(cols, 42).unwrap();
            assert_eq!((r.cols(), r.block), (cols, block));
            let d = dense(&r);
            let x: Vec<f32> = (0..2 * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut y = x.clone();
            r.rotate_rows(&mut y, &mut vec![0.0; cols]).unwrap();
            for (row_x, row_y) in x.chunks_exact(cols).zip(y.chunks_exact(cols)) {
                for i in 0..cols {
                    let want: f64 = (0..cols)
                        .map(|j| d[i * cols + j] * f64::from(row_x[j]))
                        .sum();
                    assert!((f64::from(row_y[i]) - want).abs() < 1e-3, "{cols}: {i}");
                }
                let (nx, ny): (f32, f32) = (
                    row_x.iter().map(|v| v * v).sum(),
                    row_y.iter().map(|v| v * v).sum(),
                );
                assert!((nx - ny).abs() < 1e-3 * nx, "{cols}: norm {nx} -> {ny}");
            }
        }
    }

    #[test]
    fn activations_rotate_as_rows_do_on_every_isa() {
        let mut isas = vec![lutra_kernels::Isa::Scalar];
        isas.push(Cpu::new(1).unwrap().isa());
        for cols in [576, 1536, 48, 64] {
            let r = InputRotation::random(cols, 5).unwrap();
            // Enough rows for the threads to take several chunks each.
            let n = 40;
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 41 % 103) as f32 - 51.0) / 3.0)
                .collect();
            let mut want = x.clone();
            r.rotate_rows(&mut want, &mut vec![0.0; cols]).unwrap();
            for &isa in &isas {
                let cpu = Cpu::with_isa(isa, 2).unwrap();
                let mut got = x.clone();
                r.rotate_activations(&cpu, &mut got, &mut vec![0.0; n * cols])
                    .unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{isa:?} {cols}: {g} vs {w}"
                    );
                }
            }
            assert!(r
                .rotate_activations(&Cpu::new(1).unwrap(), &mut x.clone(), &mut vec![0.0; cols])
                .is_err());
        }
    }

    #[test]
    fn conjugated_sums_are_those_of_rotated_rows() {
        let (cols, n) = (96, 40);
        let r = InputRotation::random(cols, 7).unwrap();
        let x: Vec<f64> = (0..n * cols)
            .map(|i| ((i * 53 % 97) as f64 - 48.0) / 9.0)
            .collect();
        let y: Vec<f64> = (0..n * cols)
            .map(|i| ((i * 29 % 89) as f64 - 40.0) / 5.0)
            .collect();
        // Σ a·bᵀ over the rows.
        let sums = |a: &[f64], b: &[f64]| {
            let mut h = vec![0.0; cols * cols];
            for (ra, rb) in a.chunks_exact(cols).zip(b.chunks_exact(cols)) {
                for i in 0..cols {
                    for j in 0..cols {
                        h[i * cols + j] += ra[i] * rb[j];
                    }
                }
            }
            h
        };
        let (mut rx, mut ry) = (x.clone(), y.clone());
        r.rotate_rows(&mut rx, &mut vec![0.0; cols]).unwrap();
        r.rotate_rows(&mut ry, &mut vec![0.0; cols]).unwrap();
        // A Hessian (symmetric) and cross sums (not symmetric).
        for (a, b, ra, rb) in [(&x, &x, &rx, &rx), (&y, &x, &ry, &rx)] {
            let mut h = sums(a, b);
            r.conjugate(&mut h).unwrap();
            for (got, want) in h.iter().zip(sums(ra, rb)) {
                assert!(
                    (got - want).abs() < 1e-6 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn stored_values_round_trip_and_bad_ones_are_refused() {
        let r = InputRotation::random(576, 3).unwrap();
        assert_eq!(InputRotation::from_values(576, &r.values()).unwrap(), r);
        let mut v = r.values();
        v[5] = 0.5;
        assert!(
            InputRotation::from_values(576, &v).is_err(),
            "a sign of 0.5"
        );
        let mut v = r.values();
        v[576] += 0.1;
        assert!(
            InputRotation::from_values(576, &v).is_err(),
            "a mix that is not orthogonal"
        );
        assert!(InputRotation::from_values(576, &r.values()[..600]).is_err());
        assert!(InputRotation::from_values(576, &[1.0; 10]).is_err());
        assert!(
            InputRotation::new(24, vec![1.0; 48], vec![1.0; 4]).is_err(),
            "run of 24"
        );
        assert!(
            InputRotation::new(8, vec![1.0; 16], vec![1.0; 4]).is_err(),
            "run of 8"
        );
        assert!(
            InputRotation::random(24, 1).is_none(),
            "no run of 16 divides 24"
        );
    }
}
