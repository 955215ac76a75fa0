//! Dense f32 matrices: the few tensors that stay unquantized, and the `--reference` mode.
//!
//! OWNER: int8/dense helper.

use crate::cpu::Cpu;
use crate::error::Result;

/// A row-major f32 matrix `[rows][cols]`.
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl DenseMatrix {
    /// Wraps row-major data.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<DenseMatrix> {
        Ok(DenseMatrix { rows, cols, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` for `tokens` inputs in `x` (`[tokens][cols]`).
    pub fn matmul(&self, cpu: &Cpu, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<()> {
        let _ = (cpu, x, tokens, out);
        unimplemented!()
    }
}
