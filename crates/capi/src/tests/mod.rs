//! The C functions called as C calls them: raw pointers, C strings, callbacks with user data.
//!
//! The real-model tests use the fetched SmolLM2-135M-Instruct Q4_1 file (`bash models/fetch.sh`),
//! loaded once per test binary through `lutra_model_load`.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::error::lutra_last_error;
use crate::model::{lutra_model, lutra_model_load};
use crate::params::lutra_load_options;
use crate::strings::lutra_string_free;

mod errors;
mod session;
mod tokenize;

/// The fetched SmolLM2 file.
fn real_model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `bash models/fetch.sh` first",
        path.display()
    );
    path
}

/// The real model, loaded once through the C API (never freed: tests share it).
fn real_model() -> &'static lutra_model {
    static MODEL: OnceLock<&'static lutra_model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = c_string(real_model_path().to_str().expect("UTF-8 path"));
        let opts = lutra_load_options {
            threads: 2,
            context_length: 1024,
            parallel: 4,
        };
        let model = lutra_model_load(path.as_ptr(), &opts);
        assert!(!model.is_null(), "lutra_model_load: {:?}", last_error());
        lutra_kernels::ffi::as_ref(model).expect("checked not NULL")
    })
}

fn c_string(s: &str) -> CString {
    CString::new(s).expect("no NUL in test strings")
}

/// The calling thread's last error message.
fn last_error() -> Option<String> {
    lutra_kernels::ffi::c_str(lutra_last_error()).map(|s| s.to_string_lossy().into_owned())
}

/// Takes ownership of a string lutra returned through an out-parameter.
fn take_string(ptr: *mut c_char) -> Option<String> {
    let text = lutra_kernels::ffi::c_str(ptr)?.to_str().map(str::to_owned);
    lutra_string_free(ptr);
    Some(text.expect("lutra hands out UTF-8"))
}

/// What a callback saw; passed as `user_data`.
#[derive(Default)]
struct Pieces {
    pieces: Vec<String>,
    /// Return non-zero (stop) once this many pieces arrived.
    stop_after: Option<usize>,
    /// Called after each piece (on the generating thread).
    on_piece: Option<Box<dyn FnMut(usize)>>,
}

impl Pieces {
    fn text(&self) -> String {
        self.pieces.concat()
    }

    fn user_data(&mut self) -> *mut c_void {
        (self as *mut Pieces).cast()
    }
}

/// The test callback: records the piece in the `Pieces` behind `user_data`.
extern "C" fn collect(piece: *const c_char, user_data: *mut c_void) -> c_int {
    let pieces = lutra_kernels::ffi::as_mut(user_data.cast::<Pieces>()).expect("user_data");
    let text = lutra_kernels::ffi::c_str(piece)
        .expect("a piece")
        .to_string_lossy()
        .into_owned();
    pieces.pieces.push(text);
    let n = pieces.pieces.len();
    if let Some(f) = pieces.on_piece.as_mut() {
        f(n);
    }
    c_int::from(pieces.stop_after == Some(n))
}
