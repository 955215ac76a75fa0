//! Joint refit of a row's grids: with the codes fixed, the parameters of every block of a row
//! solved together by least squares in the row's output error `(w−q)ᵀ·H·(w−q)`.
//!
//! The Hessian couples every block of a row with every other (through correlated inputs, and
//! through GPTQ, which spreads each column's rounding error over the columns after it); a block
//! fitted on its own, even with its diagonal block of `H`, cannot see those cross terms. The
//! refit solves the row's normal equations `(AᵀHA)·θ = AᵀH·w`, where `A` maps the row's parameters
//! `θ` (every block's offset and scales) to its weights, with the grids' linear form
//! ([`Grid::level_terms`]). `H·A` is one product per block of `H`'s columns (for the rows of a
//! task at once); the system is solved by conjugate gradients preconditioned with its
//! block-diagonal, started from the row's current parameters, so every step lowers the row's
//! output error.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use lutra_kernels::vector::{dot, dot_rows, segment_dots};
use lutra_kernels::Cpu;
use rayon::prelude::*;

use super::gptq::Quantized;
use super::grid::{ridge, solve, Grid};

/// Bytes of one task's normal matrices (f32), which sets how many rows a task takes.
const NORMAL_BYTES: usize = 32 << 20;
/// Most rows per task.
const MAX_TASK_ROWS: usize = 32;
/// Conjugate-gradient steps per row at most.
const CG_STEPS: usize = 64;
/// A row's solve stops once a step lowers the output error by less than this fraction of
/// what the steps before lowered it.
const CG_SETTLED: f64 = 1e-5;
/// Most linear parameters per block (the preconditioner's blocks are solved at this size).
const MAX_PARAMS: usize = 5;

/// Refits the blocks of `q` (codes fixed) row by row in the output error with the dampened
/// Hessian `hessian` (`[cols][cols]`, symmetric) and the target weights `weights`
/// (`[rows][cols]`); a row keeps its refit only when its output error falls. Grids without
/// linear parameters are left as they are.
pub(super) fn refit_rows_jointly<G: Grid>(
    cpu: &Cpu,
    grid: &G,
    cols: usize,
    weights: &[f32],
    hessian: &Mat<f32>,
    q: &mut Quantized<G::Block>,
) {
    let p = grid.linear_params();
    let n = grid.block_len();
    if p == 0 || p > MAX_PARAMS || n == 0 || cols == 0 || !cols.is_multiple_of(n) {
        return;
    }
    let groups = cols / n;
    let m = groups * p;
    // H·1 over each block's columns: the offset terms' products, the same for every row.
    let mut offset_products = vec![0.0f32; groups * cols];
    for (g, out) in offset_products.chunks_exact_mut(cols).enumerate() {
        for j in g * n..(g + 1) * n {
            for (o, &h) in out.iter_mut().zip(hessian.col_as_slice(j)) {
                *o += h;
            }
        }
    }
    let task_rows = (NORMAL_BYTES / (m * m * 4)).clamp(1, MAX_TASK_ROWS);
    let shape = Shape { p, n, groups, cols };
    q.blocks
        .par_chunks_mut(task_rows * groups)
        .zip(q.codes.par_chunks(task_rows * cols))
        .zip(weights.par_chunks(task_rows * cols))
        .for_each(|((blocks, codes), weights)| {
            let systems =
                RowSystems::build(cpu, grid, shape, hessian, &offset_products, codes, weights);
            for (r, row_blocks) in blocks.chunks_exact_mut(groups).enumerate() {
                systems.refit(cpu, grid, r, row_blocks);
            }
        });
}

#[derive(Clone, Copy)]
struct Shape {
    /// Linear parameters per block.
    p: usize,
    /// Weights per block.
    n: usize,
    /// Blocks per row.
    groups: usize,
    /// Row length.
    cols: usize,
}

impl Shape {
    fn params(&self) -> usize {
        self.groups * self.p
    }
}

/// The normal equations of a few rows.
struct RowSystems {
    shape: Shape,
    /// `AᵀHA` of each row, `[row][m][m]`.
    normal: Vec<f32>,
    /// `AᵀH·w` of each row, `[row][m]`.
    rhs: Vec<f64>,
}

