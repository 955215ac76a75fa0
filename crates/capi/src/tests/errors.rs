//! Failures end in NULL or -1 and a message, never a crash.

use std::ffi::c_char;
use std::ptr::{null, null_mut};

use lutra_runtime::fixtures::TempDir;

use super::{c_string, collect, last_error, real_model, Pieces};
use crate::generate::lutra_generate;
use crate::model::{lutra_model_free, lutra_model_load};
use crate::params::{lutra_generate_params_default, lutra_load_options};
use crate::session::{
    lutra_session_cancel, lutra_session_free, lutra_session_new, lutra_session_send,
};
use crate::strings::{lutra_string_free, lutra_version};
use crate::tokenize::lutra_tokenize;

#[test]
fn a_missing_file_gives_null_and_names_the_file() {
    let dir = TempDir::new("capi-missing");
    let path = dir.join("no-such-model.gguf");
    let c_path = c_string(path.to_str().unwrap());
    let model = lutra_model_load(c_path.as_ptr(), null());
    assert!(model.is_null());
    let message = last_error().expect("an error message");
    assert!(
        message.contains(path.to_str().unwrap()),
        "the message names the file: {message}"
    );
}

#[test]
fn a_file_that_is_not_a_model_is_refused() {
    let dir = TempDir::new("capi-not-a-model");
    let path = dir.join("not-a-model.gguf");
    std::fs::write(&path, b"this is not a GGUF file").unwrap();
    let c_path = c_string(path.to_str().unwrap());
    let model = lutra_model_load(c_path.as_ptr(), null());
    assert!(model.is_null());
    let message = last_error().expect("an error message");
    assert!(message.contains(path.to_str().unwrap()), "{message}");
}

#[test]
fn out_of_range_load_options_are_refused_before_loading() {
    let path = c_string("/nonexistent/model.gguf");
    for (opts, field) in [
        (
            lutra_load_options {
                threads: 100_000,
                context_length: 0,
                parallel: 0,
            },
            "threads",
        ),
        (
            lutra_load_options {
                threads: 0,
                context_length: 0,
                parallel: 100_000,
            },
            "parallel",
        ),
    ] {
        let model = lutra_model_load(path.as_ptr(), &opts);
        assert!(model.is_null());
        let message = last_error().unwrap();
        assert!(message.starts_with(field), "{message}");
    }
}

#[test]
fn null_arguments_are_errors() {
    let model = real_model();
    let text = c_string("Hi");
    let mut n = 0usize;

    // SAFETY (every call below): NULL where a pointer is tested, valid pointers elsewhere.
    assert!(lutra_model_load(null(), null()).is_null());
    assert_eq!(last_error().as_deref(), Some("path is NULL"));

    assert!(lutra_session_new(null(), null()).is_null());
    assert_eq!(last_error().as_deref(), Some("model is NULL"));

    let status = lutra_tokenize(null(), text.as_ptr(), 1, null_mut(), 0, &mut n);
    assert_eq!(
        (status, last_error().as_deref()),
        (-1, Some("model is NULL"))
    );
    let status = lutra_tokenize(model, null(), 1, null_mut(), 0, &mut n);
    assert_eq!(
        (status, last_error().as_deref()),
        (-1, Some("text is NULL"))
    );
    let status = lutra_tokenize(model, text.as_ptr(), 1, null_mut(), 0, null_mut());
    assert_eq!(
        (status, last_error().as_deref()),
        (-1, Some("n_tokens is NULL"))
    );
    let status = lutra_tokenize(model, text.as_ptr(), 1, null_mut(), 4, &mut n);
    assert_eq!(status, -1);
    assert_eq!(
        last_error().as_deref(),
        Some("tokens is NULL but capacity is 4")
    );

    let mut out = std::ptr::dangling_mut::<c_char>(); // a stale value the call must overwrite
    let status = lutra_generate(null(), text.as_ptr(), null(), None, null_mut(), &mut out);
    assert_eq!(
        (status, last_error().as_deref()),
        (-1, Some("model is NULL"))
    );
    assert!(out.is_null(), "*out is NULL after an error");
    let status = lutra_generate(model, null(), null(), None, null_mut(), null_mut());
    assert_eq!(
        (status, last_error().as_deref()),
        (-1, Some("prompt is NULL"))
    );

    let status = lutra_session_send(
        null_mut(),
        text.as_ptr(),
        null(),
        None,
        null_mut(),
        &mut out,
    );
    assert_eq!(
        (status, last_error().as_deref()),
        (-1, Some("session is NULL"))
    );
    let session = lutra_session_new(model, null());
    assert!(!session.is_null(), "{:?}", last_error());
    let status = lutra_session_send(session, null(), null(), None, null_mut(), &mut out);
    assert_eq!(
        (status, last_error().as_deref()),
        (-1, Some("user_message is NULL"))
    );
    assert_eq!(lutra_session_cancel(null_mut()), -1);
    assert_eq!(last_error().as_deref(), Some("session is NULL"));

    // Destructors take NULL.
    lutra_session_free(session);
    lutra_session_free(null_mut());
    lutra_model_free(null_mut());
    lutra_string_free(null_mut());
}

#[test]
fn strings_must_be_utf8() {
    let model = real_model();
    let bad = c"caf\xe9".as_ptr(); // Latin-1 é
    let mut n = 0usize;
    let status = lutra_tokenize(model, bad, 1, null_mut(), 0, &mut n);
    assert_eq!(status, -1);
    let message = last_error().unwrap();
    assert!(message.starts_with("text is not valid UTF-8"), "{message}");
    assert!(lutra_session_new(model, bad).is_null());
    assert!(last_error()
        .unwrap()
        .starts_with("system_prompt is not valid UTF-8"));
}

#[test]
fn bad_params_are_refused_without_generating() {
    let model = real_model();
    let prompt = c_string("Hello");
    let mut params = lutra_generate_params_default();
    params.top_p = 2.0;
    let mut pieces = Pieces::default();
    let status = lutra_generate(
        model,
        prompt.as_ptr(),
        &params,
        Some(collect),
        pieces.user_data(),
        null_mut(),
    );
    assert_eq!(status, -1);
    assert_eq!(
        last_error().as_deref(),
        Some("top_p is 2; it must lie in [0, 1]")
    );
    assert!(pieces.pieces.is_empty());
}

#[test]
fn a_success_clears_the_last_error() {
    let model = real_model();
    assert!(lutra_model_load(null(), null()).is_null());
    assert!(last_error().is_some());
    let text = c_string("Hi");
    let mut tokens = [0u32; 16];
    let mut n = 0usize;
    let status = lutra_tokenize(model, text.as_ptr(), 0, tokens.as_mut_ptr(), 16, &mut n);
    assert_eq!(status, 0);
    assert_eq!(last_error(), None);
}

#[test]
fn errors_are_per_thread() {
    assert!(lutra_model_load(null(), null()).is_null());
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(
        other, None,
        "another thread does not see this thread's error"
    );
    assert_eq!(last_error().as_deref(), Some("path is NULL"));
}

#[test]
fn the_version_is_the_crate_version() {
    let version = lutra_kernels::ffi::c_str(lutra_version()).expect("a static string");
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}
