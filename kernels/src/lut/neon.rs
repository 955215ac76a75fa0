//! The NEON tile kernel: `tbl` lookups of 16 rows per instruction, pairs of table groups added by
//! widening adds (`saddl`), plane weights applied with `mla`, one int16→f32 conversion per activation group.
//!
//! Float operations match [`super::scalar`] one for one (mul, add, and FMA where it fuses) so results
//! are bit-exact.

use std::arch::aarch64::*;
use std::ops::Range;

use super::layout::{BLOCK, PLANE_BYTES, TABLE_BYTES, TILE};
use super::{scalar, Acc, PlaneSums, TabView, TileView, CHUNK, MAX_BITS, MAX_FAST_BITS};

/// # Safety
/// The CPU supports NEON, and `v.is_consistent(t, n0, nb)` holds.
#[target_feature(enable = "neon")]
pub(super) unsafe fn tile<const NB: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
) {
    if v.needs_general_path() {
        // SAFETY: the closure runs only inside this call, on the CPU the caller vouched for
        // (the one feature `lookup_accumulate` needs); `lookup_accumulate` reads through bounds-checked slices that are
        // shared read-only between threads and writes only `f`, this call's own buffer.
        let lookups = |wa: &[u8], planes, tabs: &[i8], tables, ts, f: &mut [f32; TILE]| unsafe {
            lookup_accumulate(wa, planes, tabs, tables, ts, f)
        };
        return scalar::tile_with(v, t, n0, nb, acc, lookups);
    }
    let nps = v.scale_planes();
    let mut f: PlaneSums<NB> = [[[0.0; TILE]; MAX_BITS]; NB];
    for a in acc[..nb].iter_mut() {
        *a = [0.0; TILE];
    }
    for g in 0..v.groups {
        for planes in f[..nb].iter_mut() {
            for plane in planes[..nps].iter_mut() {
                *plane = [0.0; TILE];
            }
        }
        let (a0, a1) = (g * v.apg, (g + 1) * v.apg);
        let mut c0 = a0;
        while c0 < a1 {
            let c1 = (c0 + CHUNK).min(a1);
            for (n, fn_) in f[..nb].iter_mut().enumerate() {
                for a in c0..c1 {
                    let tabs = t.tables_of(n0 + n, a).as_ptr();
                    let ts = vdupq_n_f32(t.scales[(n0 + n) * t.act_groups + a]);
                    let wa = v.weights[a * v.bits * PLANE_BYTES..][..v.bits * PLANE_BYTES].as_ptr();
                    if v.per_plane {
                        for (p, fp) in fn_[..v.bits].iter_mut().enumerate() {
                            let mut s = [vdupq_n_s16(0); 8];
                            // SAFETY: `wa` holds bits·256 bytes and p < bits; `tabs` holds 128 bytes.
                            unsafe { lookups(wa.add(p * PLANE_BYTES), tabs, 1, &mut s) };
                            accumulate(fp, &s, ts);
                        }
                    } else {
                        let mut s = [vdupq_n_s16(0); 8];
                        for p in 0..v.bits {
                            // SAFETY: as above.
                            unsafe { lookups(wa.add(p * PLANE_BYTES), tabs, 1 << p, &mut s) };
                        }
                        accumulate(&mut fn_[0], &s, ts);
                    }
                }
            }
            c0 = c1;
        }
        for (n, a) in acc[..nb].iter_mut().enumerate() {
            let sx = t.group_sum(n0 + n, a0, a1);
            // Pure f32 mul/add per row: the reference combine is already the NEON one once vectorized.
            scalar::combine(v, g, &f[n], sx, a);
        }
    }
}

/// `s += pw·Σ_j T_j[nibble]` for one plane of one activation group; `s[k]` holds rows `8k..8k+8`.
///
/// # Safety
/// `plane` points to 256 readable bytes, `tabs` to 128.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn lookups(plane: *const u8, tabs: *const i8, pw: i16, s: &mut [int16x8_t; 8]) {
    let mask = vdupq_n_u8(0x0F);
    for j in (0..8).step_by(2) {
        // SAFETY: 16·(j + 1) + 16 <= 128 table bytes.
        let (t0, t1) = unsafe {
            (
                vld1q_s8(tabs.add(TABLE_BYTES * j)),
                vld1q_s8(tabs.add(TABLE_BYTES * (j + 1))),
            )
        };
        for lane in 0..2 {
            // SAFETY: 32·(j + 1) + 16·lane + 16 <= 256 weight bytes.
            let (w0, w1) = unsafe {
                (
                    vld1q_u8(plane.add(BLOCK * j + 16 * lane)),
                    vld1q_u8(plane.add(BLOCK * (j + 1) + 16 * lane)),
                )
            };
            let rl0 = vqtbl1q_s8(t0, vandq_u8(w0, mask));
            let rl1 = vqtbl1q_s8(t1, vandq_u8(w1, mask));
            let rh0 = vqtbl1q_s8(t0, vshrq_n_u8::<4>(w0));
            let rh1 = vqtbl1q_s8(t1, vshrq_n_u8::<4>(w1));
            // Bytes 0..8 of lane `lane` are rows 8·lane.., bytes 8..16 rows 16 + 8·lane.. (layout::lo_row);
            // high nibbles are the same rows + 32.
            let parts = [
                (lane, vaddl_s8(vget_low_s8(rl0), vget_low_s8(rl1))),
                (2 + lane, vaddl_high_s8(rl0, rl1)),
                (4 + lane, vaddl_s8(vget_low_s8(rh0), vget_low_s8(rh1))),
                (6 + lane, vaddl_high_s8(rh0, rh1)),
            ];
            for (k, sum) in parts {
                s[k] = vmlaq_n_s16(s[k], sum, pw);
            }
        }
    }
}

