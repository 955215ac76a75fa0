//! The scheduler on the real SmolLM2 model: requests batched together generate what each
//! generates alone, and the next turn of a long conversation reuses the first turn's cache.

use std::path::Path;
use std::sync::Arc;

use lutra::chat::Message;
use lutra::engine::{Completion, Engine, EngineOptions, Event, Request, RequestStream};
use lutra::generate::{GenerateOptions, Generator};
use lutra::llama::{LoadOptions, Model};
use lutra::sampler::SamplerConfig;
use lutra::session::chat_prompt;

const REAL_MODEL: &str = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf";

fn real_model() -> Arc<Model> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(REAL_MODEL);
    assert!(
        path.exists(),
        "{} is missing: run `bash models/fetch.sh` first",
        path.display()
    );
    let opts = LoadOptions {
        context_length: Some(2048),
        threads: 2,
        ..LoadOptions::default()
    };
    Arc::new(Model::load(&path, &opts).unwrap_or_else(|e| panic!("{e}")))
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        ..GenerateOptions::default()
    }
}

fn collect(stream: RequestStream) -> (String, Completion) {
    let mut text = String::new();
    for event in stream {
        match event {
            Event::Piece(p) => text.push_str(&p.text),
            Event::Done(c) => return (text, c),
        }
    }
    panic!("no Event::Done");
}

fn ask(model: &Model, question: &str) -> Request {
    let prompt = chat_prompt(model, &[Message::new("user", question)]).unwrap();
    let mut request = Request::new(prompt.tokens, greedy(24));
    request.stop_tokens.extend(prompt.end_of_turn);
    request
}

/// Eight chat requests on four sequences, submitted at once (prompt chunks and decode steps of
/// different requests share batches): each reply is exactly the one `Generator` gives alone.
#[test]
fn batched_chat_requests_answer_as_each_alone() {
    let model = real_model();
    let questions = [
        "What is the capital of France?",
        "Name three colors.",
        "Write a haiku about the sea.",
        "What is 12 times 12?",
        "Who wrote Hamlet?",
        "Give me a synonym for happy.",
        "What does a CPU do?",
        "Say hello in Spanish.",
    ];
    let engine = Engine::new(
        Arc::clone(&model),
        EngineOptions {
            parallel: 4,
            queue: 8,
        },
    )
    .unwrap();
    let streams: Vec<_> = questions
        .iter()
        .map(|q| engine.submit(ask(&model, q)).unwrap())
        .collect();
    for (q, stream) in questions.iter().zip(streams) {
        let (text, done) = collect(stream);
        let request = ask(&model, q);
        let mut generator = Generator::from_tokens(&model, request.prompt, greedy(24))
            .unwrap()
            .with_stop_token(request.stop_tokens.first().copied());
        let mut alone = String::new();
        for piece in &mut generator {
            alone.push_str(&piece.unwrap().text);
        }
        assert_eq!(text, alone, "{q}");
        assert!(!text.trim().is_empty(), "{q}");
        assert_eq!(Some(done.stop), generator.stop_reason(), "{q}");
    }
}

/// A conversation of about a thousand tokens, then a second turn: only the new turn's tokens
/// are computed. The times are printed (`--nocapture`); the check is on what was computed.
#[test]
fn the_second_turn_reuses_the_first() {
    let model = real_model();
    let engine = Engine::new(Arc::clone(&model), EngineOptions::default()).unwrap();
    let license =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gpl-2.txt"))
            .unwrap();
    let document: String = license.chars().take(4200).collect();
    let mut messages = vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new(
            "user",
            &format!("{document}\n\nWhat is this text about? Answer in one sentence."),
        ),
    ];
    let first = chat_prompt(&model, &messages).unwrap();
    assert!(first.tokens.len() > 900, "{} tokens", first.tokens.len());
    let mut request = Request::new(first.tokens.clone(), greedy(32));
    request.stop_tokens.extend(first.end_of_turn);
    let (reply, turn1) = collect(engine.submit(request).unwrap());
    assert_eq!(turn1.cached_tokens, 0);

    messages.push(Message::new("assistant", &reply));
    messages.push(Message::new("user", "Who wrote it?"));
    let second = chat_prompt(&model, &messages).unwrap();
    let mut request = Request::new(second.tokens.clone(), greedy(16));
    request.stop_tokens.extend(second.end_of_turn);
    let (_, turn2) = collect(engine.submit(request).unwrap());
    // Everything up to the first reply is found in the cache.
    assert!(
        turn2.cached_tokens >= first.tokens.len(),
        "{} of {} tokens cached; the first prompt had {}",
        turn2.cached_tokens,
        second.tokens.len(),
        first.tokens.len()
    );
    eprintln!(
        "first turn: {} prompt tokens, first token after {:.3} s; second turn: {} tokens, {} \
         cached, first token after {:.3} s ({:.0}%)",
        turn1.prompt_tokens,
        turn1.first_token_secs,
        turn2.prompt_tokens,
        turn2.cached_tokens,
        turn2.first_token_secs,
        100.0 * turn2.first_token_secs / turn1.first_token_secs
    );
}
