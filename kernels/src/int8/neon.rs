//! NEON int8 kernel: `vmull_s8` products, pairwise-widened to the eight int32 lane sums of a block
//! (the same grouping as AVX2's `maddubs`+`madd` and as `vdotq_s32`). IQ4 nibble blocks are split
//! into their 32 indices and looked up with `vqtbl1q_s8` as they are loaded.
//!
//! The activation quantizer rounds with `vrndaq_f32` (to nearest, ties away from zero, as
//! `f32::round`) and converts with `vcvtq_s32_f32`, which maps NaN to 0 as `as` does.

use std::arch::aarch64::*;

use std::marker::PhantomData;

use super::{block_scale, ActBlock, BlockScale, Codes, WeightBlock, BLOCK, KVALUES_IQ4NL};
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

/// NEON version of `int8::quantize_block` (codes, scale, code sums and value sums) for each block
/// of `blocks`, from 32 values of `x` each.
pub(super) fn quantize(x: &[f32], blocks: &mut [ActBlock]) {
    assert!(
        Isa::Neon.is_supported(),
        "NEON quantizer called on a CPU without NEON"
    );
    // SAFETY: the CPU supports NEON (asserted above).
    unsafe { quantize_blocks(x, blocks) }
}

/// The blocks of [`quantize`].
#[target_feature(enable = "neon")]
fn quantize_blocks(x: &[f32], blocks: &mut [ActBlock]) {
    let (low, high) = (vdupq_n_f32(-127.0), vdupq_n_f32(127.0));
    for (block, xs) in blocks.iter_mut().zip(x.chunks_exact(BLOCK)) {
        let mut v = [vdupq_n_f32(0.0); 8];
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: `xs` is 32 f32, so elements 4i..4i+4 (i < 8) are readable; vld1q has no
            // alignment requirement.
            *v = unsafe { vld1q_f32(xs.as_ptr().add(4 * i)) };
        }
        // `vmaxnmq` returns the number when one operand is a NaN, as `f32::max` does.
        let mut m = vdupq_n_f32(0.0);
        for &v in &v {
            m = vmaxnmq_f32(m, vabsq_f32(v));
        }
        let (d, inv) = block_scale(vmaxnmvq_f32(m));
        let inv = vdupq_n_f32(inv);
        let mut codes = [vdupq_n_s32(0); 8];
        for (c, &v) in codes.iter_mut().zip(&v) {
            // `vmaxq`/`vminq` keep a NaN, which the conversion turns into 0; ±∞ clamp to ±127.
            let r = vrndaq_f32(vmulq_f32(v, inv));
            *c = vcvtq_s32_f32(vminq_f32(vmaxq_f32(r, low), high));
        }
        let mut halves = [vdupq_n_s32(0); 2];
        for (i, (four, half)) in codes.chunks_exact(4).zip(&mut halves).enumerate() {
            let lo = vcombine_s16(vmovn_s32(four[0]), vmovn_s32(four[1]));
            let hi = vcombine_s16(vmovn_s32(four[2]), vmovn_s32(four[3]));
            let q = vcombine_s8(vmovn_s16(lo), vmovn_s16(hi));
            // SAFETY: `block.q` is 32 writable bytes, so bytes 16i..16i+16 (i < 2) are;
            // vst1q has no alignment requirement.
            unsafe { vst1q_s8(block.q.as_mut_ptr().add(16 * i), q) };
            *half = vaddq_s32(vaddq_s32(four[0], four[1]), vaddq_s32(four[2], four[3]));
        }
        block.sum_lo = vaddvq_s32(halves[0]);
        block.sum = vaddvq_s32(vaddq_s32(halves[0], halves[1]));
        block.d = d;
        // Lanes 0..4 of `int8::half_sums`' first half are `v[0] + v[2]` (`x[i] + x[i + 8]`),
        // lanes 4..8 `v[1] + v[3]`; the second half's are `v[4] + v[6]` and `v[5] + v[7]`.
        // Adding the next two vectors of each lane group in turn gives the lanes of
        // `int8::block_sum`.
        let (lo, hi) = (vaddq_f32(v[0], v[2]), vaddq_f32(v[1], v[3]));
        block.xsum_halves = [
            hsum(lo, hi),
            hsum(vaddq_f32(v[4], v[6]), vaddq_f32(v[5], v[7])),
        ];
        block.xsum = hsum(
            vaddq_f32(vaddq_f32(lo, v[4]), v[6]),
            vaddq_f32(vaddq_f32(hi, v[5]), v[7]),
        );
    }
}
