//! ELUTQ's hierarchical linear quantization (HLQ): `w = z + Σ_p s_p·q_p` over the bit planes
//! `q_p` of a code, with one scale per plane and an offset per group, fitted by alternating
//! nearest codes and weighted least squares. The LUT kernels run it at the cost of the uniform
//! grid ([`PlaneScales::PerPlane`](lutra_kernels::PlaneScales)).

use crate::error::Result;
use crate::weights::DecodedTensor;

use super::gptq::Quantized;
use super::grid::{
    check_quantized, fixed_code_error, nearest_level, ridge, round_f16, solve, weighted_error,
    Grid, UniformGrid,
};

/// HLQ: `w = z + Σ_p s_p·q_p` over the bit planes `q_p` of the code, one scale per plane and an
/// offset per group.
#[derive(Clone, Copy, Debug)]
pub struct PlaneGrid {
    /// Bits per code (planes), 1..=4.
    pub bits: u8,
    /// Weights per group.
    pub group_size: usize,
}

/// Offset and plane scales of one group (f16-exact); planes beyond `bits` are 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlaneBlock {
    /// Level of code 0.
    pub offset: f32,
    /// Scale of plane `p` (plane 0 least significant).
    pub scales: [f32; 4],
}

/// Alternating rounds of [`PlaneGrid::fit`]: codes for the levels, levels for the codes.
const PLANE_FIT_ROUNDS: usize = 6;

impl PlaneGrid {
    /// Weighted least squares for offset and plane scales given the codes; `None` when singular.
    fn solve_for(&self, weights: &[f32], importance: &[f32], codes: &[u8]) -> Option<PlaneBlock> {
        let planes = usize::from(self.bits);
        let n = planes + 1;
        // Each weight adds its importance `h` where both of two terms are set (the offset's
        // always is; a plane's where the code has that bit) and `h·w` where one is.
        let mut design = [[0.0f64; 5]; 5];
        let mut rhs = [0.0f64; 5];
        for ((&w, &h), &c) in weights.iter().zip(importance).zip(codes) {
            let h = f64::from(h);
            let hw = h * f64::from(w);
            design[0][0] += h;
            rhs[0] += hw;
            for a in (0..planes).filter(|a| (c >> a) & 1 == 1) {
                design[0][a + 1] += h;
                design[a + 1][0] += h;
                rhs[a + 1] += hw;
                for b in (0..planes).filter(|b| (c >> b) & 1 == 1) {
                    design[a + 1][b + 1] += h;
                }
            }
        }
        // Planes no code sets (or that duplicate another) would make the system singular.
        ridge(&mut design, n);
        let sol = match n {
            2 => solve_leading::<2>(&design, &rhs),
            3 => solve_leading::<3>(&design, &rhs),
            4 => solve_leading::<4>(&design, &rhs),
            // 4 planes (and 0, which no grid has).
            _ => solve::<5>(design, rhs),
        }?;
        self.block_from_params(&sol[..n])
    }

    /// Every code's level of `block`, as [`Grid::level`] gives it.
    fn levels(&self, block: &PlaneBlock) -> [f32; 16] {
        let mut levels = [0.0; 16];
        for (c, v) in levels.iter_mut().enumerate().take(self.codes()) {
            *v = self.level(block, 0, c as u8);
        }
        levels
    }

    /// [`block_error`](super::grid::block_error) of the grid whose levels are `levels`.
    fn error(&self, levels: &[f32; 16], weights: &[f32], importance: &[f32]) -> f64 {
        let levels = &levels[..self.codes()];
        weighted_error(weights, importance, |_, w| {
            levels[usize::from(nearest_level(levels.iter().copied(), w))]
        })
    }
}

/// [`solve`] of the leading `N`×`N` part of a system [`ridge`] made ready: the identity rows
/// beyond it change nothing, so the solution is the same.
fn solve_leading<const N: usize>(design: &[[f64; 5]; 5], rhs: &[f64; 5]) -> Option<[f64; 5]> {
    let mut a = [[0.0f64; N]; N];
    let mut b = [0.0f64; N];
    for i in 0..N {
        a[i].copy_from_slice(&design[i][..N]);
        b[i] = rhs[i];
    }
    let x = solve::<N>(a, b)?;
    let mut out = [0.0f64; 5];
    out[..N].copy_from_slice(&x);
    Some(out)
}

