//! # lutra-runtime
//!
//! Loads Llama-family models, repacks their weights into the LUT layout of `lutra-kernels`, and
//! generates text. Data flows one way:
//!
//! ```text
//! file (GGUF | safetensors folder) → gguf / config: metadata + named tensors borrowed from the mmap
//!   → weights: codes + scales + offsets (one table of source types) → kernels: packed matrices
//!   → llama::Model (struct of layers) → forward(tokens, positions, &mut KvCache) → logits
//!   → sampler → generate::Generator (iterator of text pieces) → CLI or embedding app
//! ```

#![warn(missing_docs)]

pub mod chat;
pub mod config;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
