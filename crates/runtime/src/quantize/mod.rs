//! Quantization of weight matrices to the LUT kernels' low-bit forms.
//!
//! - Round to nearest with min/max scales, applied at load time: [`Requantize`], [`quantize_rtn`].
//! - [`grid`]: the [`Grid`] trait (how a block of a row maps to codes) and [`UniformGrid`]
//!   (`w = s·q + m`); [`hlq`]: [`PlaneGrid`], ELUTQ's hierarchical linear quantization
//!   (`w = z + Σ_p s_p·q_p`).
//! - [`gptq`](mod@gptq): GPTQ over any grid with the Hessian of the layer's calibration inputs,
//!   and [`rtn`](fn@rtn) over any grid for comparison.
//!
//! Calibrated quantization of whole models (`lutra quantize`) is [`crate::quantizer`].

pub mod ggml_types;
pub mod gptq;
pub mod grid;
pub mod hlq;
mod joint_refit;
mod rtn;

pub use gptq::{
    gptq, gptq_prepared, rtn, GptqOptions, PreparedHessian, Quantized, SourcePairs, SourceShift,
};
pub use grid::{Grid, UniformBlock, UniformGrid};
pub use hlq::{PlaneBlock, PlaneGrid};
pub use rtn::{quantize_rtn, requantize, Requantize};

#[cfg(test)]
mod tests;
