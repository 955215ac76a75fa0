//! NEON f32 GEMV/GEMM: tiles of 4 rows × 2 tokens, two 4-lane accumulators per pair (8 lanes).

use std::arch::aarch64::*;

use super::zero_rows;
use crate::isa::Isa;
use crate::tiling::{for_each_tile, RowRange, TileKernel};

/// NEON version of the scalar kernel.
pub(super) fn matmul_rows(w: &[f32], x: &[f32], cols: usize, out: &mut RowRange<'_>) {
    assert!(
        Isa::Neon.is_supported(),
        "NEON kernel called on a CPU without NEON"
    );
    if cols == 0 {
        return zero_rows(out);
    }
    for_each_tile(&NeonDense(()), w, x, cols, out);
}

/// The NEON tile kernel; only built by `matmul_rows` after the CPU check.
struct NeonDense(());

impl TileKernel for NeonDense {
    type W = f32;
    type X = f32;

    fn tile<const R: usize, const T: usize>(
        &self,
        w: &[f32],
        x: &[f32],
        per_row: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: a `NeonDense` exists only inside `matmul_rows`, after it asserted that the CPU
        // supports NEON.
        unsafe { tile::<R, T>(w, x, per_row) }
    }
}

#[target_feature(enable = "neon")]
fn tile<const R: usize, const T: usize>(w: &[f32], x: &[f32], cols: usize) -> [[f32; T]; R] {
    let w: [&[f32]; R] = std::array::from_fn(|r| &w[r * cols..(r + 1) * cols]);
    let x: [&[f32]; T] = std::array::from_fn(|t| &x[t * cols..(t + 1) * cols]);
    let body = cols / 8 * 8;
    let mut acc = [[[vdupq_n_f32(0.0); 2]; T]; R];
    let mut k = 0;
    while k < body {
        // SAFETY: k + 8 <= body <= cols = length of every row and token slice.
        let xv: [[float32x4_t; 2]; T] = std::array::from_fn(|t| unsafe {
            [
                vld1q_f32(x[t].as_ptr().add(k)),
                vld1q_f32(x[t].as_ptr().add(k + 4)),
            ]
        });
        for r in 0..R {
            // SAFETY: as above.
            let wv = unsafe {
                [
                    vld1q_f32(w[r].as_ptr().add(k)),
                    vld1q_f32(w[r].as_ptr().add(k + 4)),
                ]
            };
            for t in 0..T {
                for h in 0..2 {
                    acc[r][t][h] = vfmaq_f32(acc[r][t][h], wv[h], xv[t][h]);
                }
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
            result[r][t] = crate::int8::neon_hsum(acc[r][t][0], acc[r][t][1]) + tail;
        }
    }
    result
}
