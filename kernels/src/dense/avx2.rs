//! AVX2/FMA f32 GEMV/GEMM: tiles of 4 rows × 2 tokens, eight lanes per accumulator.

use std::arch::x86_64::*;

use super::zero_rows;
use crate::isa::Isa;
use crate::tiling::{for_each_tile, RowRange, TileKernel};

/// AVX2 version of the scalar kernel.
pub(super) fn matmul_rows(w: &[f32], x: &[f32], cols: usize, out: &mut RowRange<'_>) {
    assert!(
        Isa::Avx2.is_supported(),
        "AVX2 kernel called on a CPU without AVX2"
    );
    if cols == 0 {
        return zero_rows(out);
    }
    for_each_tile(&Avx2Dense(()), w, x, cols, out);
}

/// The AVX2 tile kernel; only built by `matmul_rows` after the CPU check.
struct Avx2Dense(());

impl TileKernel for Avx2Dense {
    type W = f32;
    type X = f32;

    fn tile<const R: usize, const T: usize>(
        &self,
        w: &[f32],
        x: &[f32],
        per_row: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: an `Avx2Dense` exists only inside `matmul_rows`, after it asserted that the CPU
        // supports AVX2, FMA and F16C.
        unsafe { tile::<R, T>(w, x, per_row) }
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
