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

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod architecture;
pub mod attention;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod perplexity;
pub mod quantize;
pub mod quantizer;
pub mod rope;
pub mod rotation;
pub mod safetensors;
pub mod sampler;
pub mod session;
pub mod tokenizer;
pub mod weights;

pub use engine::{Engine, EngineOptions, Event, Request, RequestStream};
pub use error::{Error, Result};
pub use generate::{CancelToken, GenerateOptions, Generator, Piece, Stats, StopReason};
pub use perplexity::{perplexity, PerplexityResult};
pub use sampler::{Sampler, SamplerConfig};
pub use session::ChatSession;