impl RowSystems {
    fn build<G: Grid>(
        cpu: &Cpu,
        grid: &G,
        shape: Shape,
        hessian: &Mat<f32>,
        offset_products: &[f32],
        codes: &[u8],
        weights: &[f32],
    ) -> RowSystems {
        let Shape { p, n, groups, cols } = shape;
        let m = shape.params();
        let rows = codes.len() / cols;
        // Terms `[row][param][col]`.
        let mut terms = vec![0.0f32; rows * p * cols];
        let mut t = [0.0f32; MAX_PARAMS];
        for (r, row_codes) in codes.chunks_exact(cols).enumerate() {
            let row_terms = &mut terms[r * p * cols..(r + 1) * p * cols];
            for (i, &c) in row_codes.iter().enumerate() {
                grid.level_terms(c, &mut t[..p]);
                for (a, &v) in t[..p].iter().enumerate() {
                    row_terms[a * cols + i] = v;
                }
            }
        }
        let mut normal = vec![0.0f32; rows * m * m];
        let mut rhs = vec![0.0f64; rows * m];
        // Per block of H's columns: the products of the rows' non-offset terms, column
        // `r·(p−1) + a − 1`.
        let varying = p - 1;
        let mut block_terms = vec![0.0f32; n * rows * varying];
        let mut products = vec![0.0f32; cols * rows * varying];
        let mut segment_sums = vec![0.0f32; groups];
        for g2 in 0..groups {
            let span = g2 * n..(g2 + 1) * n;
            for r in 0..rows {
                for a in 1..p {
                    let column = r * varying + a - 1;
                    block_terms[column * n..(column + 1) * n]
                        .copy_from_slice(&terms[(r * p + a) * cols..][span.clone()]);
                }
            }
            if varying > 0 {
                matmul(
                    MatMut::from_column_major_slice_mut(&mut products, cols, rows * varying),
                    Accum::Replace,
                    hessian.as_ref().subcols(g2 * n, n),
                    MatRef::from_column_major_slice(&block_terms, n, rows * varying),
                    1.0,
                    Par::Seq,
                );
            }
            for r in 0..rows {
                let row_terms = &terms[r * p * cols..(r + 1) * p * cols];
                let w = &weights[r * cols..(r + 1) * cols];
                for b in 0..p {
                    let column = if b == 0 {
                        &offset_products[g2 * cols..(g2 + 1) * cols]
                    } else {
                        let c = r * varying + b - 1;
                        &products[c * cols..(c + 1) * cols]
                    };
                    let at = g2 * p + b;
                    rhs[r * m + at] = f64::from(dot(cpu, column, w));
                    // Row `at` of the symmetric AᵀHA up to its block (mirrored below): each
                    // block's terms against the column.
                    let out = &mut normal[(r * m + at) * m..(r * m + at + 1) * m];
                    let upto = (g2 + 1) * n;
                    for a in 0..p {
                        let sums = &mut segment_sums[..=g2];
                        let term = &row_terms[a * cols..a * cols + upto];
                        segment_dots(cpu, term, &column[..upto], n, sums);
                        for (g1, &v) in sums.iter().enumerate() {
                            out[g1 * p + a] = v;
                        }
                    }
                }
            }
        }
        for row_normal in normal.chunks_exact_mut(m * m) {
            for i in 0..m {
                for j in (i / p + 1) * p..m {
                    row_normal[i * m + j] = row_normal[j * m + i];
                }
            }
        }
        RowSystems { shape, normal, rhs }
    }

    /// Refits row `r`'s blocks when the solve lowers its output error.
    fn refit<G: Grid>(&self, cpu: &Cpu, grid: &G, r: usize, blocks: &mut [G::Block]) {
        let Shape { p, groups, .. } = self.shape;
        let m = self.shape.params();
        let normal = &self.normal[r * m * m..(r + 1) * m * m];
        let rhs = &self.rhs[r * m..(r + 1) * m];
        let start = params_of(grid, blocks, p);
        let Some(preconditioner) = BlockJacobi::new(normal, m, p) else {
            return;
        };
        let solution = conjugate_gradients(cpu, normal, rhs, &start, &preconditioner);
        let Some(refitted) = solution
            .chunks_exact(p)
            .map(|params| grid.block_from_params(params))
            .collect::<Option<Vec<G::Block>>>()
        else {
            return;
        };
        debug_assert_eq!(refitted.len(), groups);
        let stored = params_of(grid, &refitted, p);
        if objective(normal, rhs, &stored) < objective(normal, rhs, &start) {
            blocks.clone_from_slice(&refitted);
        }
    }
}

/// The linear parameters of a row's blocks, `p` per block.
fn params_of<G: Grid>(grid: &G, blocks: &[G::Block], p: usize) -> Vec<f64> {
    let mut params = vec![0.0f64; blocks.len() * p];
    for (b, out) in blocks.iter().zip(params.chunks_exact_mut(p)) {
        grid.block_params(b, out);
    }
    params
}

