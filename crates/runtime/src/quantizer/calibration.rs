//! Calibration data: token sequences cut from a text, and the second-moment (Hessian) matrices
//! `H = Σ x·xᵀ` of the rows each matrix reads while the model runs over them.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef};

use crate::error::{Error, Result};
use crate::quantize::gptq::par;
use crate::tokenizer::Tokenizer;

/// The calibration text that ships with lutra: chapters of *The Rust Programming Language*
/// (MIT OR Apache-2.0), prose and code never used for evaluation.
pub const DEFAULT_TEXT: &str = include_str!("calibration.txt");

/// Where the calibration sequences come from and how many there are.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// The text the sequences are cut from.
    pub text: String,
    /// A name for the text (a file name, or "built-in"), recorded in quantized files.
    pub source: String,
    /// Sequences (llama.cpp's `--chunks`).
    pub sequences: usize,
    /// Tokens per sequence.
    pub tokens: usize,
}

impl Calibration {
    /// The built-in text, cut into `sequences` sequences of `tokens` tokens.
    pub fn builtin(sequences: usize, tokens: usize) -> Calibration {
        Calibration {
            text: DEFAULT_TEXT.to_string(),
            source: "built-in (The Rust Programming Language, excerpts)".into(),
            sequences,
            tokens,
        }
    }

    /// A one-line description: `32 x 256 tokens of <source>`.
    pub fn describe(&self) -> String {
        format!(
            "{} x {} tokens of {}",
            self.sequences, self.tokens, self.source
        )
    }

    /// The token sequences: `sequences` runs of `tokens` tokens, spread evenly over the text,
    /// each starting with BOS when the tokenizer starts every text with it (as perplexity's
    /// chunks do).
    pub fn token_sequences(&self, tokenizer: &Tokenizer) -> Result<Vec<Vec<u32>>> {
        if self.sequences == 0 || self.tokens < 2 {
            return Err(Error::InvalidOption(format!(
                "calibration needs at least one sequence of at least 2 tokens, not {} of {}",
                self.sequences, self.tokens
            )));
        }
        let bos = crate::perplexity::chunk_bos(tokenizer)?;
        let mut ids = tokenizer.encode(&self.text, false)?;
        if bos.is_some() && ids.first() == bos.as_ref() {
            ids.remove(0);
        }
        let body = self.tokens - usize::from(bos.is_some());
        let needed = self.sequences.saturating_mul(body);
        if ids.len() < needed {
            return Err(Error::InvalidOption(format!(
                "calibration text {} has {} tokens; {} sequences of {} need {needed}",
                self.source,
                ids.len(),
                self.sequences,
                self.tokens
            )));
        }
        let stride = match self.sequences {
            1 => 0,
            n => (ids.len() - body) / (n - 1),
        };
        Ok((0..self.sequences)
            .map(|s| {
                let start = (s * stride).min(ids.len() - body);
                bos.into_iter()
                    .chain(ids[start..start + body].iter().copied())
                    .collect()
            })
            .collect())
    }
}

/// `Σ x·xᵀ` over the rows `x` of a matrix input, `[k][k]` in f64, with the rows that arrive
/// buffered so that each product is one large matrix multiplication. Built with
/// [`Hessian::add_pairs`] instead of [`Hessian::add`], it is the cross product `Σ a·bᵀ` of
/// paired rows.
pub(crate) struct Hessian {
    k: usize,
    sum: Vec<f64>,
    /// `bᵀa` of the rows pending (`[k][k]`; only the lower triangle for a symmetric sum), reused
    /// by every fold.
    gram: Mat<f32>,
    pending: Vec<f32>,
    /// The right-hand rows `b` of pairs (empty for `Σ x·xᵀ`).
    pending_right: Vec<f32>,
    /// Built from pairs of rows: not symmetric.
    pairs: bool,
    rows: usize,
    threads: usize,
}

/// Rows buffered before they are folded into the sum.
const FOLD_ROWS: usize = 512;

