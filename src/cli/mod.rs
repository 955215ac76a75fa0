//! The `lutra` command line: argument parsing (clap derive, llama.cpp flag names) and dispatch.
//! Every subcommand lives in its own module and only parses, calls the library and prints.

mod bench;
mod generate;
mod inspect;
mod interrupt;
mod kernels;
mod plot;
mod quantize;
mod report;
mod serve;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lutra_runtime::llama::{LoadOptions, Model, Requantize};
use lutra_runtime::sampler::SamplerConfig;

/// The default model, relative to a models root.
const DEFAULT_MODEL: &str = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf";

/// CPU inference for low-bit LLMs with table-lookup matrix kernels.
#[derive(Debug, Parser)]
#[command(name = "lutra", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Continue a prompt; prints only the new text on stdout, speed on stderr.
    Generate(generate::GenerateArgs),
    /// Interactive multi-turn chat (reads turns line by line from stdin; `/exit` or Ctrl-D quits).
    Chat(generate::ChatArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(inspect::TokenizeArgs),
    /// Perplexity of a text file, llama-perplexity style.
    Perplexity(inspect::PerplexityArgs),
    /// Architecture, sizes, tensor types and memory use of a model.
    Info(inspect::InfoArgs),
    /// Prompt-processing and generation speed, llama-bench style.
    Bench(bench::BenchArgs),
    /// Speed of the matrix kernels alone, as JSON records.
    BenchKernels(kernels::BenchKernelsArgs),
    /// Quantize a model with GPTQ / HLQ into a file that loads without repacking.
    Quantize(quantize::QuantizeArgs),
    /// OpenAI-compatible HTTP server (chat and text completions, streamed or not).
    Serve(serve::ServeArgs),
}

/// Model file and how to load it; shared by the subcommands that run a model.
#[derive(Debug, Args)]
pub(crate) struct ModelArgs {
    /// GGUF model file or Hugging Face model folder [default: the fetched SmolLM2-135M-Instruct Q4_1]
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Worker threads (0 = one per core)
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    threads: usize,
    /// Context length in tokens (0 = the model's own)
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,
    /// Run the plain f32 reference forward pass instead of the LUT kernels
    #[arg(long)]
    reference: bool,
    /// Requantize every LUT matrix to this many bits (1..=4)
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=4))]
    bits: Option<u8>,
    /// Group size for --bits
    #[arg(long, requires = "bits")]
    group_size: Option<usize>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// KV cache element types, with llama.cpp's flags (`-ctk`/`-ctv` are rewritten to the long forms).
#[derive(Debug, Args)]
pub(crate) struct CacheArgs {
    /// KV cache type for keys: f16 (as llama.cpp) or f32 (exact, twice the memory)
    #[arg(long = "cache-type-k", value_enum, default_value_t = CacheType::F16)]
    cache_type_k: CacheType,
    /// KV cache type for values; must equal --cache-type-k
    #[arg(long = "cache-type-v", value_enum, default_value_t = CacheType::F16)]
    cache_type_v: CacheType,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CacheType {
    F32,
    F16,
}

impl CacheType {
    fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
        }
    }
}

impl CacheArgs {
    /// Whether the cache stores f16; keys and values share one type.
    pub(crate) fn kv_f16(&self) -> Result<bool> {
        if self.cache_type_k != self.cache_type_v {
            bail!(
                "-ctk {} and -ctv {} differ: lutra stores keys and values in one type, give both the same",
                self.cache_type_k.name(),
                self.cache_type_v.name()
            );
        }
        Ok(self.cache_type_k == CacheType::F16)
    }
}

impl ModelArgs {
    /// The model path: `-m`, or the default model found by [`default_model_path`].
    pub(crate) fn path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => default_model_path(),
        }
    }

    fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            threads: self.threads,
            reference: self.reference,
            requantize: requantize(self.bits, self.group_size),
            context_length: (self.ctx_size > 0).then_some(self.ctx_size),
            kv_f16: self.cache.kv_f16()?,
        })
    }

    /// Loads the model, reporting what and how long on stderr.
    pub(crate) fn load(&self) -> Result<Model> {
        let path = self.path()?;
        load_model(&path, &self.load_options()?)
    }
}

