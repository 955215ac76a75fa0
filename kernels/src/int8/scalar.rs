//! The portable reference kernel; every SIMD path must match it bit for bit.

use super::{hsum8, ActBlock, BlockScale, Codes, WeightBlock, BLOCK, ROW_TILE};
use crate::tiling::RowRange;

/// Computes the rows of `out` from their weight blocks `w` (tiles of 4 interleaved rows, then
/// row-major tail rows) and all tokens' activation blocks `x` (`[tokens][per_row]`).
pub(super) fn matmul_rows<S: BlockScale, C: Codes>(
    w: &[WeightBlock<S, C>],
    x: &[ActBlock],
    per_row: usize,
    out: &mut RowRange<'_>,
) {
    let rows = w.len() / per_row;
    let mut r = 0;
    while r < rows {
        let rt = if rows - r >= ROW_TILE { ROW_TILE } else { 1 };
        let tile = &w[r * per_row..(r + rt) * per_row];
        for i in 0..rt {
            for (n, xs) in out.tokens().zip(x.chunks_exact(per_row)) {
                out.set(n, out.start() + r + i, dot(tile, rt, i, xs));
            }
        }
        r += rt;
    }
}

/// Row `i` of a tile of `rt` interleaved rows times one token, in the lane order shared by every
/// ISA (see the module docs).
fn dot<S: BlockScale, C: Codes>(
    tile: &[WeightBlock<S, C>],
    rt: usize,
    i: usize,
    x: &[ActBlock],
) -> f32 {
    let mut acc = [0.0f32; 8];
    for (b, xb) in x.iter().enumerate() {
        let wb = &tile[b * rt + i];
        let q = wb.q.codes();
        let [lo, hi] = wb.d.halves();
        let scale = [lo * xb.d, hi * xb.d];
        for (j, lane) in acc.iter_mut().enumerate() {
            let k = 4 * j;
            let s: i32 = (k..k + 4)
                .map(|e| i32::from(q[e]) * i32::from(xb.q[e]))
                .sum();
            // Lanes 0..4 sum elements 0..16, lanes 4..8 elements 16..32.
            *lane = (s as f32).mul_add(scale[j / 4], *lane);
        }
    }
    debug_assert_eq!(BLOCK, 32);
    hsum8(acc)
}
