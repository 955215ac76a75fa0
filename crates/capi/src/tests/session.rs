//! Chat turns and completions on the real model, checked against the runtime's `Generator`.

use std::ffi::c_char;
use std::ptr::{null, null_mut};
use std::sync::Barrier;

use lutra_runtime::chat::Message;
use lutra_runtime::generate::{generate_text, GenerateOptions, Generator};
use lutra_runtime::sampler::SamplerConfig;
use lutra_runtime::session::chat_prompt;

use super::{c_string, collect, last_error, real_model, real_model_path, take_string, Pieces};
use crate::generate::lutra_generate;
use crate::model::{lutra_model_free, lutra_model_load};
use crate::params::{lutra_generate_params, lutra_generate_params_default, lutra_load_options};
use crate::session::{
    lutra_session, lutra_session_cancel, lutra_session_free, lutra_session_new, lutra_session_send,
};

fn greedy(max_tokens: u32) -> lutra_generate_params {
    lutra_generate_params {
        max_tokens,
        temperature: 0.0,
        ..lutra_generate_params_default()
    }
}

/// The runtime's greedy reply to a conversation: the same prompt tokens and end of turn the
/// session submits, run by a plain `Generator`.
fn reference_reply(messages: &[Message], max_tokens: usize) -> (String, usize) {
    let model = real_model().model();
    let prompt = chat_prompt(model, messages).unwrap();
    let opts = GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        ..GenerateOptions::default()
    };
    let mut generator = Generator::from_tokens(model, prompt.tokens, opts)
        .unwrap()
        .with_stop_token(prompt.end_of_turn);
    let text = generate_text(&mut generator).unwrap();
    (text, generator.stats().generated_tokens)
}

/// A new session without a system prompt.
fn new_session() -> *mut lutra_session {
    let session = lutra_session_new(real_model(), null());
    assert!(!session.is_null(), "lutra_session_new: {:?}", last_error());
    session
}

/// One turn through the C API; the reply and the pieces the callback saw.
fn send(
    session: *mut lutra_session,
    message: &str,
    params: &lutra_generate_params,
    pieces: &mut Pieces,
) -> String {
    let message = c_string(message);
    let mut reply: *mut c_char = null_mut();
    // writable out-pointer, all alive across the call.
    let status = lutra_session_send(
        session,
        message.as_ptr(),
        params,
        Some(collect),
        pieces.user_data(),
        &mut reply,
    );
    assert_eq!(status, 0, "lutra_session_send: {:?}", last_error());
    take_string(reply).expect("a reply")
}

#[test]
fn a_greedy_turn_is_the_generators_text_and_the_conversation_goes_on() {
    let session = new_session();
    let question = "What is the capital of France?";
    let mut pieces = Pieces::default();
    let reply = send(session, question, &greedy(48), &mut pieces);
    let mut messages = vec![Message::new("user", question)];
    let (expected, _) = reference_reply(&messages, 48);
    assert!(!reply.is_empty());
    assert_eq!(reply, expected);
    assert_eq!(pieces.text(), reply, "the callback saw the whole reply");
    assert!(pieces.pieces.iter().all(|p| !p.is_empty()));

    // The second turn renders both turns: the same text as the generator over that conversation.
    messages.push(Message::new("assistant", &reply));
    messages.push(Message::new("user", "And of Germany?"));
    let mut pieces = Pieces::default();
    let second = send(session, "And of Germany?", &greedy(48), &mut pieces);
    assert_eq!(second, reference_reply(&messages, 48).0);
    lutra_session_free(session);
}

#[test]
fn lutra_generate_is_the_generators_text() {
    let prompt = "The meaning of life is";
    let model = real_model().model();
    let opts = GenerateOptions {
        max_tokens: 24,
        sampler: SamplerConfig::greedy(),
        ..GenerateOptions::default()
    };
    let expected = generate_text(&mut Generator::new(model, prompt, opts).unwrap()).unwrap();

    let c_prompt = c_string(prompt);
    let mut pieces = Pieces::default();
    let mut out: *mut c_char = null_mut();
    let status = lutra_generate(
        real_model(),
        c_prompt.as_ptr(),
        &greedy(24),
        Some(collect),
        pieces.user_data(),
        &mut out,
    );
    assert_eq!(status, 0, "{:?}", last_error());
    let text = take_string(out).unwrap();
    assert!(!text.is_empty());
    assert_eq!(text, expected);
    assert_eq!(pieces.text(), text);

    // No callback, no out-pointer: still generates and succeeds.
    let status = lutra_generate(
        real_model(),
        c_prompt.as_ptr(),
        &greedy(4),
        None,
        null_mut(),
        null_mut(),
    );
    assert_eq!(status, 0, "{:?}", last_error());
}

#[test]
fn a_non_zero_callback_return_stops_the_reply() {
    let question = "Tell me a long story about a dragon who learns to read.";
    let (full, generated) = reference_reply(&[Message::new("user", question)], 64);
    assert!(generated > 8, "the uncut reply is long: {full:?}");

    let session = new_session();
    let mut pieces = Pieces {
        stop_after: Some(3),
        ..Pieces::default()
    };
    let reply = send(session, question, &greedy(64), &mut pieces);
    assert_eq!(
        pieces.pieces.len(),
        3,
        "no piece after the callback said stop"
    );
    assert_eq!(reply, pieces.text());
    assert!(
        full.starts_with(&reply) && reply.len() < full.len(),
        "{reply:?} cuts {full:?}"
    );

    // The cut reply joined the conversation, and the session goes on.
    let mut pieces = Pieces::default();
    let next = send(session, "Thanks!", &greedy(8), &mut pieces);
    assert!(!next.is_empty());
    lutra_session_free(session);
}

