//! Text generation: prompt → prefill → sample → decode, as an iterator of text pieces.
//!
//! ```text
//! Generator::new(model, prompt, opts)      tokenize (special tokens parsed), check the context
//!   next() #1: forward(prompt) → logits    one batched prefill
//!   next() #n: sample → Piece{token,text}  then forward(token) on the following call
//! ```
//! Generation stops at an end-of-generation token (not yielded), after `max_tokens` pieces, when
//! the [`CancelToken`] fires, or when the sequence (prompt and generated tokens) fills the
//! context. The last sampled token is never fed back, so a sequence of the context's length needs
//! one position less in the cache; every generated token could still be fed to continue it. A
//! prompt must leave room for at least one generated token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::llama::Model;
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What to generate and how.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (default 256).
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampler: SamplerConfig,
    /// Turn special-token text in the prompt (e.g. `<|im_start|>`) into its token (default true).
    pub parse_special: bool,
    /// Stop at the tokenizer's end-of-generation tokens (default true).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampler: SamplerConfig::default(),
            parse_special: true,
            stop_at_eos: true,
        }
    }
}

/// A shared flag that stops generation before the next token; clone it to another thread or a
/// signal handler.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that has not fired.
    pub fn new() -> Self {
        CancelToken::default()
    }

    /// Asks every generator holding this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Re-arms the token (a chat session does this at the start of each turn).
    pub fn reset(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One generated token and the text it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The token id.
    pub token: u32,
    /// Newly complete text: may be empty while a multi-byte character is split across tokens.
    pub text: String,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_tokens` pieces were produced.
    MaxTokens,
    /// The [`CancelToken`] fired.
    Cancelled,
    /// The sequence filled the context before `max_tokens` pieces: no position is left for the
    /// next token.
    ContextFull,
    /// A forward pass failed (the error was yielded).
    Failed,
}

/// Timings and outcome of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Tokens fed in the prefill.
    pub prompt_tokens: usize,
    /// Seconds in the prefill forward pass.
    pub prompt_secs: f64,
    /// Pieces yielded.
    pub generated_tokens: usize,
    /// Seconds of the decode steps: everything after the first piece (forward, sampling,
    /// detokenization) until the last.
    pub gen_secs: f64,
    /// Single-token forward passes after the prefill (one per piece after the first, plus the one
    /// that produced an end-of-generation token).
    pub decode_steps: usize,
    /// Seconds inside those forward passes (part of `gen_secs`).
    pub decode_forward_secs: f64,
    /// Seconds in the sampler, all tokens.
    pub sample_secs: f64,
    /// Seconds spent tokenizing the prompt.
    pub tokenize_secs: f64,
    /// Why generation ended; `None` while it can go on.
    pub stop_reason: Option<StopReason>,
}

impl Stats {
    /// Prompt tokens per second of prefill.
    pub fn prompt_tps(&self) -> f64 {
        per_sec(self.prompt_tokens, self.prompt_secs)
    }

    /// Generated tokens per second of decoding (decode steps over `gen_secs`, as llama.cpp's
    /// "eval time" counts them).
    pub fn gen_tps(&self) -> f64 {
        per_sec(self.decode_steps, self.gen_secs)
    }
}

fn per_sec(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Generates text from a prompt; an iterator of [`Piece`]s.
pub struct Generator<'m> {
    model: &'m Model,
    tokenizer: Option<&'m Tokenizer>,
    cache: KvCache,
    logits: Vec<f32>,
    sampler: Sampler,
    /// Every token of the sequence: cache contents, then the tokens still to be fed.
    tokens: Vec<u32>,
    /// How many of `tokens` are already in the cache.
    fed: usize,
    decoder: StreamDecoder,
    max_tokens: usize,
    stop_at_eos: bool,
    /// Extra end-of-turn token (chat templates), stopped at like end-of-generation.
    extra_stop: Option<u32>,
    /// The most tokens the sequence may hold: the cache's capacity, at most the model's context.
    context: usize,
    cancel: CancelToken,
    stats: Stats,
    stop: Option<StopReason>,
    /// Start of the decode-phase clock (set when the first piece is yielded).
    decode_start: Option<Instant>,
}

impl<'m> Generator<'m> {
    /// Tokenizes `prompt` with the model's tokenizer and prepares to generate.
    ///
    /// Fails with [`Error::PromptTooLong`] when the prompt leaves no room in the context for a
    /// generated token, and with [`Error::InvalidOption`] for a model without a tokenizer or an
    /// empty prompt. When `max_tokens` would overflow the context, generation stops once the
    /// context is full ([`StopReason::ContextFull`]).
    pub fn new(model: &'m Model, prompt: &str, opts: GenerateOptions) -> Result<Self> {
        let tokenizer = model.tokenizer().ok_or_else(|| {
            Error::InvalidOption("this model has no tokenizer; use Generator::from_tokens".into())
        })?;
        let start = Instant::now();
        let tokens = tokenizer.encode(prompt, opts.parse_special)?;
        let tokenize_secs = start.elapsed().as_secs_f64();
        let mut generator = Self::from_tokens(model, tokens, opts)?;
        generator.stats.tokenize_secs = tokenize_secs;
        Ok(generator)
    }

    /// Prepares to generate after the given prompt tokens (no tokenization; models without a
    /// tokenizer yield pieces with empty text and never stop at end-of-generation).
    pub fn from_tokens(model: &'m Model, prompt: Vec<u32>, opts: GenerateOptions) -> Result<Self> {
        let cache = model.new_cache();
        Self::resume(model, cache, prompt, 0, opts)
    }

    /// Continues a sequence whose first `fed` tokens are already in `cache` (chat sessions).
    pub(crate) fn resume(
        model: &'m Model,
        mut cache: KvCache,
        tokens: Vec<u32>,
        fed: usize,
        opts: GenerateOptions,
    ) -> Result<Self> {
        if fed >= tokens.len() {
            return Err(Error::InvalidOption(
                "the prompt is empty: there is nothing to generate from".into(),
            ));
        }
        let context = cache.capacity().min(model.context_length());
        if tokens.len() >= context {
            return Err(Error::PromptTooLong {
                prompt_tokens: tokens.len(),
                context,
            });
        }
        let vocab = model.config().vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidOption(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        cache.truncate(fed);
        // Room for the prompt and the reply at once (the cache would otherwise grow by doubling).
        let room = opts.max_tokens.min(context - tokens.len());
        cache.reserve(tokens.len() + room)?;
        let mut tokens = tokens;
        tokens.reserve(room);
        let prompt_tokens = tokens.len() - fed;
        Ok(Generator {
            model,
            tokenizer: model.tokenizer(),
            cache,
            logits: vec![0.0; vocab],
            sampler: Sampler::new(opts.sampler.clone()),
            tokens,
            fed,
            decoder: StreamDecoder::new(),
            max_tokens: opts.max_tokens,
            stop_at_eos: opts.stop_at_eos,
            extra_stop: None,
            context,
            cancel: CancelToken::new(),
            stats: Stats {
                prompt_tokens,
                ..Stats::default()
            },
            stop: None,
            decode_start: None,
        })
    }

    /// Uses `token` (shared with other code) to cancel this generation.
    pub fn with_cancel(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    /// Also stops at this token (e.g. a chat template's end-of-turn), when `stop_at_eos` is set.
    pub fn with_stop_token(mut self, token: Option<u32>) -> Self {
        self.extra_stop = token;
        self
    }

    /// Replaces the sampler (chat sessions keep one across turns so a seed gives one stream).
    pub(crate) fn with_sampler(mut self, sampler: Sampler) -> Self {
        self.sampler = sampler;
        self
    }

    /// A handle that stops this generation before its next token.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Timings so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Why generation ended; `None` while it can go on.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// The most tokens the sequence (prompt and generated) may hold.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// Whether generation ended at an end-of-generation token.
    pub fn stopped_at_eos(&self) -> bool {
        self.stop == Some(StopReason::EndOfGeneration)
    }

    /// The whole sequence: prompt, then the generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Gives back the KV cache, the sampler and the tokens it holds (chat sessions).
    pub(crate) fn into_parts(self) -> (KvCache, Sampler, Vec<u32>) {
        let mut tokens = self.tokens;
        tokens.truncate(self.fed);
        (self.cache, self.sampler, tokens)
    }

    fn is_stop_token(&self, token: u32) -> bool {
        if !self.stop_at_eos {
            return false;
        }
        self.extra_stop == Some(token)
            || self
                .tokenizer
                .is_some_and(|tok| tok.is_end_of_generation(token))
    }

    /// Feeds the pending tokens, samples one, and turns it into a piece (or a stop).
    fn step(&mut self) -> Result<Option<Piece>> {
        if self.stop.is_some() {
            return Ok(None);
        }
        if self.cancel.is_cancelled() {
            self.finish(StopReason::Cancelled);
            return Ok(None);
        }
        if self.stats.generated_tokens >= self.max_tokens {
            self.finish(StopReason::MaxTokens);
            return Ok(None);
        }
        if self.tokens.len() >= self.context {
            self.finish(StopReason::ContextFull);
            return Ok(None);
        }

        let prefill = self.stats.generated_tokens == 0;
        let start = Instant::now();
        let (fresh, cache, logits) = (&self.tokens[self.fed..], &mut self.cache, &mut self.logits);
        if prefill {
            self.model.forward_prompt(fresh, cache, logits)?;
        } else {
            self.model.forward(fresh, cache, logits)?;
        }
        let forward_secs = start.elapsed().as_secs_f64();
        self.fed = self.tokens.len();
        if prefill {
            self.stats.prompt_secs = forward_secs;
        } else {
            self.stats.decode_steps += 1;
            self.stats.decode_forward_secs += forward_secs;
        }

        let start = Instant::now();
        let token = self.sampler.sample(&mut self.logits, &self.tokens);
        self.stats.sample_secs += start.elapsed().as_secs_f64();

        if self.is_stop_token(token) {
            self.finish(StopReason::EndOfGeneration);
            self.end_decode_clock();
            return Ok(None);
        }
        self.tokens.push(token);
        self.stats.generated_tokens += 1;
        let mut text = match self.tokenizer {
            Some(tok) => self.decoder.push(tok, token),
            None => String::new(),
        };
        if self.stats.generated_tokens == self.max_tokens || self.tokens.len() == self.context {
            // Last piece: hand out whatever bytes the decoder still holds.
            text.push_str(&self.decoder.finish());
        }
        if self.decode_start.is_none() {
            self.decode_start = Some(Instant::now());
        } else {
            self.end_decode_clock();
        }
        Ok(Some(Piece { token, text }))
    }

    /// Ends generation for `reason`.
    fn finish(&mut self, reason: StopReason) {
        self.stop = Some(reason);
        self.stats.stop_reason = Some(reason);
    }

    fn end_decode_clock(&mut self) {
        if let Some(t) = self.decode_start {
            self.stats.gen_secs = t.elapsed().as_secs_f64();
        }
    }
}

impl Iterator for Generator<'_> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(piece)) => Some(Ok(piece)),
            Ok(None) => None,
            Err(e) => {
                // A failed forward leaves the cache in an unknown state: end here.
                self.finish(StopReason::Failed);
                Some(Err(e))
            }
        }
    }
}

/// Runs a generator to the end and returns the text (convenience for tests and simple callers).
pub fn generate_text(generator: &mut Generator<'_>) -> Result<String> {
    let mut text = String::new();
    for piece in generator {
        text.push_str(&piece?.text);
    }
    Ok(text)
}
