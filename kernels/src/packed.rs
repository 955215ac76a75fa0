//! LUT-packed low-bit weight matrices and the mpGEMV/mpGEMM over them.
//!
//! OWNER: kernels helper. The public items below are the contract the runtime codes against;
//! bodies are to be filled in.

use crate::cpu::Cpu;
use crate::error::Result;
use crate::tables::ActivationTables;

/// How many consecutive K elements share one scale (and offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// A group of this many elements along K: 32, 64, 128 or 256.
    Size(usize),
    /// One group per row (group size = K).
    PerRow,
    /// One scale (and offset) for the whole tensor.
    PerTensor,
}

/// How the bit planes of a group are weighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaneScales {
    /// `w = s·q + m` with `q = Σ_p 2^p·q_p`: one scale per group.
    Uniform,
    /// `w = z + Σ_p s_p·q_p`: one scale per plane per group (the HLQ grid), offset `z` per group.
    PerPlane,
}

/// Shape and quantization of a low-bit matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    /// Output features (M).
    pub rows: usize,
    /// Input features (K); a multiple of 32.
    pub cols: usize,
    /// Bits per code: 1, 2, 3 or 4 (ternary is 2-bit codes {0,1,2} with offset −s).
    pub bits: u8,
    /// Elements per scale group.
    pub grouping: Grouping,
    /// Uniform or per-plane scales.
    pub plane_scales: PlaneScales,
}

/// Unpacked quantized weights, as decoded from a file: the input of [`PackedMatrix::pack`].
#[derive(Clone, Copy, Debug)]
pub struct QuantizedWeights<'a> {
    /// Shape and quantization.
    pub spec: QuantSpec,
    /// One code per element, row-major `[rows][cols]`, each `< 2^bits`.
    pub codes: &'a [u8],
    /// Uniform: `[rows][groups]` (or 1 value per tensor); per-plane: `[rows][groups][bits]`
    /// (plane 0 = least significant), or `bits` values per tensor.
    pub scales: &'a [f32],
    /// Optional offset `m` (uniform) or `z` (per-plane) per group: `[rows][groups]`, or 1 per tensor.
    pub offsets: Option<&'a [f32]>,
}

/// A weight matrix repacked into the LUT layout (bit planes, nibbles, row tiles).
pub struct PackedMatrix {
    spec: QuantSpec,
}

impl PackedMatrix {
    /// Checks the inputs and repacks them. Scales and offsets are stored as f16.
    pub fn pack(weights: &QuantizedWeights<'_>) -> Result<PackedMatrix> {
        let _ = weights;
        unimplemented!("kernels helper fills this in")
    }

    /// Shape and quantization.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }

    /// Output features (M).
    pub fn rows(&self) -> usize {
        self.spec.rows
    }

    /// Input features (K).
    pub fn cols(&self) -> usize {
        self.spec.cols
    }

    /// Bytes of packed weights, scales and offsets (what one GEMV streams from memory).
    pub fn bytes(&self) -> usize {
        unimplemented!()
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` for every token `n` of `tables`; `out` is `[n][rows]`.
    pub fn matmul(&self, cpu: &Cpu, tables: &ActivationTables, out: &mut [f32]) -> Result<()> {
        let _ = (cpu, tables, out);
        unimplemented!()
    }

    /// Dequantized row `r` (`w = s·q + m`), for reference paths and tests.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let _ = (row, out);
        unimplemented!()
    }
}
