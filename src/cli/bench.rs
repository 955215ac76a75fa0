//! `lutra bench`: llama-bench's measurement over models × thread counts × tests, printed as
//! Markdown, JSON or CSV, optionally with an SVG thread-sweep chart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use lutra_kernels::measure::BANDWIDTH_BYTES;
use lutra_runtime::fixtures::{synthetic_model_with, SyntheticWeights};
use lutra_runtime::llama::{LoadOptions, Model};
use lutra_tooling::bench::{self as measure, BenchOptions, Test, TestKind};
use lutra_tooling::synthetic;

use super::plot::{self, Series};
use super::report::{self, BenchRow, Format};
use super::{default_model_path, load_model, requantize, write_stdout};

/// Seed of synthetic weights: fixed, so that runs compare like with like.
const SYNTHETIC_SEED: u64 = 0x1u64 << 40 | 0x5EED;

/// Arguments of `lutra bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Models, comma-separated: GGUF paths or synthetic:NAME (smollm2-135m, bitnet-2b, bitnet-3b,
    /// llama2-7b, llama3-8b) [default: the fetched SmolLM2 model]
    #[arg(short = 'm', long = "model", value_delimiter = ',')]
    models: Vec<String>,
    /// Thread counts, comma-separated [default: one per core]
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    threads: Vec<usize>,
    /// Prompt lengths to process, comma-separated (0 = skip)
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    n_prompt: Vec<usize>,
    /// Tokens to generate, comma-separated (0 = skip)
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_gen: Vec<usize>,
    /// Positions already in the KV cache when each test starts, comma-separated (llama-bench's
    /// depth: decode and prefill speed deep into a conversation)
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    n_depth: Vec<usize>,
    /// Also generate with this many sequences at once through the scheduler (continuous
    /// batching), comma-separated: a `tgN xS` row per -n value, with all sequences' tokens per
    /// second together
    #[arg(long = "parallel", value_delimiter = ',',
          value_parser = clap::value_parser!(u64).range(1..))]
    parallel: Vec<u64>,
    /// Timed repetitions of each test
    #[arg(short = 'r', long = "repetitions", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    repetitions: u64,
    /// Output format
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Md)]
    output: Format,
    /// Bits per weight: synthetic models [default: 2; BitNet shapes: ternary, 1.58], or
    /// requantize a GGUF
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=4))]
    bits: Option<u8>,
    /// Group size: synthetic models [default: 128 where it divides; BitNet shapes: one scale per
    /// tensor], or requantize a GGUF. Either flag puts BitNet shapes on the LUT grid
    #[arg(long)]
    group_size: Option<usize>,
    /// Write a thread-sweep chart (t/s against threads) to this SVG file
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Skip the untimed warm-up run of each test
    #[arg(long)]
    no_warmup: bool,
    #[command(flatten)]
    cache: super::CacheArgs,
}

/// What a `-m` entry names.
enum ModelSource {
    File(PathBuf),
    Synthetic(Box<synthetic::SyntheticShape>),
}

impl ModelSource {
    fn parse(spec: &str) -> Result<ModelSource> {
        if spec.starts_with("synthetic:") {
            return Ok(ModelSource::Synthetic(Box::new(synthetic::shape(spec)?)));
        }
        Ok(ModelSource::File(PathBuf::from(spec)))
    }
}

