//! Failures: the calling thread's last error message, and the guard every exported function runs
//! its body in (a panic becomes an error return).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A failure of one C API call, as the message [`lutra_last_error`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError(pub(crate) String);

impl From<lutra_runtime::Error> for ApiError {
    fn from(e: lutra_runtime::Error) -> ApiError {
        ApiError(e.to_string())
    }
}

impl From<String> for ApiError {
    fn from(message: String) -> ApiError {
        ApiError(message)
    }
}

impl From<&str> for ApiError {
    fn from(message: &str) -> ApiError {
        ApiError(message.to_owned())
    }
}

/// Result of a C API call's body.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

thread_local! {
    /// The message of this thread's last failed call; cleared when a fallible call succeeds.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Runs the body of a fallible exported function, catching panics, and records the outcome as
/// this thread's last error: none on success (also when a callback inside `body` made a failing
/// call), the message on failure, when `on_error` is returned.
pub(crate) fn guard<T>(on_error: T, body: impl FnOnce() -> ApiResult<T>) -> T {
    let message = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => {
            set_last_error(None);
            return value;
        }
        Ok(Err(ApiError(message))) => message,
        Err(payload) => panic_message(payload.as_ref()),
    };
    set_last_error(Some(message));
    on_error
}

/// Runs the body of an infallible exported function (a destructor): a panic is caught and
/// recorded as this thread's last error instead of unwinding into C.
pub(crate) fn guard_void(body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        set_last_error(Some(panic_message(payload.as_ref())));
    }
}

/// The error message of a caught panic.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_owned());
    format!("internal error in lutra (a panic, please report it): {what}")
}

fn set_last_error(message: Option<String>) {
    let message = message.map(|m| crate::text::to_c_string(&m));
    // `try_with`: during thread teardown the slot may be gone; the message is then dropped.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = message);
}

/// The message of the calling thread's last failed call, or NULL when its last fallible call
/// succeeded (or it has made none).
///
/// Every function that returns a status or a handle (`lutra_model_load`, `lutra_session_new`,
/// `lutra_session_send`, `lutra_session_cancel`, `lutra_generate`, `lutra_tokenize`) sets or
/// clears the message when it returns. The pointer stays valid until the calling thread's next
/// call of one of them returns; do not free it.
#[no_mangle]
pub extern "C" fn lutra_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| {
            slot.borrow()
                .as_ref()
                .map_or(std::ptr::null(), |m| m.as_ptr())
        })
        .unwrap_or(std::ptr::null())
}

#[cfg(test)]
mod tests {

    use super::{guard, lutra_last_error, ApiError};

    fn last_error() -> Option<String> {
        let ptr = lutra_last_error();
        lutra_kernels::ffi::c_str(ptr).map(|s| s.to_str().unwrap().to_owned())
    }

    #[test]
    fn a_panic_becomes_an_error_return() {
        let status = guard(-1, || -> Result<i32, ApiError> {
            panic!("boom at step {}", 3)
        });
        assert_eq!(status, -1);
        let message = last_error().unwrap();
        assert!(message.starts_with("internal error in lutra"), "{message}");
        assert!(message.ends_with("boom at step 3"), "{message}");
    }

    #[test]
    fn the_outer_calls_outcome_is_the_last_error() {
        let status = guard(-1, || {
            // A failing call made inside a successful one (a callback's, say).
            assert_eq!(guard(-1, || Err("inner".into())), -1);
            assert_eq!(last_error().as_deref(), Some("inner"));
            Ok(0)
        });
        assert_eq!((status, last_error()), (0, None));
        assert_eq!(guard(-1, || Err("outer".into())), -1);
        assert_eq!(last_error().as_deref(), Some("outer"));
    }
}
