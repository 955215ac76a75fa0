//! Output of `lutra bench`: one row per (model, threads, test) as a Markdown table (with a header
//! describing the machine), a JSON array or CSV.

use std::fmt::Write as _;

use serde::Serialize;

/// One result row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchRow {
    /// Model path or `synthetic:NAME`.
    pub model: String,
    /// Bits per weight of the LUT matrices (`None` when the file's own types are kept).
    pub bits: Option<u8>,
    /// Group size of the LUT matrices, when requantized or synthetic.
    pub group_size: Option<usize>,
    /// Bytes of weights the model holds.
    pub size_bytes: u64,
    /// Kernel ISA.
    pub isa: String,
    /// Worker threads.
    pub threads: usize,
    /// `ppN` or `tgN`.
    pub test: String,
    /// Tokens in the test.
    pub tokens: usize,
    /// Mean tokens per second over the repetitions.
    pub tokens_per_sec: f64,
    /// Sample standard deviation of the tokens per second.
    pub tokens_per_sec_std: f64,
    /// Per-repetition tokens per second.
    pub samples: Vec<f64>,
    /// Weight bytes × tokens/s, in GB/s (generation rows only: prompt processing reuses weights).
    pub effective_gb_per_sec: Option<f64>,
    /// The machine's measured read bandwidth with the same thread count, in GB/s.
    pub machine_gb_per_sec: Option<f64>,
    /// Process-wide peak resident memory (VmHWM) after the test, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// CPU model name.
    pub cpu: String,
    /// How batches of tokens were multiplied ([`lutra_runtime::Model::prefill_kernel`]).
    pub prefill: String,
    /// Weights are random values of the real shapes.
    pub synthetic: bool,
}

/// Output format of `lutra bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Markdown table with a header.
    Md,
    /// A JSON array of row objects.
    Json,
    /// Comma-separated values with a header line.
    Csv,
}

/// The note printed for synthetic models.
pub const SYNTHETIC_NOTE: &str =
    "synthetic weights: random values of the real shapes; speed does not depend on the values";

/// Renders `rows` in `format`.
pub fn render(rows: &[BenchRow], format: Format) -> String {
    match format {
        Format::Md => markdown(rows),
        // Serializing plain numbers and strings cannot fail.
        Format::Json => serde_json::to_string_pretty(rows).unwrap_or_default() + "\n",
        Format::Csv => csv(rows),
    }
}

fn markdown(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let cpu = rows.first().map_or("unknown", |r| r.cpu.as_str());
    let isa = rows.first().map_or("unknown", |r| r.isa.as_str());
    let _ = writeln!(out, "CPU: {cpu}");
    let _ = writeln!(out, "ISA: {isa}");
    if let Some(r) = rows.first() {
        let _ = writeln!(out, "prefill GEMM: {}", r.prefill);
    }
    if rows.iter().any(|r| r.synthetic) {
        let _ = writeln!(out, "{SYNTHETIC_NOTE}");
    }
    let _ = writeln!(
        out,
        "peak RSS is process-wide (VmHWM), reset before each model where the kernel allows it"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| model | bits | size | threads | test | t/s | GB/s (eff / machine) | peak RSS |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        let bits = match (r.bits, r.group_size) {
            (Some(b), Some(g)) => format!("{b} (g{g})"),
            (Some(b), None) => b.to_string(),
            _ => "file".to_string(),
        };
        let bandwidth = match (r.effective_gb_per_sec, r.machine_gb_per_sec) {
            (Some(e), Some(m)) => format!("{e:.2} / {m:.2}"),
            (Some(e), None) => format!("{e:.2}"),
            _ => String::new(),
        };
        let rss = r.peak_rss_bytes.map(human_bytes).unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} | {} |",
            r.model,
            bits,
            human_bytes(r.size_bytes),
            r.threads,
            r.test,
            r.tokens_per_sec,
            r.tokens_per_sec_std,
            bandwidth,
            rss
        );
    }
    out
}