/// `--bits`/`--group-size` as a requantization request (group size 128 unless given).
fn requantize(bits: Option<u8>, group_size: Option<usize>) -> Option<Requantize> {
    bits.map(|bits| Requantize {
        bits,
        group_size: group_size.unwrap_or(128),
    })
}

/// Loads `path`, naming it in every error.
fn load_model(path: &Path, opts: &LoadOptions) -> Result<Model> {
    ensure_exists(path)?;
    let start = std::time::Instant::now();
    let model = Model::load(path, opts)
        .with_context(|| format!("failed to load model {}", path.display()))?;
    eprintln!(
        "lutra: loaded {} in {:.2} s ({} threads, {})",
        path.display(),
        start.elapsed().as_secs_f64(),
        model.threads(),
        model.isa()
    );
    Ok(model)
}

fn ensure_exists(path: &Path) -> Result<()> {
    // A file is a GGUF; a directory is a Hugging Face folder.
    if !path.is_file() && !path.is_dir() {
        bail!(
            "model file {} does not exist (run models/fetch.sh to download the default model, or pass -m)",
            path.display()
        );
    }
    Ok(())
}

/// Where the default model is looked for: `$LUTRA_MODELS`, the current directory, and the
/// repository this binary was built from.
fn default_model_candidates() -> Vec<PathBuf> {
    let file = Path::new(DEFAULT_MODEL);
    let mut candidates = Vec::new();
    if let Some(root) = std::env::var_os("LUTRA_MODELS").filter(|v| !v.is_empty()) {
        let root = PathBuf::from(root);
        // LUTRA_MODELS may name the repository root, the models folder or the cache itself.
        candidates.push(root.join(file));
        if let Ok(rest) = file.strip_prefix("models") {
            candidates.push(root.join(rest));
        }
        if let Some(name) = file.file_name() {
            candidates.push(root.join(name));
        }
    }
    candidates.push(file.to_path_buf());
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(file));
    candidates
}

/// The first existing default model, or an error listing where it was looked for.
fn default_model_path() -> Result<PathBuf> {
    let candidates = default_model_candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "no -m given and the default model {DEFAULT_MODEL} was not found (looked in: {}); \
         run models/fetch.sh to download it, or set LUTRA_MODELS",
        tried.join(", ")
    )
}

/// Sampling flags, llama.cpp names and defaults.
#[derive(Debug, Args)]
pub(crate) struct SamplingArgs {
    /// Temperature (0 = greedy)
    #[arg(long = "temp", default_value_t = 0.8)]
    temp: f32,
    /// Keep the k most likely tokens (0 = all)
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off)
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the most likely one (0 = off)
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeated tokens (1 = off)
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (default: from the clock)
    #[arg(short = 's', long = "seed")]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

/// Writes `text` to stdout and flushes; a closed pipe (`lutra ... | head`) becomes an error
/// instead of the panic `print!` would raise.
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Rewrites llama.cpp's multi-letter single-dash flags (`-sys`, `-ctk`, `-ctv`) that clap cannot
/// express.
fn normalize_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| {
            if a == "-sys" {
                "--system-prompt".into()
            } else if a == "-ctk" {
                "--cache-type-k".into()
            } else if a == "-ctv" {
                "--cache-type-v".into()
            } else {
                a
            }
        })
        .collect()
}

