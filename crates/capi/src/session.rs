//! Chat sessions: a conversation whose every turn renders the whole conversation with the model's
//! chat template and submits it; the engine reuses the cached prefix of earlier turns.

use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::ThreadId;

use lutra_runtime::chat::Message;
use lutra_runtime::engine::{Engine, Request};
use lutra_runtime::generate::CancelToken;
use lutra_runtime::session::chat_prompt;

use crate::error::{guard, guard_void, ApiResult};
use crate::ffi::{opt_ref_arg, opt_str_arg, ref_arg, str_arg, write_out};
use crate::model::lutra_model;
use crate::params::lutra_generate_params;
use crate::stream::{self, lutra_token_callback, Sink};
use crate::text::to_c_string;

/// A chat conversation with a model (opaque). Turns of one session run one at a time (a second
/// `lutra_session_send` waits for the first); different sessions run at once, batched together.
pub struct lutra_session {
    /// The model's engine, held so that the session outlives `lutra_model_free`.
    engine: Arc<Engine>,
    /// System, user and assistant messages so far; locked for a whole turn.
    messages: Mutex<Vec<Message>>,
    /// The cancel token of the turn in progress, if any.
    running: Mutex<Option<CancelToken>>,
    /// The thread running a turn, if any (a callback sending on its own session is refused).
    turn_thread: Mutex<Option<ThreadId>>,
}

/// Marks the calling thread as running a turn of a session until dropped.
struct TurnMark<'s>(&'s Mutex<Option<ThreadId>>);

impl<'s> TurnMark<'s> {
    fn new(slot: &'s Mutex<Option<ThreadId>>) -> TurnMark<'s> {
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(std::thread::current().id());
        TurnMark(slot)
    }
}

impl Drop for TurnMark<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl lutra_session {
    /// Runs one turn: `user` joins the conversation, the reply streams to `sink` and joins it
    /// too. On error the user message is taken back out.
    fn send(&self, user: &str, params: &lutra_generate_params, sink: &Sink) -> ApiResult<String> {
        let options = params.options()?;
        let this_thread = std::thread::current().id();
        if *self
            .turn_thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            == Some(this_thread)
        {
            return Err(
                "lutra_session_send was called from a callback of the same session's turn; \
                 a session runs one turn at a time"
                    .into(),
            );
        }
        let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        let _mark = TurnMark::new(&self.turn_thread);
        messages.push(Message::new("user", user));
        let turn = || -> ApiResult<String> {
            let prompt = chat_prompt(self.engine.model(), &messages)?;
            let mut request = Request::new(prompt.tokens, options);
            request.stop_tokens.extend(prompt.end_of_turn);
            stream::run(&self.engine, request, sink, Some(&self.running))
        };
        match turn() {
            Ok(reply) => {
                messages.push(Message::new("assistant", &reply));
                Ok(reply)
            }
            Err(e) => {
                messages.pop();
                Err(e)
            }
        }
    }
}

/// Starts a conversation with `model`, with `system_prompt` as its system message (NULL or "": no
/// system message).
///
/// Returns NULL on error. The session keeps the model alive: it may outlive `lutra_model_free`.
/// Free it with `lutra_session_free`.
///
/// # Contract (C caller)
/// `model` is NULL or a live model; `system_prompt` is NULL or a NUL-terminated string.
#[no_mangle]
pub extern "C" fn lutra_session_new(
    model: *const lutra_model,
    system_prompt: *const c_char,
) -> *mut lutra_session {
    guard(std::ptr::null_mut(), || {
        let model = ref_arg(model, "model")?;
        let system = opt_str_arg(system_prompt, "system_prompt")?;
        if model.model().tokenizer().is_none() {
            return Err("this model has no tokenizer, so it cannot chat".into());
        }
        let messages = system
            .filter(|s| !s.is_empty())
            .map(|s| vec![Message::new("system", s)])
            .unwrap_or_default();
        let session = lutra_session {
            engine: Arc::clone(&model.engine),
            messages: Mutex::new(messages),
            running: Mutex::new(None),
            turn_thread: Mutex::new(None),
        };
        Ok(Box::into_raw(Box::new(session)))
    })
}

/// Frees a session (NULL is ignored); no other call may be using it.
///
/// # Contract (C caller)
/// `session` is NULL or a session from `lutra_session_new` that was not freed yet.
#[no_mangle]
pub extern "C" fn lutra_session_free(session: *mut lutra_session) {
    guard_void(|| {
        drop(lutra_kernels::ffi::take_box(session));
    })
}

/// Sends `user_message` and generates the assistant's reply, which then joins the conversation
/// (a reply stopped by the callback or `lutra_session_cancel` joins as far as it got).
///
/// `params` may be NULL for `lutra_generate_params_default()`. `callback` (may be NULL) gets each
/// piece of the reply as it is generated, on this thread; returning non-zero stops the reply.
/// When `reply_out` is not NULL, `*reply_out` receives the whole reply (free it with
/// `lutra_string_free`), or NULL on error.
///
/// Returns 0 on success (also when the reply was stopped), -1 on error (`lutra_last_error` says
/// why; the user message is then not part of the conversation). A conversation too long for the
/// context is an error.
///
/// The callback may call other lutra functions (`lutra_session_cancel` included); a
/// `lutra_session_send` on this same session from it fails (a session runs one turn at a time).
///
/// # Contract (C caller)
/// `session` is NULL or a live session; `user_message` is NULL or a NUL-terminated string;
/// `params` is NULL or points to a `lutra_generate_params`; `callback` is NULL or a function of
/// the `lutra_token_callback` type; `reply_out` is NULL or writable.
#[no_mangle]
pub extern "C" fn lutra_session_send(
    session: *mut lutra_session,
    user_message: *const c_char,
    params: *const lutra_generate_params,
    callback: lutra_token_callback,
    user_data: *mut c_void,
    reply_out: *mut *mut c_char,
) -> c_int {
    guard(-1, || {
        write_out(reply_out, std::ptr::null_mut());
        let session = ref_arg(session, "session")?;
        let user = str_arg(user_message, "user_message")?;
        let params = opt_ref_arg(params).copied().unwrap_or_default();
        let sink = Sink {
            callback,
            user_data,
        };
        let reply = session.send(user, &params, &sink)?;
        write_out(reply_out, to_c_string(&reply).into_raw());
        Ok(0)
    })
}

/// Stops the reply `session` is generating, before its next token (the `lutra_session_send` in
/// progress then returns 0 with the reply so far). May be called from any thread; does nothing
/// when no reply is in progress. Returns 0, or -1 when `session` is NULL.
///
/// # Contract (C caller)
/// `session` is NULL or a live session.
#[no_mangle]
pub extern "C" fn lutra_session_cancel(session: *mut lutra_session) -> c_int {
    guard(-1, || {
        let session = ref_arg(session, "session")?;
        let running = session
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(token) = running.as_ref() {
            token.cancel();
        }
        Ok(0)
    })
}
