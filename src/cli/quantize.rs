//! `lutra quantize`: GPTQ / HLQ quantization of a model into a file that loads without repacking.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{HumanDuration, ProgressBar, ProgressStyle};
use lutra_runtime::quantize::ggml_types::GgmlTarget;
use lutra_runtime::quantize::gptq::GptqOptions;
use lutra_runtime::quantizer::blocks::{Bits, Method, QuantizeOptions, Rotate, Target};
use lutra_runtime::quantizer::calibration::Calibration;

use super::ensure_exists;
use super::report::human_bytes;

/// Arguments of `lutra quantize`.
#[derive(Debug, Args)]
pub(crate) struct QuantizeArgs {
    /// Source model: a GGUF file of any type lutra reads (dequantized exactly)
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Output GGUF file (lutra tensor types in the kernels' layout)
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Bits per weight: 1, 2, 3 or 4, or an average such as 2.5 (per-matrix widths chosen by
    /// measured sensitivity)
    #[arg(long, default_value = "2")]
    bits: String,
    /// Weights per scale group along a row (32, 64, 128 or 256; must divide every row)
    #[arg(long = "group-size", default_value_t = 32)]
    group_size: usize,
    /// Write a standard GGUF type llama.cpp reads instead of lutra's types: Q4_0, Q5_0, Q8_0,
    /// IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K (codes chosen by --method rtn or gptq)
    #[arg(long = "type")]
    ggml_type: Option<String>,
    /// rtn, gptq, hlq or gptq+hlq (gptq when --type is given and --method is not)
    #[arg(long)]
    method: Option<String>,
    /// Calibration text [default: the built-in text, chapters of The Rust Programming Language]
    #[arg(long = "calib")]
    calib: Option<PathBuf>,
    /// Calibration sequences (llama-imatrix's --chunks)
    #[arg(long = "chunks", default_value_t = 16)]
    chunks: usize,
    /// Tokens per calibration sequence (the context perplexity is commonly measured at)
    #[arg(long = "calib-ctx", default_value_t = 512)]
    calib_ctx: usize,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Quantize columns in their natural order instead of by descending Hessian diagonal
    #[arg(long = "no-act-order")]
    no_act_order: bool,
    /// Rotate block inputs (a random orthogonal rotation per input, applied to the activations at
    /// run time; lutra types only): auto (inputs whose matrices are all under 4 bits), always or
    /// never
    #[arg(long, default_value = "auto")]
    rotate: String,
    /// Worker threads (0 = one per core)
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    threads: usize,
}

/// Runs `lutra quantize`.
pub(crate) fn quantize(args: &QuantizeArgs) -> Result<()> {
    ensure_exists(&args.model)?;
    let calibration = match &args.calib {
        Some(path) => Calibration {
            text: std::fs::read_to_string(path)
                .with_context(|| format!("cannot read calibration text {}", path.display()))?,
            source: path.display().to_string(),
            sequences: args.chunks,
            tokens: args.calib_ctx,
        },
        None => Calibration::builtin(args.chunks, args.calib_ctx),
    };
    let opts = QuantizeOptions {
        method: match (&args.method, &args.ggml_type) {
            (Some(m), _) => m.parse::<Method>()?,
            (None, Some(_)) => Method::Gptq,
            (None, None) => Method::GptqHlq,
        },
        bits: args.bits.parse::<Bits>()?,
        group_size: args.group_size,
        calibration,
        gptq: GptqOptions {
            damp: args.damp,
            act_order: !args.no_act_order,
            ..GptqOptions::default()
        },
        target: match &args.ggml_type {
            Some(t) => Target::Ggml(t.parse::<GgmlTarget>()?),
            None => Target::Lut,
        },
        rotate: args.rotate.parse::<Rotate>()?,
    };
    let form = match opts.target {
        Target::Lut => format!("{} bits, groups of {}", opts.bits, opts.group_size),
        Target::Ggml(t) => format!("ggml type {t:?}"),
    };
    eprintln!(
        "lutra: quantizing {} to {form}, {} (calibration: {})",
        args.model.display(),
        opts.method.name(),
        opts.calibration.describe()
    );
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "block {pos}/{len} [{bar:30}] {elapsed_precise} elapsed, {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let start = std::time::Instant::now();
    let summary = lutra_runtime::quantizer::file::quantize(
        &args.model,
        &args.output,
        &opts,
        args.threads,
        &mut |p| {
            bar.set_length(p.blocks as u64);
            bar.set_position(p.done as u64);
            bar.set_message(match time_left(start.elapsed(), p.done, p.blocks) {
                Some(left) => format!("about {:#} left", HumanDuration(left)),
                None => String::new(),
            });
        },
    )
    .with_context(|| {
        format!(
            "failed to quantize {} into {}",
            args.model.display(),
            args.output.display()
        )
    })?;
    bar.finish_and_clear();
    let bits = match opts.target {
        Target::Lut => format!(", {:.2} bits per weight on average", summary.average_bits),
        Target::Ggml(_) => String::new(),
    };
    eprintln!(
        "lutra: wrote {} ({}): {} matrices{bits}, in {:.1} s",
        args.output.display(),
        human_bytes(summary.file_bytes),
        summary.matrices,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The time the remaining blocks should take at the pace of the blocks done so far; `None` before
/// the first block is done. (indicatif's `{eta}` weighs the most recent steps, which misleads
/// when steps are minutes apart.)
fn time_left(
    elapsed: std::time::Duration,
    done: usize,
    blocks: usize,
) -> Option<std::time::Duration> {
    if done == 0 || done > blocks {
        return None;
    }
    Some(elapsed.mul_f64((blocks - done) as f64 / done as f64))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::time_left;

    #[test]
    fn time_left_is_the_pace_so_far_times_the_blocks_left() {
        let minute = Duration::from_secs(60);
        assert_eq!(time_left(minute, 0, 30), None);
        assert_eq!(time_left(minute * 6, 1, 32), Some(minute * 186));
        assert_eq!(time_left(minute * 10, 5, 30), Some(minute * 50));
        assert_eq!(time_left(minute, 30, 30), Some(Duration::ZERO));
        assert_eq!(time_left(minute, 31, 30), None);
    }
}