/// Runs `lutra bench`.
pub(crate) fn bench(args: &BenchArgs) -> Result<()> {
    let models = if args.models.is_empty() {
        vec![default_model_path()?.display().to_string()]
    } else {
        args.models.clone()
    };
    let threads = if args.threads.is_empty() {
        vec![std::thread::available_parallelism().map_or(1, |n| n.get())]
    } else {
        args.threads.clone()
    };
    let prompts = args
        .n_prompt
        .iter()
        .filter(|&&n| n > 0)
        .map(|&tokens| (TestKind::Prompt, tokens));
    let gens = args
        .n_gen
        .iter()
        .filter(|&&n| n > 0)
        .map(|&tokens| (TestKind::Generate, tokens));
    let parallel = args.parallel.iter().flat_map(|&sequences| {
        args.n_gen.iter().filter(|&&n| n > 0).map(move |&tokens| {
            let sequences = sequences as usize;
            (TestKind::ParallelGenerate { sequences }, tokens)
        })
    });
    let tests: Vec<Test> = prompts
        .chain(gens)
        .chain(parallel)
        .flat_map(|(kind, tokens)| {
            args.n_depth.iter().map(move |&depth| Test {
                kind,
                tokens,
                depth,
            })
        })
        .collect();
    if tests.is_empty() {
        bail!("nothing to measure: -p and -n are both 0");
    }
    // Every test starts at its depth; d + p + n is enough for the longest, as in llama-bench.
    let longest = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    // The scheduler's tests start from an 8-token prompt and generate one token more.
    let context = longest(&args.n_depth) + longest(&args.n_prompt) + longest(&args.n_gen) + 9;
    let sources = models
        .iter()
        .map(|m| ModelSource::parse(m).map(|s| (m.clone(), s)))
        .collect::<Result<Vec<_>>>()?;
    for (name, source) in &sources {
        if let ModelSource::File(path) = source {
            super::ensure_exists(path).with_context(|| format!("bench model '{name}'"))?;
        }
    }

    let cpu = measure::cpu_name().unwrap_or_else(|| "unknown CPU".to_string());
    let mut machine_bandwidth = BTreeMap::new();
    for &t in &threads {
        let bw = lutra_kernels::measure::read_bandwidth(t, BANDWIDTH_BYTES, 3)
            .context("memory bandwidth probe failed")?
            .gb_per_s;
        eprintln!("lutra bench: memory read bandwidth with {t} threads: {bw:.1} GB/s");
        machine_bandwidth.insert(t, bw);
    }
    let opts = BenchOptions {
        repetitions: args.repetitions as usize,
        warmup: !args.no_warmup,
        ..BenchOptions::default()
    };

    let mut rows = Vec::new();
    // Models are built once, on the most threads of the sweep, and re-threaded per row.
    let build_threads = threads.iter().copied().max().unwrap_or(1);
    for (name, source) in &sources {
        // Peak RSS per model rather than per process, where the kernel allows the reset.
        measure::reset_peak_rss();
        let (model, bits, group) = build(source, args, build_threads, context)?;
        let mut model = Arc::new(model);
        for &t in &threads {
            Arc::get_mut(&mut model)
                .context("the model is still in use by a scheduler")?
                .set_threads(t)
                .with_context(|| format!("{name}: cannot run on {t} threads"))?;
            for &test in &tests {
                if test.depth > 0 && matches!(test.kind, TestKind::ParallelGenerate { .. }) {
                    continue;
                }
                eprintln!("lutra bench: {name}, {t} threads, {} ...", test.name());
                let result = match test.kind {
                    TestKind::ParallelGenerate { .. } => {
                        measure::run_parallel_test(&model, test, &opts)
                    }
                    _ => measure::run_test(&*model, test, &opts),
                }
                .with_context(|| format!("{name}: {} failed", test.name()))?;
                let size = model.weight_bytes() as u64;
                let tps = &result.tokens_per_sec;
                rows.push(BenchRow {
                    model: display_name(name, source, args),
                    bits,
                    group_size: group,
                    size_bytes: size,
                    isa: model.isa().to_string(),
                    threads: model.threads(),
                    test: test.name(),
                    tokens: test.tokens,
                    tokens_per_sec: tps.mean,
                    tokens_per_sec_std: tps.std,
                    samples: result
                        .seconds
                        .iter()
                        .map(|s| timed_tokens(test) as f64 / s)
                        .collect(),
                    effective_gb_per_sec: (test.kind == TestKind::Generate)
                        .then(|| size as f64 * tps.mean / 1e9),
                    machine_gb_per_sec: machine_bandwidth.get(&t).copied(),
                    peak_rss_bytes: measure::peak_rss_bytes(),
                    cpu: cpu.clone(),
                    prefill: model.prefill_kernel(),
                    synthetic: matches!(source, ModelSource::Synthetic(_)),
                });
            }
        }
    }

    write_stdout(&report::render(&rows, args.output))?;
    if let Some(path) = &args.plot {
        let svg = plot::render_svg("lutra bench: tokens/s vs threads", &series(&rows));
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("lutra bench: wrote {}", path.display());
    }
    Ok(())
}