/// `θᵀNθ − 2·θᵀb`: the row's output error less a constant.
fn objective(normal: &[f32], rhs: &[f64], theta: &[f64]) -> f64 {
    let m = theta.len();
    let mut quad = 0.0;
    for (i, row) in normal.chunks_exact(m).enumerate() {
        let nt: f64 = row.iter().zip(theta).map(|(&a, &t)| f64::from(a) * t).sum();
        quad += theta[i] * (nt - 2.0 * rhs[i]);
    }
    quad
}

/// `out = N·v`, the products in f32 (`v32` and `out32` are scratch of `v`'s length).
fn multiply(
    cpu: &Cpu,
    normal: &[f32],
    v: &[f64],
    v32: &mut [f32],
    out32: &mut [f32],
    out: &mut [f64],
) {
    for (s, &x) in v32.iter_mut().zip(v) {
        *s = x as f32;
    }
    dot_rows(cpu, v32, normal, out32);
    for (o, &x) in out.iter_mut().zip(out32.iter()) {
        *o = f64::from(x);
    }
}

/// The inverses of the `p`×`p` diagonal blocks of a normal matrix.
struct BlockJacobi {
    p: usize,
    /// `[block][p][p]`.
    inverses: Vec<f64>,
}

impl BlockJacobi {
    fn new(normal: &[f32], m: usize, p: usize) -> Option<BlockJacobi> {
        let mut inverses = vec![0.0f64; m * p];
        for (g, inv) in inverses.chunks_exact_mut(p * p).enumerate() {
            let mut block = [[0.0f64; MAX_PARAMS]; MAX_PARAMS];
            for (a, row) in block.iter_mut().enumerate().take(p) {
                for (b, v) in row.iter_mut().enumerate().take(p) {
                    *v = f64::from(normal[(g * p + a) * m + g * p + b]);
                }
            }
            // A term no code of the block sets leaves its row zero.
            ridge(&mut block, p);
            for b in 0..p {
                let mut unit = [0.0f64; MAX_PARAMS];
                unit[b] = 1.0;
                let column = solve::<MAX_PARAMS>(block, unit)?;
                for a in 0..p {
                    inv[a * p + b] = column[a];
                }
            }
        }
        Some(BlockJacobi { p, inverses })
    }

    fn apply(&self, r: &[f64], out: &mut [f64]) {
        let p = self.p;
        for ((inv, r), o) in self
            .inverses
            .chunks_exact(p * p)
            .zip(r.chunks_exact(p))
            .zip(out.chunks_exact_mut(p))
        {
            for (a, o) in o.iter_mut().enumerate() {
                *o = (0..p).map(|b| inv[a * p + b] * r[b]).sum();
            }
        }
    }
}

/// Preconditioned conjugate gradients for `N·θ = b` from `start`.
fn conjugate_gradients(
    cpu: &Cpu,
    normal: &[f32],
    rhs: &[f64],
    start: &[f64],
    preconditioner: &BlockJacobi,
) -> Vec<f64> {
    let m = start.len();
    let mut theta = start.to_vec();
    let mut product = vec![0.0f64; m];
    let (mut v32, mut out32) = (vec![0.0f32; m], vec![0.0f32; m]);
    multiply(cpu, normal, &theta, &mut v32, &mut out32, &mut product);
    let mut residual: Vec<f64> = rhs.iter().zip(&product).map(|(b, p)| b - p).collect();
    let mut z = vec![0.0f64; m];
    preconditioner.apply(&residual, &mut z);
    let mut direction = z.clone();
    let mut rz: f64 = residual.iter().zip(&z).map(|(a, b)| a * b).sum();
    // Each step lowers the objective by `alpha·rz`: stop once a step adds little to the total.
    let mut lowered = 0.0f64;
    for _ in 0..CG_STEPS {
        multiply(cpu, normal, &direction, &mut v32, &mut out32, &mut product);
        let curvature: f64 = direction.iter().zip(&product).map(|(a, b)| a * b).sum();
        if curvature <= 0.0 || !curvature.is_finite() {
            break;
        }
        let alpha = rz / curvature;
        let step = alpha * rz;
        lowered += step;
        for ((t, r), (d, p)) in theta
            .iter_mut()
            .zip(residual.iter_mut())
            .zip(direction.iter().zip(&product))
        {
            *t += alpha * d;
            *r -= alpha * p;
        }
        if step <= CG_SETTLED * lowered {
            break;
        }
        preconditioner.apply(&residual, &mut z);
        let next: f64 = residual.iter().zip(&z).map(|(a, b)| a * b).sum();
        let beta = next / rz;
        rz = next;
        for (d, z) in direction.iter_mut().zip(&z) {
            *d = z + beta * *d;
        }
    }
    theta
}
