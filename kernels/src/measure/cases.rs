//! The default grid of kernel cases and the filter that picks a subset of it.

use super::{KernelCase, KernelKind};
use crate::error::{KernelError, Result};
use crate::packed::SUPER_BLOCK;

/// Shapes (M×K) of the default grid: Llama-2/3-7B projections and SmolLM2-135M's.
pub const DEFAULT_SHAPES: [(usize, usize); 7] = [
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (4096, 14336),
    (576, 576),
    (1536, 576),
    (49152, 576),
];

/// Thread counts of the default grid.
pub const DEFAULT_THREADS: [usize; 2] = [1, 2];

/// Token counts (N) of the default grid: decode and three prefill sizes.
pub const DEFAULT_TOKENS: [usize; 4] = [1, 8, 64, 512];

/// LUT group size used for a given K: 128 (GPTQ-style) where it divides K, else 32 (GGUF-style).
fn lut_group(cols: usize) -> usize {
    if cols.is_multiple_of(128) {
        128
    } else {
        32
    }
}

/// The kernels measured on a matrix of K = `cols` (LUT 1–4 bits, ternary as 2-bit planes, int8,
/// the dot GEMM at 2, 4 and 6 bits, the baseline at 2 and 4 bits, and where K is whole
/// super-blocks the K-quant forms Q2_K to Q6_K).
pub fn kinds_for(cols: usize) -> Vec<KernelKind> {
    let group_size = lut_group(cols);
    let mut kinds: Vec<KernelKind> = (1..=4)
        .map(|bits| KernelKind::Lut { bits, group_size })
        .collect();
    kinds.push(KernelKind::Ternary { group_size });
    kinds.push(KernelKind::Int8);
    kinds.extend([2, 4, 6].map(|bits| KernelKind::Dot { bits, group_size }));
    kinds.extend([2, 4].map(|bits| KernelKind::Dequant { bits }));
    if cols.is_multiple_of(SUPER_BLOCK) {
        kinds.extend((2..=6).map(|bits| KernelKind::KQuant { bits }));
    }
    kinds
}

/// Every shape × kernel ([`kinds_for`], and ternary at 1.67 bits) × threads × N.
pub fn default_cases() -> Vec<KernelCase> {
    let mut cases = Vec::new();
    for (rows, cols) in DEFAULT_SHAPES {
        let mut kinds = kinds_for(cols);
        kinds.push(KernelKind::Ternary167);
        for threads in DEFAULT_THREADS {
            for tokens in DEFAULT_TOKENS {
                for kind in &kinds {
                    cases.push(KernelCase {
                        kind: *kind,
                        rows,
                        cols,
                        threads,
                        tokens,
                    });
                }
            }
        }
    }
    cases
}

/// Selects cases; every field left `None` matches everything.
///
/// Parsed from text such as `kernel=lut2,int8;shape=4096x4096;threads=1;tokens=1,8`
/// (kernel names match by prefix, so `lut` selects `lut1`..`lut4`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaseFilter {
    /// Kernel name prefixes ([`KernelKind::name`]).
    pub kernels: Option<Vec<String>>,
    /// Shapes as (M, K).
    pub shapes: Option<Vec<(usize, usize)>>,
    /// Thread counts.
    pub threads: Option<Vec<usize>>,
    /// Token counts.
    pub tokens: Option<Vec<usize>>,
}

impl CaseFilter {
    /// Parses `key=v1,v2;key=...` with keys `kernel`, `shape` (`MxK`), `threads`, `tokens`;
    /// [`KernelError::BadCaseFilter`] says which part is wrong.
    pub fn parse(text: &str) -> Result<CaseFilter> {
        CaseFilter::parse_text(text).map_err(KernelError::BadCaseFilter)
    }

    fn parse_text(text: &str) -> std::result::Result<CaseFilter, String> {
        let mut filter = CaseFilter::default();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, values) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' is not key=value"))?;
            let values: Vec<&str> = values
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect();
            match key.trim() {
                "kernel" | "kernels" => {
                    filter.kernels = Some(values.iter().map(|v| v.to_ascii_lowercase()).collect())
                }
                "shape" | "shapes" => {
                    filter.shapes = Some(
                        values
                            .iter()
                            .map(|v| parse_shape(v))
                            .collect::<std::result::Result<_, _>>()?,
                    )
                }
                "threads" => filter.threads = Some(parse_numbers(&values)?),
                "tokens" | "n" => filter.tokens = Some(parse_numbers(&values)?),
                other => {
                    return Err(format!(
                        "unknown filter key '{other}' (use kernel, shape, threads, tokens)"
                    ))
                }
            }
        }
        Ok(filter)
    }

    /// Whether `case` passes the filter.
    pub fn matches(&self, case: &KernelCase) -> bool {
        let name = case.kind.name();
        self.kernels
            .as_ref()
            .is_none_or(|k| k.iter().any(|p| name.starts_with(p.as_str())))
            && self
                .shapes
                .as_ref()
                .is_none_or(|s| s.contains(&(case.rows, case.cols)))
            && self
                .threads
                .as_ref()
                .is_none_or(|t| t.contains(&case.threads))
            && self
                .tokens
                .as_ref()
                .is_none_or(|t| t.contains(&case.tokens))
    }

    /// The cases of `cases` that pass.
    pub fn apply(&self, cases: &[KernelCase]) -> Vec<KernelCase> {
        cases.iter().filter(|c| self.matches(c)).copied().collect()
    }
}

fn parse_shape(text: &str) -> std::result::Result<(usize, usize), String> {
    let (m, k) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("shape '{text}' is not MxK"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| format!("shape '{text}' is not MxK"))
    };
    Ok((number(m)?, number(k)?))
}

fn parse_numbers(values: &[&str]) -> std::result::Result<Vec<usize>, String> {
    values
        .iter()
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| format!("'{v}' is not a number"))
        })
        .collect()
}
