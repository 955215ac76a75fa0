//! llama-bench-style speed measurement: prompt processing (`pp512`) and token generation
//! (`tg128`) timed over repetitions, plus the facts a result needs next to it (CPU model,
//! peak resident memory). The machine's read bandwidth comes from
//! `lutra_kernels::measure::read_bandwidth`.
//!
//! Only `forward` is timed. Token ids are random (tokenization is not measured), and the greedy
//! argmax that picks each next generated token runs outside the timed region, so the figures are
//! the model's own speed and do not depend on a tokenizer or sampler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lutra_kernels::measure::SplitMix64;
use lutra_runtime::engine::{Engine, EngineOptions, Event, Request};
use lutra_runtime::generate::GenerateOptions;
use lutra_runtime::kv_cache::KvCache;
use lutra_runtime::llama::Model;
use lutra_runtime::sampler::{argmax, SamplerConfig};
use lutra_runtime::{Error, Result};

/// Mean and spread of repeated measurements.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator, as llama-bench); 0 for one sample.
    pub std: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub count: usize,
}

impl Stats {
    /// Statistics of `samples`; `None` when there are none.
    pub fn from_samples(samples: &[f64]) -> Option<Stats> {
        let count = samples.len();
        if count == 0 {
            return None;
        }
        let mean = samples.iter().sum::<f64>() / count as f64;
        let std = if count > 1 {
            let ss: f64 = samples.iter().map(|s| (s - mean) * (s - mean)).sum();
            (ss / (count - 1) as f64).sqrt()
        } else {
            0.0
        };
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Stats {
            mean,
            std,
            min,
            max,
            count,
        })
    }
}

/// What one test measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TestKind {
    /// Prompt processing: all tokens in one batched `forward` on an empty cache.
    Prompt,
    /// Token generation: one-token `forward` steps on an empty cache, each feeding the greedy
    /// argmax of the previous step.
    Generate,
    /// Token generation of this many sequences at once through the scheduler
    /// ([`lutra_runtime::Engine`]): every step decodes one token of each in one batch; the rate
    /// is all sequences' tokens together ([`run_parallel_test`]).
    ParallelGenerate {
        /// Sequences decoded together.
        sequences: usize,
    },
}

/// One test: a kind, a token count and a cache depth, named like llama-bench (`pp512`, `tg128`,
/// `tg128 @ d2048`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Test {
    /// Prompt processing or generation.
    pub kind: TestKind,
    /// Tokens processed (prompt) or generated.
    pub tokens: usize,
    /// Positions already in the cache when the timed part starts (llama-bench's `-d`).
    pub depth: usize,
}

impl Test {
    /// llama-bench's name: `pp` or `tg` followed by the token count, ` xS` for S sequences at
    /// once, and ` @ dN` at depth N > 0.
    pub fn name(&self) -> String {
        let name = match self.kind {
            TestKind::Prompt => format!("pp{}", self.tokens),
            TestKind::Generate => format!("tg{}", self.tokens),
            TestKind::ParallelGenerate { sequences } => format!("tg{} x{sequences}", self.tokens),
        };
        if self.depth > 0 {
            format!("{name} @ d{}", self.depth)
        } else {
            name
        }
    }
}

/// Anything that runs a causal LM forward pass over a cache: the model, or a stand-in in tests.
pub trait Decoder {
    /// The per-sequence state (the KV cache).
    type Cache;
    /// Number of logits a forward pass writes.
    fn vocab_size(&self) -> usize;
    /// A fresh, empty cache large enough for the longest test.
    fn new_cache(&self) -> Self::Cache;
    /// Keeps the first `len` positions of `cache` (at most its length), so that the next forward
    /// starts at position `len`.
    fn truncate(&self, cache: &mut Self::Cache, len: usize);
    /// Appends `tokens` to `cache` and writes the last token's logits.
    fn forward(&self, tokens: &[u32], cache: &mut Self::Cache, logits: &mut [f32]) -> Result<()>;
}

impl Decoder for Model {
    type Cache = KvCache;

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn new_cache(&self) -> Self::Cache {
        Model::new_cache(self)
    }

