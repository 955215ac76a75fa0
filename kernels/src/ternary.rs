//! Ternary (BitNet b1.58) weights at 1.67 bits per weight, in the TL2 packing of bitnet.cpp.
//!
//! Three weights `(w0, w1, w2) ∈ {−1, 0, 1}³` read as one balanced-ternary number
//! `u = 9·w0 + 3·w1 + w2 ∈ −13..=13`, stored as a 4-bit magnitude index `|u|` (14 patterns up to
//! sign) and one sign bit: 5 bits per 3 weights. For every triple of activations a 16-entry int8
//! table `T[i] = Σ_d digit_d(i)·x_d` holds its dot product with each pattern ([`TernaryTables`],
//! built once per token); the multiply looks up `T[|u|]` for 32 rows per instruction (`pshufb` on
//! AVX2, `tbl` on NEON), negates where the sign bit is set, and sums in int16. Compared with the
//! 2-bit plane form of [`crate::PackedMatrix`] it moves 17% fewer bytes and does a third fewer
//! lookups, for a conditional negation per lookup.
//!
//! ```
//! use lutra_kernels::{Cpu, Grouping, TernaryMatrix, TernaryTables, TernaryWeights};
//!
//! let (rows, cols) = (4, 96);
//! // Codes 0, 1, 2 mean −1, 0, +1 (times the row's scale).
//! let codes: Vec<u8> = (0..rows * cols).map(|i| (i % 3) as u8).collect();
//! let scales = [0.5f32, 1.0, 1.0, 2.0];
//! let weights = TernaryWeights { rows, cols, grouping: Grouping::PerRow, codes: &codes, scales: &scales };
//! let m = TernaryMatrix::pack(&weights).unwrap();
//!
//! let cpu = Cpu::new(1).unwrap();
//! let mut tables = TernaryTables::new(cols);
//! tables.build(&cpu, &vec![1.0f32; cols], 1).unwrap();
//! let mut out = vec![0.0f32; rows];
//! m.matmul(&cpu, &tables, &mut out).unwrap();
//! // Every row holds as many −1 as +1, so its dot with ones is 0.
//! assert!(out.iter().all(|v| v.abs() < 1e-3));
//! ```

mod kernel;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::lut::layout::{ROW_BYTE, TILE};
use crate::packed::Grouping;
use crate::tiling::{check_parts, MAX_PARTS};
use kernel::{TabView, Weights, CHUNK_BYTES, CHUNK_COLS, NIBBLE_BYTES, SIGN_OFFSET, TRIPLES};

/// Triples of activations sharing one int8 table scale: one chunk (24 activations). Blocks of 16
/// triples are a little faster but exceed 1e-4 NMSE with 50× outliers.
pub(crate) const BLOCK_TRIPLES: usize = 8;
/// Bytes of one triple's table (14 entries used, 2 zero).
pub(crate) const TABLE_BYTES: usize = 16;
// The table-build split (`tables::table_build_chunk`) cuts at whole bit-plane tables.
const _: () = assert!(TABLE_BYTES == crate::lut::layout::TABLE_BYTES);
/// Used entries of a table: the magnitudes 0..=13.
const PATTERNS: usize = 14;

/// The balanced-ternary digits `(d0, d1, d2)` of each magnitude index `i = 9·d0 + 3·d1 + d2`.
const DIGITS: [[i8; 3]; PATTERNS] = {
    let mut t = [[0i8; 3]; PATTERNS];
    let mut i = 0;
    while i < PATTERNS {
        // The digits of i in balanced ternary (each in −1..=1), most significant first.
        let mut v = i as i32;
        let mut d = 3;
        while d > 0 {
            d -= 1;
            let mut r = v % 3;
            v /= 3;
            if r == 2 {
                r = -1;
                v += 1;
            }
            t[i][d] = r as i8;
        }
        i += 1;
    }
    t
};

/// Ternary weights as decoded from a file: the input of [`TernaryMatrix::pack`].
#[derive(Clone, Copy, Debug)]
pub struct TernaryWeights<'a> {
    /// Output features (M).
    pub rows: usize,
    /// Input features (K); a multiple of 32.
    pub cols: usize,
    /// [`Grouping::PerRow`] or [`Grouping::PerTensor`] (a group of K elements counts as per row);
    /// smaller groups would split the triples and are refused.
    pub grouping: Grouping,
    /// One code per element, row-major `[rows][cols]`: 0, 1, 2 for −1, 0, +1.
    pub codes: &'a [u8],
    /// `w = scale·(code − 1)`: one scale per row, or one for the tensor.
    pub scales: &'a [f32],
}

