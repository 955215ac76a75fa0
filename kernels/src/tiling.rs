//! The row × token tiling shared by the dense and int8 kernels of every SIMD ISA.
//!
//! A kernel computes a tile of `R` rows × `T` tokens at once (each loaded weight serves `T` tokens);
//! this driver walks the rows of a task in full tiles of [`ROW_TILE`] (single rows at the end) and the
//! tokens in pairs (a single token at the end), and stores every tile's results.

use crate::dense::RowRange;

/// Rows of a full tile. The int8 layout interleaves rows in groups of this size.
pub(crate) const ROW_TILE: usize = 4;

/// Tokens of a full tile.
pub(crate) const TOKEN_TILE: usize = 2;

/// A kernel that computes `R` consecutive rows times `T` consecutive tokens.
pub(crate) trait TileKernel {
    /// A weight element or block.
    type W;
    /// An activation element or block.
    type X;

    /// `R` rows of weights (`w`, `per_row` items each, in the kernel's layout) times `T` tokens
    /// (`x`, `per_row` items each): `[row][token]` results.
    fn tile<const R: usize, const T: usize>(
        &self,
        w: &[Self::W],
        x: &[Self::X],
        per_row: usize,
    ) -> [[f32; T]; R];
}

/// Runs `kernel` over every (row tile, token tile) of a task's rows and writes the results to `out`.
/// `w` holds the task's rows (`per_row` items each), `x` every token (`per_row` items each).
pub(crate) fn for_each_tile<K: TileKernel>(
    kernel: &K,
    w: &[K::W],
    x: &[K::X],
    per_row: usize,
    out: &mut RowRange<'_>,
) {
    if per_row == 0 {
        return;
    }
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
                (ROW_TILE, TOKEN_TILE) => store(
                    out,
                    row,
                    n,
                    kernel.tile::<ROW_TILE, TOKEN_TILE>(wt, xt, per_row),
                ),
                (ROW_TILE, _) => store(out, row, n, kernel.tile::<ROW_TILE, 1>(wt, xt, per_row)),
                (_, TOKEN_TILE) => {
                    store(out, row, n, kernel.tile::<1, TOKEN_TILE>(wt, xt, per_row))
                }
                _ => store(out, row, n, kernel.tile::<1, 1>(wt, xt, per_row)),
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