    fn truncate(&self, cache: &mut Self::Cache, len: usize) {
        cache.truncate(len);
    }

    fn forward(&self, tokens: &[u32], cache: &mut Self::Cache, logits: &mut [f32]) -> Result<()> {
        Model::forward(self, tokens, cache, logits)
    }
}

/// How a test is repeated.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    /// Timed repetitions (at least 1).
    pub repetitions: usize,
    /// Run the test once untimed first, to fault in weights and warm the caches.
    pub warmup: bool,
    /// Seed of the random prompt tokens.
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            repetitions: 5,
            warmup: true,
            seed: 42,
        }
    }
}

/// The measurements of one test.
#[derive(Clone, Debug, PartialEq)]
pub struct TestResult {
    /// The test.
    pub test: Test,
    /// Timed seconds of each repetition (forward calls only).
    pub seconds: Vec<f64>,
    /// Tokens per second over the repetitions.
    pub tokens_per_sec: Stats,
}

/// Runs `test` on `decoder`: an optional warm-up, then `opts.repetitions` timed runs. The cache is
/// first filled with `test.depth` random tokens (one untimed batched forward), and every run starts
/// from those positions.
pub fn run_test<D: Decoder>(decoder: &D, test: Test, opts: &BenchOptions) -> Result<TestResult> {
    if test.tokens == 0 {
        return Err(Error::InvalidOption(format!(
            "test {} has no tokens",
            test.name()
        )));
    }
    if opts.repetitions == 0 {
        return Err(Error::InvalidOption(
            "repetitions must be at least 1".into(),
        ));
    }
    if let TestKind::ParallelGenerate { .. } = test.kind {
        return Err(Error::InvalidOption(format!(
            "test {} runs on the scheduler (run_parallel_test)",
            test.name()
        )));
    }
    let vocab = decoder.vocab_size();
    let mut cache = decoder.new_cache();
    let mut logits = vec![0.0f32; vocab];
    let mut rng = TokenRng(SplitMix64::new(opts.seed));
    let mut seconds = Vec::with_capacity(opts.repetitions);
    if test.depth > 0 {
        let context: Vec<u32> = (0..test.depth).map(|_| rng.token(vocab)).collect();
        decoder.forward(&context, &mut cache, &mut logits)?;
    }
    let runs = opts.repetitions + usize::from(opts.warmup);
    for run in 0..runs {
        decoder.truncate(&mut cache, test.depth);
        let elapsed = match test.kind {
            TestKind::Prompt => {
                let tokens: Vec<u32> = (0..test.tokens).map(|_| rng.token(vocab)).collect();
                let start = Instant::now();
                decoder.forward(&tokens, &mut cache, &mut logits)?;
                start.elapsed()
            }
            TestKind::Generate => {
                let mut token = rng.token(vocab);
                let mut timed = Duration::ZERO;
                for _ in 0..test.tokens {
                    let start = Instant::now();
                    decoder.forward(&[token], &mut cache, &mut logits)?;
                    timed += start.elapsed();
                    token = argmax(&logits);
                }
                timed
            }
            TestKind::ParallelGenerate { .. } => unreachable!("refused above"),
        };
        if run >= usize::from(opts.warmup) {
            seconds.push(elapsed.as_secs_f64());
        }
    }
    result(test, test.tokens, seconds)
}

/// The result of `test` whose repetitions each timed `tokens` tokens in `seconds`.
fn result(test: Test, tokens: usize, seconds: Vec<f64>) -> Result<TestResult> {
    let rates: Vec<f64> = seconds
        .iter()
        .map(|&s| tokens as f64 / s.max(1e-12))
        .collect();
    let tokens_per_sec = Stats::from_samples(&rates)
        .ok_or_else(|| Error::InvalidOption("no timed repetitions".into()))?;
    Ok(TestResult {
        test,
        seconds,
        tokens_per_sec,
    })
}

