//! 8-bit weights (Q8_0 style: int8 codes, one scale per 32) times int8-quantized activations.
//!
//! OWNER: int8/dense helper.

use crate::cpu::Cpu;
use crate::error::Result;

/// An int8 weight matrix with one f32 scale per block of 32 elements along K.
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
}

impl Int8Matrix {
    /// Builds the matrix from row-major codes `[rows][cols]` and scales `[rows][cols/32]`.
    pub fn new(rows: usize, cols: usize, codes: &[i8], scales: &[f32]) -> Result<Int8Matrix> {
        let _ = (codes, scales);
        Ok(Int8Matrix { rows, cols })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of codes and scales.
    pub fn bytes(&self) -> usize {
        unimplemented!()
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` with `x` quantized in `acts`; `out` is `[n][rows]`.
    pub fn matmul(&self, cpu: &Cpu, acts: &Int8Activations, out: &mut [f32]) -> Result<()> {
        let _ = (cpu, acts, out);
        unimplemented!()
    }

    /// Dequantized row `r` (embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let _ = (row, out);
        unimplemented!()
    }
}

/// Activations quantized to int8 with one scale per 32 elements, for [`Int8Matrix::matmul`].
pub struct Int8Activations {
    cols: usize,
    tokens: usize,
}

impl Int8Activations {
    /// Empty buffers for inputs of `cols` elements (a multiple of 32).
    pub fn new(cols: usize) -> Int8Activations {
        Int8Activations { cols, tokens: 0 }
    }

    /// Quantizes `tokens` vectors stored back to back in `x`.
    pub fn build(&mut self, cpu: &Cpu, x: &[f32], tokens: usize) -> Result<()> {
        let _ = (cpu, x, tokens);
        unimplemented!()
    }

    /// Input length.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Tokens quantized by the last build.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}
