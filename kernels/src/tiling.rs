//! How a matmul is cut into tasks and tiles, for every matrix kind.
//!
//! [`run_row_tasks`] is the one driver: it numbers the row tiles of one or more outputs one after
//! the other, pairs them with token blocks, cuts the (token block, tile) pairs into contiguous
//! ranges, a few per thread, and hands each task a [`RowRange`] per (output, token block) run of its
//! range: write access to exactly those rows of those tokens.
//!
//! - Table-lookup kernels (bit planes in `lut`, ternary in `ternary`) use tiles of 64 rows and
//!   token blocks of 16; with one token each thread owns one contiguous range of
//!   tiles, so its weights are one stream that the kernel's prefetch (which runs into the next
//!   tile) and the hardware prefetcher follow. Handing out single tiles instead made the threads
//!   alternate tiles, so every tile started with a cold stream: SmolLM2 decode on 2 threads ran at
//!   190–200 t/s that way and 280 t/s with ranges. With several tokens a range walks block by block,
//!   so the tables of a block stay in cache while the tiles go past, and each thread gets the same
//!   number of tile calls whatever the tile count.
//! - Dense and int8 kernels use tiles of [`ROW_TILE`] rows, all tokens in one block and four ranges
//!   per thread; inside a range [`for_each_tile`] walks micro-tiles of [`ROW_TILE`] rows ×
//!   [`TOKEN_TILE`] tokens (single rows and tokens at the ends).

mod out_rows;

pub(crate) use out_rows::{check_parts, RowRange, MAX_PARTS};

use crate::cpu::Cpu;
use out_rows::OutputParts;

/// Rows of a full micro-tile of the dense and int8 kernels. The int8 layout interleaves rows in
/// groups of this size.
pub(crate) const ROW_TILE: usize = 4;

/// Tokens of a full micro-tile of the dense and int8 kernels.
pub(crate) const TOKEN_TILE: usize = 2;

/// How [`run_row_tasks`] cuts the work.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Split {
    /// Rows per tile: tasks own whole tiles, so ranges start at multiples of this.
    pub tile_rows: usize,
    /// Tokens per block: tasks own whole (block, tile) pairs.
    pub token_block: usize,
    /// Tasks per thread (more balance uneven progress; one keeps each thread's weights one stream).
    pub tasks_per_thread: usize,
}