/// Runs a [`TestKind::ParallelGenerate`] test: `sequences` requests of random 8-token prompts
/// submitted together to an [`Engine`] with as many sequences, each generating `test.tokens + 1`
/// tokens greedily (end-of-generation ignored). Timed from the moment every request has its first
/// token (the prefills are done) to the moment the last one ends: `sequences × tokens` decoded
/// tokens, the aggregate rate.
pub fn run_parallel_test(
    model: &Arc<Model>,
    test: Test,
    opts: &BenchOptions,
) -> Result<TestResult> {
    let TestKind::ParallelGenerate { sequences } = test.kind else {
        return Err(Error::InvalidOption(format!(
            "test {} is not a parallel generation test",
            test.name()
        )));
    };
    if test.tokens == 0 || sequences == 0 || opts.repetitions == 0 || test.depth > 0 {
        return Err(Error::InvalidOption(format!(
            "test {} needs tokens, sequences and repetitions, and no depth",
            test.name()
        )));
    }
    let engine = Engine::new(
        Arc::clone(model),
        EngineOptions {
            parallel: sequences,
            queue: sequences,
        },
    )?;
    let vocab = model.config().vocab_size;
    let mut rng = TokenRng(SplitMix64::new(opts.seed));
    let options = GenerateOptions {
        max_tokens: test.tokens + 1,
        sampler: SamplerConfig::greedy(),
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    let mut seconds = Vec::with_capacity(opts.repetitions);
    for run in 0..opts.repetitions + usize::from(opts.warmup) {
        let (tx, rx) = std::sync::mpsc::channel();
        for s in 0..sequences {
            let prompt: Vec<u32> = (0..8).map(|_| rng.token(vocab)).collect();
            let tx = tx.clone();
            let sink = Box::new(move |event: Event| {
                let when = Instant::now();
                let _ = match event {
                    Event::Piece(_) => tx.send((s, when, None)),
                    Event::Done(c) => tx.send((s, when, Some(c))),
                };
                true
            });
            engine.submit_with(Request::new(prompt, options.clone()), sink)?;
        }
        drop(tx);
        let mut first: Vec<Option<Instant>> = vec![None; sequences];
        let mut end = None;
        for (s, when, done) in rx {
            match done {
                None => {
                    first[s].get_or_insert(when);
                }
                Some(c) if c.generated_tokens != test.tokens + 1 => {
                    return Err(Error::InvalidOption(format!(
                        "test {}: a request ended after {} tokens ({:?}{})",
                        test.name(),
                        c.generated_tokens,
                        c.stop,
                        c.error.map(|e| format!(": {e}")).unwrap_or_default()
                    )));
                }
                Some(_) => end = Some(when),
            }
        }
        let start = first.iter().flatten().max().copied();
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Error::InvalidOption(format!(
                "test {}: no tokens",
                test.name()
            )));
        };
        if run >= usize::from(opts.warmup) {
            seconds.push((end - start).as_secs_f64());
        }
    }
    result(test, sequences * test.tokens, seconds)
}

/// Random token ids from the shared splitmix64 stream (no dependency needed for benchmark input).
struct TokenRng(SplitMix64);

impl TokenRng {
    fn token(&mut self, vocab: usize) -> u32 {
        (self.0.next_u64() % vocab.max(1) as u64) as u32
    }
}

/// The CPU's model name from `/proc/cpuinfo` (Linux); `None` elsewhere.
pub fn cpu_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_name(&info)
}

fn parse_cpu_name(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        let key = key.trim();
        // x86 says "model name"; some aarch64 kernels only give "Hardware" or "CPU part".
        (key == "model name" || key == "Hardware")
            .then(|| value.trim().to_string())
            .filter(|v| !v.is_empty())
    })
}

