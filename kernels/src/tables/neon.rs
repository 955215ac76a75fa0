//! The NEON table fill: one table group (4 activations) per iteration, its 8 computed entries in two
//! vectors. The float operations are [`super::fill_table`]'s (adds in the same order, one multiply,
//! clamp, round to nearest even), so the tables are the same bytes as the scalar path's.

use std::arch::aarch64::*;

use crate::lut::layout::{TABLES_PER_ACT, TABLE_BYTES};

/// Fills the tables `out` (16 bytes each) of the table groups `first..`, whose activations are `x`
/// (4 per table) and whose activation-group scales are `scales` (indexed by table group / 8).
///
/// # Safety
/// The CPU supports NEON (the slices are checked: the function panics, never reads out of bounds,
/// if `x` is not 4 values per table of `out` or `scales` lacks a group).
#[target_feature(enable = "neon")]
pub(super) unsafe fn fill_tables(x: &[f32], first: usize, scales: &[f32], out: &mut [i8]) {
    assert_eq!(
        x.len() * TABLE_BYTES,
        out.len() * 4,
        "4 activations per table"
    );
    // Lane `idx` (of entries 0..4 and 4..8) of the sign mask of x_i: set where bit i of idx is 0,
    // i.e. where the entry takes −x_i.
    let flip = |i: u32, base: u32| {
        let lane = |idx: u32| {
            if idx & (1 << i) == 0 {
                0x8000_0000u32
            } else {
                0
            }
        };
        let lanes = [lane(base), lane(base + 1), lane(base + 2), lane(base + 3)];
        // SAFETY: `lanes` is 4 readable u32s.
        unsafe { vld1q_u32(lanes.as_ptr()) }
    };
    let signs = [
        [flip(0, 0), flip(1, 0), flip(2, 0), flip(3, 0)],
        [flip(0, 4), flip(1, 4), flip(2, 4), flip(3, 4)],
    ];
    let (lo, hi) = (vdupq_n_f32(-127.0), vdupq_n_f32(127.0));
    for (k, (quad, table)) in x
        .chunks_exact(4)
        .zip(out.chunks_exact_mut(TABLE_BYTES))
        .enumerate()
    {
        let scale = scales[(first + k) / TABLES_PER_ACT];
        let inv = vdupq_n_f32(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let half = |s: &[uint32x4_t; 4]| {
            let term = |i: usize| {
                vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(vdupq_n_f32(quad[i])), s[i]))
            };
            // ((±x0 ± x1) ± x2) ± x3, the scalar sum's order.
            let t = vaddq_f32(vaddq_f32(vaddq_f32(term(0), term(1)), term(2)), term(3));
            let v = vmulq_f32(t, inv);
            // NaN → 0, as the scalar path's `as i8` does.
            let v = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), vceqq_f32(v, v)));
            // Clamped, then rounded to nearest with ties to even.
            vcvtnq_s32_f32(vminq_f32(vmaxq_f32(v, lo), hi))
        };
        let q = vqmovn_s16(vcombine_s16(
            vqmovn_s32(half(&signs[0])),
            vqmovn_s32(half(&signs[1])),
        ));
        // Entry 15 − idx is −entry idx.
        let r = vrev64_s8(vneg_s8(q));
        // SAFETY: `table` is exactly 16 bytes (a chunk of `chunks_exact_mut(16)`).
        unsafe { vst1q_s8(table.as_mut_ptr(), vcombine_s8(q, r)) };
    }
}
