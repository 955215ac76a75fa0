//! Made-up models and files for tests and benchmarks; not part of the inference API.
//!
//! Compiled only with the `fixtures` feature (and in this crate's own tests):
//! - [`synthetic_model`] / [`synthetic_model_with`]: random weights of any shape, generated
//!   directly in kernel form (speed measurements, forward-pass tests);
//! - [`GgufWriter`], [`write_safetensors`]: files written on the fly, good or deliberately broken;
//! - [`tiny_llama_gguf`]: a complete tiny model file (weights, tokenizer, chat template);
//! - [`gguf_to_hf_folder`]: the same weights as a Hugging Face folder, to compare the loaders;
//! - [`requantized_lutra_file`]: a GGUF model requantized into a lutra file;
//! - [`TempDir`]: a fresh folder for a test's files, removed when dropped.

mod gguf_writer;
mod hf_folder;
mod lutra_file;
mod safetensors_writer;
mod temp_dir;
mod tiny_gguf;

pub use crate::llama::synthetic::{
    synthetic_model, synthetic_model_with, SyntheticSpec, SyntheticWeights,
};
pub use gguf_writer::GgufWriter;
pub use hf_folder::gguf_to_hf_folder;
pub use lutra_file::requantized_lutra_file;
pub use safetensors_writer::{write_safetensors, TensorData};
pub use temp_dir::TempDir;
pub use tiny_gguf::{i2_s_tensor, tiny_llama_gguf, TinyModelSpec, TINY_CHATML_TEMPLATE};
