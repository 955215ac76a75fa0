//! GPTQ (Frantar et al., 2022): the columns of a weight matrix are quantized one at a time, and
//! each column's rounding error is spread over the columns not yet quantized through the inverse
//! Hessian of the layer's calibration inputs, so that the layer's *output* error
//! `tr((W−Q)·H·(W−Q)ᵀ)` stays small rather than each weight's.
//!
//! As in the reference implementation: dead inputs (zero Hessian diagonal) are zeroed; the
//! Hessian is dampened by a fraction of its mean diagonal (more when its Cholesky fails); columns
//! go in blocks, with the error of a block applied to the rest of the matrix as one product
//! ("lazy batch updates"); with act-order the columns go by descending Hessian diagonal and the
//! grid of each block of the row is fitted first on the unquantized weights ("static groups"),
//! otherwise each grid block is fitted on the updated weights when its first column comes.
//! After the pass the grids are refitted to the codes: those whose levels are linear in their
//! parameters (uniform, HLQ) a whole row at once in the row's output error
//! (`joint_refit`), the others block by block with the Hessian's diagonal;
//! per row only when that lowers the row's output error.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::{Llt, Solve};
use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use lutra_kernels::{Cpu, Isa};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::rotation::InputRotation;

use super::grid::Grid;
use super::joint_refit::refit_rows_jointly;

/// Dampenings tried (each 10× the last) before a Hessian is declared not positive definite.
const DAMP_TRIES: usize = 5;

/// Ridge of [`PreparedHessian::source_shift`], as a fraction of the Hessian's mean diagonal.
/// Without enough of it the shift fits the calibration rows' noise: SmolLM2 at 2 bits
/// (gptq+hlq, 32 × 256 calibration tokens, gpl-2.txt perplexity) measured 49.9 at 0.5, 47.2 at
/// 1 and 52.2 at 3, against 54.4 without the shift.
pub const SOURCE_RIDGE: f64 = 1.0;

/// GPTQ's settings.
#[derive(Clone, Copy, Debug)]
pub struct GptqOptions {
    /// Dampening, as a fraction of the mean Hessian diagonal (0.01 in the reference).
    pub damp: f64,
    /// Columns per lazy update block (rounded up to a multiple of the grid's block).
    pub block: usize,
    /// Quantize columns by descending Hessian diagonal.
    pub act_order: bool,
    /// Threads of the faer products and factorizations (the row-parallel parts run on the
    /// current rayon pool).
    pub threads: usize,
    /// The instruction set of the refit's vector sums.
    pub isa: Isa,
}

impl Default for GptqOptions {
    fn default() -> GptqOptions {
        GptqOptions {
            damp: 0.01,
            block: 128,
            act_order: true,
            threads: 1,
            isa: Isa::best(),
        }
    }
}

/// Codes and grid parameters of a quantized matrix.
#[derive(Clone, Debug)]
pub struct Quantized<B> {
    /// One code per weight, `[rows][cols]`.
    pub codes: Vec<u8>,
    /// Grid parameters, `[rows][cols / block_len]`.
    pub blocks: Vec<B>,
}

impl<B> Quantized<B> {
    /// The weights the codes stand for, `[rows][cols]`.
    pub fn dequantize<G: Grid<Block = B>>(&self, grid: &G, cols: usize) -> Vec<f32> {
        let n = grid.block_len();
        let per_row = cols / n;
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let (r, k) = (i / cols, i % cols);
                grid.level(&self.blocks[r * per_row + k / n], k % n, c)
            })
            .collect()
    }
}

/// A calibration Hessian made ready for GPTQ: shared by the matrices that read one input.
pub struct PreparedHessian {
    k: usize,
    /// Column order of the pass (identity without act-order).
    order: Vec<usize>,
    /// Inputs whose Hessian diagonal is 0: their weights are zeroed.
    dead: Vec<bool>,
    /// Upper Cholesky factor of the inverse dampened Hessian, in pass order, `[k][k]`.
    inverse_factor: Mat<f32>,
    /// The dampened Hessian in the original order, for output errors.
    damped: Mat<f32>,
    /// Its diagonal: the importance of each input for grid fits.
    importance: Vec<f32>,
}

