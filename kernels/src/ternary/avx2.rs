//! The AVX2 tile kernel: `vpshufb` looks up the magnitude indices of 32 rows per instruction (a
//! triple's table broadcast to both lanes), `vpsignb` negates where the row's sign bit is set (the
//! sign bytes are shifted left by one bit per triple so that the MSB is the current triple's sign;
//! OR-ing 1 keeps them nonzero), pairs of triples are interleaved and summed in int16 by
//! `vpmaddubsw`, and one int16→f32 conversion per table block.
//!
//! Float operations match [`super::scalar`] one for one (mul, add; no FMA) so results are
//! bit-exact.

use std::arch::x86_64::*;

use super::kernel::{TabView, TileView, BLOCK_CHUNKS, CHUNK_BYTES, SIGN_OFFSET, SPAN, TRIPLES};
use super::TABLE_BYTES;
use crate::lut::avx2::accumulate;
use crate::lut::layout::TILE;

/// Chunks of weights fetched ahead (2.5 KiB): the hardware prefetcher alone leaves the stream
/// below the memory bandwidth.
const PREFETCH_AHEAD: usize = 8;

/// # Safety
/// The CPU supports avx2, fma and f16c, and `v.is_consistent(t, n0, acc.len(), _)` holds.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile(v: &TileView<'_>, t: &TabView<'_>, n0: usize, acc: &mut [[f32; TILE]]) {
    for a in acc.iter_mut() {
        *a = [0.0; TILE];
    }
    let nb = acc.len();
    let blocks = v.blocks();
    let w = v.weights.as_ptr();
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + SPAN).min(blocks);
        for (n, f) in acc.iter_mut().enumerate() {
            for b in b0..b1 {
                let (c0, c1) = v.block_chunks(b);
                let mut s = [_mm256_setzero_si256(); 4];
                for c in c0..c1 {
                    // In bounds: c < chunks and the weights hold chunks·CHUNK_BYTES bytes.
                    let wc = w.wrapping_add(c * CHUNK_BYTES);
                    if n == 0 {
                        prefetch(wc);
                    }
                    let tabs = t.chunk_tables(n0 + n, c).as_ptr();
                    if nb > 1 {
                        // The tokens' tables are far apart (too many streams for the hardware
                        // prefetcher): fetch this token's tables of the next span now.
                        let next = tabs.wrapping_add(SPAN * BLOCK_CHUNKS * TRIPLES * TABLE_BYTES);
                        // Prefetching never faults, whatever the address (the intrinsic is safe).
                        _mm_prefetch::<_MM_HINT_T0>(next.cast());
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64).cast());
                    }
                    // SAFETY: `wc` points to the CHUNK_BYTES bytes of chunk c, `tabs` to its 128
                    // table bytes (a slice of that length).
                    unsafe { lookups(wc, tabs, &mut s) };
                }
                accumulate(f, &s, _mm256_set1_ps(t.scale(n0 + n, b)));
            }
        }
        b0 = b1;
    }
    for f in acc.iter_mut() {
        for r in (0..TILE).step_by(8) {
            // SAFETY: r + 8 <= TILE, and `v.scales` holds TILE values (checked by the caller).
            unsafe {
                let y = _mm256_mul_ps(
                    _mm256_loadu_ps(f[r..].as_ptr()),
                    _mm256_loadu_ps(v.scales[r..].as_ptr()),
                );
                _mm256_storeu_ps(f[r..].as_mut_ptr(), y);
            }
        }
    }
}

/// Prefetches the weights `PREFETCH_AHEAD` chunks after `wc` (possibly in the next tile, which
/// follows in memory; a prefetch past the end of the buffer is harmless).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch(wc: *const u8) {
    let ahead = wc.wrapping_add(PREFETCH_AHEAD * CHUNK_BYTES);
    for line in 0..CHUNK_BYTES / 64 {
        // Prefetching never faults, whatever the address (the intrinsic is safe).
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
    }
}

/// `s += Σ_t ±T_t[|u_t|]` over the 8 triples of one chunk; `s[q]` holds rows `16q..16q+16`.
///
/// # Safety
/// `wc` points to CHUNK_BYTES readable bytes, `tabs` to 128.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lookups(wc: *const u8, tabs: *const i8, s: &mut [__m256i; 4]) {
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi8(1);
    // SAFETY: the sign bytes are the last 64 of the chunk.
    let (mut sl, mut sh) = unsafe {
        (
            _mm256_loadu_si256(wc.add(SIGN_OFFSET).cast()),
            _mm256_loadu_si256(wc.add(SIGN_OFFSET + 32).cast()),
        )
    };
    for pair in 0..4 {
        // SAFETY: 32·pair + 32 <= 128 table bytes and 64·pair + 64 <= SIGN_OFFSET weight bytes.
        let (ta, tb, wa, wb) = unsafe {
            (
                _mm256_broadcastsi128_si256(_mm_loadu_si128(tabs.add(32 * pair).cast())),
                _mm256_broadcastsi128_si256(_mm_loadu_si128(tabs.add(32 * pair + 16).cast())),
                _mm256_loadu_si256(wc.add(64 * pair).cast()),
                _mm256_loadu_si256(wc.add(64 * pair + 32).cast()),
            )
        };
        let la = _mm256_shuffle_epi8(ta, _mm256_and_si256(wa, mask));
        let ha = _mm256_shuffle_epi8(ta, _mm256_and_si256(_mm256_srli_epi16::<4>(wa), mask));
        let lb = _mm256_shuffle_epi8(tb, _mm256_and_si256(wb, mask));
        let hb = _mm256_shuffle_epi8(tb, _mm256_and_si256(_mm256_srli_epi16::<4>(wb), mask));
        // The MSB of each sign byte is now triple 2·pair's bit; table entries are within ±127,
        // so negating never overflows.
        let la = _mm256_sign_epi8(la, _mm256_or_si256(sl, ones));
        let ha = _mm256_sign_epi8(ha, _mm256_or_si256(sh, ones));
        sl = _mm256_add_epi8(sl, sl);
        sh = _mm256_add_epi8(sh, sh);
        let lb = _mm256_sign_epi8(lb, _mm256_or_si256(sl, ones));
        let hb = _mm256_sign_epi8(hb, _mm256_or_si256(sh, ones));
        sl = _mm256_add_epi8(sl, sl);
        sh = _mm256_add_epi8(sh, sh);
        // Interleaving triples 2·pair and 2·pair+1 byte-wise makes maddubs add them per row.
        s[0] = _mm256_add_epi16(
            s[0],
            _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(la, lb)),
        );
        s[1] = _mm256_add_epi16(
            s[1],
            _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(la, lb)),
        );
        s[2] = _mm256_add_epi16(
            s[2],
            _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(ha, hb)),
        );
        s[3] = _mm256_add_epi16(
            s[3],
            _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(ha, hb)),
        );
    }
}