/// A ternary matrix packed 3 weights to 5 bits (magnitude nibble + sign bit), in row tiles of 64.
pub struct TernaryMatrix {
    rows: usize,
    cols: usize,
    tiles: usize,
    chunks: usize,
    per_tensor: bool,
    /// `[tile][chunk][CHUNK_BYTES]`: 8 blocks of 32 nibble bytes (one per triple), then 64 sign bytes.
    weights: Vec<u8>,
    /// `[tile][64]` row scales; padded rows hold 0.
    scales: Vec<f32>,
}

/// Chunks of 8 triples (24 columns) covering `cols`.
fn chunks_of(cols: usize) -> usize {
    cols.div_ceil(CHUNK_COLS)
}

/// Table-scale blocks of [`BLOCK_TRIPLES`] covering `chunks` chunks.
fn blocks_of(chunks: usize) -> usize {
    (chunks * TRIPLES).div_ceil(BLOCK_TRIPLES)
}

impl TernaryMatrix {
    /// Checks the codes, scales and shape and packs them; K is padded with zero weights to whole
    /// chunks of 24 columns.
    pub fn pack(w: &TernaryWeights<'_>) -> Result<TernaryMatrix> {
        let (rows, cols) = (w.rows, w.cols);
        if cols == 0 || !cols.is_multiple_of(32) {
            return Err(KernelError::KNotMultipleOf32(cols));
        }
        let per_tensor = match w.grouping {
            Grouping::PerTensor => true,
            Grouping::PerRow => false,
            Grouping::Size(g) if g == cols => false,
            Grouping::Size(g) => return Err(KernelError::TernaryGrouping { group: g, cols }),
        };
        let expected = rows.checked_mul(cols);
        if expected != Some(w.codes.len()) {
            return Err(KernelError::LengthMismatch {
                what: "ternary codes",
                expected: expected.unwrap_or(usize::MAX),
                got: w.codes.len(),
            });
        }
        let nscales = if per_tensor { 1 } else { rows };
        if w.scales.len() != nscales {
            return Err(KernelError::LengthMismatch {
                what: "ternary scales",
                expected: nscales,
                got: w.scales.len(),
            });
        }
        if let Some((index, &value)) = w.scales.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(KernelError::ScaleOutOfRange { index, value });
        }

