//! Joint refit of a row's grids: with the codes fixed, the parameters of every block of a row
//! solved together by least squares in the row's output error `(w−q)ᵀ·H·(w−q)`.
//!
//! The Hessian couples every block of a row with every other (through correlated inputs, and
//! through GPTQ, which spreads each column's rounding error over the columns after it); a block
//! fitted on its own, even with its diagonal block of `H`, cannot see those cross terms. The
//! refit solves the row's normal equations `(AᵀHA)·θ = AᵀH·w`, where `A` maps the row's parameters
//! `θ` (every block's offset and scales) to its weights, with the grids' linear form
//! ([`Grid::level_terms`]). `AᵀHA` is symmetric, so it is kept as its rows up to their block's
//! diagonal block ([`Shape::row_start`]), and per block of `H`'s columns only the rows of
//! `H·A` up to that block are formed (one product for the rows of a task at once); `AᵀH·w` takes
//! the same products against `w`, and the rest of `H·w` on the block, `H[after, block]ᵀ·w`, from
//! one product whose inner dimension is the rows after the block. The system is solved by
//! conjugate gradients preconditioned with its block-diagonal, started from the row's current
//! parameters, so every step lowers the row's output error.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use lutra_kernels::vector::{axpy, dot, segment_dots};
use lutra_kernels::Cpu;
use rayon::prelude::*;

use super::gptq::Quantized;
use super::grid::{ridge, solve, Grid};

/// Bytes of one task's normal matrices (f32), which sets how many rows a task takes.
const NORMAL_BYTES: usize = 128 << 20;
/// Most rows per task.
const MAX_TASK_ROWS: usize = 32;
/// Conjugate-gradient steps per row at most.
const CG_STEPS: usize = 64;
/// A row's solve stops once a step lowers the output error by less than this fraction of
/// what the steps before lowered it.
const CG_SETTLED: f64 = 1e-5;
/// Most linear parameters per block (the preconditioner's blocks are solved at this size).
const MAX_PARAMS: usize = 5;
/// Bytes of the terms, columns and weights of a run of blocks ([`Shape::run_blocks`]).
const RUN_BYTES: usize = 24 << 10;

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
    let shape = Shape {
        p,
        n,
        groups,
        cols,
        run_blocks: run_blocks(p, n),
    };
    let offset_products = offset_products(hessian, shape);
    let task_rows = (NORMAL_BYTES / (shape.normal_len() * 4)).clamp(1, MAX_TASK_ROWS);
    q.blocks
        .par_chunks_mut(task_rows * groups)
        .zip(q.codes.par_chunks(task_rows * cols))
        .zip(weights.par_chunks(task_rows * cols))
        .for_each_init(Vec::new, |normal, ((blocks, codes), weights)| {
            let systems = RowSystems::build(
                cpu,
                grid,
                shape,
                hessian,
                &offset_products,
                codes,
                weights,
                std::mem::take(normal),
            );
            for (r, row_blocks) in blocks.chunks_exact_mut(groups).enumerate() {
                systems.refit(cpu, grid, r, row_blocks);
            }
            *normal = systems.normal;
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
    /// Blocks of a run whose terms and columns stay in the L1 cache while the normal matrix's
    /// p² sums over them are taken.
    run_blocks: usize,
}

/// Blocks of a run: `2p + 1` vectors (the terms, the columns and `w`) in [`RUN_BYTES`], a
/// multiple of the eight blocks [`segment_dots`] sums in a pass where that fits.
fn run_blocks(p: usize, n: usize) -> usize {
    let fit = RUN_BYTES / ((2 * p + 1) * n * 4);
    if fit >= 8 {
        fit / 8 * 8
    } else {
        fit.max(1)
    }
}

/// H·1 over each block's columns, `[block][cols]`: the offset terms' products, the same for every
/// row.
fn offset_products(hessian: &Mat<f32>, shape: Shape) -> Vec<f32> {
    let Shape {
        n, groups, cols, ..
    } = shape;
    let mut products = vec![0.0f32; groups * cols];
    for (g, out) in products.chunks_exact_mut(cols).enumerate() {
        for j in g * n..(g + 1) * n {
            for (o, &h) in out.iter_mut().zip(hessian.col_as_slice(j)) {
                *o += h;
            }
        }
    }
    products
}

impl Shape {
    fn params(&self) -> usize {
        self.groups * self.p
    }

    /// Where row `i` of a packed normal matrix starts: row `i`, of block `g = i / p`, holds
    /// its entries up to the end of its own block, `(g + 1)·p` of them, after the `p` rows of
    /// each block before it.
    fn row_start(&self, i: usize) -> usize {
        let (g, b) = (i / self.p, i % self.p);
        self.p * self.p * g * (g + 1) / 2 + b * (g + 1) * self.p
    }

    /// Entries of a packed normal matrix.
    fn normal_len(&self) -> usize {
        self.row_start(self.params())
    }

    /// Length of row `i` of a packed normal matrix.
    fn row_len(&self, i: usize) -> usize {
        (i / self.p + 1) * self.p
    }

    /// Row `i` of the packed normal matrix `normal`.
    fn normal_row<'a>(&self, normal: &'a [f32], i: usize) -> &'a [f32] {
        &normal[self.row_start(i)..][..self.row_len(i)]
    }

    /// Row `i` of the packed normal matrix `normal`, to write.
    fn normal_row_mut<'a>(&self, normal: &'a mut [f32], i: usize) -> &'a mut [f32] {
        &mut normal[self.row_start(i)..][..self.row_len(i)]
    }
}

