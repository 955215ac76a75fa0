//! Load time of a model requantized at load against the same matrices stored as a lutra file.
//!
//! ```text
//! cargo run --release --example lutra_file_load -- [MODEL.gguf] [BITS] [GROUP] [OUT]
//! ```
//! The model defaults to `models/cache/SmolLM2-135M-Instruct.Q4_1.gguf` (fetch it with
//! `bash models/fetch.sh`), bits to 2 and the group size to 32. The lutra file is written to
//! `OUT` and kept, or without `OUT` to the system's temporary directory and removed at the end. Both loads read a file already in the
//! page cache (each is timed three times; the best is printed), and the logits of both models for
//! one prompt are compared.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use lutra::llama::{LoadOptions, Model};
use lutra_runtime::fixtures::requantized_lutra_file;
use lutra_runtime::quantize::Requantize;

fn best_load(path: &std::path::Path, opts: &LoadOptions) -> anyhow::Result<(f64, Model)> {
    let mut best = f64::INFINITY;
    let mut model = None;
    for _ in 0..3 {
        let start = Instant::now();
        let m = Model::load(path, opts).with_context(|| format!("loading {}", path.display()))?;
        best = best.min(start.elapsed().as_secs_f64());
        model = Some(m);
    }
    Ok((best, model.context("no load")?))
}

fn first_logits(model: &Model, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
    let mut logits = vec![0.0; model.config().vocab_size];
    model.forward(tokens, &mut model.new_cache(), &mut logits)?;
    Ok(logits)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let src = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let bits = args.next().map_or(Ok(2), |b| b.parse()).context("BITS")?;
    let group_size = args.next().map_or(Ok(32), |g| g.parse()).context("GROUP")?;
    let spec = Requantize { bits, group_size };
    let keep = args.next().map(PathBuf::from);
    let out = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("lutra-load-{}.lutra.gguf", std::process::id()))
    });

    let start = Instant::now();
    let packed = requantized_lutra_file(&src, &out, spec)?;
    let convert = start.elapsed().as_secs_f64();
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6);
    println!(
        "wrote {} ({packed} matrices as LUT{bits} g{group_size}, {:.1} MB; source {:.1} MB) in {convert:.2} s",
        out.display(),
        size(&out)?,
        size(&src)?
    );

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let requantized = LoadOptions {
        threads,
        requantize: Some(spec),
        ..LoadOptions::default()
    };
    let plain = LoadOptions {
        threads,
        ..LoadOptions::default()
    };
    let (t_requant, a) = best_load(&src, &requantized)?;
    let (t_lutra, b) = best_load(&out, &plain)?;
    let mapped = b.describe().tensors.iter().filter(|t| t.mapped).count();
    println!("load, requantized at load: {t_requant:.3} s ({threads} threads)");
    println!("load, lutra file:          {t_lutra:.3} s ({mapped} matrices mapped, no repack)");
    let tokens = a
        .tokenizer()
        .context("no tokenizer")?
        .encode("The capital of France is", false)?;
    let same = first_logits(&a, &tokens)? == first_logits(&b, &tokens)?;
    println!("logits equal bit for bit: {same}");
    if keep.is_none() {
        std::fs::remove_file(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    anyhow::ensure!(same, "the two models differ");
    Ok(())
}
