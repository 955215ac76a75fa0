//! NEON int8 kernel: `vmull_s8` products, pairwise-widened to the eight int32 lane sums of a block
//! (the same grouping as AVX2's `maddubs`+`madd` and as `vdotq_s32`). IQ4 nibble blocks are split
//! into their 32 indices and looked up with `vqtbl1q_s8` as they are loaded.

use std::arch::aarch64::*;

use std::marker::PhantomData;

use super::{ActBlock, BlockScale, Codes, WeightBlock, KVALUES_IQ4NL};
use crate::isa::Isa;
use crate::tiling::{for_each_tile, RowRange, TileKernel};

/// NEON version of the scalar kernel.
pub(super) fn matmul_rows<S: BlockScale, C: Codes>(
    w: &[WeightBlock<S, C>],
    x: &[ActBlock],
    per_row: usize,
    out: &mut RowRange<'_>,
) {
    assert!(
        Isa::Neon.is_supported(),
        "NEON kernel called on a CPU without NEON"
    );
    for_each_tile(&NeonInt8::<S, C>(PhantomData), w, x, per_row, out);
}

/// The NEON tile kernel; only built by `matmul_rows` after the CPU check.
struct NeonInt8<S, C>(PhantomData<(S, C)>);

impl<S: BlockScale, C: Codes> TileKernel for NeonInt8<S, C> {
    type W = WeightBlock<S, C>;
    type X = ActBlock;

    fn tile<const R: usize, const T: usize>(
        &self,
        w: &[WeightBlock<S, C>],
        x: &[ActBlock],
        per_row: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: a `NeonInt8` exists only inside `matmul_rows`, after it asserted that the CPU
        // supports NEON.
        unsafe { tile::<S, C, R, T>(w, x, per_row) }
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
fn tile<S: BlockScale, C: Codes, const R: usize, const T: usize>(
    w: &[WeightBlock<S, C>],
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
            let wq = load_codes(&block.q);
            let wd = block.d.halves();
            for t in 0..T {
                // Half h holds elements 16h..16h+16 (lanes 4h..4h+4).
                let low = vdupq_n_f32(wd[0] * xd[t]);
                let scales = if S::PER_HALF {
                    [low, vdupq_n_f32(wd[1] * xd[t])]
                } else {
                    [low; 2]
                };
                for h in 0..2 {
                    let scale = scales[h];
                    let lanes = vcvtq_f32_s32(lanes16(wq[h], xq[t][h]));
                    acc[r][t][h] = vfmaq_f32(acc[r][t][h], lanes, scale);
                }
            }
        }
    }
    acc.map(|per_token| per_token.map(|v| hsum(v[0], v[1])))
}

/// The 32 int8 codes of a block's code storage: elements 0..16 and 16..32.
#[target_feature(enable = "neon")]
#[inline]
fn load_codes<C: Codes>(q: &C) -> [int8x16_t; 2] {
    let bytes: *const u8 = (q as *const C).cast();
    if C::NIBBLES {
        // SAFETY: a nibble block is 16 readable bytes (`Nibbles` is `[u8; 16]`), as is the table;
        // vld1q has no alignment requirement.
        let (packed, table) = unsafe { (vld1q_u8(bytes), vld1q_s8(KVALUES_IQ4NL.as_ptr())) };
        let low = vandq_u8(packed, vdupq_n_u8(0x0F));
        let high = vshrq_n_u8::<4>(packed);
        [vqtbl1q_s8(table, low), vqtbl1q_s8(table, high)]
    } else {
        // SAFETY: int8 storage is `[i8; 32]`, 32 readable bytes; vld1q has no alignment
        // requirement.
        unsafe { [vld1q_s8(bytes.cast()), vld1q_s8(bytes.add(16).cast())] }
    }
}

/// Lane sum of lanes 0..4 (`lo`) and 4..8 (`hi`) in the order of `int8::hsum8`.
#[target_feature(enable = "neon")]
pub(crate) fn hsum(lo: float32x4_t, hi: float32x4_t) -> f32 {
    let h = vaddq_f32(lo, hi);
    vpadds_f32(vadd_f32(vget_low_f32(h), vget_high_f32(h)))
}