fn csv(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "model,bits,group_size,size_bytes,isa,threads,test,tokens,tokens_per_sec,tokens_per_sec_std,\
         effective_gb_per_sec,machine_gb_per_sec,peak_rss_bytes,cpu,synthetic\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{:.4},{:.4},{},{},{},{},{}",
            csv_field(&r.model),
            opt(r.bits.map(|b| b.to_string())),
            opt(r.group_size.map(|g| g.to_string())),
            r.size_bytes,
            csv_field(&r.isa),
            r.threads,
            r.test,
            r.tokens,
            r.tokens_per_sec,
            r.tokens_per_sec_std,
            opt(r.effective_gb_per_sec.map(|v| format!("{v:.4}"))),
            opt(r.machine_gb_per_sec.map(|v| format!("{v:.4}"))),
            opt(r.peak_rss_bytes.map(|v| v.to_string())),
            csv_field(&r.cpu),
            r.synthetic
        );
    }
    out
}

/// Quotes a CSV field when it holds a separator, quote or newline.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// Bytes in binary units, like llama-bench's size column (`3.56 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(test: &str, tps: f64, synthetic: bool) -> BenchRow {
        BenchRow {
            model: "synthetic:smollm2-135m".into(),
            bits: Some(4),
            group_size: Some(64),
            size_bytes: 80 << 20,
            isa: "avx2".into(),
            threads: 2,
            test: test.into(),
            tokens: 16,
            tokens_per_sec: tps,
            tokens_per_sec_std: 1.5,
            samples: vec![tps - 1.0, tps + 1.0],
            effective_gb_per_sec: test.starts_with("tg").then_some(6.7),
            machine_gb_per_sec: Some(28.0),
            peak_rss_bytes: Some(300 << 20),
            cpu: "AMD EPYC, 2 cores".into(),
            prefill: "table lookups".into(),
            synthetic,
        }
    }

    #[test]
    fn markdown_has_header_and_one_line_per_row() {
        let rows = [row("pp16", 250.0, true), row("tg4", 80.0, true)];
        let md = render(&rows, Format::Md);
        assert!(md.contains("CPU: AMD EPYC, 2 cores"));
        assert!(md.contains("ISA: avx2"));
        assert!(md.contains("prefill GEMM: table lookups"));
        assert!(md.contains(SYNTHETIC_NOTE));
        let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(table.len(), 4, "header, separator and two rows");
        assert!(table[2].contains("pp16") && table[2].contains("250.00 ± 1.50"));
        assert!(table[3].contains("6.70 / 28.00"));
        assert!(table[3].contains("80.00 MiB") && table[3].contains("300.00 MiB"));
        assert!(!render(&[row("tg4", 1.0, false)], Format::Md).contains(SYNTHETIC_NOTE));
    }

    #[test]
    fn json_round_trips() {
        let rows = [row("pp16", 250.0, true), row("tg4", 80.0, true)];
        let parsed: serde_json::Value = serde_json::from_str(&render(&rows, Format::Json)).unwrap();
        let array = parsed.as_array().unwrap();
        assert_eq!(array.len(), 2);
        assert_eq!(array[1]["test"], "tg4");
        assert_eq!(array[1]["tokens_per_sec"], 80.0);
        assert!(array[0]["effective_gb_per_sec"].is_null());
    }

    #[test]
    fn csv_quotes_fields_with_commas() {
        let out = render(&[row("tg4", 80.0, false)], Format::Csv);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        let header_fields = lines[0].split(',').count();
        assert!(lines[1].contains("\"AMD EPYC, 2 cores\""));
        // Same number of fields once the quoted comma is discounted.
        assert_eq!(lines[1].split(',').count(), header_fields + 1);
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
        assert_eq!(human_bytes(1536), "1.50 KiB");
    }
}
