//! The model handle: a loaded model and the engine that batches every thread's requests on it.

use std::path::Path;
use std::sync::Arc;

use lutra_runtime::engine::{Engine, EngineOptions};
use lutra_runtime::llama::{LoadOptions, Model};

use crate::error::{guard, guard_void, ApiError};
use crate::ffi::{opt_ref_arg, str_arg};
use crate::params::{lutra_load_options, DEFAULT_PARALLEL};

/// Most worker threads a model may have.
const MAX_THREADS: usize = 1024;
/// Most sequences one batch may hold.
const MAX_PARALLEL: usize = 256;

/// A loaded model (opaque). Every function taking it may be called from any number of threads at
/// once; their requests are decoded together.
pub struct lutra_model {
    /// Shared with every session made from this model, so sessions outlive `lutra_model_free`.
    pub(crate) engine: Arc<Engine>,
}

impl lutra_model {
    /// The model the engine runs.
    pub(crate) fn model(&self) -> &Model {
        self.engine.model()
    }
}

/// Loads a model: a GGUF file, or a Hugging Face folder (`config.json`, `tokenizer.json`,
/// safetensors). `opts` may be NULL for the defaults.
///
/// Returns NULL on error (`lutra_last_error` says why, naming the file). Free the model with
/// `lutra_model_free`.
///
/// # Contract (C caller)
/// `path` is NULL or a NUL-terminated string; `opts` is NULL or points to a `lutra_load_options`.
#[no_mangle]
pub extern "C" fn lutra_model_load(
    path: *const std::ffi::c_char,
    opts: *const lutra_load_options,
) -> *mut lutra_model {
    guard(std::ptr::null_mut(), || {
        let path = str_arg(path, "path")?;
        let opts = opt_ref_arg(opts).copied().unwrap_or_default();
        if opts.threads as usize > MAX_THREADS {
            return Err(ApiError(format!(
                "threads is {}; at most {MAX_THREADS} are allowed (0: one per core)",
                opts.threads
            )));
        }
        if opts.parallel as usize > MAX_PARALLEL {
            return Err(ApiError(format!(
                "parallel is {}; at most {MAX_PARALLEL} sequences are allowed (0: {DEFAULT_PARALLEL})",
                opts.parallel
            )));
        }
        let load = LoadOptions {
            threads: opts.threads as usize,
            context_length: (opts.context_length > 0).then_some(opts.context_length as usize),
            ..LoadOptions::default()
        };
        let model = Model::load(Path::new(path), &load)?;
        let parallel = match opts.parallel {
            0 => DEFAULT_PARALLEL,
            n => n as usize,
        };
        let engine = Engine::new(
            Arc::new(model),
            EngineOptions {
                parallel,
                ..EngineOptions::default()
            },
        )
        .map_err(|e| ApiError(format!("{path}: {e}")))?;
        let handle = lutra_model {
            engine: Arc::new(engine),
        };
        Ok(Box::into_raw(Box::new(handle)))
    })
}

/// Frees a model (NULL is ignored). Sessions made from it stay usable: each holds the model until
/// it is freed itself, and the memory goes with the last of them. No other call may be using
/// `model` (this pointer) while or after it is freed.
///
/// # Contract (C caller)
/// `model` is NULL or a model from `lutra_model_load` that was not freed yet.
#[no_mangle]
pub extern "C" fn lutra_model_free(model: *mut lutra_model) {
    guard_void(|| {
        drop(lutra_kernels::ffi::take_box(model));
    })
}
