//! lutra: CPU inference for low-bit LLMs whose matrix multiplications are table lookups.
//!
//! This crate is a thin facade over [`lutra_runtime`] (models, tokenizers, generation) and
//! [`lutra_kernels`] (the LUT matrix kernels).

pub use lutra_kernels as kernels;
pub use lutra_runtime::*;

/// The README, compiled by `cargo test --doc` so that its library example keeps building.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
