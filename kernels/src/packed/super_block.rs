//! Two-level ("super-block") scales, the form of llama.cpp's K-quants: per (row, group of 16 or 32)
//! an integer sub-scale `sc` (and sub-min `m`), per (row, super-block of 256) f16 factors `d` (and
//! `dmin`), and `w = (d·sc)·(q − z) − dmin·m` with a zero point `z` shared by the matrix.
//!
//! `d` and `dmin` are kept as the f16 bits of the file and the sub-scales as bytes (in groups of
//! 16 with mins, Q2_K's form, a sub-scale and its sub-min as the two nibbles of one byte, as in
//! the file), so a packed matrix is about as small as the file (Q4_K: 4.625 bits per weight
//! against 4.5; Q2_K: 2.625 and Q6_K: 6.5625, the same). The kernels multiply by exactly the
//! weights ggml dequantizes to: in groups of 32 each group's scale is one exact f32 product `d·sc`
//! (and `dmin·m`); in groups of 16 the integer sub-scales multiply the integer lookup sums, and
//! `d`, `dmin` the result (see `lut::HalvesCombine`), with Σx of each half rounded to 1/8 of a
//! table scale (Q6_K: a whole one) beside the tables' own rounding.

use half::f16;

use super::{pack_code_rows, Grouping, PackedMatrix, PlaneScales, QuantSpec};
use crate::error::{KernelError, Result};
use crate::lut::layout::{ACT, PLANE_BYTES, TILE};
use crate::lut::{SuperScales, MAX_BITS};
use crate::storage::Storage;

/// Elements per super-block along K (one `d`, `dmin` per row and super-block).
pub const SUPER_BLOCK: usize = 256;

/// Unpacked weights with two-level scales, as decoded from K-quant blocks: the input of
/// [`PackedMatrix::pack_super_blocks`].
///
/// Weight `k` of row `r`, in group `g = k / group` and super-block `b = k / 256`, is
/// `(d[r][b]·sc[r][g])·(q − zero_point) − dmin[r][b]·m[r][g]` (the last term only with mins), each
/// product in f32. The llama.cpp types map to it as:
///
/// | type | bits | group | zero_point | sub_scales | sub_mins / dmin |
/// |------|------|-------|------------|------------|-----------------|
/// | Q2_K | 2 | 16 | 0 | 4-bit `sc` | 4-bit `m`, `dmin` |
/// | Q3_K | 3 | 16 | 4 | 6-bit `sc − 32` (signed) | none |
/// | Q4_K | 4 | 32 | 0 | 6-bit `sc` | 6-bit `m`, `dmin` |
/// | Q5_K | 5 | 32 | 0 | 6-bit `sc` | 6-bit `m`, `dmin` |
/// | Q6_K | 6 | 16 | 32 | int8 `sc` | none |
///
/// The crate's tests split real blocks of each type into these fields (`split_q2_k` ..
/// `split_q6_k` in `packed/super_block/tests.rs`) and check the result against ggml's
/// dequantization, bit for bit.
#[derive(Clone, Copy, Debug)]
pub struct SuperBlockWeights<'a> {
    /// Output features (M).
    pub rows: usize,
    /// Input features (K); a multiple of [`SUPER_BLOCK`].
    pub cols: usize,
    /// Bits per code, 1 to 6.
    pub bits: u8,
    /// Elements per sub-scale group along K: 16 or 32.
    pub group: usize,
    /// Subtracted from every code before scaling (Q3_K: 4, Q6_K: 32, else 0).
    pub zero_point: u8,
    /// One code per element, row-major `[rows][cols]`, each `< 2^bits`.
    pub codes: &'a [u8],
    /// Sub-scales `sc`, `[rows][cols / group]`; 0 to 15 in groups of 16 with mins.
    pub sub_scales: &'a [i8],
    /// Sub-mins `m`, `[rows][cols / group]`; given exactly when `dmin` is; 0 to 15 in groups of
    /// 16.
    pub sub_mins: Option<&'a [u8]>,
    /// f16 bits of the super-scales `d`, `[rows][cols / 256]`.
    pub d: &'a [u16],
    /// f16 bits of the super-mins `dmin`, `[rows][cols / 256]`.
    pub dmin: Option<&'a [u16]>,
}

