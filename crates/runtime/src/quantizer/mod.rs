//! `lutra quantize`: whole models quantized with calibration, into lutra files or standard GGUF
//! types.
//!
//! - [`calibration`]: token sequences cut from a text, and the Hessians `Σ x·xᵀ` of matrix inputs;
//! - [`blocks`]: a loaded model quantized block by block, the calibration sequences carried
//!   through the blocks already quantized (the numerics are [`crate::quantize`]);
//! - [`file`]: the same from a model file into a GGUF file ([`file::quantize`]).

pub mod blocks;
pub mod calibration;
pub mod file;
