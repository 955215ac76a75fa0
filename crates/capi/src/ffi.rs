//! Reading the arguments C passes: NULL checks, UTF-8 strings, handles, out-parameters.

use std::ffi::{c_char, CStr};

use crate::error::{ApiError, ApiResult};

/// The UTF-8 text of the NUL-terminated string `ptr`, argument `name` of the call.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays unchanged for `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> ApiResult<&'a str> {
    if ptr.is_null() {
        return Err(ApiError(format!("{name} is NULL")));
    }
    // SAFETY: not NULL, and the caller guarantees a NUL-terminated string alive for 'a.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes
        .to_str()
        .map_err(|e| ApiError(format!("{name} is not valid UTF-8: {e}")))
}

/// Like [`str_arg`], but NULL is `None`.
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(ptr: *const c_char, name: &str) -> ApiResult<Option<&'a str>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller.
    unsafe { str_arg(ptr, name) }.map(Some)
}

/// The object behind the handle or struct pointer `ptr`, argument `name` of the call.
///
/// # Safety
/// `ptr` is NULL or points to a live, properly aligned `T` that is not freed for `'a`.
pub(crate) unsafe fn ref_arg<'a, T>(ptr: *const T, name: &str) -> ApiResult<&'a T> {
    // SAFETY: the caller guarantees a valid pointer when it is not NULL.
    unsafe { ptr.as_ref() }.ok_or_else(|| ApiError(format!("{name} is NULL")))
}

/// Like [`ref_arg`], but NULL is `None` (optional parameter structs).
///
/// # Safety
/// As [`ref_arg`].
pub(crate) unsafe fn opt_ref_arg<'a, T>(ptr: *const T) -> Option<&'a T> {
    // SAFETY: the caller guarantees a valid pointer when it is not NULL.
    unsafe { ptr.as_ref() }
}

/// Stores `value` in the out-parameter `ptr` when it is not NULL.
///
/// # Safety
/// `ptr` is NULL or valid for writing one `T`.
pub(crate) unsafe fn write_out<T>(ptr: *mut T, value: T) {
    if !ptr.is_null() {
        // SAFETY: not NULL and, by the caller's guarantee, writable; `write` drops no old value
        // (the slot may be uninitialised in C).
        unsafe { ptr.write(value) };
    }
}