/// Peak resident memory of this process in bytes (`VmHWM` of `/proc/self/status`).
///
/// The figure is process-wide: it covers everything loaded so far, not one model, unless
/// [`reset_peak_rss`] was called in between.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// Current resident memory of this process in bytes (`VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// Resets the peak-RSS counter to the current RSS (Linux ≥ 4.0: writes 5 to
/// `/proc/self/clear_refs`), so that the next [`peak_rss_bytes`] describes what runs after it.
/// Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&status, key)
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn stats_of_known_samples() {
        let s = Stats::from_samples(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert!((s.mean - 5.0).abs() < 1e-12);
        // Sample variance: 32 / 7.
        assert!((s.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.count), (2.0, 9.0, 8));
        assert_eq!(Stats::from_samples(&[3.0]).unwrap().std, 0.0);
        assert!(Stats::from_samples(&[]).is_none());
    }

    #[test]
    fn test_names_follow_llama_bench() {
        let pp = Test {
            kind: TestKind::Prompt,
            tokens: 512,
            depth: 0,
        };
        let tg = Test {
            kind: TestKind::Generate,
            tokens: 128,
            depth: 0,
        };
        assert_eq!(pp.name(), "pp512");
        assert_eq!(tg.name(), "tg128");
        let deep = Test { depth: 2048, ..tg };
        assert_eq!(deep.name(), "tg128 @ d2048");
    }

    /// The scheduler test on a one-layer SmolLM2-shaped model: one timed span per repetition, a
    /// rate for all sequences' tokens together, and the wrong tests refused.
    #[test]
    fn parallel_test_times_every_sequence_together() {
        use lutra_runtime::fixtures::synthetic_model_with;
        use lutra_runtime::llama::LoadOptions;

        let shape = crate::synthetic::shape("smollm2-135m").unwrap();
        let config = lutra_runtime::config::ModelConfig {
            layers: 1,
            vocab_size: 512,
            context_length: 64,
            ..shape.benchmark_config()
        };
        let opts = LoadOptions {
            threads: 1,
            ..LoadOptions::default()
        };
        let model = Arc::new(
            synthetic_model_with(config, shape.weights(Some(4), Some(32)), &opts, 1).unwrap(),
        );
        let test = Test {
            kind: TestKind::ParallelGenerate { sequences: 3 },
            tokens: 5,
            depth: 0,
        };
        assert_eq!(test.name(), "tg5 x3");
        let bench = BenchOptions {
            repetitions: 2,
            warmup: false,
            seed: 1,
        };
        let r = run_parallel_test(&model, test, &bench).unwrap();
        assert_eq!(r.seconds.len(), 2);
        // 3 sequences × 5 decoded tokens in each timed span.
        let fastest = r.seconds.iter().map(|&s| 15.0 / s).fold(0.0, f64::max);
        assert!(
            (r.tokens_per_sec.max - fastest).abs() <= 1e-9 * fastest,
            "{r:?}"
        );
        assert_eq!(r.tokens_per_sec.count, 2);
        // A plain test does not run on the scheduler, nor a parallel one without it.
        let plain = Test {
            kind: TestKind::Generate,
            ..test
        };
        assert!(run_parallel_test(&model, plain, &bench).is_err());
        assert!(run_test(&*model, test, &bench).is_err());
        assert!(run_parallel_test(&model, Test { depth: 8, ..test }, &bench).is_err());
    }

    /// Records every forward call; its "logits" make token `(last + 1) % vocab` the argmax.
    struct Recorder {
        vocab: usize,
        calls: RefCell<Vec<(usize, Vec<u32>)>>,
    }

    impl Decoder for Recorder {
        type Cache = usize;
        fn vocab_size(&self) -> usize {
            self.vocab
        }
        fn new_cache(&self) -> usize {
            0
        }
        fn truncate(&self, cache: &mut usize, len: usize) {
            *cache = len.min(*cache);
        }
        fn forward(&self, tokens: &[u32], cache: &mut usize, logits: &mut [f32]) -> Result<()> {
            self.calls.borrow_mut().push((*cache, tokens.to_vec()));
            *cache += tokens.len();
            logits.fill(0.0);
            let last = *tokens.last().unwrap_or(&0) as usize;
            logits[(last + 1) % self.vocab] = 1.0;
            std::thread::sleep(Duration::from_micros(50));
            Ok(())
        }
    }

    #[test]
    fn prompt_test_is_one_batched_forward_per_run_plus_warmup() {
        let rec = Recorder {
            vocab: 100,
            calls: RefCell::new(vec![]),
        };
        let test = Test {
            kind: TestKind::Prompt,
            tokens: 16,
            depth: 0,
        };
        let opts = BenchOptions {
            repetitions: 3,
            warmup: true,
            seed: 1,
        };
        let r = run_test(&rec, test, &opts).unwrap();
        let calls = rec.calls.borrow();
        assert_eq!(calls.len(), 4, "three timed runs and one warm-up");
        for (pos, tokens) in calls.iter() {
            assert_eq!(*pos, 0, "every run starts on an empty cache");
            assert_eq!(tokens.len(), 16);
            assert!(tokens.iter().all(|&t| t < 100));
        }
        assert_eq!(r.seconds.len(), 3);
        assert_eq!(r.tokens_per_sec.count, 3);
        assert!(r.tokens_per_sec.mean > 0.0 && r.tokens_per_sec.mean.is_finite());
    }

    #[test]
    fn generate_test_steps_one_token_and_feeds_the_argmax() {
        let rec = Recorder {
            vocab: 50,
            calls: RefCell::new(vec![]),
        };
        let test = Test {
            kind: TestKind::Generate,
            tokens: 5,
            depth: 0,
        };
        let opts = BenchOptions {
            repetitions: 2,
            warmup: false,
            seed: 7,
        };
        let r = run_test(&rec, test, &opts).unwrap();
        let calls = rec.calls.borrow();
        assert_eq!(calls.len(), 10);
        for run in calls.chunks(5) {
            for (step, (pos, tokens)) in run.iter().enumerate() {
                assert_eq!(*pos, step);
                assert_eq!(tokens.len(), 1);
            }
            for pair in run.windows(2) {
                assert_eq!(pair[1].1[0], (pair[0].1[0] + 1) % 50, "next token = argmax");
            }
        }
        // 5 tokens in at least 5 × 50 µs.
        assert!(r.tokens_per_sec.max < 5.0 / 250e-6);
    }

    #[test]
    fn depth_is_filled_once_and_every_run_starts_there() {
        let rec = Recorder {
            vocab: 30,
            calls: RefCell::new(vec![]),
        };
        let test = Test {
            kind: TestKind::Generate,
            tokens: 3,
            depth: 40,
        };
        let opts = BenchOptions {
            repetitions: 2,
            warmup: true,
            seed: 3,
        };
        let r = run_test(&rec, test, &opts).unwrap();
        let calls = rec.calls.borrow();
        // One untimed fill of 40 tokens at position 0, then 3 runs of 3 steps from position 40.
        assert_eq!(calls.len(), 1 + 3 * 3);
        assert_eq!((calls[0].0, calls[0].1.len()), (0, 40));
        for run in calls[1..].chunks(3) {
            let positions: Vec<usize> = run.iter().map(|(pos, _)| *pos).collect();
            assert_eq!(positions, [40, 41, 42]);
        }
        assert_eq!(r.seconds.len(), 2);
    }

    #[test]
    fn zero_tokens_or_repetitions_are_rejected() {
        let rec = Recorder {
            vocab: 10,
            calls: RefCell::new(vec![]),
        };
        let opts = BenchOptions::default();
        assert!(run_test(
            &rec,
            Test {
                kind: TestKind::Prompt,
                tokens: 0,
                depth: 0,
            },
            &opts
        )
        .is_err());
        let none = BenchOptions {
            repetitions: 0,
            ..opts
        };
        assert!(run_test(
            &rec,
            Test {
                kind: TestKind::Generate,
                tokens: 2,
                depth: 0,
            },
            &none
        )
        .is_err());
    }

    #[test]
    fn cpuinfo_and_status_parsing() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpu_name(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(parse_cpu_name("processor: 0\n"), None);
        let status = "Name:\tx\nVmHWM:\t  123456 kB\nVmRSS:\t  1000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(123456));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn live_process_figures_are_plausible() {
        if cfg!(target_os = "linux") {
            // Current first: the peak can only grow after it, even while other tests allocate.
            let now = current_rss_bytes().unwrap();
            let peak = peak_rss_bytes().unwrap();
            assert!(peak >= now && now > 0);
        }
    }
}
