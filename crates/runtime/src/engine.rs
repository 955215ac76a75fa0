//! Many requests on one model at once: a scheduler with continuous batching.
//!
//! ```text
//! Engine::submit(Request) ─► queue ─► scheduler thread, each step:
//!   admit queued requests to free sequences (the one whose cached tokens share the longest
//!   prefix with the prompt; only the tokens after that prefix are computed)
//!   batch: one token of every decoding sequence + prompt chunks of the others (≤ MAX_BATCH)
//!   Model::forward_sequences (every matrix reads the weights once for all of them)
//!   sample each sequence that has logits ─► Event::Piece … Event::Done
//! ```
//!
//! A sequence is a KV cache and the tokens it holds. It outlives its request: the next request
//! that starts with the same tokens (the next turn of a chat, whose earlier turns the template
//! renders again) reuses them. The scheduler is the only thread that runs the model, so the
//! model's worker pool is never asked for two things at once by it, and callers only wait on
//! their own events.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::generate::{CancelToken, GenerateOptions, Piece, StopReason};
use crate::kv_cache::KvCache;
use crate::llama::{Model, SequenceBatch, MAX_BATCH};
use crate::sampler::Sampler;
use crate::session::common_prefix;
use crate::tokenizer::StreamDecoder;

/// How many requests the scheduler runs and holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Sequences decoded together in one batch, each with its own KV cache of the model's
    /// context length (llama-server's `--parallel`). Default 4.
    pub parallel: usize,
    /// Requests that may wait while every sequence is busy; [`Engine::submit`] fails with
    /// [`Error::QueueFull`] beyond (0: none wait, a request needs a free sequence). Default 64.
    pub queue: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            parallel: 4,
            queue: 64,
        }
    }
}

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Prompt tokens (for a chat, see [`crate::session::chat_prompt`]).
    pub prompt: Vec<u32>,
    /// Most tokens, sampler and end-of-generation handling (`parse_special` does not apply: the
    /// prompt is tokens).
    pub options: GenerateOptions,
    /// Subtracted once from the logit of every token generated so far (OpenAI's
    /// `presence_penalty`); 0 disables.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated so far (OpenAI's
    /// `frequency_penalty`); 0 disables.
    pub frequency_penalty: f32,
    /// More tokens that end generation like end-of-generation (a chat template's end of turn),
    /// when `options.stop_at_eos` is set.
    pub stop_tokens: Vec<u32>,
}

impl Request {
    /// A request for `prompt` with no penalties and no extra stop tokens.
    pub fn new(prompt: Vec<u32>, options: GenerateOptions) -> Request {
        Request {
            prompt,
            options,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop_tokens: Vec::new(),
        }
    }
}

/// What a request produces, in order: pieces, then one [`Event::Done`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// One generated token and the text it completes (as [`crate::Generator`] yields them).
    Piece(Piece),
    /// The last event of every request.
    Done(Completion),
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// Why generation ended.
    pub stop: StopReason,
    /// What went wrong, when `stop` is [`StopReason::Failed`].
    pub error: Option<String>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens found in a sequence's cache and not computed again.
    pub cached_tokens: usize,
    /// Pieces produced.
    pub generated_tokens: usize,
    /// Seconds spent waiting for a free sequence.
    pub queued_secs: f64,
    /// Seconds from submission to the first piece (0 when there was none).
    pub first_token_secs: f64,
    /// Seconds from submission to the end.
    pub total_secs: f64,
}

/// Requests waiting and running now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// Waiting for a free sequence.
    pub queued: usize,
    /// Being computed.
    pub running: usize,
}

/// Receives a request's events on the scheduler thread; returning `false` cancels the request.
pub type EventSink = Box<dyn FnMut(Event) -> bool + Send>;

/// The scheduler of one model: a thread that batches every running request into one forward pass
/// per step. Dropping it cancels what is queued and running and waits for the thread.
pub struct Engine {
    model: Arc<Model>,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("load", &self.load())
            .finish_non_exhaustive()
    }
}

/// State shared by the callers and the scheduler thread.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a request is queued and when the engine is dropped.
    wake: Condvar,
}