impl Hessian {
    pub(crate) fn new(k: usize, threads: usize) -> Hessian {
        Hessian {
            k,
            sum: vec![0.0; k * k],
            gram: Mat::zeros(k, k),
            pending: Vec::new(),
            pending_right: Vec::new(),
            pairs: false,
            rows: 0,
            threads: threads.max(1),
        }
    }

    /// Adds rows `[n][k]`.
    pub(crate) fn add(&mut self, rows: &[f32]) {
        debug_assert!(rows.len().is_multiple_of(self.k) && !self.pairs);
        self.pending.extend_from_slice(rows);
        if self.pending.len() >= FOLD_ROWS * self.k {
            self.fold();
        }
    }

    /// Adds the pairs of rows `left[i]`, `right[i]` (`[n][k]` each) to `Σ a·bᵀ`.
    pub(crate) fn add_pairs(&mut self, left: &[f32], right: &[f32]) {
        debug_assert!(left.len().is_multiple_of(self.k) && left.len() == right.len());
        debug_assert!(self.pending.len() == self.pending_right.len());
        debug_assert!(self.pairs || self.rows + self.pending.len() == 0);
        self.pairs = true;
        self.pending.extend_from_slice(left);
        self.pending_right.extend_from_slice(right);
        if self.pending.len() >= FOLD_ROWS * self.k {
            self.fold();
        }
    }

    fn fold(&mut self) {
        let (k, n) = (self.k, self.pending.len() / self.k);
        if n == 0 {
            return;
        }
        let a = MatRef::from_row_major_slice(&self.pending, n, k);
        let symmetric = !self.pairs;
        let b = if symmetric {
            a
        } else {
            MatRef::from_row_major_slice(&self.pending_right, n, k)
        };
        // `gram = bᵀ·a`, column-major: its column i is row i of `Σ a·bᵀ`, contiguous like the
        // row of `sum` it is added to. A symmetric sum needs only the lower triangle of `gram`
        // (row i from column i on), half the products; `finish` mirrors it.
        let structure = if symmetric {
            BlockStructure::TriangularLower
        } else {
            BlockStructure::Rectangular
        };
        triangular::matmul(
            self.gram.as_mut(),
            structure,
            Accum::Replace,
            b.transpose(),
            BlockStructure::Rectangular,
            a,
            BlockStructure::Rectangular,
            1.0,
            par(self.threads),
        );
        let gram = self.gram.as_ref();
        // Rows `first..` of the sum, `rows` (whole rows), take their part of the gram.
        let add = move |first: usize, rows: &mut [f64]| {
            for (r, row) in rows.chunks_exact_mut(k).enumerate() {
                let i = first + r;
                let from = if symmetric { i } else { 0 };
                let col = gram.col(i).subrows(from, k - from);
                let col = col
                    .try_as_col_major()
                    .expect("faer matrices are column-major");
                for (s, &g) in row[from..].iter_mut().zip(col.as_slice()) {
                    *s += f64::from(g);
                }
            }
        };
        let bounds = fold_bounds(k, self.threads, symmetric);
        if bounds.len() <= 2 {
            add(0, &mut self.sum);
        } else {
            std::thread::scope(|scope| {
                let mut rest = &mut self.sum[..];
                for w in bounds.windows(2) {
                    let (rows, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - w[0]) * k);
                    rest = tail;
                    scope.spawn(move || add(w[0], rows));
                }
            });
        }
        self.rows += n;
        self.pending.clear();
        self.pending_right.clear();
    }

    /// The sum over every row added, `[k][k]` row-major, and the number of rows (a symmetric
    /// sum's lower triangle mirrored from its upper one).
    pub(crate) fn finish(mut self) -> (Vec<f64>, usize) {
        self.fold();
        if !self.pairs {
            let k = self.k;
            for i in 0..k {
                for j in i + 1..k {
                    self.sum[j * k + i] = self.sum[i * k + j];
                }
            }
        }
        (self.sum, self.rows)
    }
}