impl PreparedHessian {
    /// Prepares `hessian` (`[k][k]`, symmetric: `Σ x·xᵀ` at any positive scale) with the column
    /// order (`opts.act_order`) and dampening (`opts.damp`) of `opts`. The sums are taken by
    /// value: they are reordered and factored in their own memory, and freed once the inverse
    /// factor is made (a 11008-wide Hessian is 970 MB).
    pub fn new(hessian: Vec<f64>, k: usize, opts: &GptqOptions) -> Result<PreparedHessian> {
        if k == 0 || hessian.len() != k * k {
            return Err(Error::InvalidOption(format!(
                "Hessian of {} values for {k} inputs",
                hessian.len()
            )));
        }
        if let Some(bad) = hessian.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidOption(format!(
                "Hessian entry ({}, {}) is {} (calibration activations overflowed?)",
                bad / k,
                bad % k,
                hessian[bad]
            )));
        }
        // A dead input's zero diagonal entry is read as 1 (its row and column are zero).
        let mut dead = vec![false; k];
        let mut diag = Vec::with_capacity(k);
        for (i, d) in dead.iter_mut().enumerate() {
            let v = hessian[i * k + i];
            if v < 0.0 {
                return Err(Error::InvalidOption(format!(
                    "Hessian diagonal entry {i} is negative ({v}): not a sum of outer products"
                )));
            }
            *d = v == 0.0;
            diag.push(if *d { 1.0 } else { v });
        }
        let mut order: Vec<usize> = (0..k).collect();
        if opts.act_order {
            order.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
        }
        let mean = diag.iter().sum::<f64>() / k as f64;
        // The dampened Hessian in f32, its diagonal set once the dampening is known. Filled a
        // column at a time, from the symmetric sums' row of the same index (contiguous reads).
        let mut damped = Mat::<f32>::from_fn(k, k, |i, j| hessian[j * k + i] as f32);
        // The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU, in pass order) without forming H⁻¹:
        // with R the reversal of the order, RHR = LLᵀ gives H⁻¹ = (R·L⁻¹·R)ᵀ(R·L⁻¹·R), and
        // R·L⁻¹·R is upper triangular with a positive diagonal: it is U. RHR is formed and factored
        // in the sums' own memory, so the only k×k f64 matrix is that one.
        let reversal: Vec<usize> = (0..k).map(|i| order[k - 1 - i]).collect();
        let mut sums = hessian;
        permute_symmetric(&mut sums, &reversal);
        let mut damp = opts.damp.max(0.0) * mean;
        let parallel = par(opts.threads);
        let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f64>(
            k,
            parallel,
            Default::default(),
        ));
        let mut factored = false;
        for attempt in 0..DAMP_TRIES {
            if attempt > 0 {
                // The failed factoring overwrote the sums: a retry starts again from the f32 copy
                // (its rounding is far below the larger dampening a retry adds).
                damp = if damp > 0.0 {
                    damp * 10.0
                } else {
                    1e-6 * mean.max(1e-30)
                };
                for (i, row) in sums.chunks_exact_mut(k).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = f64::from(damped[(reversal[i], reversal[j])]);
                    }
                }
            }
            for (i, &at) in reversal.iter().enumerate() {
                sums[i * k + i] = diag[at] + damp;
            }
            // Factored in place: its lower triangle becomes L (symmetric, so the row-major sums
            // read as the same matrix column-major).
            let mut reversed = MatMut::from_column_major_slice_mut(&mut sums, k, k);
            let ok = cholesky_in_place(
                reversed.as_mut(),
                Default::default(),
                parallel,
                MemStack::new(&mut scratch),
                Default::default(),
            );
            // U's diagonal is the reciprocal of L's, which must stay a positive f32.
            let usable = |d: f64| {
                let u = (1.0 / d) as f32;
                d > 0.0 && u.is_finite() && u > 0.0
            };
            if ok.is_ok() && (0..k).all(|i| usable(reversed[(i, i)])) {
                factored = true;
                break;
            }
        }
        if !factored {
            return Err(Error::InvalidOption(format!(
                "the {k}x{k} Hessian is not positive definite even after dampening by up to \
                 {damp:.3e} ({DAMP_TRIES} tries from {} of its mean diagonal; calibrate with more or \
                 other text)",
                opts.damp
            )));
        }
        for (i, &d) in diag.iter().enumerate() {
            damped[(i, i)] = (d + damp) as f32;
        }
        // L is the lower triangle; what the factoring left above it is not read.
        let lower = MatRef::from_column_major_slice(&sums, k, k);
        let inverse_factor = reversed_inverse(lower, parallel);
        drop(sums);
        Ok(PreparedHessian {
            k,
            order,
            dead,
            inverse_factor,
            damped,
            importance: diag.iter().map(|&d| d as f32).collect(),
        })
    }

    /// Inputs.
    pub fn inputs(&self) -> usize {
        self.k
    }

    /// The Hessian diagonal: how much each input's errors weigh.
    pub fn importance(&self) -> &[f32] {
        &self.importance
    }

    /// The shift that makes GPTQ on this Hessian aim at the *source* model's outputs rather
    /// than at `W` applied to the quantized model's inputs (asymmetric calibration, as in
    /// GPTAQ): with `X` the rows this Hessian was built from and `S` the source model's rows of
    /// the same input (paired token by token), `‖W·Sᵀ − Q·Xᵀ‖²` is `tr((W*−Q)·H·(W*−Q)ᵀ)` plus a
    /// constant for `W* = W + W·C·H⁻¹`, `C = Σ (s − x)·xᵀ` (`[k][k]`, from `pairs`). `H` is solved
    /// with a ridge of [`SOURCE_RIDGE`] times its mean diagonal, which keeps the correction to
    /// the directions the calibration rows pin down.
    ///
    /// `pairs` carries `C` as sums or as the rows themselves ([`SourcePairs`]). `rows` is how
    /// many weight rows the shift will serve (all the matrices that read this input): when they
    /// are fewer than the inputs, or the pairs are rows, each matrix solves its own
    /// `(W·C)·H⁻¹` (`rows` right-hand sides) instead of the `k` of `C·H⁻¹`.
    pub fn source_shift(&self, pairs: SourcePairs, rows: usize) -> Result<SourceShift> {
        let k = self.k;
        match &pairs {
            SourcePairs::Sums(cross) if cross.len() != k * k => {
                return Err(Error::InvalidOption(format!(
                    "{} cross values for {k} inputs",
                    cross.len()
                )));
            }
            SourcePairs::Rows {
                diff,
                inputs,
                rotation,
            } => {
                let total = inputs.iter().map(Vec::len).sum::<usize>();
                if diff.len() != total || inputs.iter().any(|x| !x.len().is_multiple_of(k)) {
                    return Err(Error::InvalidOption(format!(
                        "{} differences and {total} inputs in rows of {k}",
                        diff.len()
                    )));
                }
                if let Some(r) = rotation.as_ref().filter(|r| r.cols() != k) {
                    return Err(Error::InvalidOption(format!(
                        "a rotation of {} features for {k} inputs",
                        r.cols()
                    )));
                }
            }
            _ => {}
        }
        let mean = (0..k).map(|i| f64::from(self.damped[(i, i)])).sum::<f64>() / k as f64;
        let ridge = SOURCE_RIDGE * mean;
        // In f32: the ridge bounds the condition number by about k + 1, and the solves are the
        // larger part of a block's factoring.
        let h = Mat::<f32>::from_fn(k, k, |i, j| {
            (f64::from(self.damped[(i, j)]) + if i == j { ridge } else { 0.0 }) as f32
        });
        let llt = h.llt(Side::Lower).map_err(|_| {
            Error::InvalidOption(format!(
                "the dampened {k}x{k} Hessian has no Cholesky factor"
            ))
        })?;
        drop(h);
        // The input whose sums or rows hold a value that is not finite.
        let bad = match &pairs {
            SourcePairs::Sums(cross) => cross
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| (i / k, "cross sums overflowed?")),
            SourcePairs::Rows { diff, inputs, .. } => diff
                .iter()
                .chain(inputs.iter().flatten())
                .position(|v| !v.is_finite())
                .map(|i| (i % k, "calibration rows not finite?")),
        };
        if let Some((bad, why)) = bad {
            return Err(Error::InvalidOption(format!(
                "the source shift of input {bad} is not finite ({why})"
            )));
        }
        let cross = match pairs {
            SourcePairs::Rows {
                diff,
                inputs,
                rotation,
            } => {
                return Ok(SourceShift(ShiftForm::PerMatrix {
                    factor: llt,
                    cross: Cross::Rows {
                        diff,
                        inputs,
                        rotation,
                    },
                }))
            }
            SourcePairs::Sums(cross) => cross,
        };
        // Cᵀ: H⁻¹·Cᵀ is the transpose of C·H⁻¹ (H is symmetric).
        let ct = Mat::<f32>::from_fn(k, k, |i, j| cross[j * k + i] as f32);
        if rows < k {
            return Ok(SourceShift(ShiftForm::PerMatrix {
                factor: llt,
                cross: Cross::Transposed(ct),
            }));
        }
        let solved = llt.solve(&ct);
        if let Some(bad) = (0..k * k).find(|&i| !solved[(i % k, i / k)].is_finite()) {
            return Err(Error::InvalidOption(format!(
                "the source shift of input {} is not finite (cross sums overflowed?)",
                bad / k
            )));
        }
        Ok(SourceShift(ShiftForm::Product(
            solved.transpose().to_owned(),
        )))
    }

    /// `tr((W−Q)·H·(W−Q)ᵀ)` row by row, with the dampened Hessian.
    pub fn output_errors(&self, weights: &[f32], approx: &[f32], threads: usize) -> Vec<f64> {
        let k = self.k;
        let rows = weights.len() / k;
        let diff: Vec<f32> = weights.iter().zip(approx).map(|(w, q)| w - q).collect();
        // H·(W−Q)ᵀ, column-major: column r (row r's product) is contiguous.
        let mut hd = vec![0.0f32; rows * k];
        matmul(
            MatMut::from_column_major_slice_mut(&mut hd, k, rows),
            Accum::Replace,
            self.damped.as_ref(),
            MatRef::from_column_major_slice(&diff, k, rows),
            1.0,
            par(threads),
        );
        hd.par_chunks_exact(k)
            .zip(diff.par_chunks_exact(k))
            .map(|(h, d)| {
                h.iter()
                    .zip(d)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum()
            })
            .collect()
    }
}