/// The two-level scales of a packed matrix, in row tiles: `[tile][group or super-block][64 rows]`;
/// padded rows hold 0.
pub(super) struct SuperScaleBuffers {
    /// Sub-scales, or with `nibbles` `sc | m << 4`.
    sub_scales: Vec<i8>,
    /// Sub-mins, when they have bytes of their own.
    sub_mins: Option<Vec<u8>>,
    /// Groups of 16 with mins: a sub-scale and its sub-min share a byte of `sub_scales`.
    nibbles: bool,
    d: Vec<u16>,
    dmin: Option<Vec<u16>>,
    groups_per_super: usize,
}

impl SuperScaleBuffers {
    /// Bytes of the scales: one per sub-scale and sub-min, two per `d` and `dmin`.
    pub(super) fn bytes(&self) -> usize {
        self.sub_scales.len()
            + self.sub_mins.as_ref().map_or(0, Vec::len)
            + 2 * self.d.len()
            + 2 * self.dmin.as_ref().map_or(0, Vec::len)
    }

    /// The buffers, borrowed for the kernels.
    pub(super) fn view(&self) -> SuperScales<'_> {
        let shared: &[u8] = bytemuck::cast_slice(&self.sub_scales);
        SuperScales {
            sub_scales: &self.sub_scales,
            sub_mins: if self.nibbles {
                Some(shared)
            } else {
                self.sub_mins.as_deref()
            },
            d: &self.d,
            dmin: self.dmin.as_deref(),
            groups_per_super: self.groups_per_super,
            nibbles: self.nibbles,
        }
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Rows `first..first + src.len() / per_row` of `[rows][per_row]` values written into `out`,
/// laid out `[tile][per_row][64 rows]`.
fn scatter_tile_major<T: Copy>(src: &[T], first: usize, per_row: usize, out: &mut [T]) {
    for (r, row) in src.chunks_exact(per_row).enumerate() {
        let (tile, rr) = ((first + r) / TILE, (first + r) % TILE);
        for (i, &v) in row.iter().enumerate() {
            out[(tile * per_row + i) * TILE + rr] = v;
        }
    }
}

/// `sc | m << 4` for each sub-scale and sub-min, or the error naming the first that does not fit
/// 4 bits.
fn nibble_pairs(sub_scales: &[i8], sub_mins: &[u8]) -> Result<Vec<i8>> {
    sub_scales
        .iter()
        .zip(sub_mins)
        .enumerate()
        .map(|(index, (&sc, &m))| match (u8::try_from(sc), m) {
            (Ok(sc @ 0..16), 0..16) => Ok((sc | m << 4) as i8),
            _ => Err(KernelError::SubScaleOutOfRange {
                index,
                sub_scale: sc,
                sub_min: m,
            }),
        })
        .collect()
}

/// An error when one of the f16 factors is not finite.
fn check_finite(factors: &[u16]) -> Result<()> {
    match factors.iter().position(|&h| !f16::from_bits(h).is_finite()) {
        Some(index) => Err(KernelError::ScaleOutOfRange {
            index,
            value: f16::from_bits(factors[index]).to_f32(),
        }),
        None => Ok(()),
    }
}

impl PackedMatrix {
    /// Checks weights with two-level scales and repacks them; `d`, `dmin` stay f16 and the
    /// sub-scales bytes (see [`SuperBlockWeights`]).
    ///
    /// ```
    /// use lutra_kernels::{PackedMatrix, SuperBlockWeights};
    ///
    /// // One row of one Q4_K super-block: 8 groups of 32, codes 0..16.
    /// let codes: Vec<u8> = (0..256).map(|k| (k % 16) as u8).collect();
    /// let sub_scales = [1i8, 2, 3, 4, 5, 6, 7, 63];
    /// let sub_mins = [0u8, 1, 2, 3, 4, 5, 6, 63];
    /// let d = [half::f16::from_f32(0.01).to_bits()];
    /// let dmin = [half::f16::from_f32(0.002).to_bits()];
    /// let weights = SuperBlockWeights {
    ///     rows: 1,
    ///     cols: 256,
    ///     bits: 4,
    ///     group: 32,
    ///     zero_point: 0,
    ///     codes: &codes,
    ///     sub_scales: &sub_scales,
    ///     sub_mins: Some(&sub_mins),
    ///     d: &d,
    ///     dmin: Some(&dmin),
    /// };
    /// let matrix = PackedMatrix::pack_super_blocks(&weights).unwrap();
    /// let mut row = vec![0.0f32; 256];
    /// matrix.dequantize_row(0, &mut row).unwrap();
    /// let (dv, mv) = (half::f16::from_bits(d[0]).to_f32(), half::f16::from_bits(dmin[0]).to_f32());
    /// assert_eq!(row[255], (dv * 63.0) * 15.0 - mv * 63.0);
    /// ```
    pub fn pack_super_blocks(weights: &SuperBlockWeights<'_>) -> Result<PackedMatrix> {
        let w = weights;
        // The codes are checked against the shape before anything is allocated for it.
        check_len("codes", w.rows.saturating_mul(w.cols), w.codes.len())?;
        let mins = w.sub_mins.is_some();
        let mut builder =
            SuperBlockMatrixBuilder::new(w.rows, w.cols, w.bits, w.group, w.zero_point, mins)?;
        builder.push_rows(w)?;
        builder.finish()
    }
}

/// A [`PackedMatrix`] with two-level scales filled a block of rows at a time
/// ([`SuperBlockMatrixBuilder::push_rows`]), so that a caller decoding a file holds the codes of
/// one block, not of the whole matrix.
pub struct SuperBlockMatrixBuilder {
    spec: QuantSpec,
    group: usize,
    zero_point: u8,
    weights: Vec<u8>,
    scales: SuperScaleBuffers,
    /// Rows packed so far.
    rows_done: usize,
}

impl SuperBlockMatrixBuilder {
    /// Rows per tile: every block but the last must hold a multiple of this many rows.
    pub const ROWS_PER_TILE: usize = TILE;

