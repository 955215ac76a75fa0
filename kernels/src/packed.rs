//! LUT-packed low-bit weight matrices and the mpGEMV/mpGEMM over them.
//!
//! Packing splits codes into bit planes and lays them out in row tiles (see `lut::layout`); the
//! multiply is done by the tile kernels of `lut`, chosen by the [`Cpu`]'s ISA.

use half::f16;

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::int8::Int8Activations;
use crate::lut::layout::{ACT, PLANE_BYTES, ROW_BYTE, TILE};
use crate::lut::{self, Weights, MAX_BITS};
use crate::storage::Storage;
use crate::tables::ActivationTables;
use crate::tiling::{check_parts, MAX_PARTS};

mod planes;
mod super_block;

use planes::pack_code_rows;

use super_block::SuperScaleBuffers;
pub use super_block::{SuperBlockMatrixBuilder, SuperBlockWeights, SUPER_BLOCK};

/// How many consecutive K elements share one scale (and offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// A group of this many elements along K: 32, 64, 128 or 256 (and 16 for
    /// [`SuperBlockWeights`]).
    Size(usize),
    /// One group per row (group size = K).
    PerRow,
    /// One scale (and offset) for the whole tensor.
    PerTensor,
}

/// How the bit planes of a group are weighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaneScales {
    /// `w = s·q + m` with `q = Σ_p 2^p·q_p`: one scale per group.
    Uniform,
    /// `w = z + Σ_p s_p·q_p`: one scale per plane per group (the HLQ grid), offset `z` per group.
    PerPlane,
}

/// Shape and quantization of a low-bit matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    /// Output features (M).
    pub rows: usize,
    /// Input features (K); a multiple of 32.
    pub cols: usize,
    /// Bits per code: 1, 2, 3 or 4 (ternary is 2-bit codes {0,1,2} with offset −s).
    pub bits: u8,
    /// Elements per scale group.
    pub grouping: Grouping,
    /// Uniform or per-plane scales.
    pub plane_scales: PlaneScales,
}

/// Unpacked quantized weights, as decoded from a file: the input of [`PackedMatrix::pack`].
#[derive(Clone, Copy, Debug)]
pub struct QuantizedWeights<'a> {
    /// Shape and quantization.
    pub spec: QuantSpec,
    /// One code per element, row-major `[rows][cols]`, each `< 2^bits`.
    pub codes: &'a [u8],
    /// Uniform: `[rows][groups]` (or 1 value per tensor); per-plane: `[rows][groups][bits]`
    /// (plane 0 = least significant), or `bits` values per tensor.
    pub scales: &'a [f32],
    /// Optional offset `m` (uniform) or `z` (per-plane) per group: `[rows][groups]`, or 1 per tensor.
    pub offsets: Option<&'a [f32]>,
}

/// A weight matrix repacked into the LUT layout (bit planes, nibbles, row tiles). Its buffers
/// are owned, or borrowed from a mapped file already in this layout ([`PackedMatrix::from_parts`]).
pub struct PackedMatrix {
    spec: QuantSpec,
    tiles: usize,
    groups: usize,
    /// `[tile][K/32][plane][256]`: nibbles of 4 columns of one plane, 64 rows per 32 bytes.
    weights: Storage<u8>,
    /// f16 bits, `[tile][group][plane or 1][64 rows]`; padded rows hold 0.
    scales: Storage<u16>,
    /// f16 bits, `[tile][group][64 rows]`.
    offsets: Option<Storage<u16>>,
    /// The code `z` every code is centred on, `w = s·(q − z)`: 0 but for formats whose offset is
    /// `−z·s` in every group (Q4_0, Q5_0, which then need no stored offsets) and the two-level
    /// forms' zero points (Q3_K: 4, Q6_K: 32).
    zero_point: u8,
    /// Weight groups of 16 (two per activation group).
    half_groups: bool,
    /// Two-level scales (super-block forms); `scales` is then empty and `offsets` `None`.
    super_scales: Option<SuperScaleBuffers>,
}

