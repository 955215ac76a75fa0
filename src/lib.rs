//! lutra: CPU inference for low-bit LLMs whose matrix multiplications are table lookups.
//!
//! This crate is a thin facade over [`lutra_runtime`] (models, tokenizers, generation) and
//! [`lutra_kernels`] (the LUT matrix kernels). It re-exports the runtime's inference API by name,
//! so that the made-up models and files the `lutra` tool and the tests use
//! (`lutra_runtime::fixtures`) are not part of it.

#![forbid(unsafe_code)]

pub use lutra_kernels as kernels;
pub use lutra_runtime::{
    architecture, attention, chat, config, engine, error, generate, gguf, kv_cache, linear, llama,
    perplexity, quantize, quantizer, rope, safetensors, sampler, session, tokenizer, weights,
};
pub use lutra_runtime::{
    CancelToken, ChatSession, Engine, EngineOptions, Error, GenerateOptions, Generator,
    PerplexityResult, Piece, Result, Sampler, SamplerConfig, Stats, StopReason,
};

/// The README, compiled by `cargo test --doc` so that its library example keeps building.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