/// [`scalar::lookup_accumulate`] with `tbl` lookups: planes in runs of at most [`MAX_FAST_BITS`]
/// summed in int16 (at most 15·127·8 per row, no overflow), each run widened to i32 and shifted by
/// its first plane's weight, then `f += ts·S` as [`accumulate`] does it. Every read goes through a
/// bounds-checked slice.
///
/// # Safety
/// The CPU supports NEON.
#[target_feature(enable = "neon")]
unsafe fn lookup_accumulate(
    wa: &[u8],
    planes: Range<usize>,
    tabs: &[i8],
    tables: Range<usize>,
    ts: f32,
    f: &mut [f32; TILE],
) {
    debug_assert!(tables.start.is_multiple_of(2) && tables.end.is_multiple_of(2));
    // `total[2k + h]`: rows 8k + 4h .. + 4.
    let mut total = [vdupq_n_s32(0); 16];
    let mask = vdupq_n_u8(0x0F);
    let mut p0 = planes.start;
    while p0 < planes.end {
        let p1 = (p0 + MAX_FAST_BITS).min(planes.end);
        let mut s = [vdupq_n_s16(0); 8];
        for p in p0..p1 {
            let plane = &wa[p * PLANE_BYTES..][..PLANE_BYTES];
            let pw = 1i16 << (p - p0);
            for j in tables.clone().step_by(2) {
                let blocks = &plane[BLOCK * j..][..2 * BLOCK];
                let pair_tabs = &tabs[TABLE_BYTES * j..][..2 * TABLE_BYTES];
                // SAFETY: `pair_tabs` is 32 bytes.
                let (t0, t1) = unsafe {
                    (
                        vld1q_s8(pair_tabs.as_ptr()),
                        vld1q_s8(pair_tabs.as_ptr().add(TABLE_BYTES)),
                    )
                };
                for lane in 0..2 {
                    // SAFETY: `blocks` is 64 bytes: 32 + 16·lane + 16 <= 64.
                    let (w0, w1) = unsafe {
                        (
                            vld1q_u8(blocks.as_ptr().add(16 * lane)),
                            vld1q_u8(blocks.as_ptr().add(BLOCK + 16 * lane)),
                        )
                    };
                    let rl0 = vqtbl1q_s8(t0, vandq_u8(w0, mask));
                    let rl1 = vqtbl1q_s8(t1, vandq_u8(w1, mask));
                    let rh0 = vqtbl1q_s8(t0, vshrq_n_u8::<4>(w0));
                    let rh1 = vqtbl1q_s8(t1, vshrq_n_u8::<4>(w1));
                    // The row order of `lookups`: `s[k]` holds rows 8k..8k+8.
                    let parts = [
                        (lane, vaddl_s8(vget_low_s8(rl0), vget_low_s8(rl1))),
                        (2 + lane, vaddl_high_s8(rl0, rl1)),
                        (4 + lane, vaddl_s8(vget_low_s8(rh0), vget_low_s8(rh1))),
                        (6 + lane, vaddl_high_s8(rh0, rh1)),
                    ];
                    for (k, sum) in parts {
                        s[k] = vmlaq_n_s16(s[k], sum, pw);
                    }
                }
            }
        }
        let shift = vdupq_n_s32((p0 - planes.start) as i32);
        for (k, &sk) in s.iter().enumerate() {
            let halves = [vmovl_s16(vget_low_s16(sk)), vmovl_high_s16(sk)];
            for (h, &v) in halves.iter().enumerate() {
                total[2 * k + h] = vaddq_s32(total[2 * k + h], vshlq_s32(v, shift));
            }
        }
        p0 = p1;
    }
    let ts = vdupq_n_f32(ts);
    for (i, &s) in total.iter().enumerate() {
        let dst = &mut f[4 * i..][..4];
        // SAFETY: `dst` is 4 f32s.
        let old = unsafe { vld1q_f32(dst.as_ptr()) };
        // SAFETY: as above.
        unsafe {
            vst1q_f32(
                dst.as_mut_ptr(),
                vaddq_f32(old, vmulq_f32(ts, vcvtq_f32_s32(s))),
            )
        };
    }
}

/// `f[r] += ts·S[r]` (also the ternary kernel's, whose sums come in the same row order).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn accumulate(f: &mut [f32; TILE], s: &[int16x8_t; 8], ts: float32x4_t) {
    for (k, &sk) in s.iter().enumerate() {
        let halves = [vmovl_s16(vget_low_s16(sk)), vmovl_high_s16(sk)];
        for (h, &v) in halves.iter().enumerate() {
            let dst = &mut f[8 * k + 4 * h..][..4];
            // SAFETY: `dst` is 4 f32s.
            let old = unsafe { vld1q_f32(dst.as_ptr()) };
            let new = vaddq_f32(old, vmulq_f32(ts, vcvtq_f32_s32(v)));
            // SAFETY: as above.
            unsafe { vst1q_f32(dst.as_mut_ptr(), new) };
        }
    }
}