/// Lengths of the buffers of a [`PackedMatrix`] with one-level f16 scales
/// ([`QuantSpec::packed_layout`]), in the order a file stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedLayout {
    /// Bytes of bit-plane weights: `tiles · K/32 · bits · 256`.
    pub weight_bytes: usize,
    /// f16 scales: `tiles · groups · (bits if per-plane, else 1) · 64`.
    pub scales: usize,
    /// f16 offsets: `tiles · groups · 64`, or 0 without offsets.
    pub offsets: usize,
    /// Row tiles of 64 rows (the last one padded).
    pub tiles: usize,
    /// Scale groups per row.
    pub groups: usize,
}

impl PackedLayout {
    /// Bytes of all three buffers, weights first, then scales, then offsets (each a multiple of
    /// 128 bytes, so every buffer starts where the previous one ends, aligned for f16).
    pub fn total_bytes(&self) -> usize {
        self.weight_bytes + 2 * (self.scales + self.offsets)
    }
}

impl QuantSpec {
    /// The buffer lengths of this matrix packed with one-level scales (and `offsets` or not), or
    /// the error for a spec the kernels cannot run (bits, K, grouping) or sizes that overflow.
    pub fn packed_layout(&self, offsets: bool) -> Result<PackedLayout> {
        let (rows, cols) = (self.rows, self.cols);
        if !(1..=MAX_BITS as u8).contains(&self.bits) {
            return Err(KernelError::UnsupportedBits(self.bits));
        }
        if cols == 0 || cols % ACT != 0 {
            return Err(KernelError::KNotMultipleOf32(cols));
        }
        let bits = usize::from(self.bits);
        let groups = cols / group_size(self.grouping, cols)?;
        let nps = if self.plane_scales == PlaneScales::PerPlane {
            bits
        } else {
            1
        };
        let tiles = rows.div_ceil(TILE);
        let size = |per_tile: Option<usize>| {
            per_tile
                .and_then(|n| n.checked_mul(tiles))
                .filter(|&n| n.checked_mul(2).is_some())
                .ok_or(KernelError::LengthMismatch {
                    what: "rows",
                    expected: usize::MAX,
                    got: rows,
                })
        };
        let weight_bytes = size((cols / ACT).checked_mul(bits * PLANE_BYTES))?;
        let scales = size(groups.checked_mul(nps * TILE))?;
        let offsets = match offsets {
            true => size(groups.checked_mul(TILE))?,
            false => 0,
        };
        let layout = PackedLayout {
            weight_bytes,
            scales,
            offsets,
            tiles,
            groups,
        };
        // The sum must fit too (it is what a file holds).
        weight_bytes
            .checked_add(2 * scales)
            .and_then(|n| n.checked_add(2 * offsets))
            .ok_or(KernelError::LengthMismatch {
                what: "rows",
                expected: usize::MAX,
                got: rows,
            })?;
        Ok(layout)
    }
}

/// The buffers of a [`PackedMatrix`] with one-level f16 scales, borrowed
/// ([`PackedMatrix::raw_parts`]): what a file in the kernels' layout stores.
#[derive(Clone, Copy, Debug)]
pub struct PackedParts<'a> {
    /// Bit-plane weights, `[tile][K/32][plane][256]`.
    pub weights: &'a [u8],
    /// f16 bits of the scales, `[tile][group][plane or 1][64 rows]`.
    pub scales: &'a [u16],
    /// f16 bits of the offsets, `[tile][group][64 rows]`.
    pub offsets: Option<&'a [u16]>,
}

/// Elements per group along K, or the error for a grouping that does not fit `cols`.
fn group_size(grouping: Grouping, cols: usize) -> Result<usize> {
    match grouping {
        Grouping::Size(g @ (32 | 64 | 128 | 256)) if cols.is_multiple_of(g) => Ok(g),
        Grouping::Size(g) => Err(KernelError::BadGroupSize { group: g, cols }),
        Grouping::PerRow | Grouping::PerTensor => Ok(cols),
    }
}

fn check_len(what: &'static str, expected: Option<usize>, got: usize) -> Result<()> {
    match expected {
        Some(e) if e == got => Ok(()),
        _ => Err(KernelError::LengthMismatch {
            what,
            expected: expected.unwrap_or(usize::MAX),
            got,
        }),
    }
}