/// How the source model's rows `s` of one input pair with the quantized model's rows `x` in
/// [`PreparedHessian::source_shift`].
pub enum SourcePairs {
    /// The cross sums `C = Σ (s − x)·xᵀ`, `[k][k]`.
    Sums(Vec<f64>),
    /// The rows themselves: `W·C` is then `(W·Dᵀ)·X`, and the rows `x` are kept only once, as
    /// the block computed them (a run resumed at the input reads them too).
    Rows {
        /// `s − x` of every sequence in turn, `[n][k]`, rotated when the input is.
        diff: Vec<f32>,
        /// `x` of each sequence, `[n_s][k]` (`n` rows in all), before `rotation`.
        inputs: Vec<Vec<f32>>,
        /// The input's rotation `R` (a rotated row is `R·x`): `Xᵀ` enters as `R·Xᵀ`.
        rotation: Option<InputRotation>,
    },
}

impl SourcePairs {
    /// Whether an input of `k` values, read by `weight_rows` weight rows in all, is cheaper
    /// shifted from its `n` pairs of rows than from their sums: the rows take `2·n·k` products
    /// per weight row, the sums `k²·n` once and `k²` per weight row (the solves are the same).
    /// So it is for inputs read by fewer than about `k/2` rows, such as a feed-forward's down
    /// projection, while the rows (`2·n·k` f32) take no more memory than the sums (`k²` f64).
    pub fn as_rows(k: usize, weight_rows: usize, n: usize) -> bool {
        n <= k && 2 * weight_rows * n < k * (n + weight_rows)
    }
}

