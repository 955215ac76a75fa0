//! The AVX2 table fill: one table group (4 activations) per iteration, its 8 computed entries in the
//! lanes of one vector. The float operations are [`super::fill_table`]'s (adds in the same order, one
//! multiply, clamp, round to nearest even), so the tables are the same bytes as the scalar path's.

use std::arch::x86_64::*;

use crate::lut::layout::{TABLES_PER_ACT, TABLE_BYTES};

/// Fills the tables `out` (16 bytes each) of the table groups `first..`, whose activations are `x`
/// (4 per table) and whose activation-group scales are `scales` (indexed by table group / 8).
///
/// # Safety
/// The CPU supports avx2 (the slices are checked: the function panics, never reads out of bounds,
/// if `x` is not 4 values per table of `out` or `scales` lacks a group).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fill_tables(x: &[f32], first: usize, scales: &[f32], out: &mut [i8]) {
    assert_eq!(
        x.len() * TABLE_BYTES,
        out.len() * 4,
        "4 activations per table"
    );
    // Lane `idx` of `SIGN[i]` flips the sign of x_i (xor of the sign bit) where bit i of idx is 0:
    // entry idx = Σ_i (bit_i(idx) ? +x_i : −x_i).
    let flip = |i: u32| {
        let lane = |idx: u32| if idx & (1 << i) == 0 { i32::MIN } else { 0 };
        _mm256_castsi256_ps(_mm256_setr_epi32(
            lane(0),
            lane(1),
            lane(2),
            lane(3),
            lane(4),
            lane(5),
            lane(6),
            lane(7),
        ))
    };
    let signs = [flip(0), flip(1), flip(2), flip(3)];
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let reverse = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    // Bytes of `packs(packs(q, r))` in the order q0..q7, r0..r7.
    let order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    for (k, (quad, table)) in x
        .chunks_exact(4)
        .zip(out.chunks_exact_mut(TABLE_BYTES))
        .enumerate()
    {
        let scale = scales[(first + k) / TABLES_PER_ACT];
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let term = |i: usize| _mm256_xor_ps(_mm256_set1_ps(quad[i]), signs[i]);
        // ((±x0 ± x1) ± x2) ± x3: the scalar sum's order (its leading `0 +` changes only the sign of
        // a zero, which rounds to the same entry).
        let t = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(term(0), term(1)), term(2)),
            term(3),
        );
        let v = _mm256_mul_ps(t, inv);
        // NaN → 0, as the scalar path's `as i8` does.
        let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        // Rounds to nearest even (the default MXCSR mode, which Rust code never changes).
        let q = _mm256_cvtps_epi32(v);
        // Entry 15 − idx is −entry idx.
        let r = _mm256_permutevar8x32_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), q), reverse);
        let words = _mm256_packs_epi32(q, r);
        let bytes = _mm_packs_epi16(
            _mm256_castsi256_si128(words),
            _mm256_extracti128_si256::<1>(words),
        );
        let bytes = _mm_shuffle_epi8(bytes, order);
        // SAFETY: `table` is exactly 16 bytes (a chunk of `chunks_exact_mut(16)`).
        unsafe { _mm_storeu_si128(table.as_mut_ptr().cast(), bytes) };
    }
}