/// f16 bits of `values` (the first is element `first` of its array, for the error) into `out`, or
/// an error naming the first that is not finite or overflows f16.
fn to_f16_row(values: &[f32], first: usize, out: &mut [u16]) -> Result<()> {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    out.reinterpret_cast_mut::<f16>()
        .convert_from_f32_slice(values);
    // An all-ones exponent is an infinity or a NaN.
    match out.iter().position(|&h| h & 0x7C00 == 0x7C00) {
        Some(i) => Err(KernelError::ScaleOutOfRange {
            index: first + i,
            value: values[i],
        }),
        None => Ok(()),
    }
}

/// f16 bits of `value`, or an error when it is not finite or overflows f16.
fn to_f16(value: f32, index: usize) -> Result<u16> {
    let h = f16::from_f32(value);
    if h.is_finite() {
        Ok(h.to_bits())
    } else {
        Err(KernelError::ScaleOutOfRange { index, value })
    }
}

/// A [`PackedMatrix`] filled a block of rows at a time ([`PackedMatrixBuilder::push_rows`]), so
/// that a caller decoding a file holds the codes of one block, not of the whole matrix.
pub struct PackedMatrixBuilder {
    spec: QuantSpec,
    tiles: usize,
    groups: usize,
    weights: Vec<u8>,
    scales: Vec<u16>,
    offsets: Option<Vec<u16>>,
    zero_point: u8,
    /// Rows packed so far.
    rows_done: usize,
}

impl PackedMatrixBuilder {
    /// Rows per tile: every block but the last must hold a multiple of this many rows.
    pub const ROWS_PER_TILE: usize = TILE;

    /// Checks `spec` and allocates the packed matrix; `offsets` says whether the weights come with
    /// offsets.
    pub fn new(spec: QuantSpec, offsets: bool) -> Result<PackedMatrixBuilder> {
        let layout = spec.packed_layout(offsets)?;
        Ok(PackedMatrixBuilder {
            spec,
            tiles: layout.tiles,
            groups: layout.groups,
            weights: vec![0u8; layout.weight_bytes],
            scales: vec![0u16; layout.scales],
            offsets: offsets.then(|| vec![0u16; layout.offsets]),
            zero_point: 0,
            rows_done: 0,
        })
    }

    /// A builder for codes centred on `zero_point`: `w = s·(q − z)` with one uniform scale per
    /// group and no stored offsets (Q4_0 is `d·(q − 8)`, Q5_0 `d·(q − 16)`), so the matrix holds
    /// the file's bytes per weight instead of an f16 offset per group beside each scale. The
    /// weights pushed carry no offsets.
    pub fn with_zero_point(spec: QuantSpec, zero_point: u8) -> Result<PackedMatrixBuilder> {
        let mut builder = PackedMatrixBuilder::new(spec, false)?;
        if spec.plane_scales != PlaneScales::Uniform || u32::from(zero_point) >= 1 << spec.bits {
            return Err(KernelError::UnsupportedForm(
                "a zero point needs uniform planes and a code below 2^bits",
            ));
        }
        builder.zero_point = zero_point;
        Ok(builder)
    }