/// A session pointer handed to another thread as an address, as a C program may (lutra_session is
/// Sync; the pointer stays valid until the test frees it after joining).
#[derive(Clone, Copy)]
struct SessionPtr(usize);

impl SessionPtr {
    fn new(session: *mut lutra_session) -> SessionPtr {
        SessionPtr(session as usize)
    }

    fn get(self) -> *mut lutra_session {
        self.0 as *mut lutra_session
    }
}

#[test]
fn lutra_session_cancel_from_another_thread_stops_the_reply() {
    let question = "Tell me a long story about a dragon who learns to read.";
    let (full, generated) = reference_reply(&[Message::new("user", question)], 64);
    assert_eq!(
        generated, 64,
        "the uncut reply runs to max_tokens: {full:?}"
    );

    let session = new_session();
    let handle = SessionPtr::new(session);
    let mut pieces = Pieces {
        on_piece: Some(Box::new(move |n| {
            if n == 2 {
                let canceller = std::thread::spawn(move || {
                    let handle = handle;
                    lutra_session_cancel(handle.get())
                });
                assert_eq!(canceller.join().unwrap(), 0);
            }
        })),
        ..Pieces::default()
    };
    let reply = send(session, question, &greedy(64), &mut pieces);
    assert!(
        pieces.pieces.len() < 32,
        "the reply stopped soon after the cancel, not at max_tokens: {} pieces",
        pieces.pieces.len()
    );
    assert!(full.starts_with(&reply) && reply.len() < full.len());

    // Cancelling with no reply in progress does nothing, and the next turn runs in full.
    assert_eq!(lutra_session_cancel(session), 0);
    let mut pieces = Pieces::default();
    assert!(!send(session, "Thanks!", &greedy(8), &mut pieces).is_empty());
    lutra_session_free(session);
}

#[test]
fn a_callback_cannot_send_on_its_own_session() {
    let session = new_session();
    let handle = SessionPtr::new(session);
    let inner = std::rc::Rc::new(std::cell::RefCell::new(None));
    let seen = inner.clone();
    let mut pieces = Pieces {
        on_piece: Some(Box::new(move |n| {
            if n == 1 {
                let message = c_string("Interrupting!");
                let status = lutra_session_send(
                    handle.get(),
                    message.as_ptr(),
                    null(),
                    None,
                    null_mut(),
                    null_mut(),
                );
                *seen.borrow_mut() = Some((status, last_error()));
            }
        })),
        ..Pieces::default()
    };
    let reply = send(
        session,
        "What is the capital of France?",
        &greedy(8),
        &mut pieces,
    );
    assert!(!reply.is_empty());
    let (status, message) = inner.borrow_mut().take().expect("the callback ran");
    assert_eq!(status, -1);
    assert!(message.unwrap().contains("same session"));
    assert_eq!(last_error(), None, "the outer turn succeeded");
    lutra_session_free(session);
}

#[test]
fn two_sessions_on_two_threads_both_complete() {
    let questions = ["What is the capital of France?", "Name three colors."];
    let barrier = Barrier::new(questions.len());
    let replies: Vec<String> = std::thread::scope(|scope| {
        let threads: Vec<_> = questions
            .iter()
            .map(|&question| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let session = new_session();
                    barrier.wait();
                    let mut pieces = Pieces::default();
                    let reply = send(session, question, &greedy(32), &mut pieces);
                    assert_eq!(pieces.text(), reply);
                    lutra_session_free(session);
                    reply
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (question, reply) in questions.iter().zip(&replies) {
        assert!(!reply.is_empty(), "{question}");
        let (expected, _) = reference_reply(&[Message::new("user", question)], 32);
        assert_eq!(reply, &expected, "{question}");
    }
}

#[test]
fn a_session_outlives_lutra_model_free() {
    let path = c_string(real_model_path().to_str().unwrap());
    let opts = lutra_load_options {
        threads: 1,
        context_length: 256,
        parallel: 1,
    };
    let model = lutra_model_load(path.as_ptr(), &opts);
    assert!(!model.is_null(), "{:?}", last_error());
    let system = c_string("You are terse.");
    let session = lutra_session_new(model, system.as_ptr());
    assert!(!session.is_null(), "{:?}", last_error());
    lutra_model_free(model);
    let mut pieces = Pieces::default();
    let reply = send(session, "Hi!", &greedy(6), &mut pieces);
    assert!(!reply.is_empty());
    lutra_session_free(session);
}

#[test]
fn a_conversation_longer_than_the_context_is_an_error_and_is_not_kept() {
    let path = c_string(real_model_path().to_str().unwrap());
    let opts = lutra_load_options {
        threads: 1,
        context_length: 64,
        parallel: 1,
    };
    let model = lutra_model_load(path.as_ptr(), &opts);
    assert!(!model.is_null(), "{:?}", last_error());
    let session = lutra_session_new(model, null());
    let long = c_string(&"word ".repeat(80));
    let mut reply: *mut c_char = null_mut();
    let status = lutra_session_send(session, long.as_ptr(), null(), None, null_mut(), &mut reply);
    assert_eq!(status, -1);
    assert!(reply.is_null());
    let message = last_error().unwrap();
    assert!(message.contains("context"), "{message}");
    // The failed message is not part of the conversation: a short one still fits.
    let mut pieces = Pieces::default();
    assert!(!send(session, "Hi", &greedy(2), &mut pieces).is_empty());
    lutra_session_free(session);
    lutra_model_free(model);
}
