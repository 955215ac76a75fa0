//! The driver shared by the table-lookup kernels (bit planes in `lut`, ternary in `ternary`): it
//! splits a matmul over row tiles of [`TILE`] rows into tasks on the caller's threads and writes
//! each tile's accumulators to the output.
//!
//! - one token (GEMV): one task per tile, so the weights stream through memory once;
//! - several tokens (GEMM): each task owns a contiguous range of tiles and walks it once per block
//!   of `NB` tokens, so the tables of a block stay in cache while the tiles go past, and each weight
//!   chunk is loaded once per block (the tokens of a block loop inside the tile kernel).

use crate::cpu::Cpu;
use crate::lut::layout::TILE;

/// The output pointer shared by the tile tasks; each task writes only the rows of its own tiles.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (distinct tiles = distinct rows), and `run_tiles` waits for
// all of them before the `&mut [f32]` it came from is used again.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `out[n][r]` for `tokens` tokens and `rows` rows held in `tiles` row tiles.
///
/// `gemv(tile, acc)` fills `acc[0]` with tile `tile`'s rows for the only token; `gemm(tile, n0, nb,
/// acc)` fills `acc[n]` for tokens `n0 + n`, `n < nb <= NB`. Rows past `rows` in the last tile are
/// computed and dropped.
pub(crate) fn run_tiles<const NB: usize>(
    cpu: &Cpu,
    tiles: usize,
    rows: usize,
    tokens: usize,
    out: &mut [f32],
    gemv: impl Fn(usize, &mut [[f32; TILE]; 1]) + Sync,
    gemm: impl Fn(usize, usize, usize, &mut [[f32; TILE]; NB]) + Sync,
) {
    assert_eq!(
        out.len(),
        tokens * rows,
        "output length checked by the caller"
    );
    assert!(tiles * TILE >= rows, "every row belongs to a tile");
    if tokens == 0 || rows == 0 {
        return;
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Writes the accumulators of tile `tile`, tokens n0.., to `out`.
    let write = |tile: usize, n0: usize, acc: &[[f32; TILE]]| {
        let r0 = tile * TILE;
        let nrows = TILE.min(rows - r0);
        for (n, row) in acc.iter().enumerate() {
            // SAFETY: n0 + n < tokens and r0 + nrows <= rows, so the range lies inside `out`
            // (length tokens·rows); no other task writes rows r0..r0+nrows (tasks own disjoint
            // tiles).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    row.as_ptr(),
                    out_ptr.get().add((n0 + n) * rows + r0),
                    nrows,
                );
            }
        }
    };
    if tokens == 1 {
        cpu.for_each_index(tiles, |tile| {
            let mut acc = [[0.0f32; TILE]; 1];
            gemv(tile, &mut acc);
            write(tile, 0, &acc);
        });
        return;
    }
    let ranges = cpu.threads().min(tiles).max(1);
    let per_range = tiles.div_ceil(ranges);
    cpu.for_each_index(ranges, |range| {
        let mut acc = [[0.0f32; TILE]; NB];
        let range_tiles = range * per_range..((range + 1) * per_range).min(tiles);
        let mut n0 = 0;
        while n0 < tokens {
            let nb = NB.min(tokens - n0);
            for tile in range_tiles.clone() {
                gemm(tile, n0, nb, &mut acc);
                write(tile, n0, &acc[..nb]);
            }
            n0 += nb;
        }
    });
}