/// Row boundaries `0 = b₀ < … < bₙ = k` splitting a fold's additions over at most `threads`
/// threads in equal parts: rows of equal length, or for a symmetric sum the upper triangle's rows
/// (row i adds `k − i` values), cut where the triangle's area splits evenly.
fn fold_bounds(k: usize, threads: usize, symmetric: bool) -> Vec<usize> {
    let parts = threads.clamp(1, k.max(1));
    let mut bounds: Vec<usize> = (0..=parts)
        .map(|t| {
            let share = t as f64 / parts as f64;
            let row = if symmetric {
                // Rows 0..b hold k²·(1 − (1 − b/k)²)/2 of the triangle's values.
                k as f64 * (1.0 - (1.0 - share).sqrt())
            } else {
                k as f64 * share
            };
            (row.round() as usize).min(k)
        })
        .collect();
    bounds.dedup();
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Σ a[i]·b[j]` in f64 over the paired rows of `a` and `b` (`[n][k]` each).
    fn product_sum(a: &[f32], b: &[f32], k: usize, i: usize, j: usize) -> f64 {
        a.chunks_exact(k)
            .zip(b.chunks_exact(k))
            .map(|(a, b)| f64::from(a[i]) * f64::from(b[j]))
            .sum()
    }

    #[test]
    fn paired_rows_give_the_sum_of_cross_products() {
        let k = 4;
        let a: Vec<f32> = (0..600 * k).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let b: Vec<f32> = (0..600 * k).map(|i| ((i * 13) % 11) as f32 - 5.0).collect();
        let mut h = Hessian::new(k, 3);
        for (a, b) in a.chunks(53 * k).zip(b.chunks(53 * k)) {
            h.add_pairs(a, b);
        }
        let (sum, n) = h.finish();
        assert_eq!(n, 600);
        for i in 0..k {
            for j in 0..k {
                let want = product_sum(&a, &b, k, i, j);
                assert_eq!(sum[i * k + j], want, "({i}, {j})");
            }
        }
        assert_ne!(sum[1], sum[k], "the cross product is not symmetric here");
    }

    #[test]
    fn fold_bounds_cover_every_row_in_order() {
        let cases = [(11008, 2, true), (37, 3, true), (2, 3, false), (1, 4, true)];
        for (k, threads, symmetric) in cases {
            let b = fold_bounds(k, threads, symmetric);
            assert_eq!((b[0], *b.last().unwrap()), (0, k), "{k} on {threads}");
            assert!(b.windows(2).all(|w| w[0] < w[1]) && b.len() <= threads + 1);
        }
        // Two threads on a triangle of 11008 rows: the first takes the longer rows, fewer of them.
        let b = fold_bounds(11008, 2, true);
        let area = |r: std::ops::Range<usize>| r.map(|i| 11008 - i).sum::<usize>() as f64;
        let (first, second) = (area(0..b[1]), area(b[1]..11008));
        assert!((first / second - 1.0).abs() < 0.01, "{first} vs {second}");
    }

    #[test]
    fn hessian_is_the_sum_of_outer_products() {
        // Threads that share the rows unevenly (37 rows on 3 threads), more threads than rows,
        // and one thread.
        for (k, threads) in [(5, 2), (37, 3), (2, 3), (6, 1)] {
            let rows: Vec<f32> = (0..700 * k)
                .map(|i| ((i * 7919) % 23) as f32 - 11.0)
                .collect();
            let mut h = Hessian::new(k, threads);
            for chunk in rows.chunks(37 * k) {
                h.add(chunk);
            }
            let (sum, n) = h.finish();
            assert_eq!(n, 700);
            for i in 0..k {
                for j in 0..k {
                    let want = product_sum(&rows, &rows, k, i, j);
                    let got = sum[i * k + j];
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{k}: ({i}, {j})"
                    );
                }
            }
        }
    }
}
