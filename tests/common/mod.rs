//! The test data every integration test reads: llama.cpp's reference results for the default
//! model and the perplexity corpus, both in `tests/data/` (see `tests/data/README.md`).
//!
//! Each golden check reads its expected token ids, texts and figures from here, so the repository
//! holds one copy of them.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;

/// The reference file, relative to `tests/data/`.
const REFERENCE_FILE: &str = "smollm2-135m-q4_1.json";

/// The repository's `tests/data/` folder.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// What llama.cpp produced with SmolLM2-135M-Instruct Q4_1.
#[derive(Debug, Deserialize)]
pub struct Reference {
    /// The model file the results were made with.
    pub model: String,
    /// The llama.cpp build that made them.
    pub reference_engine: String,
    /// Token ids of short texts.
    pub tokenization: Tokenization,
    /// Greedy completions of prompts.
    pub greedy: Greedy,
    /// Perplexity of the corpus.
    pub perplexity: Perplexity,
}

/// The tokenization section of the reference.
#[derive(Debug, Deserialize)]
pub struct Tokenization {
    /// Every case, in file order.
    pub cases: Vec<TokenizationCase>,
}

/// One text and its token ids (special-token text parsed, no BOS added).
#[derive(Debug, Deserialize)]
pub struct TokenizationCase {
    /// The input text.
    pub text: String,
    /// llama.cpp's token ids for it.
    pub ids: Vec<u32>,
}

/// The greedy-completion section of the reference.
#[derive(Debug, Deserialize)]
pub struct Greedy {
    /// Every case, in file order.
    pub cases: Vec<GreedyCase>,
}

/// One prompt and llama.cpp's greedy completion of it.
#[derive(Debug, Deserialize)]
pub struct GreedyCase {
    /// The prompt, special-token text parsed.
    pub prompt: String,
    /// Most tokens generated.
    pub n_predict: usize,
    /// The text of the generated tokens.
    pub completion: String,
    /// Whether generation ended at the end-of-sequence token before `n_predict` tokens.
    pub stopped_at_eos: bool,
}

/// The perplexity section of the reference.
#[derive(Debug, Deserialize)]
pub struct Perplexity {
    /// The corpus file, relative to `tests/data/`.
    pub corpus: String,
    /// Tokens per chunk.
    pub n_ctx: usize,
    /// Chunks scored.
    pub chunks: usize,
    /// Perplexity.
    pub ppl: f64,
    /// Its standard error.
    pub ppl_stderr: f64,
}

/// The reference, read and parsed once per test binary.
pub fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = data_dir().join(REFERENCE_FILE);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

impl Reference {
    /// The tokenization case of `text`.
    pub fn tokenization_of(&self, text: &str) -> &TokenizationCase {
        self.tokenization
            .cases
            .iter()
            .find(|c| c.text == text)
            .unwrap_or_else(|| panic!("the reference has no tokenization case {text:?}"))
    }

    /// The greedy case of `prompt`.
    pub fn greedy_of(&self, prompt: &str) -> &GreedyCase {
        self.greedy
            .cases
            .iter()
            .find(|c| c.prompt == prompt)
            .unwrap_or_else(|| panic!("the reference has no greedy case {prompt:?}"))
    }

    /// The greedy case that ends at end-of-sequence: a rendered chat turn and its full answer.
    pub fn greedy_chat_case(&self) -> &GreedyCase {
        self.greedy
            .cases
            .iter()
            .find(|c| c.stopped_at_eos)
            .expect("the reference has a greedy case that stops at end-of-sequence")
    }
}

/// The perplexity corpus named by the reference (the GNU GPL v2 text).
pub fn corpus() -> String {
    let path = data_dir().join(&reference().perplexity.corpus);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
