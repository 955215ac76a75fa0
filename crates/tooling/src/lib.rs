//! # lutra-tooling
//!
//! What `lutra bench` measures with, kept out of `lutra-runtime` so that an application embedding
//! the runtime compiles none of it:
//!
//! - [`synthetic`]: named shapes of well-known models (`llama2-7b`, `bitnet-2b`, ...) and the
//!   random weights a speed benchmark builds for them;
//! - [`bench`](mod@bench): llama-bench-style tests (`pp512`, `tg128`) timed over repetitions, with the CPU
//!   name and resident memory to report next to them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod synthetic;
