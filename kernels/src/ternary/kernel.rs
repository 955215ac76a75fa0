//! The packed ternary layout, the borrowed views the tile kernels read, and the driver that splits a
//! matmul into tile tasks over the caller's threads (as `lut::run` does for the bit-plane kernels).
//!
//! Rows are tiled by 64 ([`TILE`]). K is cut into chunks of 8 triples (24 columns); per (tile,
//! chunk) the weights take [`CHUNK_BYTES`] = 320 bytes:
//! - 8 blocks of 32 bytes, one per triple `t`: byte `b` holds the magnitude index of row
//!   `lo_row(b)` in its low nibble and of row `lo_row(b) + 32` in its high nibble (the row order
//!   of `lut::layout`, so AVX2's unpack + maddubs leaves rows in order);
//! - 64 sign bytes: byte `b` for row `lo_row(b)`, byte `32 + b` for row `lo_row(b) + 32`; bit
//!   `7 − t` is set when triple `t` of that row is negated.
//!
//! Every tile kernel computes, per row and token, `F += tscale_b · S_b` for each table block `b`
//! (`S_b` the exact integer sum of the signed lookups of the block), then `y = F · scale_row`:
//! the same float operations in the same order in every ISA, so results agree bit for bit.

use super::{BLOCK_TRIPLES, TABLE_BYTES};
use crate::cpu::Cpu;
use crate::isa::Isa;
use crate::lut::layout::TILE;
use crate::tiling::{run_row_tasks, Split};

/// Triples per chunk (one sign byte per row).
pub(crate) const TRIPLES: usize = 8;
/// Columns per chunk.
pub(crate) const CHUNK_COLS: usize = 3 * TRIPLES;
/// Bytes of magnitude nibbles per (tile, triple).
pub(crate) const NIBBLE_BYTES: usize = 32;
/// Offset of the sign bytes in a chunk.
pub(crate) const SIGN_OFFSET: usize = TRIPLES * NIBBLE_BYTES;
/// Bytes per (tile, chunk): 1536 weights in 320 bytes = 1.67 bits per weight.
pub(crate) const CHUNK_BYTES: usize = SIGN_OFFSET + 2 * 32;
/// Chunks per table-scale block.
pub(crate) const BLOCK_CHUNKS: usize = BLOCK_TRIPLES / TRIPLES;
/// Tokens per block in the GEMM loop.
pub(crate) const NB: usize = 16;
/// Tasks own whole tiles and token blocks, one contiguous range per thread (see [`crate::tiling`]).
const TILE_SPLIT: Split = Split {
    tile_rows: TILE,
    token_block: NB,
    tasks_per_thread: 1,
};

/// Table blocks of weights (per tile) that the tokens of a token block go over before moving on:
/// 16 chunks = 5 KiB, which stays in L1.
pub(crate) const SPAN: usize = 16 / BLOCK_CHUNKS;

const _: () = assert!(TILE == 64 && BLOCK_TRIPLES.is_multiple_of(TRIPLES) && TABLE_BYTES == 16);

/// A whole packed matrix, borrowed from [`super::TernaryMatrix`].
pub(crate) struct Weights<'a> {
    pub tiles: usize,
    pub chunks: usize,
    /// `[tile][chunk][CHUNK_BYTES]`.
    pub weights: &'a [u8],
    /// `[tile][64]`.
    pub scales: &'a [f32],
}

impl Weights<'_> {
    fn tile(&self, tile: usize) -> TileView<'_> {
        let bytes = self.chunks * CHUNK_BYTES;
        TileView {
            chunks: self.chunks,
            weights: &self.weights[tile * bytes..][..bytes],
            scales: &self.scales[tile * TILE..][..TILE],
        }
    }
}

/// One tile of a packed matrix.
pub(crate) struct TileView<'a> {
    pub chunks: usize,
    /// `[chunk][CHUNK_BYTES]`.
    pub weights: &'a [u8],
    /// `[64]` row scales.
    pub scales: &'a [f32],
}

impl TileView<'_> {
    /// Table blocks of the tile.
    pub fn blocks(&self) -> usize {
        (self.chunks * TRIPLES).div_ceil(BLOCK_TRIPLES)
    }

    /// Chunks `c0..c1` of table block `b`.
    #[inline]
    pub fn block_chunks(&self, b: usize) -> (usize, usize) {
        let c0 = b * BLOCK_CHUNKS;
        (c0, (c0 + BLOCK_CHUNKS).min(self.chunks))
    }

    /// Whether every slice has the length the kernels index it with (what makes the SIMD reads
    /// sound).
    fn is_consistent(&self, t: &TabView<'_>, n0: usize, nb: usize, acc: usize) -> bool {
        self.weights.len() == self.chunks * CHUNK_BYTES
            && self.scales.len() == TILE
            && t.triples == self.chunks * TRIPLES
            && t.blocks == self.blocks()
            && t.tables.len() == t.tokens * t.triples * TABLE_BYTES
            && t.scales.len() == t.tokens * t.blocks
            && nb <= acc
            && n0 + nb <= t.tokens
    }
}

