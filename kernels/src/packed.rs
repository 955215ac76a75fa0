//! LUT-packed low-bit weight matrices and the mpGEMV/mpGEMM over them.
//!
//! Packing splits codes into bit planes and lays them out in row tiles (see `lut::layout`); the
//! multiply is done by the tile kernels of `lut`, chosen by the [`Cpu`]'s ISA.

use half::f16;

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::lut::layout::{ACT, PLANE_BYTES, ROW_BYTE, TABLES_PER_ACT, TILE};
use crate::lut::{self, Weights, MAX_BITS};
use crate::tables::ActivationTables;
use crate::tiling::{check_parts, MAX_PARTS};

mod super_block;

use super_block::SuperScaleBuffers;
pub use super_block::{SuperBlockWeights, SUPER_BLOCK};

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

/// A weight matrix repacked into the LUT layout (bit planes, nibbles, row tiles).
pub struct PackedMatrix {
    spec: QuantSpec,
    tiles: usize,
    groups: usize,
    /// `[tile][K/32][plane][256]`: nibbles of 4 columns of one plane, 64 rows per 32 bytes.
    weights: Vec<u8>,
    /// f16 bits, `[tile][group][plane or 1][64 rows]`; padded rows hold 0.
    scales: Vec<u16>,
    /// f16 bits, `[tile][group][64 rows]`.
    offsets: Option<Vec<u16>>,
    /// Weight groups of 16 (two per activation group).
    half_groups: bool,
    /// Two-level scales (super-block forms); `scales` is then empty and `offsets` `None`.
    super_scales: Option<SuperScaleBuffers>,
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

/// Bit `p` of each of the four codes in the bytes of `codes`, as a nibble (bit `i` = code `i`).
///
/// The mask leaves one bit per byte, at bit `8i`; the multiplier moves byte `i`'s bit to bit `24 + i`
/// (shift `24 − 7i`), and no two of the sixteen partial products share a bit, so nothing carries.
#[inline]
fn plane_nibble(codes: u32, p: usize) -> u8 {
    let bits = (codes >> p) & 0x0101_0101;
    (bits.wrapping_mul(0x0102_0408) >> 24) as u8 & 0x0F
}

/// The codes `[rows][cols]` (each `< 2^bits`, checked) split into bit planes, in the layout of
/// `lut::layout`: `[tile][K/32][plane][256]`.
fn pack_planes(codes: &[u8], rows: usize, cols: usize, bits_u8: u8) -> Result<Vec<u8>> {
    let bits = usize::from(bits_u8);
    let tiles = rows.div_ceil(TILE);
    let act_groups = cols / ACT;
    let tile_bytes = act_groups * bits * PLANE_BYTES;
    let mut packed = vec![0u8; tiles * tile_bytes];
    let max_code = (1u8 << bits) - 1;
    for (r, row) in codes.chunks_exact(cols).enumerate() {
        // One pass to validate (vectorizes), so the packing loop below has no branch per code.
        if row.iter().fold(0u8, |m, &c| m.max(c)) > max_code {
            let i = row.iter().position(|&c| c > max_code).unwrap_or(0);
            return Err(KernelError::CodeOutOfRange {
                code: row[i],
                index: r * cols + i,
                bits: bits_u8,
            });
        }
    }
    // Rows r and r + 32 of a tile share bytes (low and high nibble): build each byte once.
    let zeros = vec![0u8; cols];
    let row_codes = |r: usize| codes.get(r * cols..(r + 1) * cols).unwrap_or(&zeros);
    for (tile, packed_tile) in packed.chunks_exact_mut(tile_bytes).enumerate() {
        for (lo, &byte) in ROW_BYTE.iter().enumerate() {
            let r = tile * TILE + lo;
            if r >= rows {
                break;
            }
            let (low, high) = (row_codes(r), row_codes(r + 32));
            for (q, (ql, qh)) in low.chunks_exact(4).zip(high.chunks_exact(4)).enumerate() {
                let (a, j) = (q / TABLES_PER_ACT, q % TABLES_PER_ACT);
                let cl = u32::from_le_bytes([ql[0], ql[1], ql[2], ql[3]]);
                let ch = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                for p in 0..bits {
                    packed_tile[(a * bits + p) * PLANE_BYTES + j * 32 + byte] =
                        plane_nibble(cl, p) | plane_nibble(ch, p) << 4;
                }
            }
        }
    }
    Ok(packed)
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

impl PackedMatrix {
    /// Checks the inputs and repacks them. Scales and offsets are stored as f16. Codes have 1 to 6
    /// bits (Q5_0 and Q5_1 are 5-bit codes with f16 block scales).
    pub fn pack(weights: &QuantizedWeights<'_>) -> Result<PackedMatrix> {
        PackedMatrix::pack_float_scales(weights, MAX_BITS as u8)
    }

    /// [`PackedMatrix::pack`] for codes of up to `max_bits` bits (the kernels take up to
    /// `lut::MAX_BITS`).
    pub(crate) fn pack_float_scales(
        weights: &QuantizedWeights<'_>,
        max_bits: u8,
    ) -> Result<PackedMatrix> {
        let spec = weights.spec;
        let (rows, cols) = (spec.rows, spec.cols);
        if !(1..=max_bits).contains(&spec.bits) {
            return Err(KernelError::UnsupportedBits(spec.bits));
        }
        if cols == 0 || cols % ACT != 0 {
            return Err(KernelError::KNotMultipleOf32(cols));
        }
        let bits = usize::from(spec.bits);
        let gs = group_size(spec.grouping, cols)?;
        let groups = cols / gs;
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
        // Index of the scale (plane p) and offset of (row, group) in the caller's arrays.
        let scale_index = |r: usize, g: usize, p: usize| {
            if per_tensor {
                p
            } else {
                (r * groups + g) * nps + p
            }
        };
        let offset_index = |r: usize, g: usize| if per_tensor { 0 } else { r * groups + g };

        let tiles = rows.div_ceil(TILE);
        let packed = pack_planes(weights.codes, rows, cols, spec.bits)?;
        let mut scales = vec![0u16; tiles * groups * nps * TILE];
        let mut offsets = weights.offsets.map(|_| vec![0u16; tiles * groups * TILE]);
        for r in 0..rows {
            let (tile, rr) = (r / TILE, r % TILE);
            for g in 0..groups {
                for p in 0..nps {
                    let i = scale_index(r, g, p);
                    scales[((tile * groups + g) * nps + p) * TILE + rr] =
                        to_f16(weights.scales[i], i)?;
                }
                if let (Some(dst), Some(src)) = (offsets.as_mut(), weights.offsets) {
                    let i = offset_index(r, g);
                    dst[(tile * groups + g) * TILE + rr] = to_f16(src[i], i)?;
                }
            }
        }
        Ok(PackedMatrix {
            spec,
            tiles,
            groups,
            weights: packed,
            scales,
            offsets,
            half_groups: false,
            super_scales: None,
        })
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
        check_parts(
            "matmul output",
            |p| (mats[p].cols(), mats[p].rows()),
            mats.len(),
            tables.cols(),
            tables.tokens(),
            outs,
        )?;
        let t = tables.view();
        for (mats, outs) in mats.chunks(MAX_PARTS).zip(outs.chunks_mut(MAX_PARTS)) {
            lut::run(cpu, |p| (mats[p].view(), mats[p].rows()), &t, outs);
        }
        Ok(())
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
            if let Some(ss) = &self.super_scales {
                *w = ss.dequantize(tile, rr, g, self.groups, code);
                continue;
            }
            if nps == 1 {
                value = f(self.scales[sbase]) * code as f32;
            }
            if let Some(o) = &self.offsets {
                value += f(o[(tile * self.groups + g) * TILE + rr]);
            }
            *w = value;
        }
        Ok(())
    }

    /// The packed buffers, borrowed for the kernels.
    fn view(&self) -> Weights<'_> {
        Weights {
            bits: usize::from(self.spec.bits),
            per_plane: self.spec.plane_scales == PlaneScales::PerPlane,
            tiles: self.tiles,
            act_groups: self.cols() / ACT,
            groups: self.groups,
            weights: &self.weights,
            scales: &self.scales,
            offsets: self.offsets.as_deref(),
            half_groups: self.half_groups,
            super_scales: self.super_scales.as_ref().map(SuperScaleBuffers::view),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::plane_nibble;

    #[test]
    fn plane_nibble_gathers_one_bit_of_each_code() {
        for quad in 0..1u32 << 16 {
            let codes: [u8; 4] = std::array::from_fn(|i| ((quad >> (4 * i)) & 0xF) as u8);
            for p in 0..4 {
                let expected = (0..4).fold(0u8, |n, i| n | (((codes[i] >> p) & 1) << i));
                assert_eq!(plane_nibble(u32::from_le_bytes(codes), p), expected);
            }
        }
    }
}
