//! Quantization grids: how a run of consecutive weights of one row maps to codes and back.
//!
//! Two grids run on the LUT kernels as they are: [`UniformGrid`] here (`w = s·q + m` per group)
//! and [`PlaneGrid`](super::hlq::PlaneGrid), ELUTQ's hierarchical linear quantization. Parameters
//! are rounded to f16 before codes are chosen, since the kernels store them as f16.

use half::f16;

use crate::error::{Error, Result};
use crate::weights::DecodedTensor;

use super::gptq::Quantized;

/// How a run of `block_len()` consecutive weights of one row is quantized.
pub trait Grid: Sync {
    /// Fitted parameters of one block.
    type Block: Clone + Send;
    /// Weights per block along a row (must divide the row length).
    fn block_len(&self) -> usize;
    /// Number of codes: a code is `0..codes()` (at most 256).
    fn codes(&self) -> usize;
    /// Fits one block's parameters to `weights` (len `block_len`), each squared error weighted by
    /// `importance` (len `block_len`, > 0: a Hessian diagonal, or ones).
    fn fit(&self, weights: &[f32], importance: &[f32]) -> Self::Block;
    /// The weight `code` stands for at position `index` (0..block_len) of a block.
    fn level(&self, block: &Self::Block, index: usize, code: u8) -> f32;
    /// The code whose level is nearest to `w` at `index` (provided: scan of all codes).
    fn nearest(&self, block: &Self::Block, index: usize, w: f32) -> u8 {
        nearest_level(
            (0..self.codes()).map(|c| self.level(block, index, c as u8)),
            w,
        )
    }
    /// Refits the block's parameters to fixed `codes` (least squares where the grid allows;
    /// provided: no change).
    fn refit(
        &self,
        _block: &mut Self::Block,
        _weights: &[f32],
        _importance: &[f32],
        _codes: &[u8],
    ) {
    }
    /// Parameters of a block whose levels are linear in them, else 0 (provided): a level is
    /// `Σ_a θ_a·t_a` with the terms `t` of [`level_terms`](Grid::level_terms), the same at every
    /// index of the block. Parameter 0 is the block's offset (its term is 1 for every code).
    fn linear_params(&self) -> usize {
        0
    }
    /// The terms of `code`'s level (len [`linear_params`](Grid::linear_params); `terms[0]` = 1).
    fn level_terms(&self, _code: u8, _terms: &mut [f32]) {}
    /// The linear parameters of `block` (len [`linear_params`](Grid::linear_params)).
    fn block_params(&self, _block: &Self::Block, _params: &mut [f64]) {}
    /// The block of linear parameters `params`, rounded as stored; `None` when that is not a
    /// valid block (not finite, or outside the grid's constraints).
    fn block_from_params(&self, _params: &[f64]) -> Option<Self::Block> {
        None
    }
}

/// The code (index) of the level nearest `w`, the first of equally near ones.
pub(super) fn nearest_level(levels: impl IntoIterator<Item = f32>, w: f32) -> u8 {
    let mut best = (0u8, f32::INFINITY);
    for (c, level) in levels.into_iter().enumerate() {
        let d = (level - w).abs();
        if d < best.1 {
            best = (c as u8, d);
        }
    }
    best.0
}

/// Weighted squared error of `weights` against the levels of their nearest codes.
pub fn block_error<G: Grid + ?Sized>(
    grid: &G,
    block: &G::Block,
    weights: &[f32],
    importance: &[f32],
) -> f64 {
    weighted_error(weights, importance, |i, w| {
        grid.level(block, i, grid.nearest(block, i, w))
    })
}

/// `Σ h·(w − q)²` over `weights` and `importance`, `q = quantized(index, w)`.
pub(super) fn weighted_error(
    weights: &[f32],
    importance: &[f32],
    quantized: impl Fn(usize, f32) -> f32,
) -> f64 {
    weights
        .iter()
        .zip(importance)
        .enumerate()
        .map(|(i, (&w, &h))| f64::from(h) * f64::from(w - quantized(i, w)).powi(2))
        .sum()
}

/// `v` rounded to the nearest f16 (ties to even), as f32.
///
/// Inside f16's normal range the rounding is done on the bits (f16 keeps the top 10 of f32's 23
/// fraction bits; a carry out of the fraction steps the exponent, which is the right result);
/// the rest (zeros, subnormals, values from 65504 up, infinities, NaN) goes through `half`. Grid
/// fits call this for every candidate range.
#[inline]
pub(super) fn round_f16(v: f32) -> f32 {
    const MIN_NORMAL: f32 = f16::MIN_POSITIVE.to_f32_const();
    const MAX: f32 = f16::MAX.to_f32_const();
    if (MIN_NORMAL..MAX).contains(&v.abs()) {
        let b = v.to_bits();
        f32::from_bits((b + 0x0fff + ((b >> 13) & 1)) & !0x1fff)
    } else {
        f16::from_f32(v).to_f32()
    }
}