/// Builds the model of `source` on `threads`; returns it with the bits and group size of its
/// LUT matrices (both `None` for a GGUF kept in its own types).
fn build(
    source: &ModelSource,
    args: &BenchArgs,
    threads: usize,
    context: usize,
) -> Result<(Model, Option<u8>, Option<usize>)> {
    let mut opts = LoadOptions {
        threads,
        context_length: Some(context),
        kv_f16: args.cache.kv_f16()?,
        ..LoadOptions::default()
    };
    match source {
        ModelSource::File(path) => {
            opts.requantize = requantize(args.bits, args.group_size);
            let model = load_model(path, &opts)?;
            let (bits, group) = match &opts.requantize {
                Some(r) => (Some(r.bits), Some(r.group_size)),
                None => (None, None),
            };
            Ok((model, bits, group))
        }
        ModelSource::Synthetic(shape) => {
            let spec = shape.weights(args.bits, args.group_size);
            let start = std::time::Instant::now();
            let model = synthetic_model_with(shape.benchmark_config(), spec, &opts, SYNTHETIC_SEED)
                .with_context(|| format!("cannot build synthetic:{}", shape.name))?;
            eprintln!(
                "lutra bench: built synthetic:{} ({:?}; layers {}, embedding/LM head {}) in {:.1} s",
                shape.name,
                shape.config.architecture,
                spec.layers,
                spec.head,
                start.elapsed().as_secs_f64()
            );
            // Which kernel each kind of tensor runs on, so that a row can be read without guessing.
            for t in &model.describe().tensor_types {
                eprintln!(
                    "lutra bench:   {:>4} × {:<18} → {:<18} {:>9.1} MiB",
                    t.count,
                    t.source,
                    t.kernel,
                    t.bytes as f64 / (1024.0 * 1024.0)
                );
            }
            // Ternary weights have no group grid: the bits column says 2 (codes 0..=2).
            let (bits, group) = match spec.layers {
                SyntheticWeights::LowBit { bits, group_size } => (bits, Some(group_size)),
                SyntheticWeights::Ternary => (2, None),
                SyntheticWeights::Int8 => (8, None),
            };
            Ok((model, Some(bits), group))
        }
    }
}

/// Tokens one repetition of `test` times: all sequences' together in a scheduler test.
fn timed_tokens(test: Test) -> usize {
    match test.kind {
        TestKind::ParallelGenerate { sequences } => sequences * test.tokens,
        _ => test.tokens,
    }
}

/// The model column: a file's name without its folders (as llama-bench), or `synthetic:NAME`.
/// Synthetic models with ternary layers say so: their bits column reads 2 (codes 0..=2).
fn display_name(spec: &str, source: &ModelSource, args: &BenchArgs) -> String {
    match source {
        ModelSource::File(path) => path
            .file_name()
            .map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned()),
        ModelSource::Synthetic(shape)
            if shape.weights(args.bits, args.group_size).layers == SyntheticWeights::Ternary =>
        {
            format!("synthetic:{} (ternary)", shape.name)
        }
        ModelSource::Synthetic(shape) => format!("synthetic:{}", shape.name),
    }
}

/// One chart line per (model, bits, test): t/s against threads.
fn series(rows: &[BenchRow]) -> Vec<Series> {
    let mut lines: BTreeMap<(String, String, String), Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows {
        let bits = r
            .bits
            .map_or("file types".to_string(), |b| format!("{b}-bit"));
        lines
            .entry((r.model.clone(), bits, r.test.clone()))
            .or_default()
            .push((r.threads as f64, r.tokens_per_sec));
    }
    lines
        .into_iter()
        .map(|((model, bits, test), points)| Series {
            label: format!("{model} {bits} {test}"),
            points,
        })
        .collect()
}
