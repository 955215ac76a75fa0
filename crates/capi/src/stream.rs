//! One request on the engine, its pieces handed to the C callback on the calling thread.

use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, PoisonError};

use lutra_runtime::engine::{Engine, Event, Request};
use lutra_runtime::generate::{CancelToken, StopReason};

use crate::error::{ApiError, ApiResult};
use crate::text::to_c_string;

/// Called with each piece of generated text (`piece`: NUL-terminated UTF-8, valid only during
/// the call) and the `user_data` given with it, on the thread that made the request. Return 0 to
/// go on, non-zero to stop generating (the call then returns 0 with the text so far).
pub type lutra_token_callback =
    Option<extern "C" fn(piece: *const c_char, user_data: *mut c_void) -> c_int>;

/// Where a request's pieces go.
pub(crate) struct Sink {
    pub(crate) callback: lutra_token_callback,
    pub(crate) user_data: *mut c_void,
}

impl Sink {
    /// Hands `text` to the callback; `false` when the callback asks to stop.
    fn deliver(&self, text: &str) -> bool {
        let Some(callback) = self.callback else {
            return true;
        };
        let piece = to_c_string(text);
        let status = callback(piece.as_ptr(), self.user_data);
        status == 0
    }
}

/// Submits `request`, returns the text it produced (all of it, or up to where the callback asked
/// to stop), delivers each non-empty piece to `sink` until it asks to stop, and waits for
/// the end. While it runs, `running` (if given) holds the request's cancel token so that another
/// thread can stop it. Pieces that arrive after the callback asked to stop are dropped.
pub(crate) fn run(
    engine: &Engine,
    request: Request,
    sink: &Sink,
    running: Option<&Mutex<Option<CancelToken>>>,
) -> ApiResult<String> {
    let mut stream = engine.submit(request)?;
    let cancel = stream.cancel_token();
    if let Some(slot) = running {
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(cancel.clone());
    }
    let mut text = String::new();
    let mut stopped_by_caller = false;
    let mut completion = None;
    for event in &mut stream {
        match event {
            Event::Piece(piece) => {
                if stopped_by_caller || piece.text.is_empty() {
                    continue;
                }
                text.push_str(&piece.text);
                if !sink.deliver(&piece.text) {
                    stopped_by_caller = true;
                    cancel.cancel();
                }
            }
            Event::Done(done) => {
                completion = Some(done);
                break;
            }
        }
    }
    if let Some(slot) = running {
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
    let completion =
        completion.ok_or("the engine ended the request without finishing it (shutting down?)")?;
    if completion.stop == StopReason::Failed {
        return Err(ApiError(
            completion
                .error
                .unwrap_or_else(|| "generation failed".to_owned()),
        ));
    }
    Ok(text)
}
