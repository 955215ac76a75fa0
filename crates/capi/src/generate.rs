//! Plain completion of raw prompt text.

use std::ffi::{c_char, c_int, c_void};

use lutra_runtime::engine::Request;

use crate::error::guard;
use crate::ffi::{opt_ref_arg, ref_arg, str_arg, write_out};
use crate::model::lutra_model;
use crate::params::lutra_generate_params;
use crate::stream::{self, lutra_token_callback, Sink};
use crate::text::to_c_string;

/// Continues `prompt` (raw text; special-token text such as `<|im_start|>` becomes its token, and
/// a BOS is added when the model asks for one), without a chat template.
///
/// `params` may be NULL for `lutra_generate_params_default()`. `callback` (may be NULL) gets each
/// piece of text as it is generated, on this thread; returning non-zero stops generation. When
/// `out` is not NULL, `*out` receives the whole generated text (free it with
/// `lutra_string_free`), or NULL on error.
///
/// Returns 0 on success (also when the callback stopped generation), -1 on error
/// (`lutra_last_error` says why). Blocks until generation ends; calls from several threads on one
/// model are decoded together.
///
/// # Contract (C caller)
/// `model` is NULL or a live model; `prompt` is NULL or a NUL-terminated string; `params` is NULL
/// or points to a `lutra_generate_params`; `callback` is NULL or a function of the
/// `lutra_token_callback` type; `out` is NULL or writable.
#[no_mangle]
pub extern "C" fn lutra_generate(
    model: *const lutra_model,
    prompt: *const c_char,
    params: *const lutra_generate_params,
    callback: lutra_token_callback,
    user_data: *mut c_void,
    out: *mut *mut c_char,
) -> c_int {
    guard(-1, || {
        write_out(out, std::ptr::null_mut());
        let model = ref_arg(model, "model")?;
        let prompt = str_arg(prompt, "prompt")?;
        let params = opt_ref_arg(params).copied().unwrap_or_default();
        let options = params.options()?;
        let tokenizer = model
            .model()
            .tokenizer()
            .ok_or("this model has no tokenizer, so it cannot take a text prompt")?;
        let tokens = tokenizer.encode(prompt, true)?;
        let sink = Sink {
            callback,
            user_data,
        };
        let text = stream::run(&model.engine, Request::new(tokens, options), &sink, None)?;
        write_out(out, to_c_string(&text).into_raw());
        Ok(0)
    })
}
