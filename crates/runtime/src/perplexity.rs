//! Perplexity over a token stream, computed exactly as llama.cpp's `llama-perplexity` does.
//!
//! The tokens are cut into non-overlapping chunks of `n_ctx`; each chunk is evaluated from an
//! empty cache and scored on its second half only, so every scored token has at least `n_ctx/2`
//! tokens of context: the logits at positions `n_ctx/2 ..= n_ctx−2` each score the token after
//! them. When the model adds BOS, the first token of each chunk is replaced by BOS. The result
//! is `exp(mean NLL)` with llama.cpp's error estimate `ppl · sqrt(var(NLL) / (count − 1))`.

use crate::error::{Error, Result};
use crate::llama::Model;
use crate::tokenizer::Tokenizer;

/// Outcome of [`perplexity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerplexityResult {
    /// `exp(mean negative log-likelihood)`.
    pub ppl: f64,
    /// Standard error of `ppl`, as llama.cpp reports it after `+/-`.
    pub stderr: f64,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens scored (`chunks · (n_ctx − 1 − n_ctx/2)`).
    pub scored: usize,
}

/// Running sums of the negative log-likelihoods.
#[derive(Debug, Clone, Copy, Default)]
struct NllSums {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl NllSums {
    fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }

    /// llama.cpp: `sqrt((E[x²] − E[x]²) / (count − 1)) · ppl`, zero when undefined.
    fn stderr(&self) -> f64 {
        let n = self.count as f64;
        let mean = self.sum / n;
        let var = self.sum_sq / n - mean * mean;
        if var > 0.0 && self.count > 1 {
            (var / (n - 1.0)).sqrt() * self.ppl()
        } else {
            0.0
        }
    }
}

/// Perplexity of `model` on `tokens` with chunks of `n_ctx` tokens (see the module docs).
///
/// Needs at least `2·n_ctx` tokens (as llama-perplexity does), `n_ctx ≥ 4`, and a context of at
/// least `n_ctx`.
pub fn perplexity(model: &Model, tokens: &[u32], n_ctx: usize) -> Result<PerplexityResult> {
    perplexity_with_progress(model, tokens, n_ctx, |_, _, _| {})
}

/// [`perplexity`], calling `on_chunk(done, total, ppl_so_far)` after each chunk.
pub fn perplexity_with_progress(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<PerplexityResult> {
    if n_ctx < 4 {
        return Err(Error::InvalidOption(format!(
            "perplexity needs a context of at least 4 tokens, not {n_ctx}"
        )));
    }
    if tokens.len() < 2 * n_ctx {
        return Err(Error::InvalidOption(format!(
            "perplexity with a context of {n_ctx} needs at least {} tokens; the text has {}",
            2 * n_ctx,
            tokens.len()
        )));
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidOption(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let mut cache = model.new_cache();
    if cache.capacity() < n_ctx {
        return Err(Error::ContextOverflow {
            tokens: n_ctx,
            context: cache.capacity(),
        });
    }
    let bos = match model.tokenizer() {
        Some(tok) => chunk_bos(tok)?,
        None => None,
    };

    let chunks = tokens.len() / n_ctx;
    let first = n_ctx / 2;
    let mut logits = vec![0.0f32; n_ctx * vocab];
    let mut chunk_tokens = Vec::with_capacity(n_ctx);
    let mut sums = NllSums::default();
    for chunk in 0..chunks {
        let start = chunk * n_ctx;
        chunk_tokens.clear();
        chunk_tokens.extend_from_slice(&tokens[start..start + n_ctx]);
        if let Some(bos) = bos {
            chunk_tokens[0] = bos;
        }
        cache.clear();
        model.forward_all(&chunk_tokens, &mut cache, &mut logits)?;
        for pos in first..n_ctx - 1 {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            sums.add(nll(row, chunk_tokens[pos + 1]));
        }
        on_chunk(chunk + 1, chunks, sums.ppl());
    }
    Ok(PerplexityResult {
        ppl: sums.ppl(),
        stderr: sums.stderr(),
        chunks,
        scored: sums.count,
    })
}

/// The BOS token when the tokenizer adds one. The tokenizer has no accessor for its
/// `add_bos_token` flag, so this asks it what it makes of empty text.
pub(crate) fn chunk_bos(tok: &Tokenizer) -> Result<Option<u32>> {
    let bos = tok.bos_id();
    let empty = tok.encode("", false)?;
    Ok(bos.filter(|&b| empty.first() == Some(&b)))
}

/// Negative log-probability of `target` under the softmax of `logits`.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (max as f64) + sum.ln() - logits[target as usize] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let logits = [0.5f32; 8];
        assert!((nll(&logits, 3) - 8f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn nll_matches_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        assert!((nll(&logits, 0) - (z.ln() - 1.0)).abs() < 1e-6);
        assert!(nll(&logits, 2) < nll(&logits, 1));
    }

    #[test]
    fn sums_give_llama_cpp_ppl_and_stderr() {
        let values = [1.0f64, 2.0, 4.0, 3.0];
        let mut s = NllSums::default();
        for v in values {
            s.add(v);
        }
        let mean = 2.5f64;
        assert!((s.ppl() - mean.exp()).abs() < 1e-12);
        // Population variance 1.25, divided by count − 1 = 3.
        let expected = (1.25f64 / 3.0).sqrt() * mean.exp();
        assert!((s.stderr() - expected).abs() < 1e-9);
    }

    #[test]
    fn constant_nll_has_zero_stderr() {
        let mut s = NllSums::default();
        s.add(2.0);
        s.add(2.0);
        assert_eq!(s.stderr(), 0.0);
    }
}