    /// Packs the next `weights.spec.rows` rows (codes, scales and offsets of those rows only;
    /// per-tensor scales as for the whole matrix). `weights.spec` must be the builder's but for
    /// `rows`, and every block but the last must hold a multiple of
    /// [`PackedMatrixBuilder::ROWS_PER_TILE`] rows.
    pub fn push_rows(&mut self, weights: &QuantizedWeights<'_>) -> Result<()> {
        let m = &mut *self;
        let spec = m.spec;
        let (first, rows, cols) = (m.rows_done, weights.spec.rows, spec.cols);
        let bad_rows = KernelError::LengthMismatch {
            what: "rows",
            expected: spec.rows - first,
            got: rows,
        };
        if weights.spec != (QuantSpec { rows, ..spec }) || first + rows > spec.rows {
            return Err(bad_rows);
        }
        if first + rows < spec.rows && rows % TILE != 0 {
            return Err(bad_rows);
        }
        if weights.offsets.is_some() != m.offsets.is_some() {
            return Err(KernelError::LengthMismatch {
                what: "offsets",
                expected: if m.offsets.is_some() { rows } else { 0 },
                got: weights.offsets.map_or(0, <[f32]>::len),
            });
        }
        let bits = usize::from(spec.bits);
        let groups = m.groups;
        let per_plane = spec.plane_scales == PlaneScales::PerPlane;
        let nps = if per_plane { bits } else { 1 };
        let per_tensor = spec.grouping == Grouping::PerTensor;

        check_len("codes", rows.checked_mul(cols), weights.codes.len())?;
        let per_matrix = if per_tensor {
            Some(1)
        } else {
            rows.checked_mul(groups)
        };
        check_len(
            "scales",
            per_matrix.and_then(|n| n.checked_mul(nps)),
            weights.scales.len(),
        )?;
        if let Some(offsets) = weights.offsets {
            check_len("offsets", per_matrix, offsets.len())?;
        }
        let tile_bytes = (cols / ACT) * bits * PLANE_BYTES;
        let first_tile = first / TILE;
        let tiles = rows.div_ceil(TILE);
        let packed = &mut m.weights[first_tile * tile_bytes..(first_tile + tiles) * tile_bytes];
        pack_code_rows(weights.codes, rows, cols, spec.bits, first, packed)?;

        // Each row's scales (and offsets) converted together, then spread over the tile layout
        // `[tile][group][plane or 1][64 rows]`.
        let per_row = groups * nps;
        let mut row_f16 = vec![0u16; per_row];
        for r in 0..rows {
            let (tile, rr) = ((first + r) / TILE, (first + r) % TILE);
            let at = |i: usize| tile * per_row * TILE + i * TILE + rr;
            if per_tensor {
                for g in 0..groups {
                    for p in 0..nps {
                        m.scales[at(g * nps + p)] = to_f16(weights.scales[p], p)?;
                    }
                }
            } else {
                to_f16_row(
                    &weights.scales[r * per_row..][..per_row],
                    r * per_row,
                    &mut row_f16,
                )?;
                for (i, &h) in row_f16.iter().enumerate() {
                    m.scales[at(i)] = h;
                }
            }
            if let (Some(dst), Some(src)) = (m.offsets.as_mut(), weights.offsets) {
                let at = |g: usize| (tile * groups + g) * TILE + rr;
                if per_tensor {
                    for g in 0..groups {
                        dst[at(g)] = to_f16(src[0], 0)?;
                    }
                } else {
                    let row = &mut row_f16[..groups];
                    to_f16_row(&src[r * groups..][..groups], r * groups, row)?;
                    for (g, &h) in row.iter().enumerate() {
                        dst[at(g)] = h;
                    }
                }
            }
        }
        m.rows_done += rows;
        Ok(())
    }

    /// The packed matrix, once every row has been pushed.
    pub fn finish(self) -> Result<PackedMatrix> {
        let rows = self.spec.rows;
        if self.rows_done != rows {
            return Err(KernelError::LengthMismatch {
                what: "rows",
                expected: rows,
                got: self.rows_done,
            });
        }
        Ok(PackedMatrix {
            spec: self.spec,
            tiles: self.tiles,
            groups: self.groups,
            weights: Storage::owned(self.weights),
            scales: Storage::owned(self.scales),
            offsets: self.offsets.map(Storage::owned),
            zero_point: self.zero_point,
            half_groups: false,
            super_scales: None,
        })
    }
}

impl PackedMatrix {
    /// Checks the inputs and repacks them. Scales and offsets are stored as f16. Codes have 1 to 6
    /// bits (Q5_0 and Q5_1 are 5-bit codes with f16 block scales).
    pub fn pack(weights: &QuantizedWeights<'_>) -> Result<PackedMatrix> {
        let mut builder = PackedMatrixBuilder::new(weights.spec, weights.offsets.is_some())?;
        builder.push_rows(weights)?;
        builder.finish()
    }