        let tiles = rows.div_ceil(TILE);
        let chunks = chunks_of(cols);
        let tile_bytes = chunks * CHUNK_BYTES;
        let mut packed = vec![0u8; tiles * tile_bytes];
        let mut scales = vec![0.0f32; tiles * TILE];
        for (r, row) in w.codes.chunks_exact(cols).enumerate() {
            let (tile, rr) = (r / TILE, r % TILE);
            scales[r] = w.scales[if per_tensor { 0 } else { r }];
            let byte = ROW_BYTE[rr % 32];
            let high = rr >= 32;
            let base = tile * tile_bytes;
            for (j, triple) in row.chunks(3).enumerate() {
                let mut u = 0i32;
                for d in 0..3 {
                    // Columns past K (the last triple of a row may be partial) are zero weights.
                    let code = triple.get(d).copied().unwrap_or(1);
                    if code > 2 {
                        return Err(KernelError::TernaryCodeOutOfRange {
                            code,
                            index: r * cols + 3 * j + d,
                        });
                    }
                    u = 3 * u + i32::from(code) - 1;
                }
                let (c, t) = (j / TRIPLES, j % TRIPLES);
                let chunk = base + c * CHUNK_BYTES;
                let magnitude = u.unsigned_abs() as u8;
                packed[chunk + t * NIBBLE_BYTES + byte] |=
                    if high { magnitude << 4 } else { magnitude };
                if u < 0 {
                    let sign = chunk + SIGN_OFFSET + if high { 32 } else { 0 } + byte;
                    packed[sign] |= 0x80 >> t;
                }
            }
        }
        Ok(TernaryMatrix {
            rows,
            cols,
            tiles,
            chunks,
            per_tensor,
            weights: packed,
            scales,
        })
    }

    /// Output features (M).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (K).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// [`Grouping::PerTensor`] or [`Grouping::PerRow`], as packed.
    pub fn grouping(&self) -> Grouping {
        if self.per_tensor {
            Grouping::PerTensor
        } else {
            Grouping::PerRow
        }
    }

    /// Bytes of packed weights and scales (what one GEMV streams from memory).
    pub fn bytes(&self) -> usize {
        self.weights.len() + 4 * self.rows
    }

    /// Bits per weight of the packed form, padding and scales included.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.bytes() as f64 / (self.rows * self.cols).max(1) as f64
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` for every token `n` of `tables`; `out` is `[n][rows]`.
    pub fn matmul(&self, cpu: &Cpu, tables: &TernaryTables, out: &mut [f32]) -> Result<()> {
        TernaryMatrix::matmul_many(cpu, tables, &[self], &mut [out])
    }

    /// [`TernaryMatrix::matmul`] of each matrix `mats[p]` into `outs[p]`, all reading the same
    /// `tables`, in one hand-over to the threads (see [`crate::PackedMatrix::matmul_many`]).
    pub fn matmul_many(
        cpu: &Cpu,
        tables: &TernaryTables,
        mats: &[&TernaryMatrix],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        check_parts(
            "ternary matmul output",
            |p| (mats[p].cols, mats[p].rows),
            mats.len(),
            tables.cols,
            tables.tokens,
            outs,
        )?;
        let t = tables.view();
        for (mats, outs) in mats.chunks(MAX_PARTS).zip(outs.chunks_mut(MAX_PARTS)) {
            kernel::run(cpu, |p| (mats[p].view(), mats[p].rows), &t, outs);
        }
        Ok(())
    }

    /// Row `r` as f32 (`w = scale·(code − 1)`), for reference paths and tests.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows {
            return Err(KernelError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        if out.len() != self.cols {
            return Err(KernelError::LengthMismatch {
                what: "dequantized row",
                expected: self.cols,
                got: out.len(),
            });
        }
        let (tile, rr) = (row / TILE, row % TILE);
        let byte = ROW_BYTE[rr % 32];
        let high = rr >= 32;
        let base = tile * self.chunks * CHUNK_BYTES;
        let scale = self.scales[row];
        for (j, triple) in out.chunks_mut(3).enumerate() {
            let (c, t) = (j / TRIPLES, j % TRIPLES);
            let chunk = base + c * CHUNK_BYTES;
            let nibbles = self.weights[chunk + t * NIBBLE_BYTES + byte];
            let magnitude = if high { nibbles >> 4 } else { nibbles & 0x0F };
            let signs = self.weights[chunk + SIGN_OFFSET + if high { 32 } else { 0 } + byte];
            let sign = if signs & (0x80 >> t) != 0 { -1.0 } else { 1.0 };
            let digits = DIGITS[usize::from(magnitude).min(PATTERNS - 1)];
            for (w, &d) in triple.iter_mut().zip(&digits) {
                *w = scale * sign * f32::from(d);
            }
        }
        Ok(())
    }

    fn view(&self) -> Weights<'_> {
        Weights {
            tiles: self.tiles,
            chunks: self.chunks,
            weights: &self.weights,
            scales: &self.scales,
        }
    }
}

/// Int8 tables of every triple of activations for a batch of inputs of length K; one build serves
/// every [`TernaryMatrix`] of that K, and rebuilding for as many tokens or fewer does not allocate.
///
/// Table `j` of a token holds `T[i] = Σ_d digit_d(i)·x[3j + d]` for the 14 magnitude indices,
/// quantized with one scale per block of 8 triples (24 activations): `scale = max |x0|+|x1|+|x2|
/// / 127` over the block, the largest |entry|, rounded to nearest.
pub struct TernaryTables {
    cols: usize,
    tokens: usize,
    /// `[token][chunks·8][16]` int8 entries.
    tables: Vec<i8>,
    /// `[token][blocks]` table scales.
    scales: Vec<f32>,
}

impl TernaryTables {
    /// Empty tables for inputs of `cols` elements (a multiple of 32).
    pub fn new(cols: usize) -> TernaryTables {
        TernaryTables {
            cols,
            tokens: 0,
            tables: Vec::new(),
            scales: Vec::new(),
        }
    }

