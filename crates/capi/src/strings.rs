//! The strings C frees or reads: `lutra_string_free` and the library's version.

use std::ffi::{c_char, CStr};

/// The crate version as a C string (a compile-time constant: a missing NUL fails the build).
const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("the package version has an interior NUL"),
    };

/// Frees a string that lutra returned through an out-parameter (`reply_out`, `out`). NULL is
/// ignored. Never pass it the result of `lutra_last_error` or `lutra_version`.
///
/// # Contract (C caller)
/// `s` is NULL or a string lutra allocated and that was not freed yet.
#[no_mangle]
pub extern "C" fn lutra_string_free(s: *mut c_char) {
    crate::error::guard_void(|| {
        drop(lutra_kernels::ffi::take_c_string(s));
    })
}

/// The library's version ("0.1.0"), a static string: do not free it.
#[no_mangle]
pub extern "C" fn lutra_version() -> *const c_char {
    VERSION.as_ptr()
}