/// The normal equations of a few rows.
struct RowSystems {
    shape: Shape,
    /// `AᵀHA` of each row, packed ([`Shape::row_start`]), `[row][shape.normal_len()]`.
    normal: Vec<f32>,
    /// `AᵀH·w` of each row, `[row][m]`.
    rhs: Vec<f64>,
}

impl RowSystems {
    /// The normal equations of the rows of `codes`, built in `normal` (a buffer handed from
    /// task to task, resized and overwritten, so that a task does not fault in fresh pages).
    #[allow(clippy::too_many_arguments)]
    fn build<G: Grid>(
        cpu: &Cpu,
        grid: &G,
        shape: Shape,
        hessian: &Mat<f32>,
        offset_products: &[f32],
        codes: &[u8],
        weights: &[f32],
        mut normal: Vec<f32>,
    ) -> RowSystems {
        let Shape {
            p,
            n,
            groups,
            cols,
            run_blocks,
        } = shape;
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
        // Every entry of the packed rows is written below.
        let packed = shape.normal_len();
        normal.resize(rows * packed, 0.0);
        let mut rhs = vec![0.0f64; rows * m];
        // Per block of H's columns: the products of the rows' non-offset terms, column
        // `r·(p−1) + a − 1`.
        let varying = p - 1;
        let mut block_terms = vec![0.0f32; n * rows * varying];
        let mut products = vec![0.0f32; cols * rows * varying];
        let mut segment_sums = vec![0.0f32; run_blocks.min(groups)];
        let mut later_hw = vec![0.0f32; n * rows];
        for g2 in 0..groups {
            let block = g2 * n..(g2 + 1) * n;
            for r in 0..rows {
                for a in 1..p {
                    let column = r * varying + a - 1;
                    block_terms[column * n..(column + 1) * n]
                        .copy_from_slice(&terms[(r * p + a) * cols..][block.clone()]);
                }
            }
            let upto = (g2 + 1) * n;
            if varying > 0 {
                matmul(
                    MatMut::from_column_major_slice_mut(
                        &mut products[..upto * rows * varying],
                        upto,
                        rows * varying,
                    ),
                    Accum::Replace,
                    hessian.as_ref().subcols(g2 * n, n).subrows(0, upto),
                    MatRef::from_column_major_slice(&block_terms, n, rows * varying),
                    1.0,
                    Par::Seq,
                );
            }
            // The part of H·w on this block from the weights after its diagonal block:
            // `H[upto.., block]ᵀ·w` for each row.
            let below = cols - upto;
            if below > 0 {
                matmul(
                    MatMut::from_column_major_slice_mut(&mut later_hw, n, rows),
                    Accum::Replace,
                    hessian
                        .as_ref()
                        .subcols(g2 * n, n)
                        .subrows(upto, below)
                        .transpose(),
                    MatRef::from_column_major_slice(weights, cols, rows).subrows(upto, below),
                    1.0,
                    Par::Seq,
                );
            } else {
                later_hw.fill(0.0);
            }
            for r in 0..rows {
                let row_terms = &terms[r * p * cols..(r + 1) * p * cols];
                let w = &weights[r * cols..(r + 1) * cols];
                let mut rhs_sums = [0.0f64; MAX_PARAMS];
                for (b, sum) in rhs_sums.iter_mut().enumerate().take(p) {
                    let term = &row_terms[b * cols..][block.clone()];
                    *sum = term
                        .iter()
                        .zip(&later_hw[r * n..(r + 1) * n])
                        .map(|(&t, &u)| f64::from(t) * f64::from(u))
                        .sum();
                }
                let mut columns = [&[][..]; MAX_PARAMS];
                for (b, column) in columns.iter_mut().enumerate().take(p) {
                    *column = if b == 0 {
                        &offset_products[g2 * cols..][..upto]
                    } else {
                        let c = r * varying + b - 1;
                        &products[c * upto..(c + 1) * upto]
                    };
                }
                // Rows `g2·p + b` of the symmetric AᵀHA up to its block (packed): each
                // block's terms against each column, a run of blocks at a time so that the
                // terms and columns of a run are read from memory once for all p² pairs; and
                // `w` against each column for AᵀH·w.
                for first in (0..=g2).step_by(run_blocks) {
                    let last = (first + run_blocks).min(g2 + 1);
                    let run = first * n..last * n;
                    let sums = &mut segment_sums[..last - first];
                    for (b, column) in columns.iter().enumerate().take(p) {
                        segment_dots(cpu, &w[run.clone()], &column[run.clone()], n, sums);
                        for &v in sums.iter() {
                            rhs_sums[b] += f64::from(v);
                        }
                        let at = g2 * p + b;
                        let out = shape.normal_row_mut(&mut normal[r * packed..], at);
                        for a in 0..p {
                            let term = &row_terms[a * cols..][run.clone()];
                            segment_dots(cpu, term, &column[run.clone()], n, sums);
                            for (g1, &v) in (first..).zip(sums.iter()) {
                                out[g1 * p + a] = v;
                            }
                        }
                    }
                }
                rhs[r * m + g2 * p..][..p].copy_from_slice(&rhs_sums[..p]);
            }
        }
        RowSystems { shape, normal, rhs }
    }

