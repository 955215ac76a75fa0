//! The scalar reference tile kernel: the definition every SIMD path is tested against.
//!
//! Per row `r` and token `n`: for each table block `b`, `S = Σ_t ±T_t[|u_t(r)|]` exactly in
//! integers (the sign from the row's sign bit of triple `t`), then `F += tscale_b·S` in f32; at the
//! end `y = F·scale_r`. The SIMD kernels perform exactly these float operations in this order.

use super::kernel::{TabView, TileView, CHUNK_BYTES, NIBBLE_BYTES, SIGN_OFFSET, SPAN, TRIPLES};
use super::TABLE_BYTES;
use crate::lut::layout::{LO_ROW, TILE};

/// `acc[n]` = the outputs of token `n0 + n` for every row of the tile.
pub(crate) fn tile(v: &TileView<'_>, t: &TabView<'_>, n0: usize, acc: &mut [[f32; TILE]]) {
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
                let mut s = [0i32; TILE];
                for c in c0..c1 {
                    let chunk = &v.weights[c * CHUNK_BYTES..][..CHUNK_BYTES];
                    lookups(chunk, t.chunk_tables(n0 + n, c), &mut s);
                }
                let ts = t.scale(n0 + n, b);
                for (f, &s) in f.iter_mut().zip(&s) {
                    *f += ts * s as f32;
                }
            }
        }
        b0 = b1;
    }
    for f in acc.iter_mut() {
        for (y, &s) in f.iter_mut().zip(v.scales) {
            *y *= s;
        }
    }
}

/// `s[r] += Σ_t ±T_t[|u_t(r)|]` over the 8 triples of one chunk.
fn lookups(chunk: &[u8], tabs: &[i8], s: &mut [i32; TILE]) {
    let (nibbles, signs) = chunk.split_at(SIGN_OFFSET);
    for (t, (block, tab)) in nibbles
        .chunks_exact(NIBBLE_BYTES)
        .zip(tabs.chunks_exact(TABLE_BYTES))
        .enumerate()
    {
        let bit = 0x80u8 >> t;
        for (b, (&byte, &r)) in block.iter().zip(LO_ROW.iter()).enumerate() {
            let lo = i32::from(tab[usize::from(byte & 0x0F)]);
            let hi = i32::from(tab[usize::from(byte >> 4)]);
            s[r] += if signs[b] & bit != 0 { -lo } else { lo };
            s[r + 32] += if signs[32 + b] & bit != 0 { -hi } else { hi };
        }
    }
    debug_assert_eq!(tabs.len(), TRIPLES * TABLE_BYTES);
}