    /// Checks the form and allocates a `rows × cols` matrix of `bits`-bit codes in groups of
    /// `group` (16 or 32) with zero point `zero_point`, with sub-mins and `dmin` when `mins`
    /// (in groups of 16, sub-scales and sub-mins of 4 bits, packed a pair to a byte).
    pub fn new(
        rows: usize,
        cols: usize,
        bits: u8,
        group: usize,
        zero_point: u8,
        mins: bool,
    ) -> Result<SuperBlockMatrixBuilder> {
        if !(1..=MAX_BITS as u8).contains(&bits) {
            return Err(KernelError::UnsupportedBits(bits));
        }
        if cols == 0 || !cols.is_multiple_of(SUPER_BLOCK) {
            return Err(KernelError::KNotMultipleOfSuperBlock {
                cols,
                super_block: SUPER_BLOCK,
            });
        }
        if !matches!(group, 16 | 32) {
            return Err(KernelError::SuperBlockGroup(group));
        }
        if u32::from(zero_point) >= 1 << bits {
            return Err(KernelError::UnsupportedForm(
                "a zero point needs a code below 2^bits",
            ));
        }
        let spec = QuantSpec {
            rows,
            cols,
            bits,
            grouping: Grouping::Size(group),
            plane_scales: PlaneScales::Uniform,
        };
        let tiles = rows.div_ceil(TILE);
        // The planes take `bits / 8` of a byte per weight, the scales at most a byte per group
        // of 16: the size of the weights is checked, as the others are smaller.
        let weight_bytes = (cols / ACT)
            .checked_mul(usize::from(bits) * PLANE_BYTES)
            .and_then(|tile_bytes| tiles.checked_mul(tile_bytes))
            .ok_or(KernelError::LengthMismatch {
                what: "rows",
                expected: usize::MAX,
                got: rows,
            })?;
        let (groups, supers) = (cols / group, cols / SUPER_BLOCK);
        Ok(SuperBlockMatrixBuilder {
            spec,
            group,
            zero_point,
            weights: vec![0u8; weight_bytes],
            scales: SuperScaleBuffers {
                sub_scales: vec![0; tiles * groups * TILE],
                sub_mins: (mins && group != 16).then(|| vec![0; tiles * groups * TILE]),
                nibbles: mins && group == 16,
                d: vec![0; tiles * supers * TILE],
                dmin: mins.then(|| vec![0; tiles * supers * TILE]),
                groups_per_super: SUPER_BLOCK / group,
            },
            rows_done: 0,
        })
    }