/// The shift of [`PreparedHessian::source_shift`]: `W ↦ W + W·C·H⁻¹`.
pub struct SourceShift(ShiftForm);

/// `C` as a per-matrix shift reads it.
enum Cross {
    /// `Cᵀ`, `[k][k]`.
    Transposed(Mat<f32>),
    /// The pairs' rows ([`SourcePairs::Rows`]).
    Rows {
        diff: Vec<f32>,
        inputs: Vec<Vec<f32>>,
        rotation: Option<InputRotation>,
    },
}

enum ShiftForm {
    /// `C·H⁻¹`, `[k][k]`: one product per matrix.
    Product(Mat<f32>),
    /// The Cholesky factorization `L·Lᵀ` of the ridged `H`, and `C`: each matrix solves
    /// `H·Y = Cᵀ·Wᵀ`, whose column `r` is row `r` of `W·C·H⁻¹`.
    PerMatrix { factor: Llt<f32>, cross: Cross },
}

impl SourceShift {
    /// The unrotated rows a shift made from [`SourcePairs::Rows`] holds, handed back once its
    /// matrices are done.
    pub fn into_input_rows(self) -> Option<Vec<Vec<f32>>> {
        match self.0 {
            ShiftForm::PerMatrix {
                cross: Cross::Rows { inputs, .. },
                ..
            } => Some(inputs),
            _ => None,
        }
    }

