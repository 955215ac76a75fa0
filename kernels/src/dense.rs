//! Dense f32 matrices: the few tensors that stay unquantized, and the `--reference` mode.
//!
//! All ISAs sum eight interleaved lanes (`k mod 8`) and add the `K mod 8` tail last; SIMD paths use
//! fused multiply-add, so they agree with the scalar reference to rounding, not bit for bit.

use half::f16;

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::isa::Isa;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

use crate::tiling::{run_row_tasks, RowRange, Split, ROW_TILE};

/// Whole micro-tiles of rows per task, all tokens at once, a few tasks per thread to balance
/// uneven progress.
const ROW_SPLIT: Split = Split {
    tile_rows: ROW_TILE,
    token_block: usize::MAX,
    tasks_per_thread: 4,
};

/// A row-major f32 matrix `[rows][cols]`.
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl DenseMatrix {
    /// Wraps row-major data; fails unless `data.len() == rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<DenseMatrix> {
        if data.len() != rows * cols {
            return Err(KernelError::LengthMismatch {
                what: "dense matrix data",
                expected: rows * cols,
                got: data.len(),
            });
        }
        Ok(DenseMatrix { rows, cols, data })
    }

    /// Converts row-major f16 data (F16 tensors of a file) to a dense f32 matrix.
    pub fn from_f16(rows: usize, cols: usize, data: &[f16]) -> Result<DenseMatrix> {
        DenseMatrix::new(rows, cols, data.iter().map(|v| v.to_f32()).collect())
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weights (what one GEMV streams from memory).
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    /// Row `r`. Panics if `r >= rows()`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` for `tokens` inputs in `x` (`[tokens][cols]`).
    pub fn matmul(&self, cpu: &Cpu, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<()> {
        check_len("dense matmul input", tokens * self.cols, x.len())?;
        check_len("dense matmul output", tokens * self.rows, out.len())?;
        let cols = self.cols;
        let isa = cpu.isa();
        run_row_tasks(
            cpu,
            &mut [out],
            |_| self.rows,
            tokens,
            ROW_SPLIT,
            |_, range| {
                let w = &self.data[range.start() * cols..range.end() * cols];
                let x = &x[range.tokens().start * cols..range.tokens().end * cols];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => avx2::matmul_rows(w, x, cols, range),
                    #[cfg(target_arch = "aarch64")]
                    Isa::Neon => neon::matmul_rows(w, x, cols, range),
                    _ => matmul_rows_scalar(w, x, cols, range),
                }
            },
        );
        Ok(())
    }
}

impl std::fmt::Debug for DenseMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// The portable reference: rows of `w` (`[rows in range][cols]`) times every token of `x`.
fn matmul_rows_scalar(w: &[f32], x: &[f32], cols: usize, out: &mut RowRange<'_>) {
    if cols == 0 {
        return zero_rows(out);
    }
    let first = out.start();
    for (i, row) in w.chunks_exact(cols).enumerate() {
        for (n, xs) in out.tokens().zip(x.chunks_exact(cols)) {
            out.set(n, first + i, dot_scalar(row, xs));
        }
    }
}

/// Writes zeros: an empty dot product (K = 0) has nothing to iterate over.
fn zero_rows(out: &mut RowRange<'_>) {
    for r in out.start()..out.end() {
        for n in out.tokens() {
            out.set(n, r, 0.0);
        }
    }
}

/// Eight interleaved lanes, then the tail, as the SIMD paths sum.
fn dot_scalar(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let body = w.len() / 8 * 8;
    for (wc, xc) in w[..body].chunks_exact(8).zip(x[..body].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += wc[j] * xc[j];
        }
    }
    let tail: f32 = w[body..].iter().zip(&x[body..]).map(|(a, b)| a * b).sum();
    crate::int8::hsum8(acc) + tail
}