struct Queue {
    waiting: VecDeque<Job>,
    capacity: usize,
    /// Sequences of the scheduler.
    sequences: usize,
    running: usize,
    accepting: bool,
    /// [`Engine::cancel_all`] asks the scheduler to cancel what it runs.
    cancel_running: bool,
    /// The engine was dropped: cancel everything and end the thread.
    closing: bool,
}

/// A submitted request with where its events go.
struct Job {
    request: Request,
    sink: EventSink,
    cancel: CancelToken,
    submitted: Instant,
}

impl Engine {
    /// Starts the scheduler thread for `model`.
    pub fn new(model: Arc<Model>, opts: EngineOptions) -> Result<Engine> {
        if opts.parallel == 0 {
            return Err(Error::InvalidOption(
                "the scheduler needs at least one sequence (parallel ≥ 1)".into(),
            ));
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                capacity: opts.queue,
                sequences: opts.parallel,
                running: 0,
                accepting: true,
                cancel_running: false,
                closing: false,
            }),
            wake: Condvar::new(),
        });
        let scheduler = Scheduler::new(Arc::clone(&model), Arc::clone(&shared), opts.parallel);
        let worker = std::thread::Builder::new()
            .name("lutra-scheduler".into())
            .spawn(move || scheduler.run())
            .map_err(|e| Error::InvalidOption(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Engine {
            model,
            shared,
            worker: Some(worker),
        })
    }

    /// The model this engine runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Queues `request`; its events arrive on the returned stream, which cancels the request
    /// when dropped.
    ///
    /// Fails, before queueing, with [`Error::InvalidOption`] (empty prompt, a token outside the
    /// vocabulary), [`Error::PromptTooLong`], [`Error::QueueFull`] or [`Error::ShuttingDown`].
    pub fn submit(&self, request: Request) -> Result<RequestStream> {
        let (tx, rx) = mpsc::channel();
        let cancel = self.submit_with(request, Box::new(move |e| tx.send(e).is_ok()))?;
        Ok(RequestStream { rx, cancel })
    }

    /// Like [`Engine::submit`], with `on_event` called on the scheduler thread for each event.
    /// It must return quickly (every running request waits for it): hand the event to another
    /// thread, e.g. through a channel. Returning `false` cancels the request.
    pub fn submit_with(&self, request: Request, on_event: EventSink) -> Result<CancelToken> {
        self.check(&request)?;
        let cancel = CancelToken::new();
        let mut queue = lock(&self.shared.queue);
        if !queue.accepting || queue.closing {
            return Err(Error::ShuttingDown);
        }
        queue.waiting.retain(|job| !job.cancel.is_cancelled());
        // Queued requests that free sequences will take at the scheduler's next step do not wait.
        let free = queue.sequences.saturating_sub(queue.running);
        if queue.waiting.len() >= queue.capacity + free {
            return Err(Error::QueueFull {
                queue: queue.capacity,
            });
        }
        queue.waiting.push_back(Job {
            request,
            sink: on_event,
            cancel: cancel.clone(),
            submitted: Instant::now(),
        });
        drop(queue);
        self.shared.wake.notify_one();
        Ok(cancel)
    }

    /// Stops accepting requests ([`Engine::submit`] fails with [`Error::ShuttingDown`]); those
    /// already queued or running go on.
    pub fn shutdown(&self) {
        lock(&self.shared.queue).accepting = false;
    }

    /// Cancels every queued and running request.
    pub fn cancel_all(&self) {
        let mut queue = lock(&self.shared.queue);
        for job in &queue.waiting {
            job.cancel.cancel();
        }
        queue.cancel_running = true;
        drop(queue);
        self.shared.wake.notify_one();
    }

    /// Requests waiting and running now.
    pub fn load(&self) -> EngineLoad {
        let queue = lock(&self.shared.queue);
        EngineLoad {
            queued: queue.waiting.len(),
            running: queue.running,
        }
    }

    fn check(&self, request: &Request) -> Result<()> {
        let prompt = &request.prompt;
        if prompt.is_empty() {
            return Err(Error::InvalidOption(
                "the prompt is empty: there is nothing to generate from".into(),
            ));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidOption(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let context = self.model.context_length();
        if prompt.len() >= context {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                context,
            });
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        lock(&self.shared.queue).closing = true;
        self.shared.wake.notify_one();
        if let Some(worker) = self.worker.take() {
            // A panic on the scheduler thread already ended every request's stream.
            let _ = worker.join();
        }
    }
}

