//! AVX2/FMA f32 GEMV/GEMM: tiles of 4 rows × 2 tokens, eight lanes per accumulator.

use std::arch::x86_64::*;

use super::{zero_rows, RowRange, ROW_TILE};
use crate::isa::Isa;

/// Tokens computed together: each loaded weight vector serves this many tokens.
const TOKEN_TILE: usize = 2;

/// AVX2 version of `matmul_rows_scalar`.
pub(super) fn matmul_rows(w: &[f32], x: &[f32], cols: usize, out: &mut RowRange<'_>) {
    assert!(
        Isa::Avx2.is_supported(),
        "AVX2 kernel called on a CPU without AVX2"
    );
    if cols == 0 {
        return zero_rows(out);
    }
    // SAFETY: the CPU supports AVX2, FMA and F16C (asserted above).
    unsafe { matmul_rows_avx2(w, x, cols, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn matmul_rows_avx2(w: &[f32], x: &[f32], cols: usize, out: &mut RowRange<'_>) {
    let rows = w.len() / cols;
    let tokens = x.len() / cols;
    let mut r = 0;
    while r < rows {
        let rt = if rows - r >= ROW_TILE { ROW_TILE } else { 1 };
        let wt = &w[r * cols..(r + rt) * cols];
        let mut n = 0;
        while n < tokens {
            let nt = if tokens - n >= TOKEN_TILE {
                TOKEN_TILE
            } else {
                1
            };
            let xt = &x[n * cols..(n + nt) * cols];
            let row = out.start() + r;
            match (rt, nt) {
                (ROW_TILE, TOKEN_TILE) => {
                    store(out, row, n, tile::<ROW_TILE, TOKEN_TILE>(wt, xt, cols))
                }
                (ROW_TILE, _) => store(out, row, n, tile::<ROW_TILE, 1>(wt, xt, cols)),
                (_, TOKEN_TILE) => store(out, row, n, tile::<1, TOKEN_TILE>(wt, xt, cols)),
                _ => store(out, row, n, tile::<1, 1>(wt, xt, cols)),
            }
            n += nt;
        }
        r += rt;
    }
}

fn store<const R: usize, const T: usize>(
    out: &mut RowRange<'_>,
    row: usize,
    token: usize,
    v: [[f32; T]; R],
) {
    for (i, per_token) in v.iter().enumerate() {
        for (t, &value) in per_token.iter().enumerate() {
            out.set(token + t, row + i, value);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const R: usize, const T: usize>(w: &[f32], x: &[f32], cols: usize) -> [[f32; T]; R] {
    let w: [&[f32]; R] = std::array::from_fn(|r| &w[r * cols..(r + 1) * cols]);
    let x: [&[f32]; T] = std::array::from_fn(|t| &x[t * cols..(t + 1) * cols]);
    let body = cols / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut k = 0;
    while k < body {
        // SAFETY: k + 8 <= body <= cols = length of every row and token slice.
        let xv: [__m256; T] =
            std::array::from_fn(|t| unsafe { _mm256_loadu_ps(x[t].as_ptr().add(k)) });
        for r in 0..R {
            // SAFETY: as above.
            let wv = unsafe { _mm256_loadu_ps(w[r].as_ptr().add(k)) };
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
        k += 8;
    }
    let mut result = [[0.0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let tail: f32 = w[r][body..]
                .iter()
                .zip(&x[t][body..])
                .map(|(a, b)| a * b)
                .sum();
            result[r][t] = crate::int8::avx2_hsum(acc[r][t]) + tail;
        }
    }
    result
}
