//! The pointer operations of lutra's C library (`crates/capi`), the one place a C caller's
//! pointers become Rust values.
//!
//! Each function takes a pointer exactly as a C caller handed it to an exported `extern "C"`
//! function and treats NULL as absent. Whether a non-NULL pointer is valid cannot be checked: it
//! is the C caller's side of the C API's contract (stated on each function of `include/lutra.h`),
//! as for every C library. These functions are therefore only for pointers received from C, never
//! for pointers made in Rust.

use std::ffi::{c_char, CStr, CString};

/// The NUL-terminated string at `ptr` (NULL: `None`).
///
/// Contract: `ptr` is NULL or points to a NUL-terminated string left unchanged for `'a`.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn c_str<'a>(ptr: *const c_char) -> Option<&'a CStr> {
    // SAFETY: not NULL, and by the C caller's contract a NUL-terminated string alive for 'a.
    (!ptr.is_null()).then(|| unsafe { CStr::from_ptr(ptr) })
}

/// The `T` at `ptr` (NULL: `None`).
///
/// Contract: `ptr` is NULL or points to a live, aligned `T`, not freed or written for `'a`.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn as_ref<'a, T>(ptr: *const T) -> Option<&'a T> {
    // SAFETY: the C caller's contract; `as_ref` itself maps NULL to None.
    unsafe { ptr.as_ref() }
}

/// The `T` at `ptr`, to modify (NULL: `None`): the `user_data` a C caller passed back to its own
/// callback.
///
/// Contract: `ptr` is NULL or points to a live, aligned `T` that nothing else reads or writes
/// for `'a`.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn as_mut<'a, T>(ptr: *mut T) -> Option<&'a mut T> {
    // SAFETY: the C caller's contract; `as_mut` itself maps NULL to None.
    unsafe { ptr.as_mut() }
}

/// Stores `value` in the out-parameter `ptr`; nothing when it is NULL. The old contents are not
/// read or dropped (C may pass uninitialized memory).
///
/// Contract: `ptr` is NULL or valid for writing one aligned `T`.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn write<T>(ptr: *mut T, value: T) {
    if !ptr.is_null() {
        // SAFETY: not NULL and, by the C caller's contract, writable.
        unsafe { ptr.write(value) };
    }
}

/// Copies `values` to the C buffer at `ptr`; nothing when `values` is empty.
///
/// Contract: `ptr` has room for `values.len()` aligned `T`s that no Rust value aliases (a C
/// caller's buffer). A NULL `ptr` with values to copy is refused (`false`).
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn copy_to<T: Copy>(ptr: *mut T, values: &[T]) -> bool {
    if values.is_empty() {
        return true;
    }
    if ptr.is_null() {
        return false;
    }
    // SAFETY: not NULL, and by the C caller's contract room for `values.len()` Ts in memory that
    // does not overlap `values` (a Rust slice).
    unsafe { std::slice::from_raw_parts_mut(ptr, values.len()) }.copy_from_slice(values);
    true
}

/// Takes back a value handed to C with `Box::into_raw` (NULL: `None`).
///
/// Contract: `ptr` is NULL or came from `Box::<T>::into_raw` and is given back once.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn take_box<T>(ptr: *mut T) -> Option<Box<T>> {
    // SAFETY: the C caller's contract: a pointer from Box::into_raw, freed once.
    (!ptr.is_null()).then(|| unsafe { Box::from_raw(ptr) })
}

/// Takes back a string handed to C with `CString::into_raw` (NULL: `None`).
///
/// Contract: `ptr` is NULL or came from `CString::into_raw` and is given back once.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn take_c_string(ptr: *mut c_char) -> Option<CString> {
    // SAFETY: the C caller's contract: a pointer from CString::into_raw, freed once.
    (!ptr.is_null()).then(|| unsafe { CString::from_raw(ptr) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_is_absent_and_values_round_trip() {
        assert!(c_str(std::ptr::null()).is_none());
        assert!(as_ref::<u32>(std::ptr::null()).is_none());
        assert!(take_box::<u32>(std::ptr::null_mut()).is_none());
        assert!(take_c_string(std::ptr::null_mut()).is_none());
        write::<u32>(std::ptr::null_mut(), 7);
        assert!(!copy_to::<u32>(std::ptr::null_mut(), &[1]));
        assert!(copy_to::<u32>(std::ptr::null_mut(), &[]));

        let s = CString::new("héllo").unwrap();
        assert_eq!(c_str(s.as_ptr()).unwrap().to_str().unwrap(), "héllo");
        let raw = CString::new("x").unwrap().into_raw();
        assert_eq!(take_c_string(raw).unwrap().as_bytes(), b"x");
        let boxed = Box::into_raw(Box::new(41u32));
        assert_eq!(as_ref(boxed as *const u32), Some(&41));
        *as_mut(boxed).unwrap() += 1;
        assert_eq!(*take_box(boxed).unwrap(), 42);
        let mut out = 0u32;
        write(&mut out, 9);
        assert_eq!(out, 9);
        let mut buf = [0u32; 3];
        assert!(copy_to(buf.as_mut_ptr(), &[4, 5]));
        assert_eq!(buf, [4, 5, 0]);
    }
}