/// The events of one request, as an iterator that blocks until the next one. Dropping it cancels
/// the request.
#[derive(Debug)]
pub struct RequestStream {
    rx: mpsc::Receiver<Event>,
    cancel: CancelToken,
}

impl RequestStream {
    /// A handle that cancels the request from anywhere.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }
}

impl Iterator for RequestStream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.rx.recv().ok()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The queue is only pushed to and popped from under the lock; a panic elsewhere leaves it
    // consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A KV cache and the tokens it holds; it outlives the requests that run on it.
struct Sequence {
    cache: KvCache,
    /// The tokens whose keys and values the cache holds, in order.
    cached: Vec<u32>,
    /// The step at which a request last ran here (the least recently used free sequence is taken
    /// when none shares a prefix with a new prompt).
    last_used: u64,
    active: Option<Running>,
}

/// A request being computed on a sequence.
struct Running {
    job: Job,
    /// Prompt, then the generated tokens.
    tokens: Vec<u32>,
    /// How many of `tokens` are in the cache.
    fed: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    generated: usize,
    /// How often each token was generated (presence and frequency penalties).
    counts: HashMap<u32, u32>,
    cached_tokens: usize,
    started: Instant,
    first_token: Option<Instant>,
}

impl Running {
    fn pending(&self) -> usize {
        self.tokens.len() - self.fed
    }
}

/// The scheduler thread's state: the sequences and the model.
struct Scheduler {
    model: Arc<Model>,
    shared: Arc<Shared>,
    seqs: Vec<Sequence>,
    step: u64,
    logits: Vec<f32>,
}

impl Scheduler {
    fn new(model: Arc<Model>, shared: Arc<Shared>, parallel: usize) -> Scheduler {
        let seqs = (0..parallel)
            .map(|_| Sequence {
                cache: model.new_cache(),
                cached: Vec::new(),
                last_used: 0,
                active: None,
            })
            .collect();
        Scheduler {
            model,
            shared,
            seqs,
            step: 0,
            logits: Vec::new(),
        }
    }

    fn running(&self) -> usize {
        self.seqs.iter().filter(|s| s.active.is_some()).count()
    }

