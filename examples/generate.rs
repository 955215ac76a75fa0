//! Generate text with the library API: load a GGUF model, stream pieces, print the timings.
//!
//! ```text
//! cargo run --release --example generate -- [MODEL.gguf] [PROMPT] [MAX_TOKENS]
//! ```
//! The model defaults to `models/cache/SmolLM2-135M-Instruct.Q4_1.gguf` (fetch it with
//! `bash models/fetch.sh`). Generation is greedy so the output is reproducible.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use lutra::generate::{GenerateOptions, Generator};
use lutra::llama::{LoadOptions, Model};
use lutra::sampler::SamplerConfig;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let prompt = args
        .next()
        .unwrap_or_else(|| "The meaning of life is".to_string());
    let max_tokens = match args.next() {
        Some(n) => n.parse().context("MAX_TOKENS must be a whole number")?,
        None => 64,
    };

    let model = Model::load(&path, &LoadOptions::default()).with_context(|| {
        format!(
            "loading {} (run `bash models/fetch.sh` for the default model)",
            path.display()
        )
    })?;
    let opts = GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        ..GenerateOptions::default()
    };
    let mut generator = Generator::new(&model, &prompt, opts)?;

    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    for piece in &mut generator {
        write!(out, "{}", piece?.text)?;
        out.flush()?;
    }
    writeln!(out)?;

    let stats = generator.stats();
    eprintln!(
        "prompt: {} tokens, {:.1} t/s | generated: {} tokens, {:.1} t/s | stop: {:?}",
        stats.prompt_tokens,
        stats.prompt_tps(),
        stats.generated_tokens,
        stats.gen_tps(),
        generator.stop_reason()
    );
    eprintln!(
        "per token: sampling {:.3} ms, decode forward {:.2} ms",
        1e3 * stats.sample_secs / stats.generated_tokens.max(1) as f64,
        1e3 * stats.decode_forward_secs / stats.decode_steps.max(1) as f64
    );
    Ok(())
}