/// Calls `work(p, range)` for disjoint ranges covering every row of every token of each output
/// `outs[p]` (`[tokens][rows(p)]`, at most [`MAX_PARTS`] outputs), spread over the threads of `cpu`.
///
/// Every range covers whole tiles of one output (the last tile of an output may be short) and one
/// token block. All outputs share one dispatch, so small matrices that read the same input (q, k, v)
/// cost one hand-over between threads and their tiles balance together. The callers check the
/// output lengths; a wrong one panics here.
pub(crate) fn run_row_tasks(
    cpu: &Cpu,
    outs: &mut [&mut [f32]],
    rows: impl Fn(usize) -> usize,
    tokens: usize,
    split: Split,
    work: impl Fn(usize, &mut RowRange<'_>) + Sync,
) {
    let parts = OutputParts::new(outs, rows, tokens);
    let tile_rows = split.tile_rows.max(1);
    let token_block = split.token_block.max(1);
    // `first[p]`: the global number of output p's first tile; `first[count]` is the total.
    let mut first = [0usize; MAX_PARTS + 1];
    for p in 0..parts.count() {
        first[p + 1] = first[p] + parts.rows(p).div_ceil(tile_rows);
    }
    let total = first[parts.count()];
    if tokens == 0 || total == 0 {
        return;
    }
    let blocks = tokens.div_ceil(token_block);
    let units = blocks * total;
    let ranges = if cpu.threads() == 1 {
        1
    } else {
        (cpu.threads() * split.tasks_per_thread.max(1)).min(units)
    };
    let parts = &parts;
    let first = &first;
    cpu.for_each_index(ranges, |range| {
        let (mut unit, end) = (units * range / ranges, units * (range + 1) / ranges);
        // Each run of units with the same block and output becomes one row range.
        while unit < end {
            let (block, g) = (unit / total, unit % total);
            let p = (0..parts.count())
                .rfind(|&p| first[p] <= g)
                .unwrap_or_default();
            let last = (end - block * total).min(first[p + 1]);
            let row_start = (g - first[p]) * tile_rows;
            let row_end = ((last - first[p]) * tile_rows).min(parts.rows(p));
            let n0 = block * token_block;
            let n1 = (n0 + token_block).min(tokens);
            // SAFETY: `for_each_index` runs each `range` exactly once, also while other threads
            // dispatch on the same `Cpu` or when this call is nested in a job (see `Cpu`); the
            // ranges' units are disjoint (contiguous pieces of 0..units), and units map one to
            // one to (token block, output, tile); a row range covers only the rows of its tiles
            // and the tokens of its block, so no two live ranges share an element.
            let mut out = unsafe { parts.range(p, row_start..row_end, n0..n1) };
            work(p, &mut out);
            unit += last - g;
        }
    });
}

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

/// Runs `kernel` over every (row tile, token tile) of a range's rows and writes the results to
/// `out`. `w` holds the range's rows (`per_row` items each), `x` the range's tokens (`per_row`
/// items each).
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
    let first_token = out.tokens().start;
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
            let (row, token) = (out.start() + r, first_token + n);
            match (rt, nt) {
                (ROW_TILE, TOKEN_TILE) => store(
                    out,
                    row,
                    token,
                    kernel.tile::<ROW_TILE, TOKEN_TILE>(wt, xt, per_row),
                ),
                (ROW_TILE, _) => {
                    store(out, row, token, kernel.tile::<ROW_TILE, 1>(wt, xt, per_row))
                }
                (_, TOKEN_TILE) => store(
                    out,
                    row,
                    token,
                    kernel.tile::<1, TOKEN_TILE>(wt, xt, per_row),
                ),
                _ => store(out, row, token, kernel.tile::<1, 1>(wt, xt, per_row)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Isa;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every element of every output is handed to exactly one range, whatever the split.
    #[test]
    fn ranges_cover_every_element_once() {
        for threads in [1, 2, 3] {
            let cpu = Cpu::with_isa(Isa::Scalar, threads).unwrap();
            for (tile_rows, token_block, per_thread) in [(64, 16, 1), (4, 1000, 4), (1, 3, 2)] {
                for tokens in [1, 2, 5, 33] {
                    let rows = [130usize, 7, 64];
                    let mut bufs: Vec<Vec<f32>> =
                        rows.iter().map(|&r| vec![0.0; r * tokens]).collect();
                    let mut outs: Vec<&mut [f32]> =
                        bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                    let visited = AtomicUsize::new(0);
                    let split = Split {
                        tile_rows,
                        token_block,
                        tasks_per_thread: per_thread,
                    };
                    run_row_tasks(
                        &cpu,
                        &mut outs,
                        |p| rows[p],
                        tokens,
                        split,
                        |p, out| {
                            assert!(
                                out.start().is_multiple_of(tile_rows),
                                "range starts inside a tile"
                            );
                            visited.fetch_add(
                                out.tokens().len() * (out.end() - out.start()),
                                Ordering::Relaxed,
                            );
                            for n in out.tokens() {
                                for r in out.start()..out.end() {
                                    out.set(n, r, (p * 1_000_000 + n * 1000 + r + 1) as f32);
                                }
                            }
                        },
                    );
                    let elements: usize = rows.iter().map(|r| r * tokens).sum();
                    assert_eq!(
                        visited.load(Ordering::Relaxed),
                        elements,
                        "an element visited twice"
                    );
                    for (p, buf) in bufs.iter().enumerate() {
                        for (i, &v) in buf.iter().enumerate() {
                            let (n, r) = (i / rows[p], i % rows[p]);
                            assert_eq!(v, (p * 1_000_000 + n * 1000 + r + 1) as f32);
                        }
                    }
                }
            }
        }
    }
}