    /// A matrix from buffers already in the packed layout (e.g. ranges of a mapped file written
    /// from [`PackedMatrix::raw_parts`]), used as they are: nothing is copied or repacked. Checks
    /// `spec` and every length against it ([`QuantSpec::packed_layout`]); the values themselves
    /// (any bit pattern is a code, any f16 a scale) need no check.
    pub fn from_parts(
        spec: QuantSpec,
        weights: Storage<u8>,
        scales: Storage<u16>,
        offsets: Option<Storage<u16>>,
    ) -> Result<PackedMatrix> {
        let layout = spec.packed_layout(offsets.is_some())?;
        check_len(
            "packed weight bytes",
            Some(layout.weight_bytes),
            weights.len(),
        )?;
        check_len("packed scales", Some(layout.scales), scales.len())?;
        if let Some(o) = &offsets {
            check_len("packed offsets", Some(layout.offsets), o.len())?;
        }
        Ok(PackedMatrix {
            spec,
            tiles: layout.tiles,
            groups: layout.groups,
            weights,
            scales,
            offsets,
            zero_point: 0,
            half_groups: false,
            super_scales: None,
        })
    }

    /// The packed buffers, for writing them to a file that [`PackedMatrix::from_parts`] reads
    /// back. Two-level (super-block) scales have no such form: they are refused.
    pub fn raw_parts(&self) -> Result<PackedParts<'_>> {
        if self.super_scales.is_some() || self.half_groups {
            return Err(KernelError::UnsupportedForm(
                "a matrix with two-level (super-block) scales has no one-level packed form",
            ));
        }
        if self.zero_point != 0 {
            return Err(KernelError::UnsupportedForm(
                "a matrix with a zero point has no one-level packed form",
            ));
        }
        Ok(PackedParts {
            weights: &self.weights,
            scales: &self.scales,
            offsets: self.offsets.as_deref(),
        })
    }

    /// Whether the buffers are read in place from a mapped file rather than owned.
    pub fn is_mapped(&self) -> bool {
        self.weights.is_mapped()
    }

    /// Shape and quantization.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }

    /// Whether the group scales are two-level (integer sub-scales under f16 super-block factors,
    /// [`PackedMatrix::pack_super_blocks`]) rather than f16 per group.
    pub fn has_super_block_scales(&self) -> bool {
        self.super_scales.is_some()
    }

    /// Output features (M).
    pub fn rows(&self) -> usize {
        self.spec.rows
    }

    /// Input features (K).
    pub fn cols(&self) -> usize {
        self.spec.cols
    }

    /// Bytes of packed weights, scales and offsets (what one GEMV streams from memory).
    pub fn bytes(&self) -> usize {
        self.weights.len()
            + 2 * self.scales.len()
            + self.offsets.as_ref().map_or(0, |o| 2 * o.len())
            + self
                .super_scales
                .as_ref()
                .map_or(0, SuperScaleBuffers::bytes)
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` for every token `n` of `tables`; `out` is `[n][rows]`.
    pub fn matmul(&self, cpu: &Cpu, tables: &ActivationTables, out: &mut [f32]) -> Result<()> {
        PackedMatrix::matmul_many(cpu, tables, &[self], &mut [out])
    }

    /// [`PackedMatrix::matmul`] of each matrix `mats[p]` into `outs[p]`, all reading the same
    /// `tables` (a layer's q/k/v, or gate/up): one hand-over to the threads for all of them, whose
    /// row tiles balance together. Results are those of separate `matmul`s, bit for bit.
    pub fn matmul_many(
        cpu: &Cpu,
        tables: &ActivationTables,
        mats: &[&PackedMatrix],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        let t = tables.view();
        for_parts(mats, outs, tables.cols(), tables.tokens(), |mats, outs| {
            lut::run(cpu, |p| (mats[p].view(), mats[p].rows()), &t, outs)
        })
    }

    /// The instruction [`PackedMatrix::matmul_dot`] multiplies with on `cpu` (`vpdpbusd` with
    /// AVX-512 VNNI, else `maddubs` on AVX2), or `None` where it has no SIMD form (NEON and the
    /// scalar reference so far), so that batches are faster on the table lookups there.
    pub fn dot_instruction(cpu: &Cpu) -> Option<&'static str> {
        crate::dot::instruction(cpu)
    }

    /// The instruction [`PackedMatrix::matmul_dot`] unpacks bit planes into byte codes with on
    /// `cpu` (`gf2p8affineqb` bit-matrix transposes with AVX-512 VBMI and GFNI), or `None` where
    /// it shifts and masks.
    pub fn dot_unpack_instruction(cpu: &Cpu) -> Option<&'static str> {
        crate::dot::unpacker(cpu.isa()).instruction
    }

    /// Whether [`PackedMatrix::matmul_dot`] can multiply this matrix: uniform planes of 1 to 6
    /// bits in any of the packed weight groups (16, or 32 or more; f16 or two-level scales), or
    /// per-plane scales in groups of 32 or more.
    pub fn has_dot_form(&self) -> bool {
        crate::dot::supports(&self.view())
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` for every token of the int8 activations `acts`, by
    /// integer dot products of the codes with the int8 activations: the path for batches of
    /// tokens (prefill), where it does more work per instruction than the table lookups.
    pub fn matmul_dot(&self, cpu: &Cpu, acts: &Int8Activations, out: &mut [f32]) -> Result<()> {
        PackedMatrix::matmul_many_dot(cpu, acts, &[self], &mut [out])
    }

    /// [`PackedMatrix::matmul_dot`] of each matrix `mats[p]` into `outs[p]`, all reading the same
    /// `acts`, in one hand-over to the threads. Results are those of separate calls, bit for bit.
    pub fn matmul_many_dot(
        cpu: &Cpu,
        acts: &Int8Activations,
        mats: &[&PackedMatrix],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        if !mats.iter().all(|m| m.has_dot_form()) {
            return Err(KernelError::UnsupportedForm(
                "the int8 dot path takes planes of 1 to 6 bits (per-plane scales only in groups of \
                 32 or more)",
            ));
        }
        for_parts(mats, outs, acts.cols(), acts.tokens(), |mats, outs| {
            let unpacker = crate::dot::unpacker(cpu.isa());
            let planes = |p: usize| crate::dot::Planes {
                w: mats[p].view(),
                rows: mats[p].rows(),
                unpacker,
            };
            crate::dot::run(
                cpu,
                planes,
                acts.blocks(),
                acts.cols() / crate::int8::BLOCK,
                outs,
            )
        })
    }

    /// Dequantized row `r` (`w = s·q + m`; super-block forms: `w = (d·sc)·(q − z) − dmin·m`, in
    /// f32 as ggml computes it), for reference paths and tests.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        if row >= rows {
            return Err(KernelError::RowOutOfRange { row, rows });
        }
        if out.len() != cols {
            return Err(KernelError::LengthMismatch {
                what: "dequantized row",
                expected: cols,
                got: out.len(),
            });
        }
        let super_scales = self.super_scales.as_ref().map(SuperScaleBuffers::view);
        let bits = usize::from(self.spec.bits);
        let view = self.view();
        let nps = view.scale_planes();
        let gs = cols / self.groups;
        let (tile, rr) = (row / TILE, row % TILE);
        let tile_bytes = cols / ACT * bits * PLANE_BYTES;
        let base = tile * tile_bytes + ROW_BYTE[rr % 32];
        let shift = if rr < 32 { 0 } else { 4 };
        let f = |h: u16| f16::from_bits(h).to_f32();
        for (k, w) in out.iter_mut().enumerate() {
            let (a, j, i) = (k / ACT, (k % ACT) / 4, k % 4);
            let g = k / gs;
            let sbase = ((tile * self.groups + g) * nps) * TILE + rr;
            let mut value = 0.0f32;
            let mut code = 0u32;
            for p in 0..bits {
                let byte = self.weights[base + (a * bits + p) * PLANE_BYTES + j * 32];
                let bit = u32::from((byte >> (shift + i)) & 1);
                code |= bit << p;
                if nps > 1 {
                    value += f(self.scales[sbase + p * TILE]) * bit as f32;
                }
            }
            if let Some(ss) = &super_scales {
                *w = ss.dequantize(
                    tile,
                    rr,
                    g,
                    self.groups,
                    code as i32 - i32::from(self.zero_point),
                );
                continue;
            }
            if nps == 1 {
                value = f(self.scales[sbase]) * (code as f32 - f32::from(self.zero_point));
            }
            if let Some(o) = &self.offsets {
                value += f(o[(tile * self.groups + g) * TILE + rr]);
            }
            *w = value;
        }
        Ok(())
    }

    /// The packed buffers, borrowed for the kernels.
    pub(crate) fn view(&self) -> Weights<'_> {
        Weights {
            bits: usize::from(self.spec.bits),
            per_plane: self.spec.plane_scales == PlaneScales::PerPlane,
            tiles: self.tiles,
            act_groups: self.cols() / ACT,
            groups: self.groups,
            weights: &self.weights,
            scales: &self.scales,
            offsets: self.offsets.as_deref(),
            centre: ((1u32 << self.spec.bits) - 1) as f32 * 0.5 - f32::from(self.zero_point),
            half_groups: self.half_groups,
            super_scales: self.super_scales.as_ref().map(SuperScaleBuffers::view),
        }
    }
}