    /// Refits row `r`'s blocks when the solve lowers its output error.
    fn refit<G: Grid>(&self, cpu: &Cpu, grid: &G, r: usize, blocks: &mut [G::Block]) {
        let shape = self.shape;
        let Shape { p, groups, .. } = shape;
        let (m, packed) = (shape.params(), shape.normal_len());
        let normal = &self.normal[r * packed..(r + 1) * packed];
        let rhs = &self.rhs[r * m..(r + 1) * m];
        let start = params_of(grid, blocks, p);
        let Some(preconditioner) = BlockJacobi::new(normal, shape) else {
            return;
        };
        let solution = conjugate_gradients(cpu, shape, normal, rhs, &start, &preconditioner);
        let Some(refitted) = solution
            .chunks_exact(p)
            .map(|params| grid.block_from_params(params))
            .collect::<Option<Vec<G::Block>>>()
        else {
            return;
        };
        debug_assert_eq!(refitted.len(), groups);
        let stored = params_of(grid, &refitted, p);
        if objective_change(cpu, shape, normal, rhs, &start, &stored) < 0.0 {
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

/// How the row's output error changes from parameters `from` to `to` (`N` packed): the change
/// of `θᵀNθ − 2·θᵀb`, taken as `(to − from)ᵀ·(N·(to + from) − 2b)` (`N` is symmetric), one f32
/// product for both. Its rounding, relative to `|to − from|·(|N·(to + from)| + 2|b|)`, is that
/// of an f32 product; a refit that changes the error by less keeps or drops parameters whose
/// errors are that close.
fn objective_change(
    cpu: &Cpu,
    shape: Shape,
    normal: &[f32],
    rhs: &[f64],
    from: &[f64],
    to: &[f64],
) -> f64 {
    let m = from.len();
    let sum: Vec<f64> = from.iter().zip(to).map(|(a, b)| a + b).collect();
    let mut product = vec![0.0f64; m];
    let (mut v32, mut out32) = (vec![0.0f32; m], vec![0.0f32; m]);
    multiply(cpu, shape, normal, &sum, &mut v32, &mut out32, &mut product);
    from.iter()
        .zip(to)
        .zip(product.iter().zip(rhs))
        .map(|((a, b), (np, r))| (b - a) * (np - 2.0 * r))
        .sum()
}

/// `out = N·v` (`N` packed), the products in f32 (`v32` and `out32` are scratch of `v`'s
/// length): each stored row is read from memory once, by a dot for its own entry of `out`, and
/// its part before its block again from L1, by an axpy for the mirrored entries.
fn multiply(
    cpu: &Cpu,
    shape: Shape,
    normal: &[f32],
    v: &[f64],
    v32: &mut [f32],
    out32: &mut [f32],
    out: &mut [f64],
) {
    for (s, &x) in v32.iter_mut().zip(v) {
        *s = x as f32;
    }
    out32.fill(0.0);
    for i in 0..v.len() {
        let row = shape.normal_row(normal, i);
        // The entries before the row's own block stand for the mirrored ones too.
        let before = row.len() - shape.p;
        out32[i] += dot(cpu, row, &v32[..row.len()]);
        axpy(cpu, &mut out32[..before], v32[i], &row[..before]);
    }
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
    /// From the packed normal matrix `normal`.
    fn new(normal: &[f32], shape: Shape) -> Option<BlockJacobi> {
        let p = shape.p;
        let mut inverses = vec![0.0f64; shape.params() * p];
        for (g, inv) in inverses.chunks_exact_mut(p * p).enumerate() {
            let mut block = [[0.0f64; MAX_PARAMS]; MAX_PARAMS];
            for (a, row) in block.iter_mut().enumerate().take(p) {
                let stored = shape.normal_row(normal, g * p + a);
                for (b, v) in row.iter_mut().enumerate().take(p) {
                    *v = f64::from(stored[g * p + b]);
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

/// Preconditioned conjugate gradients for `N·θ = b` (`N` packed) from `start`.
fn conjugate_gradients(
    cpu: &Cpu,
    shape: Shape,
    normal: &[f32],
    rhs: &[f64],
    start: &[f64],
    preconditioner: &BlockJacobi,
) -> Vec<f64> {
    let m = start.len();
    let mut theta = start.to_vec();
    let mut product = vec![0.0f64; m];
    let (mut v32, mut out32) = (vec![0.0f32; m], vec![0.0f32; m]);
    multiply(
        cpu,
        shape,
        normal,
        &theta,
        &mut v32,
        &mut out32,
        &mut product,
    );
    let mut residual: Vec<f64> = rhs.iter().zip(&product).map(|(b, p)| b - p).collect();
    let mut z = vec![0.0f64; m];
    preconditioner.apply(&residual, &mut z);
    let mut direction = z.clone();
    let mut rz: f64 = residual.iter().zip(&z).map(|(a, b)| a * b).sum();
    // Each step lowers the objective by `alpha·rz`: stop once a step adds little to the total.
    let mut lowered = 0.0f64;
    for _ in 0..CG_STEPS {
        multiply(
            cpu,
            shape,
            normal,
            &direction,
            &mut v32,
            &mut out32,
            &mut product,
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::{PlaneGrid, UniformGrid};
    use lutra_kernels::measure::SplitMix64;
    use lutra_kernels::Isa;

    /// The normal equations of a few rows match `AᵀHA` and `AᵀH·w` computed densely in f64, on
    /// every ISA, for any cut of the blocks into runs, in a buffer whose old contents (NaN) are
    /// all overwritten.
    fn check_normal_equations<G: Grid>(name: &str, grid: &G, groups: usize) {
        let (p, n, rows) = (grid.linear_params(), grid.block_len(), 3);
        let cols = n * groups;
        let m = groups * p;
        let mut rng = SplitMix64::new(5);
        let x = rng.gaussians(2 * cols * cols);
        let mut h = Mat::<f32>::zeros(cols, cols);
        for i in 0..cols {
            for j in 0..cols {
                let s: f32 = (0..2 * cols)
                    .map(|k| x[k * cols + i] * x[k * cols + j])
                    .sum();
                h[(i, j)] = s / (2 * cols) as f32 + if i == j { 0.1 } else { 0.0 };
            }
        }
        let weights = rng.gaussians(rows * cols);
        let codes: Vec<u8> = (0..rows * cols)
            .map(|_| ((rng.uniform() * grid.codes() as f32) as usize % grid.codes()) as u8)
            .collect();
        let hm = Mat::<f64>::from_fn(cols, cols, |i, j| f64::from(h[(i, j)]));
        let mut reference_normal = Vec::with_capacity(rows * m * m);
        let mut reference_rhs = Vec::with_capacity(rows * m);
        let mut terms = [0.0f32; MAX_PARAMS];
        for r in 0..rows {
            // A: the row's terms, column `block·p + a` nonzero on the block's weights.
            let mut a = Mat::<f64>::zeros(cols, m);
            for i in 0..cols {
                grid.level_terms(codes[r * cols + i], &mut terms[..p]);
                for (t, &v) in terms[..p].iter().enumerate() {
                    a[(i, i / n * p + t)] = f64::from(v);
                }
            }
            let w = Mat::<f64>::from_fn(cols, 1, |i, _| f64::from(weights[r * cols + i]));
            let normal = a.transpose() * (&hm * &a);
            let rhs = a.transpose() * (&hm * &w);
            reference_normal.extend((0..m * m).map(|i| normal[(i / m, i % m)]));
            reference_rhs.extend((0..m).map(|i| rhs[(i, 0)]));
        }
        let scale = reference_normal.iter().fold(0.0f64, |s, v| s.max(v.abs()));
        let rhs_scale = reference_rhs.iter().fold(0.0f64, |s, v| s.max(v.abs()));
        for isa in Isa::supported() {
            let cpu = Cpu::with_isa(isa, 1).unwrap();
            let mut first: Option<RowSystems> = None;
            for run_blocks in [1, 3, 8, groups] {
                let shape = Shape {
                    p,
                    n,
                    groups,
                    cols,
                    run_blocks,
                };
                let offsets = offset_products(&h, shape);
                let systems = RowSystems::build(
                    &cpu,
                    grid,
                    shape,
                    &h,
                    &offsets,
                    &codes,
                    &weights,
                    vec![f32::NAN; rows * m * m + 7],
                );
                let at = format!("{name} {isa:?}, runs of {run_blocks}");
                let packed = shape.normal_len();
                assert_eq!(systems.normal.len(), rows * packed, "{at}");
                for r in 0..rows {
                    let normal = &systems.normal[r * packed..(r + 1) * packed];
                    let dense = &reference_normal[r * m * m..(r + 1) * m * m];
                    for i in 0..m {
                        let row = shape.normal_row(normal, i);
                        assert_eq!(row.len(), (i / p + 1) * p, "{at}");
                        for (got, want) in row.iter().zip(&dense[i * m..]) {
                            assert!(
                                (f64::from(*got) - want).abs() <= 1e-5 * scale,
                                "{at}: normal {got} against {want}"
                            );
                        }
                    }
                    check_packed_products(&cpu, shape, normal, dense, &systems.rhs[r * m..][..m]);
                }
                for (got, want) in systems.rhs.iter().zip(&reference_rhs) {
                    assert!(
                        (got - want).abs() <= 1e-5 * rhs_scale,
                        "{at}: rhs {got} against {want}"
                    );
                }
                match &first {
                    None => first = Some(systems),
                    Some(f) => {
                        assert_eq!(f.normal, systems.normal, "{at}");
                        assert_eq!(f.rhs, systems.rhs, "{at}");
                    }
                }
            }
        }
    }

    /// The packed matrix's product with a vector, and the objective's change between two
    /// vectors, against the dense ones.
    fn check_packed_products(cpu: &Cpu, shape: Shape, normal: &[f32], dense: &[f64], rhs: &[f64]) {
        let m = shape.params();
        let mut rng = SplitMix64::new(9);
        let v: Vec<f64> = rng.gaussians(m).into_iter().map(f64::from).collect();
        let (mut v32, mut out32, mut got) = (vec![0.0; m], vec![f32::NAN; m], vec![0.0; m]);
        multiply(cpu, shape, normal, &v, &mut v32, &mut out32, &mut got);
        let want: Vec<f64> = dense
            .chunks_exact(m)
            .map(|row| row.iter().zip(&v).map(|(a, b)| a * b).sum())
            .collect();
        let scale = want.iter().fold(0.0f64, |s, x| s.max(x.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * scale, "N·v {g} against {w}");
        }
        let objective = |theta: &[f64]| -> f64 {
            let quad: f64 = dense
                .chunks_exact(m)
                .zip(theta)
                .map(|(row, t)| t * row.iter().zip(theta).map(|(a, b)| a * b).sum::<f64>())
                .sum();
            quad - 2.0 * rhs.iter().zip(theta).map(|(a, b)| a * b).sum::<f64>()
        };
        // Far apart, and close (as a refit rounded to f16 is to its start): the f32 product's
        // rounding is bounded by |to − from|·(|N·(to + from)| + 2|b|).
        let w = rng.gaussians(m);
        for step in [0.5, 1e-3] {
            let to: Vec<f64> = v
                .iter()
                .zip(&w)
                .map(|(x, d)| x + step * f64::from(*d))
                .collect();
            let got = objective_change(cpu, shape, normal, rhs, &v, &to);
            let want = objective(&to) - objective(&v);
            let sum: Vec<f64> = v.iter().zip(&to).map(|(a, b)| a + b).collect();
            let bound: f64 = (0..m)
                .map(|i| {
                    let row = &dense[i * m..(i + 1) * m];
                    let ns: f64 = row.iter().zip(&sum).map(|(a, b)| (a * b).abs()).sum();
                    (to[i] - v[i]).abs() * (ns + 2.0 * rhs[i].abs())
                })
                .sum();
            assert!(
                (got - want).abs() <= 1e-5 * bound && (got - want).abs() < 0.5 * want.abs(),
                "step {step}: objective change {got} against {want} (bound {bound})"
            );
        }
        assert_eq!(objective_change(cpu, shape, normal, rhs, &v, &v), 0.0);
    }

    #[test]
    fn the_normal_equations_are_those_of_the_dense_product() {
        let plane = |bits| PlaneGrid {
            bits,
            group_size: 8,
        };
        check_normal_equations("hlq 2b", &plane(2), 21);
        check_normal_equations("hlq 4b", &plane(4), 13);
        check_normal_equations("hlq 2b, one block", &plane(2), 1);
        let uniform = UniformGrid {
            bits: 2,
            group_size: 16,
        };
        check_normal_equations("uniform 2b", &uniform, 11);
    }
}