    fn run(mut self) {
        loop {
            let mut queue = lock(&self.shared.queue);
            while !queue.closing
                && !queue.cancel_running
                && queue.waiting.is_empty()
                && self.running() == 0
            {
                queue = self
                    .shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if queue.closing {
                let waiting: Vec<Job> = queue.waiting.drain(..).collect();
                queue.running = 0;
                drop(queue);
                for job in waiting {
                    finish_unstarted(job, StopReason::Cancelled, None);
                }
                for i in 0..self.seqs.len() {
                    self.finish(i, StopReason::Cancelled, None);
                }
                return;
            }
            if std::mem::take(&mut queue.cancel_running) {
                for s in &self.seqs {
                    if let Some(r) = &s.active {
                        r.job.cancel.cancel();
                    }
                }
            }
            let free = self.seqs.len() - self.running();
            let take = free.min(queue.waiting.len());
            let admitted: Vec<Job> = queue.waiting.drain(..take).collect();
            queue.running = self.running() + admitted.len();
            drop(queue);

            for job in admitted {
                self.start(job);
            }
            self.step += 1;
            self.stop_finished();
            self.compute();
            let running = self.running();
            lock(&self.shared.queue).running = running;
        }
    }

    /// Puts `job` on the free sequence sharing the longest prefix with its prompt.
    fn start(&mut self, job: Job) {
        if job.cancel.is_cancelled() {
            return finish_unstarted(job, StopReason::Cancelled, None);
        }
        let prompt = &job.request.prompt;
        let Some((i, shared)) = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].active.is_none())
            .map(|i| (i, common_prefix(&self.seqs[i].cached, prompt)))
            .max_by_key(|&(i, shared)| (shared, std::cmp::Reverse(self.seqs[i].last_used)))
        else {
            // The caller admits no more jobs than there are free sequences.
            return finish_unstarted(
                job,
                StopReason::Failed,
                Some("no free sequence for the request".into()),
            );
        };
        let seq = &mut self.seqs[i];
        // At least one prompt token is computed: its logits choose the first token.
        let common = shared.min(prompt.len() - 1);
        seq.cached.truncate(common);
        seq.cache.truncate(common);
        let context = self.model.context_length();
        let room = job.request.options.max_tokens.min(context - prompt.len());
        if let Err(e) = seq.cache.reserve(prompt.len() + room) {
            return finish_unstarted(job, StopReason::Failed, Some(e.to_string()));
        }
        let mut tokens = Vec::with_capacity(prompt.len() + room);
        tokens.extend_from_slice(prompt);
        seq.active = Some(Running {
            sampler: Sampler::new(job.request.options.sampler.clone()),
            tokens,
            fed: common,
            decoder: StreamDecoder::new(),
            generated: 0,
            counts: HashMap::new(),
            cached_tokens: common,
            started: Instant::now(),
            first_token: None,
            job,
        });
    }

    /// Ends the requests that are cancelled or cannot produce another token.
    fn stop_finished(&mut self) {
        let context = self.model.context_length();
        for i in 0..self.seqs.len() {
            let Some(r) = &self.seqs[i].active else {
                continue;
            };
            let reason = if r.job.cancel.is_cancelled() {
                StopReason::Cancelled
            } else if r.generated >= r.job.request.options.max_tokens {
                StopReason::MaxTokens
            } else if r.tokens.len() >= context {
                StopReason::ContextFull
            } else {
                continue;
            };
            self.finish(i, reason, None);
        }
    }

    /// One forward pass over the pending tokens of every running request: a token of each
    /// decoding one, then prompt chunks of the others, [`MAX_BATCH`] tokens in all; then a token
    /// sampled for each that reached the end of its tokens.
    fn compute(&mut self) {
        let mut budget = MAX_BATCH;
        let mut plan: Vec<Option<std::ops::Range<usize>>> = vec![None; self.seqs.len()];
        // Decoding requests first (one token each), then prompt chunks.
        for pass in [true, false] {
            for (i, s) in self.seqs.iter().enumerate() {
                let Some(r) = &s.active else { continue };
                if (r.pending() == 1) != pass || budget == 0 {
                    continue;
                }
                let take = r.pending().min(budget);
                budget -= take;
                plan[i] = Some(r.fed..r.fed + take);
            }
        }
        let wanted = self
            .seqs
            .iter()
            .zip(&plan)
            .filter(|(s, p)| match (&s.active, p) {
                (Some(r), Some(p)) => p.end == r.tokens.len(),
                _ => false,
            })
            .count();
        if plan.iter().all(Option::is_none) {
            return;
        }
        let vocab = self.model.config().vocab_size;
        self.logits.resize(wanted * vocab, 0.0);
        let mut batch: Vec<SequenceBatch<'_>> = self
            .seqs
            .iter_mut()
            .zip(&plan)
            .filter_map(|(s, p)| {
                let p = p.clone()?;
                let Sequence { cache, active, .. } = s;
                let r = active.as_ref()?;
                Some(SequenceBatch {
                    // Tokens before the sampled ones are the prompt.
                    prompt: p.start < r.tokens.len() - r.generated,
                    logits: p.end == r.tokens.len(),
                    tokens: &r.tokens[p],
                    cache,
                })
            })
            .collect();
        let result = self.model.forward_sequences(&mut batch, &mut self.logits);
        drop(batch);
        if let Err(e) = result {
            let message = e.to_string();
            for (i, p) in plan.iter().enumerate() {
                if p.is_some() {
                    // The caches may hold part of the batch: forget them.
                    self.seqs[i].cache.clear();
                    self.seqs[i].cached.clear();
                    self.finish(i, StopReason::Failed, Some(message.clone()));
                }
            }
            return;
        }
        let mut row = 0;
        for (i, p) in plan.into_iter().enumerate() {
            let Some(p) = p else { continue };
            let seq = &mut self.seqs[i];
            let Some(r) = seq.active.as_mut() else {
                continue;
            };
            seq.cached.extend_from_slice(&r.tokens[p.clone()]);
            r.fed = p.end;
            seq.last_used = self.step;
            if p.end == r.tokens.len() {
                self.sample(i, row);
                row += 1;
            }
        }
    }

    /// Samples the next token of sequence `i` from row `row` of the logits and hands it out.
    fn sample(&mut self, i: usize, row: usize) {
        let vocab = self.model.config().vocab_size;
        let context = self.model.context_length();
        let tokenizer = self.model.tokenizer();
        let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
        let Some(r) = self.seqs[i].active.as_mut() else {
            return;
        };
        let request = &r.job.request;
        let (presence, frequency) = (request.presence_penalty, request.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&token, &count) in &r.counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= presence + frequency * count as f32;
                }
            }
        }
        let token = r.sampler.sample(logits, &r.tokens);
        let options = &request.options;
        let stop = options.stop_at_eos
            && (request.stop_tokens.contains(&token)
                || tokenizer.is_some_and(|t| t.is_end_of_generation(token)));
        if stop {
            return self.finish(i, StopReason::EndOfGeneration, None);
        }
        r.tokens.push(token);
        r.generated += 1;
        *r.counts.entry(token).or_default() += 1;
        let mut text = match tokenizer {
            Some(t) => r.decoder.push(t, token),
            None => String::new(),
        };
        let last = r.generated >= options.max_tokens || r.tokens.len() >= context;
        if last {
            // Whatever bytes the decoder still holds.
            text.push_str(&r.decoder.finish());
        }
        r.first_token.get_or_insert_with(Instant::now);
        if !(r.job.sink)(Event::Piece(Piece { token, text })) {
            r.job.cancel.cancel();
            return self.finish(i, StopReason::Cancelled, None);
        }
        if r.generated >= options.max_tokens {
            self.finish(i, StopReason::MaxTokens, None);
        } else if r.tokens.len() >= context {
            self.finish(i, StopReason::ContextFull, None);
        }
    }

    /// Ends the request running on sequence `i`, if any: its last event, and the sequence keeps
    /// the tokens its cache holds.
    fn finish(&mut self, i: usize, stop: StopReason, error: Option<String>) {
        let seq = &mut self.seqs[i];
        let Some(mut r) = seq.active.take() else {
            return;
        };
        seq.last_used = self.step;
        // Counted out before its caller hears that it ended.
        let running = self.running();
        lock(&self.shared.queue).running = running;
        let now = Instant::now();
        let completion = Completion {
            stop,
            error,
            prompt_tokens: r.job.request.prompt.len(),
            cached_tokens: r.cached_tokens,
            generated_tokens: r.generated,
            queued_secs: (r.started - r.job.submitted).as_secs_f64(),
            first_token_secs: r
                .first_token
                .map_or(0.0, |t| (t - r.job.submitted).as_secs_f64()),
            total_secs: (now - r.job.submitted).as_secs_f64(),
        };
        (r.job.sink)(Event::Done(completion));
    }
}