    /// Packs the next `weights.rows` rows. `weights` must have the builder's columns, bits,
    /// group, zero point and mins, and every block but the last must hold a multiple of
    /// [`SuperBlockMatrixBuilder::ROWS_PER_TILE`] rows.
    pub fn push_rows(&mut self, weights: &SuperBlockWeights<'_>) -> Result<()> {
        let w = weights;
        let (first, spec) = (self.rows_done, self.spec);
        let (rows, cols) = (w.rows, spec.cols);
        if w.sub_mins.is_some() != w.dmin.is_some() {
            return Err(KernelError::MinsWithoutSuperMins);
        }
        let bad_rows = KernelError::LengthMismatch {
            what: "rows",
            expected: spec.rows - first,
            got: rows,
        };
        let same_form = (w.cols, w.bits, w.group, w.zero_point, w.sub_mins.is_some())
            == (
                cols,
                spec.bits,
                self.group,
                self.zero_point,
                self.scales.dmin.is_some(),
            );
        if !same_form || first + rows > spec.rows {
            return Err(bad_rows);
        }
        if first + rows < spec.rows && rows % TILE != 0 {
            return Err(bad_rows);
        }
        let groups = cols / self.group;
        let supers = cols / SUPER_BLOCK;
        // Every other count is at most rows·cols, which fits once the codes match it (a slice holds
        // fewer than usize::MAX bytes).
        let elements = rows.saturating_mul(cols);
        check_len("codes", elements, w.codes.len())?;
        check_len("sub-scales", rows * groups, w.sub_scales.len())?;
        if let Some(m) = w.sub_mins {
            check_len("sub-mins", rows * groups, m.len())?;
        }
        check_len("d", rows * supers, w.d.len())?;
        check_finite(w.d)?;
        if let Some(dmin) = w.dmin {
            check_len("dmin", rows * supers, dmin.len())?;
            check_finite(dmin)?;
        }
        let tile_bytes = (cols / ACT) * usize::from(spec.bits) * PLANE_BYTES;
        let tiles = first / TILE..(first + rows).div_ceil(TILE);
        let packed = &mut self.weights[tiles.start * tile_bytes..tiles.end * tile_bytes];
        pack_code_rows(w.codes, rows, cols, spec.bits, first, packed)?;
        let s = &mut self.scales;
        match w.sub_mins.filter(|_| s.nibbles) {
            Some(mins) => {
                let bytes = nibble_pairs(w.sub_scales, mins)?;
                scatter_tile_major(&bytes, first, groups, &mut s.sub_scales);
            }
            None => scatter_tile_major(w.sub_scales, first, groups, &mut s.sub_scales),
        }
        scatter_tile_major(w.d, first, supers, &mut s.d);
        if let (Some(src), Some(dst)) = (w.sub_mins, s.sub_mins.as_mut()) {
            scatter_tile_major(src, first, groups, dst);
        }
        if let (Some(src), Some(dst)) = (w.dmin, s.dmin.as_mut()) {
            scatter_tile_major(src, first, supers, dst);
        }
        self.rows_done += rows;
        Ok(())
    }

    /// The packed matrix, once every row has been pushed.
    pub fn finish(self) -> Result<PackedMatrix> {
        let spec = self.spec;
        if self.rows_done != spec.rows {
            return Err(KernelError::LengthMismatch {
                what: "rows",
                expected: spec.rows,
                got: self.rows_done,
            });
        }
        Ok(PackedMatrix {
            spec,
            tiles: spec.rows.div_ceil(TILE),
            groups: spec.cols / self.group,
            weights: Storage::owned(self.weights),
            scales: Storage::owned(Vec::new()),
            offsets: None,
            zero_point: self.zero_point,
            half_groups: self.group == 16,
            super_scales: Some(self.scales),
        })
    }
}

#[cfg(test)]
mod tests;
