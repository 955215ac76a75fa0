//! The driver shared by the table-lookup kernels (bit planes in `lut`, ternary in `ternary`): it
//! splits a matmul over row tiles of [`TILE`] rows into tasks on the caller's threads and writes
//! each tile's accumulators to the output.
//!
//! - one token (GEMV): each thread owns a contiguous range of tiles, so its weights are one stream
//!   that the kernel's prefetch (which runs into the next tile) and the hardware prefetcher follow;
//! - several tokens (GEMM): each task owns a contiguous range of (token block, tile) pairs and walks
//!   it block by block, so the tables of a block stay in cache while the tiles go past, and each
//!   weight chunk is loaded once per block (the tokens of a block loop inside the tile kernel).
//!
//! One dispatch may cover several matrices that read the same tables (q/k/v): their tiles are
//! numbered one after the other.

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::lut::layout::TILE;

/// Most matrices one dispatch covers (a layer's q/k/v is three); callers run more in several.
pub(crate) const MAX_PARTS: usize = 4;

/// Checks the arguments of a many-matrix matmul (`what` names its outputs in errors): one output
/// per matrix, every matrix's K equal to the tables' `cols`, every output `tokens · rows` long, where
/// `shape(p)` is matrix `p`'s (K, rows).
pub(crate) fn check_parts(
    what: &'static str,
    shape: impl Fn(usize) -> (usize, usize),
    matrices: usize,
    cols: usize,
    tokens: usize,
    outs: &[&mut [f32]],
) -> Result<()> {
    if matrices != outs.len() {
        return Err(KernelError::LengthMismatch {
            what: "matmul outputs (one per matrix)",
            expected: matrices,
            got: outs.len(),
        });
    }
    for (p, out) in outs.iter().enumerate() {
        let (k, rows) = shape(p);
        if k != cols {
            return Err(KernelError::ShapeMismatch {
                matrix: k,
                activations: cols,
            });
        }
        if out.len() != tokens * rows {
            return Err(KernelError::LengthMismatch {
                what,
                expected: tokens * rows,
                got: out.len(),
            });
        }
    }
    Ok(())
}

/// An output pointer shared by the tile tasks; each task writes only the rows of its own tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (distinct tiles = distinct rows of one output, or distinct
// outputs), and `run_tiles` waits for all of them before the `&mut [f32]`s they came from are used
// again.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// The row tiles of several matrices that read the same tables, numbered one after the other.
struct Parts {
    count: usize,
    /// `first[p]`: the global number of part `p`'s first tile; `first[count]` is the total.
    first: [usize; MAX_PARTS + 1],
    rows: [usize; MAX_PARTS],
    outs: [OutPtr; MAX_PARTS],
}

impl Parts {
    /// The part and local tile of global tile `g`.
    fn locate(&self, g: usize) -> (usize, usize) {
        let p = (0..self.count)
            .rfind(|&p| self.first[p] <= g)
            .unwrap_or_default();
        (p, g - self.first[p])
    }
}

/// `outs[p][n][r]` for `tokens` tokens and every row of each part `p`, where `shape(p)` is part
/// `p`'s (row tiles, rows) and `outs[p]` holds `tokens · rows` values (at most [`MAX_PARTS`]
/// parts). All parts' tiles share one dispatch, so small matrices that read the same input (q, k,
/// v) cost one hand-over between threads, and their tiles balance together.
///
/// `gemv(p, tile, acc)` fills `acc[0]` with tile `tile` of part `p` for the only token; `gemm(p,
/// tile, n0, nb, acc)` fills `acc[n]` for tokens `n0 + n`, `n < nb <= NB`. Rows past a part's
/// `rows` in its last tile are computed and dropped.
///
/// One token: the tiles are cut into one contiguous range per thread. Handing out single tiles
/// instead (each thread taking the next free one) made the threads alternate tiles, so every tile
/// started with a cold stream (the prefetch at the end of a tile fetched the other thread's next
/// tile): SmolLM2 decode on 2 threads ran at 190–200 t/s that way and 280 t/s with ranges. Several
/// tokens: the (token block, tile) pairs, block by block, are cut into one contiguous range per
/// thread, so each thread gets the same number of tile calls whatever the tile count (9 tiles on 2
/// threads would otherwise split 5/4); inside a range the tables of a block stay in cache while
/// the tiles go past, and each weight chunk is loaded once per block.
pub(crate) fn run_tiles<const NB: usize>(
    cpu: &Cpu,
    outs: &mut [&mut [f32]],
    shape: impl Fn(usize) -> (usize, usize),
    tokens: usize,
    gemv: impl Fn(usize, usize, &mut [[f32; TILE]; 1]) + Sync,
    gemm: impl Fn(usize, usize, usize, usize, &mut [[f32; TILE]; NB]) + Sync,
) {
    assert!(
        outs.len() <= MAX_PARTS,
        "at most MAX_PARTS parts per dispatch"
    );
    let mut parts = Parts {
        count: outs.len(),
        first: [0; MAX_PARTS + 1],
        rows: [0; MAX_PARTS],
        outs: [OutPtr(std::ptr::null_mut()); MAX_PARTS],
    };
    for (p, out) in outs.iter_mut().enumerate() {
        let (tiles, rows) = shape(p);
        assert_eq!(
            out.len(),
            tokens * rows,
            "output length checked by the caller"
        );
        assert!(tiles * TILE >= rows, "every row belongs to a tile");
        parts.first[p + 1] = parts.first[p] + tiles;
        parts.rows[p] = rows;
        parts.outs[p] = OutPtr(out.as_mut_ptr());
    }
    let total = parts.first[parts.count];
    if tokens == 0 || total == 0 {
        return;
    }
    let parts = &parts;
    // Writes the accumulators of global tile `g`, tokens n0.., to its part's output.
    let write = |p: usize, tile: usize, n0: usize, acc: &[[f32; TILE]]| {
        let rows = parts.rows[p];
        let r0 = tile * TILE;
        if r0 >= rows {
            return;
        }
        let nrows = TILE.min(rows - r0);
        for (n, row) in acc.iter().enumerate() {
            // SAFETY: n0 + n < tokens and r0 + nrows <= rows, so the range lies inside part p's
            // output (length tokens·rows); no other task writes these rows of it (tasks own
            // disjoint (block, tile) pairs, and a tile's rows belong to that tile only).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    row.as_ptr(),
                    parts.outs[p].0.add((n0 + n) * rows + r0),
                    nrows,
                );
            }
        }
    };
    if tokens == 1 {
        let ranges = cpu.threads().min(total).max(1);
        cpu.for_each_index(ranges, |range| {
            for g in total * range / ranges..total * (range + 1) / ranges {
                let (p, tile) = parts.locate(g);
                let mut acc = [[0.0f32; TILE]; 1];
                gemv(p, tile, &mut acc);
                write(p, tile, 0, &acc);
            }
        });
        return;
    }
    let blocks = tokens.div_ceil(NB);
    let units = blocks * total;
    let ranges = cpu.threads().min(units).max(1);
    cpu.for_each_index(ranges, |range| {
        let mut acc = [[0.0f32; TILE]; NB];
        for unit in units * range / ranges..units * (range + 1) / ranges {
            let (block, g) = (unit / total, unit % total);
            let n0 = block * NB;
            let nb = NB.min(tokens - n0);
            let (p, tile) = parts.locate(g);
            gemm(p, tile, n0, nb, &mut acc);
            write(p, tile, n0, &acc[..nb]);
        }
    });
}
