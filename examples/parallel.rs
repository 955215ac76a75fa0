//! Several requests on one model at once: the scheduler batches their tokens together.
//!
//! `cargo run --release --example parallel [MODEL]` (default: the fetched SmolLM2 file).

use std::sync::Arc;

use lutra::chat::Message;
use lutra::engine::{Engine, EngineOptions, Event, Request};
use lutra::generate::GenerateOptions;
use lutra::llama::{LoadOptions, Model};
use lutra::session::chat_prompt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let model = Arc::new(Model::load(path.as_ref(), &LoadOptions::default())?);
    let engine = Engine::new(Arc::clone(&model), EngineOptions::default())?;
    let questions = [
        "What is the capital of France?",
        "Name three planets.",
        "What is rust?",
    ];
    let mut streams = Vec::new();
    for q in questions {
        let prompt = chat_prompt(&model, &[Message::new("user", q)])?;
        let mut request = Request::new(prompt.tokens, GenerateOptions::default());
        request.options.max_tokens = 48;
        request.stop_tokens.extend(prompt.end_of_turn);
        streams.push(engine.submit(request)?);
    }
    // All three are computed together; read each reply in turn.
    for (q, stream) in questions.iter().zip(streams) {
        let mut reply = String::new();
        for event in stream {
            match event {
                Event::Piece(p) => reply.push_str(&p.text),
                Event::Done(done) => println!(
                    "{q}\n  {}\n  ({} tokens, first after {:.2} s, {:?})",
                    reply.trim(),
                    done.generated_tokens,
                    done.first_token_secs,
                    done.stop
                ),
            }
        }
    }
    Ok(())
}
