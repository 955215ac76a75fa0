//! The NEON tile kernel: `tbl` looks up the magnitude indices of 16 rows per instruction, `cmtst`
//! turns the triple's sign bit into a mask and `(x ^ m) − m` negates, pairs of triples are added by
//! widening adds (`saddl`), and one int16→f32 conversion per table block.
//!
//! Float operations match [`super::scalar`] one for one (mul, add; no FMA) so results are
//! bit-exact.

use std::arch::aarch64::*;

use super::kernel::{TabView, TileView, CHUNK_BYTES, NIBBLE_BYTES, SIGN_OFFSET, SPAN, TRIPLES};
use super::TABLE_BYTES;
use crate::lut::layout::TILE;
use crate::lut::neon::accumulate;

/// # Safety
/// The CPU supports NEON, and `v.is_consistent(t, n0, acc.len(), _)` holds.
#[target_feature(enable = "neon")]
pub(super) unsafe fn tile(v: &TileView<'_>, t: &TabView<'_>, n0: usize, acc: &mut [[f32; TILE]]) {
    for a in acc.iter_mut() {
        *a = [0.0; TILE];
    }
    let blocks = v.blocks();
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + SPAN).min(blocks);
        for (n, f) in acc.iter_mut().enumerate() {
            for b in b0..b1 {
                let (c0, c1) = v.block_chunks(b);
                let mut s = [vdupq_n_s16(0); 8];
                for c in c0..c1 {
                    let chunk = &v.weights[c * CHUNK_BYTES..][..CHUNK_BYTES];
                    let tabs = t.chunk_tables(n0 + n, c);
                    // SAFETY: `chunk` holds CHUNK_BYTES bytes and `tabs` 128 (slices of those
                    // lengths).
                    unsafe { lookups(chunk.as_ptr(), tabs.as_ptr(), &mut s) };
                }
                accumulate(f, &s, vdupq_n_f32(t.scale(n0 + n, b)));
            }
        }
        b0 = b1;
    }
    for f in acc.iter_mut() {
        for r in (0..TILE).step_by(4) {
            // SAFETY: r + 4 <= TILE, and `v.scales` holds TILE values (checked by the caller).
            unsafe {
                let y = vmulq_f32(
                    vld1q_f32(f[r..].as_ptr()),
                    vld1q_f32(v.scales[r..].as_ptr()),
                );
                vst1q_f32(f[r..].as_mut_ptr(), y);
            }
        }
    }
}

/// `x` negated in the bytes where `m` is all ones (`m` is 0 or −1 per byte).
#[inline]
#[target_feature(enable = "neon")]
fn negate_where(x: int8x16_t, m: uint8x16_t) -> int8x16_t {
    let m = vreinterpretq_s8_u8(m);
    vsubq_s8(veorq_s8(x, m), m)
}

/// `s += Σ_t ±T_t[|u_t|]` over the 8 triples of one chunk; `s[k]` holds rows `8k..8k+8`.
///
/// # Safety
/// `wc` points to CHUNK_BYTES readable bytes, `tabs` to 128.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn lookups(wc: *const u8, tabs: *const i8, s: &mut [int16x8_t; 8]) {
    let mask = vdupq_n_u8(0x0F);
    // Sign bytes of (low rows, lane 0), (low, lane 1), (high rows, lane 0), (high, lane 1).
    // SAFETY: the sign bytes are the last 64 of the chunk.
    let signs = unsafe {
        [
            vld1q_u8(wc.add(SIGN_OFFSET)),
            vld1q_u8(wc.add(SIGN_OFFSET + 16)),
            vld1q_u8(wc.add(SIGN_OFFSET + 32)),
            vld1q_u8(wc.add(SIGN_OFFSET + 48)),
        ]
    };
    for j in (0..TRIPLES).step_by(2) {
        // SAFETY: 16·(j + 1) + 16 <= 128 table bytes.
        let (t0, t1) = unsafe {
            (
                vld1q_s8(tabs.add(TABLE_BYTES * j)),
                vld1q_s8(tabs.add(TABLE_BYTES * (j + 1))),
            )
        };
        let (bit0, bit1) = (vdupq_n_u8(0x80 >> j), vdupq_n_u8(0x80 >> (j + 1)));
        for lane in 0..2 {
            // SAFETY: 32·(j + 1) + 16·lane + 16 <= SIGN_OFFSET weight bytes.
            let (w0, w1) = unsafe {
                (
                    vld1q_u8(wc.add(NIBBLE_BYTES * j + 16 * lane)),
                    vld1q_u8(wc.add(NIBBLE_BYTES * (j + 1) + 16 * lane)),
                )
            };
            let (sl, sh) = (signs[lane], signs[2 + lane]);
            let rl0 = negate_where(vqtbl1q_s8(t0, vandq_u8(w0, mask)), vtstq_u8(sl, bit0));
            let rl1 = negate_where(vqtbl1q_s8(t1, vandq_u8(w1, mask)), vtstq_u8(sl, bit1));
            let rh0 = negate_where(vqtbl1q_s8(t0, vshrq_n_u8::<4>(w0)), vtstq_u8(sh, bit0));
            let rh1 = negate_where(vqtbl1q_s8(t1, vshrq_n_u8::<4>(w1)), vtstq_u8(sh, bit1));
            // Bytes 0..8 of lane `lane` are rows 8·lane.., bytes 8..16 rows 16 + 8·lane..
            // (lut::layout::lo_row); high nibbles are the same rows + 32.
            let parts = [
                (lane, vaddl_s8(vget_low_s8(rl0), vget_low_s8(rl1))),
                (2 + lane, vaddl_high_s8(rl0, rl1)),
                (4 + lane, vaddl_s8(vget_low_s8(rh0), vget_low_s8(rh1))),
                (6 + lane, vaddl_high_s8(rh0, rh1)),
            ];
            for (k, sum) in parts {
                s[k] = vaddq_s16(s[k], sum);
            }
        }
    }
}
