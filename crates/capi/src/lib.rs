//! # lutra's C library
//!
//! `liblutra.so` / `liblutra.a` and their header `include/lutra.h` (generated from this crate by
//! cbindgen; the `header` test checks it is current). Every function is thread-safe, checks its
//! pointer arguments for NULL and its strings for UTF-8, and catches panics: a failure is a NULL or
//! -1 return and a message in [`lutra_last_error`](error::lutra_last_error), never a crash.
//!
//! ```text
//! lutra_model_load ─ lutra_model { Arc<Engine> } ─┬─ lutra_generate        (raw prompt text)
//!                                                 ├─ lutra_tokenize
//!                                                 └─ lutra_session_new ─ lutra_session { Arc<Engine>, messages }
//!                                                                          └─ lutra_session_send (chat turn)
//! ```
//! Requests of every thread go to the model's one [`Engine`](lutra_runtime::engine::Engine), which
//! batches them; each caller blocks on its own request and gets its pieces on its own thread.

// The Rust names are the C names.
#![allow(non_camel_case_types)]

// In the order the header lists them: handles and options, then the calls on them, then errors
// and strings.
pub mod model;

pub mod params;

pub mod session;

pub mod generate;

pub mod tokenize;

pub mod error;

pub mod strings;

mod ffi;
mod stream;
mod text;

#[cfg(test)]
mod tests;