/// The last event of a request that never ran.
fn finish_unstarted(mut job: Job, stop: StopReason, error: Option<String>) {
    let secs = job.submitted.elapsed().as_secs_f64();
    (job.sink)(Event::Done(Completion {
        stop,
        error,
        prompt_tokens: job.request.prompt.len(),
        cached_tokens: 0,
        generated_tokens: 0,
        queued_secs: secs,
        first_token_secs: 0.0,
        total_secs: secs,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{tiny_llama_gguf, TempDir, TinyModelSpec};
    use crate::generate::Generator;
    use crate::llama::LoadOptions;
    use crate::sampler::SamplerConfig;

    /// The tiny model file (tokenizer and all), written and loaded once per test.
    fn tiny_model(threads: usize) -> Arc<Model> {
        let dir = TempDir::new("engine");
        let path = dir.join("tiny.gguf");
        let spec = TinyModelSpec {
            context_length: 96,
            ..TinyModelSpec::default()
        };
        tiny_llama_gguf(&path, &spec, 5).unwrap();
        let opts = LoadOptions {
            threads,
            ..LoadOptions::default()
        };
        Arc::new(Model::load(&path, &opts).unwrap())
    }

    fn engine(model: &Arc<Model>, parallel: usize, queue: usize) -> Engine {
        Engine::new(Arc::clone(model), EngineOptions { parallel, queue }).unwrap()
    }

    fn greedy(max_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            sampler: SamplerConfig::greedy(),
            // The random tiny model would stop at a random end-of-generation token.
            stop_at_eos: false,
            ..GenerateOptions::default()
        }
    }

    fn prompt(n: usize, seed: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 37 + seed * 101 + 11) % vocab) as u32)
            .collect()
    }

    /// The tokens a request generates and how it ended.
    fn collect(stream: RequestStream) -> (Vec<u32>, String, Completion) {
        let (mut tokens, mut text) = (Vec::new(), String::new());
        for event in stream {
            match event {
                Event::Piece(p) => {
                    tokens.push(p.token);
                    text.push_str(&p.text);
                }
                Event::Done(c) => return (tokens, text, c),
            }
        }
        panic!("the stream ended without Event::Done");
    }

    fn alone(model: &Model, prompt: &[u32], opts: GenerateOptions) -> (Vec<u32>, String) {
        let mut generator = Generator::from_tokens(model, prompt.to_vec(), opts).unwrap();
        let mut text = String::new();
        let mut tokens = Vec::new();
        for piece in &mut generator {
            let piece = piece.unwrap();
            tokens.push(piece.token);
            text.push_str(&piece.text);
        }
        (tokens, text)
    }

    /// Submits `request` with a sink that holds the scheduler thread at the request's first event
    /// until `release` is sent (so the request is surely running meanwhile); its completion comes
    /// on the receiver.
    fn submit_held(
        engine: &Engine,
        request: Request,
    ) -> (mpsc::Sender<()>, mpsc::Receiver<Completion>) {
        let (release, hold) = mpsc::channel::<()>();
        let (entered, started) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<Completion>();
        let mut first = true;
        let sink = Box::new(move |event| {
            if std::mem::take(&mut first) {
                let _ = entered.send(());
                let _ = hold.recv();
            }
            if let Event::Done(c) = event {
                let _ = done_tx.send(c);
            }
            true
        });
        engine.submit_with(request, sink).unwrap();
        started.recv().unwrap();
        (release, done_rx)
    }

    /// Six requests of different lengths on three sequences, all submitted at once: prompt chunks
    /// and decode steps of several requests share batches, and each request gets what it gets
    /// alone.
    #[test]
    fn batched_requests_equal_each_alone() {
        for threads in [1, 2] {
            let model = tiny_model(threads);
            let vocab = model.config().vocab_size;
            let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(3 + 13 * i, i, vocab)).collect();
            let expected: Vec<_> = prompts
                .iter()
                .map(|p| alone(&model, p, greedy(12)))
                .collect();
            let engine = engine(&model, 3, 8);
            let streams: Vec<_> = prompts
                .iter()
                .map(|p| engine.submit(Request::new(p.clone(), greedy(12))).unwrap())
                .collect();
            for ((stream, want), p) in streams.into_iter().zip(&expected).zip(&prompts) {
                let (tokens, text, done) = collect(stream);
                assert_eq!((&tokens, &text), (&want.0, &want.1), "{threads} threads");
                assert_eq!(done.stop, StopReason::MaxTokens);
                assert_eq!(done.prompt_tokens, p.len());
                assert_eq!(done.generated_tokens, 12);
                assert!(done.total_secs >= done.first_token_secs);
            }
            assert_eq!(engine.load(), EngineLoad::default());
        }
    }

    /// The next turn of a conversation reuses the cached prefix: only the new tokens are
    /// computed, and the reply is the one a fresh sequence gives.
    #[test]
    fn a_request_reuses_the_cached_prefix_of_an_earlier_one() {
        let model = tiny_model(1);
        let vocab = model.config().vocab_size;
        let engine = Engine::new(Arc::clone(&model), EngineOptions::default()).unwrap();
        let first = prompt(40, 1, vocab);
        let (reply, _, done) = collect(
            engine
                .submit(Request::new(first.clone(), greedy(8)))
                .unwrap(),
        );
        assert_eq!(done.cached_tokens, 0);
        // The last generated token was never fed: the cache holds the prompt and 7 replies.
        let mut second = first.clone();
        second.extend(&reply);
        second.extend(prompt(5, 2, vocab));
        let (tokens, _, done) = collect(
            engine
                .submit(Request::new(second.clone(), greedy(6)))
                .unwrap(),
        );
        assert_eq!(done.cached_tokens, first.len() + reply.len() - 1);
        assert_eq!(tokens, alone(&model, &second, greedy(6)).0);
        // The same prompt again: all but its last token come from the cache.
        let (again, _, done) = collect(
            engine
                .submit(Request::new(second.clone(), greedy(6)))
                .unwrap(),
        );
        assert_eq!(done.cached_tokens, second.len() - 1);
        assert_eq!(again, tokens);
    }

    #[test]
    fn bad_requests_are_refused_before_queueing() {
        let model = tiny_model(1);
        let vocab = model.config().vocab_size;
        let engine = Engine::new(Arc::clone(&model), EngineOptions::default()).unwrap();
        let refuse = |prompt: Vec<u32>| engine.submit(Request::new(prompt, greedy(4))).unwrap_err();
        assert!(matches!(refuse(vec![]), Error::InvalidOption(m) if m.contains("empty")));
        assert!(
            matches!(refuse(vec![vocab as u32]), Error::InvalidOption(m) if m.contains("vocabulary"))
        );
        assert!(matches!(
            refuse(prompt(96, 0, vocab)),
            Error::PromptTooLong {
                prompt_tokens: 96,
                context: 96
            }
        ));
        assert!(Engine::new(
            model,
            EngineOptions {
                parallel: 0,
                queue: 1
            }
        )
        .is_err());
    }

    /// With one sequence busy (its sink holds the scheduler) and a queue of one, a third request
    /// is refused; once released, both queued requests complete.
    #[test]
    fn a_full_queue_refuses_and_shutdown_stops_accepting() {
        let model = tiny_model(1);
        let vocab = model.config().vocab_size;
        let engine = engine(&model, 1, 1);
        let (release, done_rx) = submit_held(&engine, Request::new(prompt(4, 0, vocab), greedy(3)));
        let queued = engine
            .submit(Request::new(prompt(4, 1, vocab), greedy(3)))
            .unwrap();
        assert_eq!(
            engine.load(),
            EngineLoad {
                queued: 1,
                running: 1
            }
        );
        let full = engine.submit(Request::new(prompt(4, 2, vocab), greedy(3)));
        assert!(matches!(full, Err(Error::QueueFull { queue: 1 })));
        release.send(()).unwrap();
        assert_eq!(done_rx.recv().unwrap().stop, StopReason::MaxTokens);
        let (tokens, _, done) = collect(queued);
        assert_eq!((tokens.len(), done.stop), (3, StopReason::MaxTokens));
        assert!(done.queued_secs > 0.0);
        engine.shutdown();
        let late = engine.submit(Request::new(prompt(4, 3, vocab), greedy(3)));
        assert!(matches!(late, Err(Error::ShuttingDown)));
    }

    /// With no waiting room, a request is taken while a sequence is free and refused while none
    /// is.
    #[test]
    fn a_queue_of_zero_takes_requests_only_for_free_sequences() {
        let model = tiny_model(1);
        let vocab = model.config().vocab_size;
        let engine = engine(&model, 1, 0);
        let (tokens, _, _) = collect(
            engine
                .submit(Request::new(prompt(4, 0, vocab), greedy(2)))
                .unwrap(),
        );
        assert_eq!(tokens.len(), 2);
        let (release, done) = submit_held(&engine, Request::new(prompt(4, 1, vocab), greedy(3)));
        let refused = engine.submit(Request::new(prompt(4, 2, vocab), greedy(2)));
        assert!(matches!(refused, Err(Error::QueueFull { queue: 0 })));
        release.send(()).unwrap();
        assert_eq!(done.recv().unwrap().stop, StopReason::MaxTokens);
    }

    /// Dropping a stream, a sink returning false, `cancel_all` and dropping the engine all end
    /// requests with `Cancelled`, and the engine goes on serving the others.
    #[test]
    fn cancelled_requests_end_and_others_go_on() {
        let model = tiny_model(1);
        let vocab = model.config().vocab_size;
        let engine = Engine::new(Arc::clone(&model), EngineOptions::default()).unwrap();
        let long = || Request::new(prompt(6, 4, vocab), greedy(10_000));

        let (tx, rx) = mpsc::channel();
        let mut pieces = 0;
        engine
            .submit_with(
                long(),
                Box::new(move |event| {
                    if let Event::Done(c) = event {
                        tx.send((pieces, c)).unwrap();
                        return true;
                    }
                    pieces += 1;
                    pieces < 5
                }),
            )
            .unwrap();
        let (pieces, done) = rx.recv().unwrap();
        assert_eq!((pieces, done.stop), (5, StopReason::Cancelled));

        let mut stream = engine.submit(long()).unwrap();
        assert!(matches!(stream.next(), Some(Event::Piece(_))));
        drop(stream);
        let (tokens, _, done) = collect(
            engine
                .submit(Request::new(prompt(5, 5, vocab), greedy(4)))
                .unwrap(),
        );
        assert_eq!((tokens.len(), done.stop), (4, StopReason::MaxTokens));

        // Held at its first piece, so it is running when cancelled (it would otherwise fill the
        // tiny model's context soon).
        let (release, done) = submit_held(&engine, long());
        engine.cancel_all();
        release.send(()).unwrap();
        assert_eq!(done.recv().unwrap().stop, StopReason::Cancelled);

        let (release, done) = submit_held(&engine, long());
        let releaser = std::thread::spawn(move || {
            // Dropping the engine marks it closing at once, then waits for the scheduler.
            std::thread::sleep(std::time::Duration::from_millis(100));
            release.send(()).unwrap();
        });
        drop(engine);
        releaser.join().unwrap();
        assert_eq!(done.recv().unwrap().stop, StopReason::Cancelled);
    }

    /// A frequency penalty that outweighs any logit never picks a token twice; stop tokens end
    /// generation; a request that fills the context ends with `ContextFull`.
    #[test]
    fn penalties_stop_tokens_and_context() {
        let model = tiny_model(1);
        let vocab = model.config().vocab_size;
        let engine = Engine::new(Arc::clone(&model), EngineOptions::default()).unwrap();
        let p = prompt(8, 6, vocab);
        let mut request = Request::new(p.clone(), greedy(20));
        request.frequency_penalty = 1e6;
        let (tokens, _, _) = collect(engine.submit(request).unwrap());
        let mut distinct = tokens.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), tokens.len(), "{tokens:?}");

        let (free, _, _) = collect(engine.submit(Request::new(p.clone(), greedy(20))).unwrap());
        let mut request = Request::new(p.clone(), greedy(20));
        request.options.stop_at_eos = true;
        request.stop_tokens = vec![free[3]];
        let first_stop = free.iter().position(|&t| t == free[3]).unwrap();
        let (stopped, _, done) = collect(engine.submit(request).unwrap());
        assert_eq!(done.stop, StopReason::EndOfGeneration);
        assert!(stopped.len() <= first_stop, "{stopped:?} vs {free:?}");

        let (filled, _, done) = collect(
            engine
                .submit(Request::new(prompt(90, 7, vocab), greedy(50)))
                .unwrap(),
        );
        assert_eq!((filled.len(), done.stop), (6, StopReason::ContextFull));
    }
}
