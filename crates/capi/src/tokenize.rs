//! Text to token ids with the model's tokenizer.

use std::ffi::{c_char, c_int};

use crate::error::{guard, ApiError};
use crate::ffi::{ref_arg, str_arg, write_out};
use crate::model::lutra_model;

/// Tokenizes `text` with the model's tokenizer. With `parse_special` non-zero, special-token text
/// written in `text` (`<|im_start|>`) becomes that token; with 0 it is tokenized as plain text.
/// A BOS token is added when the model asks for one.
///
/// `*n_tokens` is always set to the number of tokens `text` has (0 on other errors), and the first
/// `min(capacity, *n_tokens)` ids are written to `tokens`. Returns 0 when every token fitted, and
/// -1 when `capacity` was too small (or on any other error; `lutra_last_error` says which). To
/// size a buffer, call with `tokens` NULL and `capacity` 0, then again with `*n_tokens` slots.
///
/// # Contract (C caller)
/// `model` is NULL or a live model; `text` is NULL or a NUL-terminated string; `tokens` is NULL
/// or has room for `capacity` ids; `n_tokens` is NULL or writable.
#[no_mangle]
pub extern "C" fn lutra_tokenize(
    model: *const lutra_model,
    text: *const c_char,
    parse_special: c_int,
    tokens: *mut u32,
    capacity: usize,
    n_tokens: *mut usize,
) -> c_int {
    guard(-1, || {
        if n_tokens.is_null() {
            return Err("n_tokens is NULL".into());
        }
        write_out(n_tokens, 0);
        let model = ref_arg(model, "model")?;
        let text = str_arg(text, "text")?;
        if tokens.is_null() && capacity > 0 {
            return Err(ApiError(format!(
                "tokens is NULL but capacity is {capacity}"
            )));
        }
        let tokenizer = model
            .model()
            .tokenizer()
            .ok_or("this model has no tokenizer")?;
        let ids = tokenizer.encode(text, parse_special != 0)?;
        write_out(n_tokens, ids.len());
        let fit = ids.len().min(capacity);
        // `tokens` has room for `capacity` ≥ `fit` ids (the C caller's contract); NULL only
        // with capacity 0, checked above.
        if !lutra_kernels::ffi::copy_to(tokens, &ids[..fit]) {
            return Err("tokens is NULL".into());
        }
        if ids.len() > capacity {
            return Err(ApiError(format!(
                "the text has {} tokens, more than the capacity of {capacity}",
                ids.len()
            )));
        }
        Ok(0)
    })
}