/// Parses the process arguments and runs the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse_from(normalize_args(std::env::args_os()));
    match cli.command {
        Command::Generate(args) => generate::generate(&args),
        Command::Chat(args) => generate::chat(&args),
        Command::Tokenize(args) => inspect::tokenize(&args),
        Command::Perplexity(args) => inspect::perplexity(&args),
        Command::Info(args) => inspect::info(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::BenchKernels(args) => kernels::bench_kernels(&args),
        Command::Quantize(args) => quantize::quantize(&args),
        Command::Serve(args) => serve::serve(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sys_flag_becomes_system_prompt() {
        let args = normalize_args(["lutra", "chat", "-sys", "be brief"].map(Into::into));
        let cli = Cli::try_parse_from(args).unwrap();
        match cli.command {
            Command::Chat(chat) => assert_eq!(chat.system_prompt.as_deref(), Some("be brief")),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn generate_flags_follow_llama_cpp() {
        let cli = Cli::try_parse_from([
            "lutra",
            "generate",
            "-m",
            "x.gguf",
            "-p",
            "hi",
            "-n",
            "7",
            "--temp",
            "0",
            "-s",
            "3",
            "-c",
            "256",
            "-t",
            "2",
            "--bits",
            "2",
            "--group-size",
            "64",
        ])
        .unwrap();
        let Command::Generate(g) = cli.command else {
            panic!("not generate")
        };
        assert_eq!(g.prompt, "hi");
        assert_eq!(g.n_predict, 7);
        let cfg = g.sampling.config();
        assert_eq!((cfg.temperature, cfg.seed, cfg.top_k), (0.0, Some(3), 40));
        let opts = g.model.load_options().unwrap();
        assert_eq!((opts.threads, opts.context_length), (2, Some(256)));
        assert!(opts.kv_f16, "the cache is f16 unless asked");
        assert_eq!(opts.kv_f16, LoadOptions::default().kv_f16);
        let rq = opts.requantize.unwrap();
        assert_eq!((rq.bits, rq.group_size), (2, 64));
    }

    #[test]
    fn cache_type_flags_follow_llama_cpp() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["lutra", "generate", "-p", "x"];
            args.extend_from_slice(extra);
            let cli = Cli::try_parse_from(normalize_args(args.into_iter().map(Into::into)))
                .expect("parses");
            let Command::Generate(g) = cli.command else {
                panic!("not generate")
            };
            g.model.load_options().map(|o| o.kv_f16)
        };
        assert!(parse(&["-ctk", "f16", "-ctv", "f16"]).unwrap());
        assert!(parse(&["--cache-type-k", "f16", "--cache-type-v", "f16"]).unwrap());
        assert!(!parse(&["-ctk", "f32", "-ctv", "f32"]).unwrap());
        assert!(parse(&[]).unwrap(), "f16 by default");
        let err = parse(&["-ctk", "f32"]).unwrap_err().to_string();
        assert!(err.contains("-ctk f32 and -ctv f16 differ"), "{err}");
        assert!(
            Cli::try_parse_from(["lutra", "generate", "-p", "x", "--cache-type-k", "q8_0"])
                .is_err()
        );
    }

    #[test]
    fn bad_values_are_rejected_by_the_parser() {
        assert!(Cli::try_parse_from(["lutra", "generate", "-p", "x", "--bits", "9"]).is_err());
        assert!(Cli::try_parse_from(["lutra", "generate", "-p", "x", "-n", "many"]).is_err());
        assert!(
            Cli::try_parse_from(["lutra", "generate", "-p", "x", "--group-size", "32"]).is_err()
        );
    }

    #[test]
    fn serve_flags_follow_llama_server() {
        let cli = Cli::try_parse_from([
            "lutra",
            "serve",
            "-m",
            "x.gguf",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--parallel",
            "2",
            "-c",
            "512",
            "-t",
            "3",
            "--api-key",
            "k",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(
            (s.host.as_str(), s.port, s.parallel, s.queue),
            ("0.0.0.0", 0, 2, 64)
        );
        assert_eq!(s.api_key.as_deref(), Some("k"));
        let opts = s.model.load_options().unwrap();
        assert_eq!((opts.threads, opts.context_length), (3, Some(512)));
        let defaults = Cli::try_parse_from(["lutra", "serve"]).unwrap();
        let Command::Serve(d) = defaults.command else {
            panic!("not serve")
        };
        assert_eq!(
            (d.host.as_str(), d.port, d.parallel, d.api_key),
            ("127.0.0.1", 8080, 4, None)
        );
        for bad in [["--parallel", "0"], ["--queue", "0"], ["--port", "70000"]] {
            let mut args = vec!["lutra", "serve"];
            args.extend(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_model_is_looked_for_in_the_repository() {
        let candidates = default_model_candidates();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL);
        assert!(candidates.contains(&repo));
        assert!(candidates.contains(&PathBuf::from(DEFAULT_MODEL)));
    }
}