    /// `W* = W + W·C·H⁻¹` for `weights` `W` (`[rows][k]`), on the `cpu`'s threads.
    pub fn target(&self, weights: &[f32], cpu: &Cpu) -> Result<Vec<f32>> {
        let threads = cpu.threads();
        let k = match &self.0 {
            ShiftForm::Product(m) => m.nrows(),
            ShiftForm::PerMatrix { factor, .. } => factor.L().nrows(),
        };
        if !weights.len().is_multiple_of(k) {
            return Err(Error::InvalidOption(format!(
                "{} weights in rows of {k}",
                weights.len()
            )));
        }
        let rows = weights.len() / k;
        let mut target = weights.to_vec();
        match &self.0 {
            ShiftForm::Product(shift) => matmul(
                MatMut::from_row_major_slice_mut(&mut target, rows, k),
                Accum::Add,
                MatRef::from_row_major_slice(weights, rows, k),
                shift.as_ref(),
                1.0,
                par(threads),
            ),
            ShiftForm::PerMatrix { factor, cross } => {
                // Y = Cᵀ·Wᵀ, then L·Lᵀ·Y = it: Y's column r is the shift of row r, and Y
                // stored column-major is `[rows][k]`.
                let mut y = cross_times(cross, weights, k, cpu)?;
                let mut y_mat = MatMut::from_column_major_slice_mut(&mut y, k, rows);
                solve_lower_triangular_in_place(factor.L(), y_mat.as_mut(), par(threads));
                solve_upper_triangular_in_place(
                    factor.L().transpose(),
                    y_mat.as_mut(),
                    par(threads),
                );
                for (t, v) in target.iter_mut().zip(&y) {
                    *t += v;
                }
            }
        }
        if let Some(bad) = target.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidOption(format!(
                "the source target of weight ({}, {}) is not finite",
                bad / k,
                bad % k
            )));
        }
        Ok(target)
    }
}

/// Columns of `L⁻¹` solved at a time by [`reversed_inverse`].
const INVERSE_COLUMNS: usize = 256;

/// `A[i][j] ← A[p[i]][p[j]]` for a `[k][k]` row-major `a` and a permutation `p` of `0..k`, in
/// place: rows move along the permutation's cycles through one spare row, then each row's
/// entries are gathered through another.
pub(super) fn permute_symmetric(a: &mut [f64], p: &[usize]) {
    let k = p.len();
    debug_assert!(
        a.len() == k * k && {
            let mut seen = vec![false; k];
            p.iter()
                .all(|&i| i < k && !std::mem::replace(&mut seen[i], true))
        }
    );
    let mut spare = vec![0.0; k];
    let mut placed = vec![false; k];
    for start in 0..k {
        if placed[start] {
            continue;
        }
        spare.copy_from_slice(&a[start * k..][..k]);
        let mut i = start;
        loop {
            placed[i] = true;
            let from = p[i];
            if from == start {
                a[i * k..][..k].copy_from_slice(&spare);
                break;
            }
            a.copy_within(from * k..(from + 1) * k, i * k);
            i = from;
        }
    }
    for row in a.chunks_exact_mut(k) {
        for (s, &from) in spare.iter_mut().zip(p) {
            *s = row[from];
        }
        row.copy_from_slice(&spare);
    }
}