/// `w = scale·q + offset`, `q` in `0..2^bits`, one scale and offset per group.
#[derive(Clone, Copy, Debug)]
pub struct UniformGrid {
    /// Bits per code, 1..=4.
    pub bits: u8,
    /// Weights per group.
    pub group_size: usize,
}

/// Scale and offset of one group (f16-exact).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UniformBlock {
    /// Step between levels.
    pub scale: f32,
    /// Level of code 0.
    pub offset: f32,
}

/// Shrink steps of each end of the min/max range tried by [`UniformGrid::fit`].
const CLIP_STEPS: usize = 4;
/// Fraction of the range per shrink step.
const CLIP_STEP: f32 = 0.05;

impl UniformGrid {
    fn max_code(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// [`block_error`] for this grid, with the rounding inlined and the sum in eight lanes (which
    /// the compiler keeps in vector registers).
    fn error(&self, block: &UniformBlock, weights: &[f32], importance: &[f32]) -> f64 {
        let (max, s, m) = (self.max_code(), block.scale, block.offset);
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        // Clamped to [0, max] first, so `+ 0.5` and truncation round to nearest.
        let term = |w: f32, h: f32| {
            let q = (((w - m) * inv).clamp(0.0, max) + 0.5) as i32 as f32;
            let d = w - (s * q + m);
            h * d * d
        };
        let (w8, h8) = (weights.chunks_exact(8), importance.chunks_exact(8));
        let tail: f32 = w8
            .remainder()
            .iter()
            .zip(h8.remainder())
            .map(|(&w, &h)| term(w, h))
            .sum();
        let mut lanes = [0.0f32; 8];
        for (w, h) in w8.zip(h8) {
            for l in 0..8 {
                lanes[l] += term(w[l], h[l]);
            }
        }
        f64::from(lanes.iter().sum::<f32>() + tail)
    }

    fn block_for(&self, lo: f32, hi: f32) -> UniformBlock {
        let scale = round_f16(((hi - lo) / self.max_code()).max(0.0));
        UniformBlock {
            scale,
            offset: round_f16(lo),
        }
    }
}

impl Grid for UniformGrid {
    type Block = UniformBlock;

    fn block_len(&self) -> usize {
        self.group_size
    }

    fn codes(&self) -> usize {
        1 << self.bits
    }

    /// The min/max range and ranges shrunk by up to 20 % at either end, then the best of them
    /// refitted to its codes by least squares: the grid of least weighted error wins.
    fn fit(&self, weights: &[f32], importance: &[f32]) -> UniformBlock {
        let (lo, hi) = weights
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &w| {
                (a.min(w), b.max(w))
            });
        let span = hi - lo;
        let mut best = self.block_for(lo, hi);
        let mut best_err = self.error(&best, weights, importance);
        for a in 0..CLIP_STEPS {
            for b in 0..CLIP_STEPS {
                if a + b == 0 {
                    continue;
                }
                let (fa, fb) = (CLIP_STEP * a as f32, CLIP_STEP * b as f32);
                let cand = self.block_for(lo + fa * span, hi - fb * span);
                let err = self.error(&cand, weights, importance);
                if err < best_err {
                    (best, best_err) = (cand, err);
                }
            }
        }
        let codes: Vec<u8> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| self.nearest(&best, i, w))
            .collect();
        let mut refitted = best;
        self.refit(&mut refitted, weights, importance, &codes);
        if block_error(self, &refitted, weights, importance) < best_err {
            best = refitted;
        }
        best
    }

    fn level(&self, block: &UniformBlock, _index: usize, code: u8) -> f32 {
        block.scale * f32::from(code) + block.offset
    }

    fn linear_params(&self) -> usize {
        2
    }

    fn level_terms(&self, code: u8, terms: &mut [f32]) {
        terms[0] = 1.0;
        terms[1] = f32::from(code);
    }

    fn block_params(&self, block: &UniformBlock, params: &mut [f64]) {
        params[0] = f64::from(block.offset);
        params[1] = f64::from(block.scale);
    }

    /// Offset and scale rounded to f16 (a negative scale reverses the levels: a grid all the
    /// same for the kernels, whose codes are then fixed).
    fn block_from_params(&self, params: &[f64]) -> Option<UniformBlock> {
        let block = UniformBlock {
            scale: round_f16(params[1] as f32),
            offset: round_f16(params[0] as f32),
        };
        (block.scale.is_finite() && block.offset.is_finite()).then_some(block)
    }

    fn nearest(&self, block: &UniformBlock, _index: usize, w: f32) -> u8 {
        if block.scale > 0.0 {
            // Clamped first, so `+ 0.5` and truncation round to nearest without a libm call.
            (((w - block.offset) / block.scale).clamp(0.0, self.max_code()) + 0.5) as u8
        } else {
            0
        }
    }

    /// Weighted least squares for scale and offset given the codes, kept only when it lowers
    /// the error after f16 rounding.
    fn refit(&self, block: &mut UniformBlock, weights: &[f32], importance: &[f32], codes: &[u8]) {
        let mut design = [[0.0f64; 2]; 2];
        let mut rhs = [0.0f64; 2];
        for ((&w, &h), &c) in weights.iter().zip(importance).zip(codes) {
            let x = [f64::from(c), 1.0];
            for a in 0..2 {
                for b in 0..2 {
                    design[a][b] += f64::from(h) * x[a] * x[b];
                }
                rhs[a] += f64::from(h) * x[a] * f64::from(w);
            }
        }
        if let Some(sol) = solve::<2>(design, rhs) {
            let cand = UniformBlock {
                scale: round_f16(sol[0] as f32),
                offset: round_f16(sol[1] as f32),
            };
            if cand.scale >= 0.0
                && fixed_code_error(self, &cand, weights, importance, codes)
                    < fixed_code_error(self, block, weights, importance, codes)
            {
                *block = cand;
            }
        }
    }
}

