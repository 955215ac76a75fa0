//! # lutra-kernels
//!
//! Bit-serial table-lookup (T-MAC style) matrix kernels for low-bit weights.
//!
//! A b-bit weight matrix is split into b one-bit planes. For every 4 activations a 16-entry table of
//! ±sums is built once per token ([`ActivationTables`]); each 4-bit nibble of a weight plane indexes
//! it. The multiply is a stream of table lookups (`pshufb` on AVX2, `tbl` on NEON, plain indexing in
//! the scalar reference), so cost grows linearly with bits and weights are never dequantized.
//!
//! The public API is small:
//! - [`Cpu`]: the ISA (chosen once at run time, `LUTRA_ISA` forces one) and the worker threads;
//! - [`PackedMatrix::pack`]: integer codes + group scales (+ offsets) → the LUT layout;
//!   [`PackedMatrix::pack_super_blocks`] takes two-level (K-quant) scales, exactly;
//! - [`ActivationTables::build`]: f32 activations → int8 tables, once per distinct input;
//! - [`PackedMatrix::matmul`]: tables → f32 outputs, for one token (GEMV) or a batch (GEMM);
//!   [`PackedMatrix::matmul_many`] runs the matrices that read the same tables (q/k/v) in one dispatch;
//! - [`TernaryMatrix`] and [`TernaryTables`] for ternary (BitNet) weights at 1.67 bits per weight;
//! - [`Int8Matrix`] for 8-bit tensors (embeddings, LM heads) and [`DenseMatrix`] for f32 ones;
//! - [`vector`]: `dot`, `axpy` and their many-row forms for attention, on the same ISA.
//!
//! ```
//! use lutra_kernels::{ActivationTables, Cpu, Grouping, PackedMatrix, PlaneScales, QuantSpec, QuantizedWeights};
//!
//! let (rows, cols) = (8, 64);
//! let codes: Vec<u8> = (0..rows * cols).map(|i| (i % 4) as u8).collect();
//! let scales = vec![0.5f32; rows * cols / 32];
//! let spec = QuantSpec { rows, cols, bits: 2, grouping: Grouping::Size(32), plane_scales: PlaneScales::Uniform };
//! let weights = QuantizedWeights { spec, codes: &codes, scales: &scales, offsets: None };
//! let matrix = PackedMatrix::pack(&weights).unwrap();
//!
//! let cpu = Cpu::new(1).unwrap();
//! let x = vec![1.0f32; cols];
//! let mut tables = ActivationTables::new(cols);
//! tables.build(&cpu, &x, 1).unwrap();
//! let mut out = vec![0.0f32; rows];
//! matrix.matmul(&cpu, &tables, &mut out).unwrap();
//! // Each row has 16 elements of each code 0..4, so its dot with ones is 0.5 * 16 * (0+1+2+3).
//! assert!((out[0] - 48.0).abs() < 0.5);
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod cpu;
mod dense;
mod dot;
mod error;
pub mod ffi;
mod int8;
mod isa;
mod lut;
mod mapped;
#[cfg(feature = "measure")]
pub mod measure;
mod packed;
mod pool;
mod rng;
mod storage;
mod tables;
mod ternary;
#[cfg(test)]
mod test_util;
mod tiling;
pub mod vector;

pub use cpu::Cpu;
pub use dense::DenseMatrix;
pub use error::{KernelError, Result};
pub use int8::{Int8Activations, Int8Matrix, KVALUES_IQ4NL};
pub use isa::Isa;
pub use mapped::MappedFile;
pub use packed::{
    Grouping, PackedLayout, PackedMatrix, PackedMatrixBuilder, PackedParts, PlaneScales, QuantSpec,
    QuantizedWeights, SuperBlockMatrixBuilder, SuperBlockWeights, SUPER_BLOCK,
};
pub use rng::SplitMix64;
pub use storage::Storage;
pub use tables::ActivationTables;
pub use ternary::{TernaryMatrix, TernaryTables, TernaryWeights};