    /// Input length K.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of tokens the tables were last built for.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Builds the tables of `tokens` input vectors stored back to back in `x` (`[tokens][cols]`).
    pub fn build(&mut self, cpu: &Cpu, x: &[f32], tokens: usize) -> Result<()> {
        let cols = self.cols;
        if cols == 0 || !cols.is_multiple_of(32) {
            return Err(KernelError::KNotMultipleOf32(cols));
        }
        let expected = tokens.checked_mul(cols);
        if expected != Some(x.len()) {
            return Err(KernelError::LengthMismatch {
                what: "activations",
                expected: expected.unwrap_or(usize::MAX),
                got: x.len(),
            });
        }
        let triples = chunks_of(cols) * TRIPLES;
        let blocks = blocks_of(chunks_of(cols));
        self.tables.resize(tokens * triples * TABLE_BYTES, 0);
        self.scales.resize(tokens * blocks, 0.0);
        self.tokens = tokens;

        for (xs, scales) in x
            .chunks_exact(cols)
            .zip(self.scales.chunks_exact_mut(blocks))
        {
            for (b, scale) in scales.iter_mut().enumerate() {
                let start = (3 * b * BLOCK_TRIPLES).min(cols);
                let end = (3 * (b + 1) * BLOCK_TRIPLES).min(cols);
                let mut max = 0.0f32;
                for t in xs[start..end].chunks(3) {
                    max = max.max(abs_sum(t));
                }
                *scale = max / 127.0;
            }
        }

        let chunk = crate::tables::table_build_chunk(self.tables.len(), cpu.threads());
        let scales = &self.scales;
        cpu.for_each_chunk(&mut self.tables, chunk, |start, part| {
            let first = start / TABLE_BYTES;
            // Token n, triple j of the first table; stepped (not divided) per table.
            let (mut n, mut j) = (first / triples, first % triples);
            for table in part.chunks_exact_mut(TABLE_BYTES) {
                let xs = &x[n * cols..][..cols];
                let triple = &xs[(3 * j).min(cols)..(3 * j + 3).min(cols)];
                fill_table(triple, scales[n * blocks + j / BLOCK_TRIPLES], table);
                j += 1;
                if j == triples {
                    (n, j) = (n + 1, 0);
                }
            }
        });
        Ok(())
    }

    fn view(&self) -> TabView<'_> {
        TabView {
            tokens: self.tokens,
            triples: chunks_of(self.cols) * TRIPLES,
            blocks: blocks_of(chunks_of(self.cols)),
            tables: &self.tables,
            scales: &self.scales,
        }
    }
}

/// `|x0| + |x1| + |x2|` (fewer values past the end of K), summed in order.
fn abs_sum(triple: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in triple {
        s += v.abs();
    }
    s
}

/// The digits of [`DIGITS`] as f32 columns, zero-extended to the 16 table slots, so that
/// [`fill_table`] is one straight-line vectorizable expression per slot.
const DIGIT_COLUMNS: [[f32; TABLE_BYTES]; 3] = {
    let mut cols = [[0.0f32; TABLE_BYTES]; 3];
    let mut i = 0;
    while i < PATTERNS {
        let mut d = 0;
        while d < 3 {
            cols[d][i] = DIGITS[i][d] as f32;
            d += 1;
        }
        i += 1;
    }
    cols
};

/// The int8 table of one triple (`triple` may be shorter than 3 at the end of K: missing values
/// are zero). Slots 14 and 15 have zero digits and hold 0.
fn fill_table(triple: &[f32], scale: f32, table: &mut [i8]) {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let x = |d: usize| triple.get(d).copied().unwrap_or(0.0);
    let (x0, x1, x2) = (x(0), x(1), x(2));
    let [d0, d1, d2] = &DIGIT_COLUMNS;
    for (i, q) in table.iter_mut().enumerate().take(TABLE_BYTES) {
        // `d·x` is exact (±x or 0) and the sum goes in digit order, so the all-matching-signs
        // pattern equals `abs_sum` and maps to at most 127.
        let t = (d0[i] * x0 + d1[i] * x1) + d2[i] * x2;
        // Adding 1.5·2^23 rounds to nearest (ties to even) and leaves the integer in the low
        // mantissa bits, read back with integer ops (which vectorize, unlike a float→int `as`).
        const ROUND: f32 = 12_582_912.0;
        let r = (t * inv).clamp(-127.0, 127.0) + ROUND;
        *q = (r.to_bits() as i32 - ROUND.to_bits() as i32) as i8;
    }
}