/// `R·L⁻¹·R` in f32 for the lower triangle `L` of `lower` (its entries above the diagonal are not
/// read; `R` the reversal of the order), solved a block of [`INVERSE_COLUMNS`] columns of `L⁻¹`
/// at a time so that no f64 inverse is held.
pub(super) fn reversed_inverse(lower: MatRef<'_, f64>, par: Par) -> Mat<f32> {
    let k = lower.nrows();
    let mut u = Mat::<f32>::zeros(k, k);
    let mut block = Mat::<f64>::zeros(k, INVERSE_COLUMNS.min(k));
    for c0 in (0..k).step_by(INVERSE_COLUMNS) {
        let width = INVERSE_COLUMNS.min(k - c0);
        // Columns c0.. of L⁻¹ are zero above row c0: solve the trailing part only.
        let mut x = block.as_mut().submatrix_mut(0, 0, k - c0, width);
        x.fill(0.0);
        for j in 0..width {
            x[(j, j)] = 1.0;
        }
        solve_lower_triangular_in_place(lower.submatrix(c0, c0, k - c0, k - c0), x.as_mut(), par);
        for j in 0..width {
            let col = k - 1 - (c0 + j);
            for i in j..k - c0 {
                u[(k - 1 - (c0 + i), col)] = x[(i, j)] as f32;
            }
        }
    }
    u
}

/// `Cᵀ·Wᵀ` (`[k][rows]`, column-major) for `weights` `W` (`[rows][k]`).
fn cross_times(cross: &Cross, weights: &[f32], k: usize, cpu: &Cpu) -> Result<Vec<f32>> {
    let threads = cpu.threads();
    let rows = weights.len() / k;
    let wt = MatRef::from_column_major_slice(weights, k, rows);
    let mut y = vec![0.0f32; rows * k];
    let mut y_mat = MatMut::from_column_major_slice_mut(&mut y, k, rows);
    match cross {
        Cross::Transposed(ct) => matmul(y_mat, Accum::Replace, ct.as_ref(), wt, 1.0, par(threads)),
        Cross::Rows {
            diff,
            inputs,
            rotation,
        } => {
            // Cᵀ·Wᵀ = R·Xᵀ·(D·Wᵀ), Xᵀ·(D·Wᵀ) summed sequence by sequence.
            let n = diff.len() / k;
            let dw = diff_times(MatRef::from_row_major_slice(diff, n, k), wt, threads);
            let mut first = 0;
            for x in inputs {
                let len = x.len() / k;
                matmul(
                    y_mat.as_mut(),
                    Accum::Add,
                    MatRef::from_row_major_slice(x, len, k).transpose(),
                    dw.as_ref().subrows(first, len),
                    1.0,
                    par(threads),
                );
                first += len;
            }
            if let Some(r) = rotation {
                // Each column of Y, contiguous, rotated as a row, a few at a time.
                let mut buffer = vec![0.0f32; k * ROTATED_COLUMNS];
                for part in y.chunks_mut(k * ROTATED_COLUMNS) {
                    r.rotate_activations(cpu, part, &mut buffer)?;
                }
            }
        }
    }
    Ok(y)
}

/// Columns of `Cᵀ·Wᵀ` rotated at a time by [`cross_times`].
const ROTATED_COLUMNS: usize = 64;

/// `D·Wᵀ` (`[n][rows]`) for `D` `[n][k]` and `Wᵀ` `[k][rows]`.
fn diff_times(d: MatRef<'_, f32>, wt: MatRef<'_, f32>, threads: usize) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(d.nrows(), wt.ncols());
    matmul(out.as_mut(), Accum::Replace, d, wt, 1.0, par(threads));
    out
}

/// faer's parallelism for `threads` threads: rayon's pool, or sequential for one.
pub(crate) fn par(threads: usize) -> Par {
    if threads > 1 {
        Par::rayon(threads)
    } else {
        Par::Seq
    }
}

/// Round to nearest: each block of each row fitted (weighted by `importance`, or evenly) and
/// every weight given its nearest code.
pub fn rtn<G: Grid>(
    grid: &G,
    rows: usize,
    cols: usize,
    weights: &[f32],
    importance: Option<&[f32]>,
) -> Result<Quantized<G::Block>> {
    check_shape(grid, rows, cols, weights)?;
    let n = grid.block_len();
    let ones = vec![1.0f32; cols];
    let importance = importance.unwrap_or(&ones);
    let mut codes = vec![0u8; rows * cols];
    let mut blocks = Vec::with_capacity(rows * cols / n);
    for (w_row, c_row) in weights.chunks_exact(cols).zip(codes.chunks_exact_mut(cols)) {
        for ((w, c), h) in w_row
            .chunks_exact(n)
            .zip(c_row.chunks_exact_mut(n))
            .zip(importance.chunks_exact(n))
        {
            let block = grid.fit(w, h);
            for (i, (c, &w)) in c.iter_mut().zip(w).enumerate() {
                *c = grid.nearest(&block, i, w);
            }
            blocks.push(block);
        }
    }
    Ok(Quantized { codes, blocks })
}

