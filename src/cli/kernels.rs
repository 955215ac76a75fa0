//! `lutra bench-kernels`: the matrix kernels alone, one JSON record per line from
//! `lutra_kernels::measure` (shape, bits, threads, N, median µs, effective GB/s).

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use lutra_kernels::measure::{
    self, CaseFilter, KernelCase, MeasureOptions, BANDWIDTH_BYTES, DEFAULT_THREADS, DEFAULT_TOKENS,
};
use lutra_kernels::Isa;

/// Arguments of `lutra bench-kernels`.
#[derive(Debug, Args)]
pub(crate) struct BenchKernelsArgs {
    /// Kernels, comma-separated name prefixes: lut1..lut4, ternary, int8, dot2, dot4, dot6, q2k..q6k (K-quant forms, where K is a multiple of 256), dequant2, dequant4
    /// [default: all]
    #[arg(short = 'k', long = "kernel", value_delimiter = ',')]
    kernels: Vec<String>,
    /// Shapes MxK, comma-separated (e.g. 4096x4096,11008x4096) [default: the 7B and SmolLM2 grid]
    #[arg(long = "shape", value_delimiter = ',')]
    shapes: Vec<String>,
    /// Thread counts, comma-separated [default: 1,2]
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    threads: Vec<usize>,
    /// Token counts N, comma-separated (1 = GEMV) [default: 1,8,64,512]
    #[arg(short = 'n', long = "tokens", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Timed runs per case (the median is reported)
    #[arg(short = 'r', long = "repetitions", default_value_t = 9)]
    repetitions: usize,
    /// Stop repeating a case after this many seconds of timing
    #[arg(long = "max-time", default_value_t = 3.0)]
    max_time: f64,
    /// ISA to run on (scalar, avx2, neon) [default: LUTRA_ISA or the best]
    #[arg(long)]
    isa: Option<String>,
    /// Also measure the memory read bandwidth for each thread count (record `read-bandwidth`)
    #[arg(long)]
    bandwidth: bool,
}

impl BenchKernelsArgs {
    /// The flags as a `measure` filter (same syntax as `CaseFilter::parse`, so errors read alike).
    fn filter(&self) -> Result<CaseFilter> {
        let mut parts = Vec::new();
        let list = |v: &[String]| v.join(",");
        let numbers = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        if !self.kernels.is_empty() {
            parts.push(format!("kernel={}", list(&self.kernels)));
        }
        if !self.shapes.is_empty() {
            parts.push(format!("shape={}", list(&self.shapes)));
        }
        if !self.threads.is_empty() {
            parts.push(format!("threads={}", numbers(&self.threads)));
        }
        if !self.tokens.is_empty() {
            parts.push(format!("tokens={}", numbers(&self.tokens)));
        }
        CaseFilter::parse(&parts.join(";")).map_err(|e| anyhow!("bad selection: {e}"))
    }
}

/// Runs `lutra bench-kernels`, printing each record as soon as it is measured.
pub(crate) fn bench_kernels(args: &BenchKernelsArgs) -> Result<()> {
    let filter = args.filter()?;
    let grid = match filter.shapes.as_deref() {
        // Shapes outside the default grid are measured too: the grid is only a default.
        Some(shapes) => shape_grid(shapes),
        None => measure::default_cases(),
    };
    let cases = filter.apply(&grid);
    if cases.is_empty() {
        anyhow::bail!("no kernel case matches the selection (see lutra bench-kernels --help)");
    }
    if !args.max_time.is_finite() || args.max_time <= 0.0 {
        anyhow::bail!("--max-time must be a positive number of seconds");
    }
    let isa = args
        .isa
        .as_deref()
        .map(Isa::parse)
        .transpose()
        .context("--isa")?;
    let options = MeasureOptions {
        repetitions: args.repetitions.max(1),
        max_time: Duration::from_secs_f64(args.max_time),
        isa,
        ..MeasureOptions::default()
    };
    let stdout = std::io::stdout();
    let mut write_error = None;
    let mut print = |line: String| {
        let mut out = stdout.lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            write_error.get_or_insert(e);
        }
    };
    if args.bandwidth {
        let mut threads: Vec<usize> = cases.iter().map(|c| c.threads).collect();
        threads.sort_unstable();
        threads.dedup();
        for t in threads {
            let record = measure::read_bandwidth(t, BANDWIDTH_BYTES, 3)
                .context("memory bandwidth probe failed")?;
            print(record.to_json());
        }
    }
    eprintln!("lutra bench-kernels: {} cases", cases.len());
    measure::measure_cases(&cases, &options, |record| print(record.to_json()))
        .context("kernel measurement failed")?;
    if let Some(e) = write_error {
        return Err(e).context("cannot write to stdout");
    }
    Ok(())
}

/// Every kernel of [`measure::kinds_for`] × default threads × default N for `shapes` (M, K).
fn shape_grid(shapes: &[(usize, usize)]) -> Vec<KernelCase> {
    let mut cases = Vec::new();
    for &(rows, cols) in shapes {
        let kinds = measure::kinds_for(cols);
        for threads in DEFAULT_THREADS {
            for tokens in DEFAULT_TOKENS {
                cases.extend(kinds.iter().map(|&kind| KernelCase {
                    kind,
                    rows,
                    cols,
                    threads,
                    tokens,
                }));
            }
        }
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;
    use lutra_kernels::measure::KernelKind;

    #[test]
    fn a_shape_outside_the_default_grid_gets_every_kernel() {
        let grid = shape_grid(&[(64, 96)]);
        let per_point = grid.len() / (DEFAULT_THREADS.len() * DEFAULT_TOKENS.len());
        assert_eq!(per_point, 11);
        assert!(grid.iter().all(|c| (c.rows, c.cols) == (64, 96)));
        // 96 is not a multiple of 128: GGUF-style groups of 32.
        assert!(grid.iter().any(|c| c.kind
            == KernelKind::Lut {
                bits: 2,
                group_size: 32
            }));
    }
}
