//! Per-token activation tables: int8 ±sums of every 4 activations, with per-group scales and Σx.
//!
//! OWNER: kernels helper.

use crate::cpu::Cpu;
use crate::error::Result;

/// Tables for a batch of input vectors of length K; reused across calls (no allocation once sized).
pub struct ActivationTables {
    cols: usize,
    tokens: usize,
}

impl ActivationTables {
    /// Empty tables for inputs of `cols` elements (a multiple of 32).
    pub fn new(cols: usize) -> ActivationTables {
        ActivationTables { cols, tokens: 0 }
    }

    /// Builds the tables of `tokens` input vectors stored back to back in `x` (`[tokens][cols]`).
    pub fn build(&mut self, cpu: &Cpu, x: &[f32], tokens: usize) -> Result<()> {
        let _ = (cpu, x, tokens);
        unimplemented!()
    }

    /// Input length K.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of tokens the tables were last built for.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}