fn check_shape<G: Grid>(grid: &G, rows: usize, cols: usize, weights: &[f32]) -> Result<()> {
    let n = grid.block_len();
    if n == 0 || !cols.is_multiple_of(n) {
        return Err(Error::InvalidOption(format!(
            "groups of {n} do not divide the row length {cols}"
        )));
    }
    if weights.len() != rows * cols {
        return Err(Error::InvalidOption(format!(
            "{} weights for a {rows}x{cols} matrix",
            weights.len()
        )));
    }
    Ok(())
}

/// GPTQ of `weights` (`[rows][cols]`) on `grid`, with `hessian` (`[cols][cols]`, row-major,
/// `Σ x·xᵀ` over the calibration rows of the matrix's input, at any positive scale).
pub fn gptq<G: Grid>(
    grid: &G,
    rows: usize,
    cols: usize,
    weights: &[f32],
    hessian: &[f64],
    opts: &GptqOptions,
) -> Result<Quantized<G::Block>> {
    check_shape(grid, rows, cols, weights)?;
    let prepared = PreparedHessian::new(hessian.to_vec(), cols, opts)?;
    gptq_prepared(grid, rows, cols, weights, &prepared, opts)
}

/// [`gptq`] with a Hessian already prepared (factored once for all the matrices that read one
/// input). `opts.act_order` and `opts.damp` are those `hessian` was prepared with.
pub fn gptq_prepared<G: Grid>(
    grid: &G,
    rows: usize,
    cols: usize,
    weights: &[f32],
    hessian: &PreparedHessian,
    opts: &GptqOptions,
) -> Result<Quantized<G::Block>> {
    check_shape(grid, rows, cols, weights)?;
    if hessian.k != cols {
        return Err(Error::InvalidOption(format!(
            "a Hessian of {} inputs for rows of {cols}",
            hessian.k
        )));
    }
    let n = grid.block_len();
    let per_row = cols / n;
    let order = &hessian.order;
    let importance = &hessian.importance;
    // The weights GPTQ quantizes: dead inputs zeroed (natural order, then pass order).
    let natural: Vec<f32> = weights
        .chunks_exact(cols)
        .flat_map(|row| (0..cols).map(move |j| if hessian.dead[j] { 0.0 } else { row[j] }))
        .collect();
    let mut w: Vec<f32> = Vec::with_capacity(rows * cols);
    for row in natural.chunks_exact(cols) {
        w.extend(order.iter().map(|&j| row[j]));
    }
    // Any order but the natural one would split groups across lazy blocks: fit them first.
    let static_groups = order.iter().enumerate().any(|(i, &j)| i != j);
    let mut blocks: Vec<Option<G::Block>> = vec![None; rows * per_row];
    if static_groups {
        blocks
            .par_chunks_mut(per_row)
            .zip(natural.par_chunks_exact(cols))
            .for_each(|(b_row, w_row)| {
                for (g, b) in b_row.iter_mut().enumerate() {
                    *b =
                        Some(grid.fit(&w_row[g * n..(g + 1) * n], &importance[g * n..(g + 1) * n]));
                }
            });
    }
    let step = opts.block.max(n).div_ceil(n) * n;
    let u = &hessian.inverse_factor;
    let mut codes_pass = vec![0u8; rows * cols];
    let mut errors = vec![0.0f32; rows * step];
    let mut start = 0;
    while start < cols {
        let end = (start + step).min(cols);
        let width = end - start;
        // The factor's diagonal block, row-major, for the row-wise updates below.
        let mut diag_block = vec![0.0f32; width * width];
        for (a, row) in diag_block.chunks_exact_mut(width).enumerate() {
            for (b, v) in row.iter_mut().enumerate().skip(a) {
                *v = u[(start + a, start + b)];
            }
        }
        let diag_block = &diag_block;
        // Within the block: each row on its own (rows are independent given the factor).
        w.par_chunks_exact_mut(cols)
            .zip(codes_pass.par_chunks_exact_mut(cols))
            .zip(errors.par_chunks_exact_mut(step))
            .zip(blocks.par_chunks_mut(per_row))
            .for_each(|(((w_row, c_row), e_row), b_row)| {
                for i in start..end {
                    let j = order[i];
                    let (g, at) = (j / n, j % n);
                    if b_row[g].is_none() {
                        // Natural order: the group starts here and lies inside this block.
                        b_row[g] =
                            Some(grid.fit(&w_row[i..i + n], &importance[g * n..(g + 1) * n]));
                    }
                    let block = b_row[g].as_ref().expect("fitted above");
                    let value = w_row[i];
                    let code = grid.nearest(block, at, value);
                    c_row[i] = code;
                    let a = i - start;
                    let u_row = &diag_block[a * width..(a + 1) * width];
                    let err = (value - grid.level(block, at, code)) / u_row[a];
                    e_row[a] = err;
                    for (w, &f) in w_row[i + 1..end].iter_mut().zip(&u_row[a + 1..]) {
                        *w -= err * f;
                    }
                }
            });
        if end < cols {
            // The rest of the matrix takes the block's errors in one product.
            let e = MatRef::from_row_major_slice(&errors, rows, step).subcols(0, width);
            let mut rest =
                MatMut::from_row_major_slice_mut(&mut w, rows, cols).subcols_mut(end, cols - end);
            matmul(
                rest.as_mut(),
                Accum::Add,
                e,
                u.as_ref().submatrix(start, end, width, cols - end),
                -1.0,
                par(opts.threads),
            );
        }
        start = end;
    }
    // Codes back in natural order.
    let mut codes = vec![0u8; rows * cols];
    for (c_row, p_row) in codes
        .chunks_exact_mut(cols)
        .zip(codes_pass.chunks_exact(cols))
    {
        for (i, &j) in order.iter().enumerate() {
            c_row[j] = p_row[i];
        }
    }
    let fitted: Vec<G::Block> = blocks
        .into_iter()
        .map(|b| b.expect("every group is fitted during the pass"))
        .collect();
    let mut out = Quantized {
        codes,
        blocks: fitted,
    };
    if grid.linear_params() > 0 {
        // One thread: the refit's rows run in parallel on the rayon pool.
        let cpu = Cpu::with_isa(opts.isa, 1).map_err(|e| {
            Error::InvalidOption(format!("GPTQ's refit on {}: {e}", opts.isa.name()))
        })?;
        refit_rows_jointly(&cpu, grid, cols, &natural, &hessian.damped, &mut out);
    } else {
        refit_rows(grid, rows, cols, &natural, hessian, &mut out, opts.threads);
    }
    Ok(out)
}