/// Weighted squared error of `weights` against the levels of the given `codes`.
pub fn fixed_code_error<G: Grid + ?Sized>(
    grid: &G,
    block: &G::Block,
    weights: &[f32],
    importance: &[f32],
    codes: &[u8],
) -> f64 {
    weights
        .iter()
        .zip(importance)
        .zip(codes)
        .enumerate()
        .map(|(i, ((&w, &h), &c))| f64::from(h) * f64::from(w - grid.level(block, i, c)).powi(2))
        .sum()
}

/// Readies the leading `n`×`n` part of a small normal system for [`solve`]: a ridge of 1e-9 of
/// its trace on that diagonal (a parameter no code uses leaves its row zero; the ridge keeps the
/// system solvable and that parameter near 0), and the identity beyond `n`.
pub(super) fn ridge<const N: usize>(a: &mut [[f64; N]; N], n: usize) {
    let trace: f64 = (0..n).map(|i| a[i][i]).sum::<f64>().max(f64::MIN_POSITIVE);
    for (i, row) in a.iter_mut().enumerate() {
        if i < n {
            row[i] += 1e-9 * trace;
        } else {
            row[i] = 1.0;
        }
    }
}

/// Solves the `N`×`N` system by Gaussian elimination with partial pivoting; `None` when singular.
pub(super) fn solve<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N]) -> Option<[f64; N]> {
    for col in 0..N {
        let pivot = (col..N).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..N {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (v, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; N];
    for row in (0..N).rev() {
        let s: f64 = (row + 1..N).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// Checks that `q` holds a whole `[rows][cols]` matrix of blocks of `block_len`; the row count.
pub(super) fn check_quantized<B>(q: &Quantized<B>, cols: usize, block_len: usize) -> Result<usize> {
    let ok = block_len > 0
        && cols > 0
        && cols.is_multiple_of(block_len)
        && q.codes.len().is_multiple_of(cols)
        && q.blocks.len() * block_len == q.codes.len();
    if !ok {
        return Err(Error::InvalidOption(format!(
            "{} codes and {} blocks of {block_len} are not a matrix with rows of {cols}",
            q.codes.len(),
            q.blocks.len()
        )));
    }
    Ok(q.codes.len() / cols)
}

impl Quantized<UniformBlock> {
    /// The `[rows][cols]` matrix in the kernels' low-bit form (`DecodedTensor::LowBit`).
    pub fn into_decoded(self, grid: &UniformGrid, cols: usize) -> Result<DecodedTensor> {
        let rows = check_quantized(&self, cols, grid.group_size)?;
        Ok(DecodedTensor::LowBit {
            rows,
            cols,
            bits: grid.bits,
            group_size: grid.group_size,
            codes: self.codes,
            scales: self.blocks.iter().map(|b| b.scale).collect(),
            offsets: self.blocks.iter().map(|b| b.offset).collect(),
        })
    }
}