/// Built tables, borrowed from [`super::TernaryTables`].
pub(crate) struct TabView<'a> {
    pub tokens: usize,
    /// Triples per token (whole chunks).
    pub triples: usize,
    /// Table blocks per token.
    pub blocks: usize,
    /// `[token][triple][16]` int8.
    pub tables: &'a [i8],
    /// `[token][block]`.
    pub scales: &'a [f32],
}

impl TabView<'_> {
    /// The tables of chunk `c` of `token` (8 tables, 128 bytes).
    #[inline]
    pub fn chunk_tables(&self, token: usize, c: usize) -> &[i8] {
        const BYTES: usize = TRIPLES * TABLE_BYTES;
        &self.tables[(token * self.triples + c * TRIPLES) * TABLE_BYTES..][..BYTES]
    }

    /// The table scale of block `b` of `token`.
    #[inline]
    pub fn scale(&self, token: usize, b: usize) -> f32 {
        self.scales[token * self.blocks + b]
    }
}

/// Computes, for tokens `n0..n0+nb`, `acc[n][r] = y` of every row of the tile.
type TileKernel = fn(&TileView<'_>, &TabView<'_>, usize, &mut [[f32; TILE]]);

fn kernel(isa: Isa) -> TileKernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2_tile,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon_tile,
        _ => scalar_tile,
    }
}

fn scalar_tile(v: &TileView<'_>, t: &TabView<'_>, n0: usize, acc: &mut [[f32; TILE]]) {
    assert!(
        v.is_consistent(t, n0, acc.len(), NB),
        "inconsistent ternary tile"
    );
    super::scalar::tile(v, t, n0, acc);
}

/// Only reachable through [`kernel`] with `Isa::Avx2`, which a [`Cpu`] holds only when supported.
#[cfg(target_arch = "x86_64")]
fn avx2_tile(v: &TileView<'_>, t: &TabView<'_>, n0: usize, acc: &mut [[f32; TILE]]) {
    assert!(
        v.is_consistent(t, n0, acc.len(), NB),
        "inconsistent ternary tile"
    );
    // SAFETY: `Cpu::with_isa` checked avx2+fma+f16c before a Cpu with Isa::Avx2 could exist, and
    // the slice lengths the kernel relies on were checked just above.
    unsafe { super::avx2::tile(v, t, n0, acc) }
}

/// Only reachable through [`kernel`] with `Isa::Neon`, which a [`Cpu`] holds only when supported.
#[cfg(target_arch = "aarch64")]
fn neon_tile(v: &TileView<'_>, t: &TabView<'_>, n0: usize, acc: &mut [[f32; TILE]]) {
    assert!(
        v.is_consistent(t, n0, acc.len(), NB),
        "inconsistent ternary tile"
    );
    // SAFETY: `Cpu::with_isa` checked NEON support, and the slice lengths were checked just above.
    unsafe { super::neon::tile(v, t, n0, acc) }
}

/// `outs[p][n][r]` for every token of `t` and every row of each matrix `p` (at most
/// [`crate::tiling::MAX_PARTS`]), in one dispatch; `matrix(p)` gives matrix `p`'s packed form
/// and rows. The caller checked that the tables and every matrix agree on K and that
/// `outs[p].len() == t.tokens · rows`.
pub(crate) fn run<'w>(
    cpu: &Cpu,
    matrix: impl Fn(usize) -> (Weights<'w>, usize) + Sync,
    t: &TabView<'_>,
    outs: &mut [&mut [f32]],
) {
    let kernel = kernel(cpu.isa());
    let tokens = t.tokens;
    run_row_tasks(
        cpu,
        outs,
        |p| matrix(p).1,
        tokens,
        TILE_SPLIT,
        |p, out| {
            let w = matrix(p).0;
            let tiles = (out.start()..out.end()).step_by(TILE);
            assert!(out.end() <= w.tiles * TILE, "every row belongs to a tile");
            if tokens == 1 {
                for r0 in tiles {
                    let mut acc = [[0.0f32; TILE]; 1];
                    kernel(&w.tile(r0 / TILE), t, 0, &mut acc);
                    out.write_tile(0, r0, &acc);
                }
                return;
            }
            let (first, nb) = (out.tokens().start, out.tokens().len());
            let mut acc = [[0.0f32; TILE]; NB];
            for r0 in tiles {
                kernel(&w.tile(r0 / TILE), t, first, &mut acc[..nb]);
                out.write_tile(first, r0, &acc[..nb]);
            }
        },
    );
}