/// Refits every block's grid to its codes with the Hessian's diagonal (for grids without a
/// linear form), keeping a row's refit only when its output error falls.
fn refit_rows<G: Grid>(
    grid: &G,
    rows: usize,
    cols: usize,
    weights: &[f32],
    hessian: &PreparedHessian,
    q: &mut Quantized<G::Block>,
    threads: usize,
) {
    let n = grid.block_len();
    let per_row = cols / n;
    let mut refitted = q.blocks.clone();
    refitted
        .par_chunks_mut(per_row)
        .zip(weights.par_chunks_exact(cols))
        .zip(q.codes.par_chunks_exact(cols))
        .for_each(|((b_row, w_row), c_row)| {
            for (g, b) in b_row.iter_mut().enumerate() {
                let span = g * n..(g + 1) * n;
                grid.refit(
                    b,
                    &w_row[span.clone()],
                    &hessian.importance[span.clone()],
                    &c_row[span],
                );
            }
        });
    let before = hessian.output_errors(weights, &q.dequantize(grid, cols), threads);
    let fitted = std::mem::replace(&mut q.blocks, refitted);
    let after = hessian.output_errors(weights, &q.dequantize(grid, cols), threads);
    for r in 0..rows {
        if after[r] >= before[r] {
            q.blocks[r * per_row..(r + 1) * per_row]
                .clone_from_slice(&fitted[r * per_row..(r + 1) * per_row]);
        }
    }
}
