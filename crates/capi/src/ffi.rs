//! Reading the arguments C passes: NULL checks, UTF-8 strings, handles, out-parameters. The
//! pointer operations themselves are `lutra_kernels::ffi`'s.

use std::ffi::c_char;

use lutra_kernels::ffi;

use crate::error::{ApiError, ApiResult};

/// The UTF-8 text of the NUL-terminated string `ptr`, argument `name` of the call.
pub(crate) fn str_arg<'a>(ptr: *const c_char, name: &str) -> ApiResult<&'a str> {
    opt_str_arg(ptr, name)?.ok_or_else(|| ApiError(format!("{name} is NULL")))
}

/// Like [`str_arg`], but NULL is `None`.
pub(crate) fn opt_str_arg<'a>(ptr: *const c_char, name: &str) -> ApiResult<Option<&'a str>> {
    ffi::c_str(ptr)
        .map(|s| {
            s.to_str()
                .map_err(|e| ApiError(format!("{name} is not valid UTF-8: {e}")))
        })
        .transpose()
}

/// The object behind the handle or struct pointer `ptr`, argument `name` of the call.
pub(crate) fn ref_arg<'a, T>(ptr: *const T, name: &str) -> ApiResult<&'a T> {
    ffi::as_ref(ptr).ok_or_else(|| ApiError(format!("{name} is NULL")))
}

pub(crate) use ffi::{as_ref as opt_ref_arg, write as write_out};
