//! NEON int8 kernel: `vmull_s8` products, pairwise-widened to the eight int32 lane sums of a block
//! (the same grouping as AVX2's `maddubs`+`madd` and as `vdotq_s32`).

use std::arch::aarch64::*;

use super::{ActBlock, WeightBlock, ROW_TILE};
use crate::dense::RowRange;
use crate::isa::Isa;

/// Tokens computed together in prefill.
const TOKEN_TILE: usize = 2;

/// NEON version of `scalar::matmul_rows`.
pub(super) fn matmul_rows(
    w: &[WeightBlock],
    x: &[ActBlock],
    per_row: usize,
    out: &mut RowRange<'_>,
) {
    assert!(
        Isa::Neon.is_supported(),
        "NEON kernel called on a CPU without NEON"
    );
    // SAFETY: the CPU supports NEON (asserted above).
    unsafe { matmul_rows_neon(w, x, per_row, out) }
}

#[target_feature(enable = "neon")]
fn matmul_rows_neon(w: &[WeightBlock], x: &[ActBlock], per_row: usize, out: &mut RowRange<'_>) {
    let rows = w.len() / per_row;
    let tokens = x.len() / per_row;
    let mut r = 0;
    while r < rows {
        let rt = if rows - r >= ROW_TILE { ROW_TILE } else { 1 };
        let wt = &w[r * per_row..(r + rt) * per_row];
        let mut n = 0;
        while n < tokens {
            let nt = if tokens - n >= TOKEN_TILE {
                TOKEN_TILE
            } else {
                1
            };
            let xt = &x[n * per_row..(n + nt) * per_row];
            let row = out.start() + r;
            match (rt, nt) {
                (ROW_TILE, TOKEN_TILE) => {
                    store(out, row, n, tile::<ROW_TILE, TOKEN_TILE>(wt, xt, per_row))
                }
                (ROW_TILE, _) => store(out, row, n, tile::<ROW_TILE, 1>(wt, xt, per_row)),
                (_, TOKEN_TILE) => store(out, row, n, tile::<1, TOKEN_TILE>(wt, xt, per_row)),
                _ => store(out, row, n, tile::<1, 1>(wt, xt, per_row)),
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

/// Eight int32 lane sums of `a·b` over 16 bytes: lanes j = Σ bytes 4j..4j+4 of each half.
#[target_feature(enable = "neon")]
fn lanes16(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
}

/// `R` consecutive rows (`w` = `[per_row][R]`, interleaved) times `T` consecutive tokens (`x` = `[T][per_row]`).
#[target_feature(enable = "neon")]
fn tile<const R: usize, const T: usize>(
    w: &[WeightBlock],
    x: &[ActBlock],
    per_row: usize,
) -> [[f32; T]; R] {
    // Interleaved tile: block b of row r is w[b * R + r].
    let w = &w[..R * per_row];
    let x: [&[ActBlock]; T] = std::array::from_fn(|t| &x[t * per_row..(t + 1) * per_row]);
    let mut acc = [[[vdupq_n_f32(0.0); 2]; T]; R];
    for b in 0..per_row {
        let mut xq = [[vdupq_n_s8(0); 2]; T];
        let mut xd = [0.0f32; T];
        for t in 0..T {
            let block = &x[t][b];
            // SAFETY: `q` is 32 readable bytes; vld1q has no alignment requirement.
            xq[t] = unsafe {
                [
                    vld1q_s8(block.q.as_ptr()),
                    vld1q_s8(block.q.as_ptr().add(16)),
                ]
            };
            xd[t] = block.d;
        }
        for r in 0..R {
            let block = &w[b * R + r];
            // SAFETY: as above.
            let wq = unsafe {
                [
                    vld1q_s8(block.q.as_ptr()),
                    vld1q_s8(block.q.as_ptr().add(16)),
                ]
            };
            let wd = block.d.to_f32();
            for t in 0..T {
                let scale = vdupq_n_f32(wd * xd[t]);
                for h in 0..2 {
                    let lanes = vcvtq_f32_s32(lanes16(wq[h], xq[t][h]));
                    acc[r][t][h] = vfmaq_f32(acc[r][t][h], lanes, scale);
                }
            }
        }
    }
    acc.map(|per_token| per_token.map(|v| hsum(v[0], v[1])))
}

/// Lane sum of lanes 0..4 (`lo`) and 4..8 (`hi`) in the order of `int8::hsum8`.
#[target_feature(enable = "neon")]
pub(crate) fn hsum(lo: float32x4_t, hi: float32x4_t) -> f32 {
    let h = vaddq_f32(lo, hi);
    vpadds_f32(vadd_f32(vget_low_f32(h), vget_high_f32(h)))
}
