//! Perplexity of SmolLM2-135M Q4_1 on the GPL-2 text against llama-perplexity's figure, and of the
//! same model requantized to 4, 3 and 2 bits.

use std::path::Path;

use lutra::llama::{LoadOptions, Model, Requantize};
use lutra::perplexity::{perplexity, PerplexityResult};

mod common;

const REAL_MODEL: &str = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf";
const N_CTX: usize = 512;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn load(requantize: Option<Requantize>) -> Model {
    let path = root().join(REAL_MODEL);
    assert!(
        path.exists(),
        "{} is missing: run `bash models/fetch.sh` first",
        path.display()
    );
    let opts = LoadOptions {
        context_length: Some(N_CTX),
        requantize,
        ..LoadOptions::default()
    };
    Model::load(&path, &opts).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// The corpus tokenized once, as llama-perplexity does (no special-token parsing).
fn corpus_tokens(model: &Model) -> Vec<u32> {
    model
        .tokenizer()
        .expect("tokenizer")
        .encode(&common::corpus(), false)
        .expect("encode corpus")
}

fn run(model: &Model, tokens: &[u32]) -> PerplexityResult {
    perplexity(model, tokens, N_CTX).expect("perplexity")
}

#[test]
fn perplexity_matches_llama_cpp_and_requantized_models_rank() {
    let section = &common::reference().perplexity;
    let expected_ppl = section.ppl;
    let expected_stderr = section.ppl_stderr;
    let expected_chunks = section.chunks;
    assert_eq!(section.n_ctx, N_CTX);

    let model = load(None);
    let tokens = corpus_tokens(&model);
    let q4_1 = run(&model, &tokens);
    println!(
        "Q4_1: PPL = {:.4} +/- {:.5} over {} chunks (llama.cpp: {expected_ppl} +/- {expected_stderr})",
        q4_1.ppl, q4_1.stderr, q4_1.chunks
    );
    assert_eq!(q4_1.chunks, expected_chunks);
    assert_eq!(q4_1.scored, expected_chunks * (N_CTX - 1 - N_CTX / 2));
    assert!(
        (q4_1.ppl - expected_ppl).abs() / expected_ppl < 0.01,
        "PPL {} is not within 1% of llama.cpp's {expected_ppl}",
        q4_1.ppl
    );
    assert!(
        (q4_1.stderr - expected_stderr).abs() / expected_stderr < 0.05,
        "stderr {} is not within 5% of llama.cpp's {expected_stderr}",
        q4_1.stderr
    );
    drop(model);

    let requantized = |bits: u8| {
        let model = load(Some(Requantize {
            bits,
            group_size: 32,
        }));
        let r = run(&model, &tokens);
        println!(
            "requantized {bits}-bit g32: PPL = {:.4} +/- {:.5}",
            r.ppl, r.stderr
        );
        r
    };
    let q4 = requantized(4);
    assert!(
        (q4.ppl - q4_1.ppl).abs() / q4_1.ppl < 0.05,
        "4-bit g32 PPL {} is not within 5% of Q4_1's {}",
        q4.ppl,
        q4_1.ppl
    );
    for bits in [3u8, 2] {
        let r = requantized(bits);
        assert!(r.ppl.is_finite() && r.stderr.is_finite());
        assert!(
            r.ppl > q4.ppl,
            "{bits}-bit PPL {} should exceed 4-bit's {}",
            r.ppl,
            q4.ppl
        );
    }
}