impl Grid for PlaneGrid {
    type Block = PlaneBlock;

    fn block_len(&self) -> usize {
        self.group_size
    }

    fn codes(&self) -> usize {
        1 << self.bits
    }

    /// Starts from the uniform grid's fit (plane scales `s·2^p`), then alternates nearest codes
    /// and least-squares levels, keeping the best grid seen.
    fn fit(&self, weights: &[f32], importance: &[f32]) -> PlaneBlock {
        let uniform = UniformGrid {
            bits: self.bits,
            group_size: self.group_size,
        }
        .fit(weights, importance);
        let mut block = PlaneBlock {
            offset: uniform.offset,
            scales: [0.0; 4],
        };
        for p in 0..usize::from(self.bits) {
            block.scales[p] = round_f16(uniform.scale * (1u32 << p) as f32);
        }
        let mut levels = self.levels(&block);
        let mut best_err = self.error(&levels, weights, importance);
        let mut codes = vec![0u8; weights.len()];
        for _ in 0..PLANE_FIT_ROUNDS {
            for (c, &w) in codes.iter_mut().zip(weights) {
                *c = nearest_level(levels[..self.codes()].iter().copied(), w);
            }
            let Some(next) = self.solve_for(weights, importance, &codes) else {
                break;
            };
            levels = self.levels(&next);
            let err = self.error(&levels, weights, importance);
            if err < best_err {
                (block, best_err) = (next, err);
            } else {
                break;
            }
        }
        block
    }

    fn level(&self, block: &PlaneBlock, _index: usize, code: u8) -> f32 {
        let mut v = block.offset;
        for p in 0..usize::from(self.bits) {
            if (code >> p) & 1 == 1 {
                v += block.scales[p];
            }
        }
        v
    }

    fn linear_params(&self) -> usize {
        usize::from(self.bits) + 1
    }

    fn level_terms(&self, code: u8, terms: &mut [f32]) {
        terms[0] = 1.0;
        for p in 0..usize::from(self.bits) {
            terms[p + 1] = f32::from((code >> p) & 1);
        }
    }

    fn block_params(&self, block: &PlaneBlock, params: &mut [f64]) {
        params[0] = f64::from(block.offset);
        for p in 0..usize::from(self.bits) {
            params[p + 1] = f64::from(block.scales[p]);
        }
    }

    /// Offset and plane scales rounded to f16.
    fn block_from_params(&self, params: &[f64]) -> Option<PlaneBlock> {
        let mut block = PlaneBlock {
            offset: round_f16(params[0] as f32),
            scales: [0.0; 4],
        };
        for p in 0..usize::from(self.bits) {
            block.scales[p] = round_f16(params[p + 1] as f32);
        }
        let finite = block.offset.is_finite() && block.scales.iter().all(|v| v.is_finite());
        finite.then_some(block)
    }

    fn refit(&self, block: &mut PlaneBlock, weights: &[f32], importance: &[f32], codes: &[u8]) {
        if let Some(cand) = self.solve_for(weights, importance, codes) {
            if fixed_code_error(self, &cand, weights, importance, codes)
                < fixed_code_error(self, block, weights, importance, codes)
            {
                *block = cand;
            }
        }
    }
}

impl Quantized<PlaneBlock> {
    /// The `[rows][cols]` matrix in the kernels' per-plane form (`DecodedTensor::PlaneLowBit`).
    pub fn into_decoded(self, grid: &PlaneGrid, cols: usize) -> Result<DecodedTensor> {
        let rows = check_quantized(&self, cols, grid.group_size)?;
        let planes = usize::from(grid.bits);
        Ok(DecodedTensor::PlaneLowBit {
            rows,
            cols,
            bits: grid.bits,
            group_size: grid.group_size,
            codes: self.codes,
            scales: self
                .blocks
                .iter()
                .flat_map(|b| b.scales[..planes].iter().copied())
                .collect(),
            offsets: self.blocks.iter().map(|b| b.offset).collect(),
        })
    }
}