/// Checks that each `outs[p]` holds `tokens` outputs of `mats[p]` for inputs of `cols` values,
/// then calls `run` on the matrices and outputs, at most [`MAX_PARTS`] at a time (one dispatch
/// each).
fn for_parts(
    mats: &[&PackedMatrix],
    outs: &mut [&mut [f32]],
    cols: usize,
    tokens: usize,
    mut run: impl FnMut(&[&PackedMatrix], &mut [&mut [f32]]),
) -> Result<()> {
    check_parts(
        "matmul output",
        |p| (mats[p].cols(), mats[p].rows()),
        mats.len(),
        cols,
        tokens,
        outs,
    )?;
    for (mats, outs) in mats.chunks(MAX_PARTS).zip(outs.chunks_mut(MAX_PARTS)) {
        run(mats, outs);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_rows_pack_like_the_whole_matrix() {
        let (rows, cols) = (150, 96);
        for (bits, grouping, plane_scales, offsets) in [
            (3, Grouping::Size(32), PlaneScales::Uniform, true),
            (4, Grouping::PerRow, PlaneScales::Uniform, false),
            (2, Grouping::Size(32), PlaneScales::PerPlane, true),
            (1, Grouping::PerTensor, PlaneScales::Uniform, true),
        ] {
            let spec = QuantSpec {
                rows,
                cols,
                bits,
                grouping,
                plane_scales,
            };
            let groups = match grouping {
                Grouping::Size(g) => rows * cols / g,
                Grouping::PerRow => rows,
                Grouping::PerTensor => 1,
            };
            let nps = if plane_scales == PlaneScales::PerPlane {
                usize::from(bits)
            } else {
                1
            };
            let codes: Vec<u8> = (0..rows * cols)
                .map(|i| ((i * 7 + i / 13) % (1 << bits)) as u8)
                .collect();
            let scales: Vec<f32> = (0..groups * nps).map(|i| 0.5 + i as f32 / 64.0).collect();
            let offs: Vec<f32> = (0..groups).map(|i| -(i as f32) / 32.0).collect();
            let whole = QuantizedWeights {
                spec,
                codes: &codes,
                scales: &scales,
                offsets: offsets.then_some(&offs[..]),
            };
            let a = PackedMatrix::pack(&whole).unwrap();
            let mut builder = PackedMatrixBuilder::new(spec, offsets).unwrap();
            let per_row = groups / rows.max(1);
            for block in [0..64, 64..128, 128..150] {
                let n = block.len();
                let (s, o) = match grouping {
                    Grouping::PerTensor => (&scales[..], &offs[..]),
                    _ => (
                        &scales[block.start * per_row * nps..block.end * per_row * nps],
                        &offs[block.start * per_row..block.end * per_row],
                    ),
                };
                builder
                    .push_rows(&QuantizedWeights {
                        spec: QuantSpec { rows: n, ..spec },
                        codes: &codes[block.start * cols..block.end * cols],
                        scales: s,
                        offsets: offsets.then_some(o),
                    })
                    .unwrap();
            }
            let b = builder.finish().unwrap();
            assert_eq!(a.weights[..], b.weights[..], "{spec:?}");
            assert_eq!(a.scales[..], b.scales[..], "{spec:?}");
            assert_eq!(a.offsets.as_deref(), b.offsets.as_deref(), "{spec:?}");
        }
    }

    #[test]
    fn a_builder_refuses_misplaced_or_missing_rows() {
        let spec = QuantSpec {
            rows: 100,
            cols: 32,
            bits: 2,
            grouping: Grouping::PerRow,
            plane_scales: PlaneScales::Uniform,
        };
        let codes = vec![1u8; 100 * 32];
        let scales = vec![1.0f32; 100];
        let block = |n: usize| QuantizedWeights {
            spec: QuantSpec { rows: n, ..spec },
            codes: &codes[..n * 32],
            scales: &scales[..n],
            offsets: None,
        };
        let mut builder = PackedMatrixBuilder::new(spec, false).unwrap();
        assert!(
            builder.push_rows(&block(30)).is_err(),
            "not a whole tile and not the last"
        );
        builder.push_rows(&block(64)).unwrap();
        assert!(builder.push_rows(&block(64)).is_err(), "past the last row");
        let with_offsets = QuantizedWeights {
            offsets: Some(&scales[..36]),
            ..block(36)
        };
        assert!(
            builder.push_rows(&with_offsets).is_err(),
            "offsets the builder has no room for"
        );
        assert!(PackedMatrixBuilder::new(spec, false)
            .unwrap()
            .finish()
            .is_err());
        builder.push_rows(&block(36)).unwrap();
        assert_eq!(builder.finish().unwrap().rows(), 100);
    }

    #[test]
    fn raw_parts_rebuild_the_matrix_and_lengths_are_checked() {
        let spec = QuantSpec {
            rows: 70,
            cols: 64,
            bits: 3,
            grouping: Grouping::Size(32),
            plane_scales: PlaneScales::PerPlane,
        };
        let codes: Vec<u8> = (0..70 * 64).map(|i| (i * 5 % 8) as u8).collect();
        let scales: Vec<f32> = (0..70 * 2 * 3).map(|i| 0.25 + i as f32 / 512.0).collect();
        let offsets: Vec<f32> = (0..70 * 2).map(|i| -(i as f32) / 64.0).collect();
        let m = PackedMatrix::pack(&QuantizedWeights {
            spec,
            codes: &codes,
            scales: &scales,
            offsets: Some(&offsets),
        })
        .unwrap();
        let p = m.raw_parts().unwrap();
        let layout = spec.packed_layout(true).unwrap();
        assert_eq!(p.weights.len(), layout.weight_bytes);
        assert_eq!(
            (p.scales.len(), layout.scales),
            (2 * 2 * 3 * 64, 2 * 2 * 3 * 64)
        );
        assert_eq!(p.offsets.map(<[u16]>::len), Some(layout.offsets));
        let owned = |v: &[u16]| Storage::owned(v.to_vec());
        let again = PackedMatrix::from_parts(
            spec,
            Storage::owned(p.weights.to_vec()),
            owned(p.scales),
            p.offsets.map(owned),
        )
        .unwrap();
        assert!(!again.is_mapped());
        let (mut a, mut b) = (vec![0.0f32; 64], vec![1.0f32; 64]);
        for r in [0, 63, 69] {
            m.dequantize_row(r, &mut a).unwrap();
            again.dequantize_row(r, &mut b).unwrap();
            assert_eq!(a, b);
        }
        let short = PackedMatrix::from_parts(
            spec,
            Storage::owned(p.weights[1..].to_vec()),
            owned(p.scales),
            p.offsets.map(owned),
        );
        assert!(matches!(short, Err(KernelError::LengthMismatch { .. })));
        let no_room = PackedMatrix::from_parts(
            spec,
            Storage::owned(p.weights.to_vec()),
            owned(&p.scales[..10]),
            None,
        );
        assert!(no_room.is_err());
        let huge = QuantSpec {
            rows: usize::MAX / 2,
            ..spec
        };
        assert!(
            huge.packed_layout(true).is_err(),
            "sizes that overflow are refused"
        );
    }
}
