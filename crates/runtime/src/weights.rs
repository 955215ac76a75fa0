//! One table from source tensor types (GGUF Q4_1, Q8_0, F16, GPTQ, ...) to what the kernels take:
//! low-bit codes + group scales + offsets, int8 codes + block scales, or dense f32.
//!
//! OWNER: formats helper.

/// A decoded weight tensor of shape `[rows][cols]` (cols = K, the fastest-varying dimension).
#[derive(Clone, Debug, PartialEq)]
pub enum DecodedTensor {
    /// `w = scale·q + offset` per group of `group_size` elements along a row (Q4_0, Q4_1, ...).
    LowBit {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Bits per code (1..=4).
        bits: u8,
        /// Elements per group.
        group_size: usize,
        /// One code per element, row-major.
        codes: Vec<u8>,
        /// `[rows][cols / group_size]`.
        scales: Vec<f32>,
        /// `[rows][cols / group_size]`.
        offsets: Vec<f32>,
    },
    /// `w = scale·q` with int8 `q` and one scale per block of 32 (Q8_0).
    Int8 {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// One code per element, row-major.
        codes: Vec<i8>,
        /// `[rows][cols / 32]`.
        scales: Vec<f32>,
    },
    /// Dense values, row-major (F32, F16, BF16, and types kept exact that are not low-bit).
    Dense {
        /// Output features (1 for vectors).
        rows: usize,
        /// Input features.
        cols: usize,
        /// `rows·cols` values.
        values: Vec<f32>,
    },
}
