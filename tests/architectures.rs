//! Tiny random models of the architectures beyond Llama (Qwen3, Gemma 3, Phi-3, llama.cpp's
//! BitNet), written by `lutra_runtime::fixtures::tiny_llama_gguf` at test time, against
//! llama.cpp's perplexity of the same bytes (`tests/data/architectures/llama-cpp.json`, with each
//! file's size and digest): the perplexity of the GPL-2 text must match llama.cpp's within 0.1%,
//! on the fast path and on the exact reference path.

use std::path::Path;

use lutra::config::Architecture;
use lutra::llama::{LoadOptions, Model};
use lutra::perplexity::perplexity;
use lutra_runtime::fixtures::{tiny_llama_gguf, TempDir, TinyModelSpec};
use serde::Deserialize;

mod common;

/// llama.cpp's figures for the tiny files (`tests/data/architectures/llama-cpp.json`).
#[derive(Debug, Deserialize)]
struct Figures {
    /// Tokens per chunk.
    n_ctx: usize,
    /// One entry per file.
    models: Vec<ModelFigures>,
}

/// llama-perplexity's result for one file.
#[derive(Debug, Deserialize)]
struct ModelFigures {
    /// The file's name.
    file: String,
    /// Its `general.architecture`.
    architecture: String,
    /// Chunks scored.
    chunks: usize,
    /// Perplexity.
    ppl: f64,
    /// Size of the file llama.cpp measured.
    bytes: usize,
    /// FNV-1a 64 digest of that file, in hex.
    fnv1a64: String,
}

/// FNV-1a, 64 bits: enough to tell that a written file is the one the figures were measured on.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn figures() -> Figures {
    let path = common::data_dir().join("architectures/llama-cpp.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(path: &Path, reference: bool, n_ctx: usize) -> Model {
    let opts = LoadOptions {
        reference,
        context_length: Some(n_ctx),
        ..LoadOptions::default()
    };
    Model::load(path, &opts).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// The shape of each file, as `tiny_llama_gguf` writes it with seed 11.
fn spec_of(architecture: Architecture) -> TinyModelSpec {
    let base = TinyModelSpec {
        architecture,
        ..TinyModelSpec::default()
    };
    match architecture {
        // q/k norms with heads wider than hidden/heads; untied, so that the logits stay moderate.
        Architecture::Qwen3 => TinyModelSpec {
            head_dim: Some(32),
            tied_embeddings: false,
            ..base
        },
        // One local layer (window 8, RoPE base 10000) and one global (base 1e6), logits capped.
        Architecture::Gemma3 => TinyModelSpec {
            head_dim: Some(32),
            sliding_window: Some(8),
            logit_softcap: Some(5.0),
            ..base
        },
        Architecture::Phi3 => TinyModelSpec {
            tied_embeddings: false,
            ..base
        },
        // llama.cpp's `bitnet`: SwiGLU, sub-norms, TQ2_0 matrices with `.scale` tensors, RoPE on
        // head halves. The LM head is the embedding (llama.cpp loads no `output.weight` for it),
        // kept small so that the logits stay moderate. TQ2_0 blocks are 256 wide; one layer
        // keeps the file small.
        Architecture::BitNet => TinyModelSpec {
            gguf_name: Some("bitnet"),
            embedding_range: 0.09,
            hidden: 256,
            ffn: 256,
            layers: 1,
            ..base
        },
        _ => base,
    }
}

/// Writes the tiny file of `m` into `dir` and checks it is the one llama.cpp measured.
fn write_tiny_file(dir: &Path, m: &ModelFigures) -> std::path::PathBuf {
    let arch = Architecture::from_gguf_name(&m.architecture).expect("a known architecture");
    let path = dir.join(&m.file);
    tiny_llama_gguf(&path, &spec_of(arch), 11).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes.len() == m.bytes && format!("{:016x}", fnv1a64(&bytes)) == m.fnv1a64,
        "{} is not what llama.cpp measured: the figures must be measured again on the new file",
        m.file
    );
    path
}

#[test]
fn tiny_models_match_llama_perplexity() {
    let figures = figures();
    let corpus = common::corpus();
    let dir = TempDir::new("arch-files");
    let mut seen = Vec::new();
    for m in &figures.models {
        let path = write_tiny_file(&dir, m);
        for reference in [false, true] {
            let model = load(&path, reference, figures.n_ctx);
            let expected = Architecture::from_gguf_name(&m.architecture);
            assert_eq!(Some(model.config().architecture), expected, "{}", m.file);
            let tokens = model
                .tokenizer()
                .expect("tokenizer")
                .encode(&corpus, false)
                .unwrap();
            let r = perplexity(&model, &tokens, figures.n_ctx).unwrap();
            println!(
                "{} ({}): PPL {:.4} over {} chunks, llama.cpp {}",
                m.file,
                if reference { "reference" } else { "fast" },
                r.ppl,
                r.chunks,
                m.ppl
            );
            assert_eq!(r.chunks, m.chunks, "{}", m.file);
            let diff = (r.ppl - m.ppl).abs() / m.ppl;
            assert!(
                diff < 0.001,
                "{} (reference {reference}): PPL {} is {:.3}% from llama.cpp's {}",
                m.file,
                r.ppl,
                100.0 * diff,
                m.ppl
            );
        }
        seen.push(m.architecture.as_str());
    }
    assert_eq!(seen, ["qwen3", "gemma3", "phi3", "bitnet"]);
}
