//! `lutra tokenize`, `lutra perplexity` and `lutra info`: look at a model or measure it on text.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lutra_runtime::gguf::GgufFile;
use lutra_runtime::tokenizer::Tokenizer;

use super::report::human_bytes;
use super::{default_model_path, ensure_exists, write_stdout, ModelArgs};

/// Arguments of `lutra tokenize`.
#[derive(Debug, Args)]
pub(crate) struct TokenizeArgs {
    /// GGUF model file [default: the fetched SmolLM2-135M-Instruct Q4_1]
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Text to tokenize (special tokens are parsed)
    #[arg(short = 'p', long = "prompt")]
    prompt: String,
}

/// Arguments of `lutra perplexity`.
#[derive(Debug, Args)]
pub(crate) struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to evaluate
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
}

/// Arguments of `lutra info`.
#[derive(Debug, Args)]
pub(crate) struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Also list every tensor: its name, type in the file, form in memory and bytes, and under a
    /// lutra tensor how it was quantized (method, bits, group size, calibration)
    #[arg(long)]
    tensors: bool,
}

/// Runs `lutra tokenize`: only the tokenizer is read, no weights are repacked.
pub(crate) fn tokenize(args: &TokenizeArgs) -> Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => default_model_path()?,
    };
    ensure_exists(&path)?;
    let file = GgufFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(&file)
        .with_context(|| format!("cannot read the tokenizer of {}", path.display()))?;
    let ids = tokenizer
        .encode(&args.prompt, true)
        .context("tokenization failed")?;
    write_stdout(&format!("{}\n", serde_json::to_string(&ids)?))
}

/// Runs `lutra perplexity`: prints `PPL = x.xxxx +/- y.yyyy` like llama-perplexity.
pub(crate) fn perplexity(args: &PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let model = args.model.load()?;
    let tokenizer = model
        .tokenizer()
        .context("the model has no tokenizer, so a text file cannot be evaluated")?;
    let tokens = tokenizer
        .encode(&text, false)
        .context("tokenization failed")?;
    let n_ctx = args.model.ctx_size;
    eprintln!("lutra: {} tokens, context {n_ctx}", tokens.len());
    let start = std::time::Instant::now();
    let result = lutra_runtime::perplexity::perplexity(&model, &tokens, n_ctx)
        .context("perplexity failed")?;
    eprintln!(
        "lutra: {} chunks in {:.2} s",
        result.chunks,
        start.elapsed().as_secs_f64()
    );
    write_stdout(&format!(
        "PPL = {:.4} +/- {:.4}\n",
        result.ppl, result.stderr
    ))
}

/// Runs `lutra info`.
pub(crate) fn info(args: &InfoArgs) -> Result<()> {
    let start = std::time::Instant::now();
    let model = args.model.load()?;
    let load_time = start.elapsed().as_secs_f64();
    let info = model.describe();
    let mut text = format!("{info}\n");
    let mapped = info.tensors.iter().filter(|t| t.mapped).count();
    let others = info
        .tensors
        .iter()
        .filter(|t| !t.mapped && t.kernel != "f32")
        .count();
    text += &match mapped {
        0 => format!("load time:       {load_time:.3} s\n"),
        n => format!(
            "load time:       {load_time:.3} s: {n} lutra matrices read in place from the file \
             (mmap, no repack), {others} other {} decoded from {} ggml type\n",
            if others == 1 { "matrix" } else { "matrices" },
            if others == 1 { "its" } else { "their" },
        ),
    };
    if let Some(rss) = lutra_tooling::bench::current_rss_bytes() {
        let peak = lutra_tooling::bench::peak_rss_bytes().unwrap_or(rss);
        text += &format!(
            "resident memory: {} now, {} peak (whole process, after loading)\n",
            human_bytes(rss),
            human_bytes(peak)
        );
    }
    if args.tensors {
        let width = info.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in &info.tensors {
            text += &format!(
                "{:<width$}  {:<12} → {:<18} {:>12} bytes\n",
                t.name, t.source, t.kernel, t.bytes
            );
            if let Some(q) = &t.quantization {
                text += &format!(
                    "{:<width$}    method {}, {} bits, group size {}{}, calibration: {}\n",
                    "",
                    q.method,
                    q.bits,
                    q.group_size,
                    if q.rotated { ", rotated input" } else { "" },
                    q.calibration
                );
            }
        }
    }
    write_stdout(&text)
}
