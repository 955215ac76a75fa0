//! One table from source tensor types (GGUF Q4_1, Q8_0, F16, GPTQ, ...) to what the kernels take:
//! low-bit codes + group scales + offsets, int8 codes + block scales, or dense f32.
//!
//! Every ggml type lutra reads is decoded here and nowhere else ([`decode_ggml`]); block layouts
//! follow llama.cpp's `ggml-common.h` / `ggml-quants.c` exactly. Nothing is requantized: each
//! variant reproduces the source values bit for bit (up to f16→f32 widening of the scales).

use half::{bf16, f16};
use lutra_kernels::KVALUES_IQ4NL;

mod iq_grids;
use iq_grids::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KMASK_IQ2XS,
    KSIGNS_IQ2XS,
};

/// A decoded weight tensor of shape `[rows][cols]` (cols = K, the fastest-varying dimension).
#[derive(Clone, Debug, PartialEq)]
pub enum DecodedTensor {
    /// `w = scale·q + offset` per group of `group_size` elements along a row (Q4_0, Q4_1, ...).
    LowBit {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Bits per code (1..=6).
        bits: u8,
        /// Elements per group.
        group_size: usize,
        /// One code per element, row-major.
        codes: Vec<u8>,
        /// `[rows][cols / group_size]`.
        scales: Vec<f32>,
        /// `[rows][cols / group_size]`.
        offsets: Vec<f32>,
    },
    /// `w = z + Σ_p s_p·q_p` over the bit planes `q_p` of each code, with one scale per plane and
    /// an offset `z` per group of `group_size` elements along a row (HLQ, from `lutra quantize`).
    PlaneLowBit {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Bits per code (1..=4): the number of planes.
        bits: u8,
        /// Elements per group.
        group_size: usize,
        /// One code per element, row-major.
        codes: Vec<u8>,
        /// `[rows][cols / group_size][bits]`, plane 0 least significant.
        scales: Vec<f32>,
        /// `[rows][cols / group_size]`.
        offsets: Vec<f32>,
    },
    /// `w = scale·q` with int8 `q` and one scale per block of 32 (Q8_0, Q8_K,
    /// IQ2_XXS, IQ3_XXS, IQ1_S with a tiny scale) or of 16 (IQ2_XS, IQ2_S, IQ1_M with a tiny
    /// scale).
    Int8 {
        /// Output features.
        rows: usize,
        /// Input features (a multiple of 32).
        cols: usize,
        /// Elements per scale along a row: 32 or 16.
        block: usize,
        /// One code per element, row-major.
        codes: Vec<i8>,
        /// `[rows][cols / block]`.
        scales: Vec<f32>,
    },
    /// `w = scale·KVALUES_IQ4NL[i]` with 4-bit codebook indices `i` and one scale per block of 32
    /// (IQ4_NL, IQ4_XS), kept at 4 bits for the int8 kernel.
    Iq4 {
        /// Output features.
        rows: usize,
        /// Input features (a multiple of 32).
        cols: usize,
        /// `[rows][cols / 32][16]` bytes in ggml's IQ4_NL order: byte `j` of a block holds element
        /// `j` in its low nibble and element `j + 16` in its high nibble.
        nibbles: Vec<u8>,
        /// `[rows][cols / 32]`.
        scales: Vec<f32>,
    },
    /// K-quant super-blocks of 256: `w = (d·sc)·(q − zero_point) − dmin·m`, with integer
    /// sub-scales `sc` (and sub-mins `m`) per group of `group` elements and f16 `d` (and `dmin`)
    /// per super-block (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ3_S, IQ1_S, IQ1_M).
    SuperBlock {
        /// Output features.
        rows: usize,
        /// Input features (a multiple of 256).
        cols: usize,
        /// Bits per code (2..=6).
        bits: u8,
        /// Elements per sub-scale group: 16 or 32.
        group: usize,
        /// Subtracted from every code before scaling (Q3_K: 4, Q6_K: 32, IQ3_S: 8, IQ1_S: 1,
        /// IQ1_M: 9, else 0).
        zero_point: u8,
        /// One code per element, row-major.
        codes: Vec<u8>,
        /// `[rows][cols / group]`.
        sub_scales: Vec<i8>,
        /// `[rows][cols / group]`, for the types with mins.
        sub_mins: Option<Vec<u8>>,
        /// f16 bits, `[rows][cols / 256]`.
        d: Vec<u16>,
        /// f16 bits, `[rows][cols / 256]`, for the types with mins.
        dmin: Option<Vec<u16>>,
    },
    /// Dense values, row-major (F32, F16, BF16, and types kept exact that are not low-bit).
    Dense {
        /// Output features (1 for vectors).
        rows: usize,
        /// Input features.
        cols: usize,
        /// `rows·cols` values.
        values: Vec<f32>,
    },
}

impl DecodedTensor {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            DecodedTensor::LowBit { rows, .. }
            | DecodedTensor::PlaneLowBit { rows, .. }
            | DecodedTensor::Int8 { rows, .. }
            | DecodedTensor::Iq4 { rows, .. }
            | DecodedTensor::SuperBlock { rows, .. }
            | DecodedTensor::Dense { rows, .. } => *rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            DecodedTensor::LowBit { cols, .. }
            | DecodedTensor::PlaneLowBit { cols, .. }
            | DecodedTensor::Int8 { cols, .. }
            | DecodedTensor::Iq4 { cols, .. }
            | DecodedTensor::SuperBlock { cols, .. }
            | DecodedTensor::Dense { cols, .. } => *cols,
        }
    }

    /// Rows `start..start + count`, in the same form.
    pub fn row_range(&self, start: usize, count: usize) -> DecodedTensor {
        match self {
            DecodedTensor::LowBit {
                cols,
                bits,
                group_size,
                codes,
                scales,
                offsets,
                ..
            } => {
                let groups = cols / (*group_size).max(1);
                DecodedTensor::LowBit {
                    rows: count,
                    cols: *cols,
                    bits: *bits,
                    group_size: *group_size,
                    codes: codes[start * cols..(start + count) * cols].to_vec(),
                    scales: scales[start * groups..(start + count) * groups].to_vec(),
                    offsets: offsets[start * groups..(start + count) * groups].to_vec(),
                }
            }
            DecodedTensor::PlaneLowBit {
                cols,
                bits,
                group_size,
                codes,
                scales,
                offsets,
                ..
            } => {
                let groups = cols / (*group_size).max(1);
                let planes = usize::from(*bits);
                DecodedTensor::PlaneLowBit {
                    rows: count,
                    cols: *cols,
                    bits: *bits,
                    group_size: *group_size,
                    codes: codes[start * cols..(start + count) * cols].to_vec(),
                    scales: scales[start * groups * planes..(start + count) * groups * planes]
                        .to_vec(),
                    offsets: offsets[start * groups..(start + count) * groups].to_vec(),
                }
            }
            DecodedTensor::Int8 {
                cols,
                block,
                codes,
                scales,
                ..
            } => {
                let blocks = cols / (*block).max(1);
                DecodedTensor::Int8 {
                    rows: count,
                    cols: *cols,
                    block: *block,
                    codes: codes[start * cols..(start + count) * cols].to_vec(),
                    scales: scales[start * blocks..(start + count) * blocks].to_vec(),
                }
            }
            DecodedTensor::Iq4 {
                cols,
                nibbles,
                scales,
                ..
            } => {
                let blocks = cols / 32;
                DecodedTensor::Iq4 {
                    rows: count,
                    cols: *cols,
                    nibbles: nibbles[start * cols / 2..(start + count) * cols / 2].to_vec(),
                    scales: scales[start * blocks..(start + count) * blocks].to_vec(),
                }
            }
            DecodedTensor::SuperBlock {
                cols,
                bits,
                group,
                zero_point,
                codes,
                sub_scales,
                sub_mins,
                d,
                dmin,
                ..
            } => {
                let (groups, supers) = (cols / group, cols / 256);
                let rows_of = |v: &[u16]| v[start * supers..(start + count) * supers].to_vec();
                DecodedTensor::SuperBlock {
                    rows: count,
                    cols: *cols,
                    bits: *bits,
                    group: *group,
                    zero_point: *zero_point,
                    codes: codes[start * cols..(start + count) * cols].to_vec(),
                    sub_scales: sub_scales[start * groups..(start + count) * groups].to_vec(),
                    sub_mins: sub_mins
                        .as_ref()
                        .map(|m| m[start * groups..(start + count) * groups].to_vec()),
                    d: rows_of(d),
                    dmin: dmin.as_deref().map(rows_of),
                }
            }
            DecodedTensor::Dense { cols, values, .. } => DecodedTensor::Dense {
                rows: count,
                cols: *cols,
                values: values[start * cols..(start + count) * cols].to_vec(),
            },
        }
    }

    /// All `rows·cols` values as f32, row-major (for reference paths, requantization and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            DecodedTensor::LowBit {
                group_size,
                codes,
                scales,
                offsets,
                ..
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    let g = i / group_size;
                    scales[g] * f32::from(q) + offsets[g]
                })
                .collect(),
            DecodedTensor::PlaneLowBit {
                bits,
                group_size,
                codes,
                scales,
                offsets,
                ..
            } => {
                let planes = usize::from(*bits);
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| {
                        let g = i / group_size;
                        let s = &scales[g * planes..(g + 1) * planes];
                        s.iter()
                            .enumerate()
                            .filter(|&(p, _)| (q >> p) & 1 == 1)
                            .fold(offsets[g], |w, (_, &sp)| w + sp)
                    })
                    .collect()
            }
            DecodedTensor::Int8 {
                block,
                codes,
                scales,
                ..
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &q)| scales[i / block] * f32::from(q))
                .collect(),
            DecodedTensor::Iq4 {
                nibbles, scales, ..
            } => nibbles
                .chunks_exact(16)
                .zip(scales)
                .flat_map(|(qs, &d)| iq4_nl_codes(qs).map(move |q| d * f32::from(q)))
                .collect(),
            DecodedTensor::SuperBlock {
                group,
                zero_point,
                codes,
                sub_scales,
                sub_mins,
                d,
                dmin,
                ..
            } => {
                let h = |bits: u16| f16::from_bits(bits).to_f32();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| {
                        let (g, b) = (i / group, i / QK_K);
                        // The products in ggml's order: (d·sc)·(q − z) − dmin·m, each in f32.
                        let scale = h(d[b]) * f32::from(sub_scales[g]);
                        let w = scale * f32::from(i16::from(q) - i16::from(*zero_point));
                        match (sub_mins, dmin) {
                            (Some(m), Some(dm)) => w - h(dm[b]) * f32::from(m[g]),
                            _ => w,
                        }
                    })
                    .collect()
            }
            DecodedTensor::Dense { values, .. } => values.clone(),
        }
    }
}

/// A ggml tensor type, as numbered in `ggml.h`.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    I2_S,
    MXFP4,
}

/// The K-quant super-block size.
const QK_K: usize = 256;

/// The I2_S block: 128 ternary codes in 32 bytes (bitnet.cpp's x86 layout, `QK_I2_S`).
const QK_I2_S: usize = 128;

/// What lutra knows about one ggml type (like ggml's `type_traits`): its number, its block, the
/// bytes a tensor stores once after all of its blocks (I2_S's scale), and the decoder that turns
/// whole blocks into a kernel form, when lutra reads the type.
struct TypeTraits {
    id: u32,
    ty: GgmlType,
    block_elems: usize,
    block_bytes: usize,
    tensor_tail: usize,
    /// `z` when every block's offset is `−z·d` (Q4_0: 8, Q5_0: 16): the kernels then need no
    /// offsets.
    zero_point: Option<u8>,
    decode: Option<fn(Blocks<'_>) -> DecodedTensor>,
}

const fn traits(
    id: u32,
    ty: GgmlType,
    block_elems: usize,
    block_bytes: usize,
    decode: Option<fn(Blocks<'_>) -> DecodedTensor>,
) -> TypeTraits {
    TypeTraits {
        id,
        ty,
        block_elems,
        block_bytes,
        tensor_tail: 0,
        zero_point: None,
        decode,
    }
}

impl TypeTraits {
    /// The same type with codes centred on `z`: every block's offset is `−z·d`.
    const fn with_zero_point(self, z: u8) -> TypeTraits {
        TypeTraits {
            zero_point: Some(z),
            ..self
        }
    }

    /// The same type with `bytes` stored once per tensor after its blocks.
    const fn with_tensor_tail(self, bytes: usize) -> TypeTraits {
        TypeTraits {
            tensor_tail: bytes,
            ..self
        }
    }
}

/// Every ggml type whose size is known, so that files holding types lutra cannot decode can still
/// be opened and listed. Adding a type is one entry here (and its decoder below). The kernel form
/// is the [`DecodedTensor`] variant the decoder returns: low-bit codes for the LUT kernels, int8
/// codes, or dense values.
const TYPES: [TypeTraits; 33] = {
    use GgmlType::*;
    [
        traits(0, F32, 1, 4, Some(decode_f32)),
        traits(1, F16, 1, 2, Some(decode_f16)),
        traits(2, Q4_0, 32, 18, Some(decode_q4_0)).with_zero_point(8),
        traits(3, Q4_1, 32, 20, Some(decode_q4_1)),
        traits(6, Q5_0, 32, 22, Some(decode_q5_0)).with_zero_point(16),
        traits(7, Q5_1, 32, 24, Some(decode_q5_1)),
        traits(8, Q8_0, 32, 34, Some(decode_q8_0)),
        traits(9, Q8_1, 32, 36, None),
        traits(10, Q2_K, QK_K, 84, Some(decode_q2_k)),
        traits(11, Q3_K, QK_K, 110, Some(decode_q3_k)),
        traits(12, Q4_K, QK_K, 144, Some(decode_q4_k)),
        traits(13, Q5_K, QK_K, 176, Some(decode_q5_k)),
        traits(14, Q6_K, QK_K, 210, Some(decode_q6_k)),
        traits(15, Q8_K, QK_K, 292, Some(decode_q8_k)),
        traits(16, IQ2_XXS, QK_K, 66, Some(decode_iq2_xxs)),
        traits(17, IQ2_XS, QK_K, 74, Some(decode_iq2_xs)),
        traits(18, IQ3_XXS, QK_K, 98, Some(decode_iq3_xxs)),
        traits(19, IQ1_S, QK_K, 50, Some(decode_iq1_s)),
        traits(20, IQ4_NL, 32, 18, Some(decode_iq4_nl)),
        traits(21, IQ3_S, QK_K, 110, Some(decode_iq3_s)),
        traits(22, IQ2_S, QK_K, 82, Some(decode_iq2_s)),
        traits(23, IQ4_XS, QK_K, 136, Some(decode_iq4_xs)),
        traits(24, I8, 1, 1, None),
        traits(25, I16, 1, 2, None),
        traits(26, I32, 1, 4, None),
        traits(27, I64, 1, 8, None),
        traits(28, F64, 1, 8, None),
        traits(29, IQ1_M, QK_K, 56, Some(decode_iq1_m)),
        traits(30, BF16, 1, 2, Some(decode_bf16)),
        traits(34, TQ1_0, QK_K, 54, Some(decode_tq1_0)),
        traits(35, TQ2_0, QK_K, 66, Some(decode_tq2_0)),
        // bitnet.cpp's type (its ggml fork's id 36, free in ggml's own numbering).
        traits(36, I2_S, QK_I2_S, 32, Some(decode_i2_s)).with_tensor_tail(32),
        traits(39, MXFP4, 32, 17, None),
    ]
};

impl GgmlType {
    fn traits(self) -> &'static TypeTraits {
        // The table has one entry per variant (checked by a unit test), so the search succeeds.
        TYPES.iter().find(|t| t.ty == self).unwrap_or(&TYPES[0])
    }

    /// The code `z` that the type's codes are centred on when its decoded offsets are `−z·d`
    /// in every block (Q4_0: 8, Q5_0: 16), so that a kernel form needs no offsets.
    pub fn zero_point(self) -> Option<u8> {
        self.traits().zero_point
    }

    /// The type with ggml id `id`, if lutra knows its size.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.id == id).map(|t| t.ty)
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        self.traits().id
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        self.traits().block_elems
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.traits().block_bytes
    }

    /// The type's name as ggml spells it (`"Q4_1"`, `"F32"`, ...).
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    /// Whether [`decode_ggml`] can decode this type.
    pub fn is_decodable(self) -> bool {
        self.traits().decode.is_some()
    }

    /// Bytes of the blocks of `elems` elements (e.g. of one row), or `None` when `elems` is not a
    /// whole number of blocks. A tensor may store more: see [`GgmlType::tensor_bytes`].
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Bytes a tensor stores once after all of its blocks: 32 for I2_S (its f32 scale, padded),
    /// 0 for every other type.
    pub fn tensor_tail(self) -> usize {
        self.traits().tensor_tail
    }

    /// Bytes of a whole tensor of `elems` elements: its blocks and its tail, or `None` when
    /// `elems` is not a whole number of blocks.
    pub fn tensor_bytes(self, elems: usize) -> Option<usize> {
        self.bytes_for(elems)?.checked_add(self.tensor_tail())
    }
}

/// Why [`decode_ggml`] refused a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// lutra has no decoder for this type.
    Unsupported(GgmlType),
    /// A row is not a whole number of blocks, or the data has the wrong length.
    BadShape(String),
}

/// Decodes `rows·cols` elements of type `ty` from `data` (exactly the tensor's bytes).
///
/// `cols` is GGUF's `ne0` (fastest varying), `rows` the product of the other dimensions.
pub fn decode_ggml(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
) -> Result<DecodedTensor, DecodeError> {
    row_decoder(ty, cols)?;
    let expected = rows
        .checked_mul(cols)
        .and_then(|n| ty.tensor_bytes(n))
        .ok_or_else(|| DecodeError::BadShape(format!("{rows}x{cols} elements overflow")))?;
    if data.len() != expected {
        return Err(DecodeError::BadShape(format!(
            "{rows}x{cols} {} needs {expected} bytes, got {}",
            ty.name(),
            data.len()
        )));
    }
    let (blocks, tail) = data.split_at(expected - ty.tensor_tail());
    decode_ggml_rows(ty, rows, cols, blocks, tail)
}

/// Decodes `rows` rows of `cols` elements of type `ty` from their blocks, exactly as
/// [`decode_ggml`] decodes them as part of their tensor: `tail` is the tensor's
/// [`GgmlType::tensor_tail`] (its last bytes; empty for most types).
pub fn decode_ggml_rows(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    blocks: &[u8],
    tail: &[u8],
) -> Result<DecodedTensor, DecodeError> {
    let decode = row_decoder(ty, cols)?;
    let expected = rows
        .checked_mul(cols)
        .and_then(|n| ty.bytes_for(n))
        .ok_or_else(|| DecodeError::BadShape(format!("{rows}x{cols} elements overflow")))?;
    if blocks.len() != expected || tail.len() != ty.tensor_tail() {
        return Err(DecodeError::BadShape(format!(
            "{rows} rows of {cols} {} need {expected} bytes of blocks and {} after them, got {} \
             and {}",
            ty.name(),
            ty.tensor_tail(),
            blocks.len(),
            tail.len()
        )));
    }
    Ok(decode(Blocks {
        rows,
        cols,
        data: blocks,
        block_bytes: ty.block_bytes(),
        tail,
    }))
}

/// The decoder of `ty`, after checking that rows of `cols` elements are whole blocks.
fn row_decoder(ty: GgmlType, cols: usize) -> Result<fn(Blocks<'_>) -> DecodedTensor, DecodeError> {
    let traits = ty.traits();
    let decode = traits.decode.ok_or(DecodeError::Unsupported(ty))?;
    if !cols.is_multiple_of(traits.block_elems) {
        return Err(DecodeError::BadShape(format!(
            "row length {cols} is not a multiple of the {} block of {} elements",
            ty.name(),
            traits.block_elems
        )));
    }
    Ok(decode)
}

/// The blocks of one tensor (or of some of its rows), checked against their shape, as handed to
/// a type's decoder, with the tensor's tail.
#[derive(Clone, Copy)]
struct Blocks<'a> {
    rows: usize,
    cols: usize,
    data: &'a [u8],
    block_bytes: usize,
    /// The bytes the tensor stores after all of its blocks ([`GgmlType::tensor_tail`]).
    tail: &'a [u8],
}

impl<'a> Blocks<'a> {
    /// Elements of the tensor.
    fn elems(&self) -> usize {
        self.rows * self.cols
    }

    /// The blocks in file order.
    fn iter(&self) -> std::slice::ChunksExact<'a, u8> {
        self.data.chunks_exact(self.block_bytes)
    }
}

fn decode_f32(t: Blocks<'_>) -> DecodedTensor {
    let values = t
        .iter()
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    dense(t.rows, t.cols, values)
}

fn decode_f16(t: Blocks<'_>) -> DecodedTensor {
    dense(t.rows, t.cols, t.iter().map(|b| f16_at(b, 0)))
}

fn decode_bf16(t: Blocks<'_>) -> DecodedTensor {
    let values = t.iter().map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32());
    dense(t.rows, t.cols, values)
}

fn decode_q4_0(t: Blocks<'_>) -> DecodedTensor {
    decode_q4_legacy(t, false)
}

fn decode_q4_1(t: Blocks<'_>) -> DecodedTensor {
    decode_q4_legacy(t, true)
}

/// Q4_0 (`w = d·(q − 8)`) and Q4_1 (`w = d·q + m`): 4-bit codes, groups of 32.
fn decode_q4_legacy(t: Blocks<'_>, has_min: bool) -> DecodedTensor {
    let mut lb = LowBitBuilder::new(t.elems(), 32);
    for b in t.iter() {
        let (d, m, qs) = if has_min {
            (f16_at(b, 0), f16_at(b, 2), &b[4..20])
        } else {
            let d = f16_at(b, 0);
            (d, -8.0 * d, &b[2..18])
        };
        // Low nibbles hold elements 0..16, high nibbles 16..32.
        let mut codes = [0u8; 32];
        for (j, &q) in qs.iter().enumerate().take(16) {
            codes[j] = q & 0xF;
            codes[j + 16] = q >> 4;
        }
        lb.group_codes(d, m, &codes);
    }
    lb.finish(t.rows, t.cols, 4)
}

fn decode_q8_0(t: Blocks<'_>) -> DecodedTensor {
    let Blocks { rows, cols, .. } = t;
    let (n, blocks) = (t.elems(), t.iter());
    let mut codes = Vec::with_capacity(n);
    let mut scales = Vec::with_capacity(n / 32);
    for b in blocks {
        scales.push(f16_at(b, 0));
        codes.extend(b[2..34].iter().map(|&q| q as i8));
    }
    DecodedTensor::Int8 {
        rows,
        cols,
        block: 32,
        codes,
        scales,
    }
}

fn decode_q8_k(t: Blocks<'_>) -> DecodedTensor {
    let Blocks { rows, cols, .. } = t;
    let (n, blocks) = (t.elems(), t.iter());
    // One f32 scale per 256; the Int8 variant wants one per 32, so repeat it (exact).
    let mut codes = Vec::with_capacity(n);
    let mut scales = Vec::with_capacity(n / 32);
    for b in blocks {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        scales.extend([d; QK_K / 32]);
        codes.extend(b[4..4 + QK_K].iter().map(|&q| q as i8));
    }
    DecodedTensor::Int8 {
        rows,
        cols,
        block: 32,
        codes,
        scales,
    }
}

/// Q5_0: `w = d·(q − 16)` with 5-bit `q`, groups of 32 (offset `−16·d`, exact).
fn decode_q5_0(t: Blocks<'_>) -> DecodedTensor {
    let mut lb = LowBitBuilder::new(t.elems(), 32);
    for b in t.iter() {
        let d = f16_at(b, 0);
        lb.group(d, -16.0 * d, q5_block(&b[2..6], &b[6..22]).into_iter());
    }
    lb.finish(t.rows, t.cols, 5)
}

/// IQ4_NL: `w = d·kvalues[idx]` with an f16 `d` per 32 elements; the indices stay 4-bit.
fn decode_iq4_nl(t: Blocks<'_>) -> DecodedTensor {
    let Blocks { rows, cols, .. } = t;
    let (n, blocks) = (t.elems(), t.iter());
    let mut nibbles = Vec::with_capacity(n / 2);
    let mut scales = Vec::with_capacity(n / 32);
    for b in blocks {
        scales.push(f16_at(b, 0));
        nibbles.extend_from_slice(&b[2..18]);
    }
    DecodedTensor::Iq4 {
        rows,
        cols,
        nibbles,
        scales,
    }
}

/// IQ4_XS: super-blocks of 256 whose 32-element sub-blocks are IQ4_NL blocks with scale
/// `dl = d·(ls − 32)`, computed in f32 as `dequantize_row_iq4_xs` does (exact: an f16 times a
/// 6-bit integer); the indices stay 4-bit.
fn decode_iq4_xs(t: Blocks<'_>) -> DecodedTensor {
    let Blocks { rows, cols, .. } = t;
    let (n, blocks) = (t.elems(), t.iter());
    let mut nibbles = Vec::with_capacity(n / 2);
    let mut scales = Vec::with_capacity(n / 32);
    for b in blocks {
        let d = f16_at(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let (scales_l, qs) = (&b[4..8], &b[8..136]);
        for ib in 0..QK_K / 32 {
            let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
            let high = ((scales_h >> (2 * ib)) & 3) as u8;
            let ls = i32::from(low | (high << 4));
            scales.push(d * (ls - 32) as f32);
        }
        nibbles.extend_from_slice(qs);
    }
    DecodedTensor::Iq4 {
        rows,
        cols,
        nibbles,
        scales,
    }
}

/// IQ2_XXS: per 32 elements a 4-bit `ls` and four 8-element grid entries with 7-bit sign
/// patterns: `w = db·grid[j]·sign` with `db = d·(0.5 + ls)·0.25`. The signed grid values
/// (±8, ±25, ±43) are the int8 codes and `db` (exact in f32: an f16 times `(2ls + 1)/8`) the scale.
fn decode_iq2_xxs(t: Blocks<'_>) -> DecodedTensor {
    let mut codes = Vec::with_capacity(t.elems());
    let mut scales = Vec::with_capacity(t.elems() / 32);
    for b in t.iter() {
        let d = f16_at(b, 0);
        for sub in b[2..66].chunks_exact(8) {
            let (indices, aux) = (&sub[0..4], u32_at(sub, 4));
            scales.push(d * (0.5 + (aux >> 28) as f32) * 0.25);
            for (l, &index) in indices.iter().enumerate() {
                let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                let grid = IQ2XXS_GRID[usize::from(index)].to_le_bytes();
                codes.extend(signed_grid(&grid, signs));
            }
        }
    }
    DecodedTensor::Int8 {
        rows: t.rows,
        cols: t.cols,
        block: 32,
        codes,
        scales,
    }
}

/// IQ2_XS: per 32 elements two 4-bit scales `ls` (one per 16) and four 16-bit words of a 9-bit
/// grid index and a 7-bit sign pattern: `w = db·grid[j]·sign` with `db = d·(0.5 + ls)·0.25`.
/// The scale changes every 16 elements, so the form is int8 with one scale per 16 and codes ±8,
/// ±25, ±43: `(2ls + 1)·grid` overflows int8 (one scale per 32), and ±43 needs 7-bit codes, more
/// than the super-block form has.
fn decode_iq2_xs(t: Blocks<'_>) -> DecodedTensor {
    let mut codes = Vec::with_capacity(t.elems());
    let mut scales = Vec::with_capacity(t.elems() / 16);
    for b in t.iter() {
        let d = f16_at(b, 0);
        let (qs, sc) = (&b[2..66], &b[66..74]);
        for (words, &sc) in qs.chunks_exact(8).zip(sc) {
            scales.extend(iq2_half_scales(d, sc));
            for word in words.chunks_exact(2) {
                let q = u16::from_le_bytes([word[0], word[1]]);
                let grid = IQ2XS_GRID[usize::from(q & 511)].to_le_bytes();
                codes.extend(signed_grid(&grid, KSIGNS_IQ2XS[usize::from(q >> 9)]));
            }
        }
    }
    DecodedTensor::Int8 {
        rows: t.rows,
        cols: t.cols,
        block: 16,
        codes,
        scales,
    }
}

/// IQ2_S: like IQ2_XS with 10-bit grid indices (8 bits in `qs`, 2 in `qh`) into a larger grid of
/// the same values and explicit 8-bit sign bytes; int8 with one scale per 16.
fn decode_iq2_s(t: Blocks<'_>) -> DecodedTensor {
    let mut codes = Vec::with_capacity(t.elems());
    let mut scales = Vec::with_capacity(t.elems() / 16);
    for b in t.iter() {
        let d = f16_at(b, 0);
        let (qs, signs, qh, sc) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
        for (ib, ((indices, signs), &sc)) in qs
            .chunks_exact(4)
            .zip(signs.chunks_exact(4))
            .zip(sc)
            .enumerate()
        {
            scales.extend(iq2_half_scales(d, sc));
            for (l, (&low, &sign)) in indices.iter().zip(signs).enumerate() {
                let high = (usize::from(qh[ib]) << (8 - 2 * l)) & 0x300;
                let grid = IQ2S_GRID[usize::from(low) | high].to_le_bytes();
                codes.extend(signed_grid(&grid, sign));
            }
        }
    }
    DecodedTensor::Int8 {
        rows: t.rows,
        cols: t.cols,
        block: 16,
        codes,
        scales,
    }
}

/// The two 16-element scales `d·(0.5 + ls)·0.25` of an IQ2_XS/IQ2_S sub-block from its scale
/// byte (low nibble first), computed in f32 as ggml does (exact: an f16 times `(2ls + 1)/8`).
fn iq2_half_scales(d: f32, sc: u8) -> [f32; 2] {
    [sc & 0xF, sc >> 4].map(|ls| d * (0.5 + f32::from(ls)) * 0.25)
}

/// IQ3_XXS: per 32 elements a 4-bit `ls`, eight 4-element grid entries and four 7-bit sign
/// patterns: `w = db·grid[j]·sign` with `db = d·(0.5 + ls)·0.5`. The signed grid values (at most
/// ±62, not evenly spaced) are the int8 codes and `db` (exact in f32) the scale.
fn decode_iq3_xxs(t: Blocks<'_>) -> DecodedTensor {
    let mut codes = Vec::with_capacity(t.elems());
    let mut scales = Vec::with_capacity(t.elems() / 32);
    for b in t.iter() {
        let d = f16_at(b, 0);
        let (qs, scales_and_signs) = (&b[2..66], &b[66..98]);
        for (indices, aux) in qs.chunks_exact(8).zip(scales_and_signs.chunks_exact(4)) {
            let aux = u32_at(aux, 0);
            scales.push(d * (0.5 + (aux >> 28) as f32) * 0.5);
            for (l, pair) in indices.chunks_exact(2).enumerate() {
                let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                let mut grid = [0u8; 8];
                grid[..4].copy_from_slice(&IQ3XXS_GRID[usize::from(pair[0])].to_le_bytes());
                grid[4..].copy_from_slice(&IQ3XXS_GRID[usize::from(pair[1])].to_le_bytes());
                codes.extend(signed_grid(&grid, signs));
            }
        }
    }
    DecodedTensor::Int8 {
        rows: t.rows,
        cols: t.cols,
        block: 32,
        codes,
        scales,
    }
}

/// IQ3_S: per 32 elements a 4-bit `s`, eight 9-bit indices into a grid of odd values 1..15 and
/// 32 sign bits: `w = db·grid[j]·sign` with `db = d·(1 + 2s)` (f32). A signed odd value
/// `v = 2q − 15` (`q` in 0..15) makes it the super-block form with mins, groups of 32:
/// `(d·2(1 + 2s))·(q − 8) − (−d)·(1 + 2s)`. Each product and the difference are exact in f32 (`d`
/// is the file's f16, the result has at most 20 significant bits), so the weights are ggml's.
/// (The plain low-bit form would round the scale `2db` to f16.)
fn decode_iq3_s(t: Blocks<'_>) -> DecodedTensor {
    let mut sb = SuperBlockBuilder::new(t, 4, 32, 8, true);
    for b in t.iter() {
        let (qs, qh, signs, sc) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
        for (k, (indices, signs)) in qs.chunks_exact(8).zip(signs.chunks_exact(4)).enumerate() {
            let odd = 1 + 2 * ((sc[k / 2] >> (4 * (k % 2))) & 0xF);
            let mut values = [0i8; 32];
            for (l, (out, &sign)) in values.chunks_exact_mut(8).zip(signs).enumerate() {
                let mut grid = [0u8; 8];
                for (i, half) in grid.chunks_exact_mut(4).enumerate() {
                    let high = (u16::from(qh[k]) << (8 - 2 * l - i)) & 256;
                    let index = usize::from(u16::from(indices[2 * l + i]) | high);
                    half.copy_from_slice(&IQ3S_GRID[index].to_le_bytes());
                }
                out.copy_from_slice(&signed_grid(&grid, sign));
            }
            let codes = values.iter().map(|&v| ((i16::from(v) + 15) / 2) as u8);
            sb.group(2 * odd as i8, odd, codes);
        }
        // dmin = −d: flipping the sign bit of the f16 is exact.
        let d = f16_bits_at(b, 0);
        sb.super_block(d, d ^ 0x8000);
    }
    sb.finish()
}

/// IQ1_S: per 32 elements a 3-bit `s`, a shift sign and four 11-bit indices into a grid of
/// ternary values `g` (−1, 0, 1): `w = dl·(g + δ)` with `dl = d·(2s + 1)` and `δ = ±1/8`.
///
/// When every block's `d/8` is an f16 (always for `|d| ≥ 2^-11`) the form is 2-bit super-blocks
/// with mins, groups of 32, zero point 1: `(d·(2s + 1))·(q − 1) − (d/8)·m` with `q = g + 1`,
/// `m = 2s + 1` for `δ < 0` and `q = g + 2`, `m = 7·(2s + 1)` for `δ > 0`. Each product and the
/// difference are exact in f32 (the result has at most 19 significant bits). Otherwise it is int8
/// with one scale `dl/8` per 32 and codes `8g + 8δ` (±1, ±7, ±9), also exact.
fn decode_iq1_s(t: Blocks<'_>) -> DecodedTensor {
    let eighths: Option<Vec<u16>> = t
        .iter()
        .map(|b| f16_eighth(f16::from_bits(f16_bits_at(b, 0))))
        .collect();
    if let Some(eighths) = eighths {
        return decode_iq1_s_super_blocks(t, eighths);
    }
    let mut codes = Vec::with_capacity(t.elems());
    let mut scales = Vec::with_capacity(t.elems() / 32);
    for b in t.iter() {
        let d = f16_at(b, 0);
        for (indices, qh) in iq1_s_sub_blocks(b) {
            let dl = d * f32::from(2 * ((qh >> 12) & 7) + 1);
            scales.push(dl * IQ1_DELTA);
            let shift: i8 = if qh & 0x8000 != 0 { -1 } else { 1 };
            codes.extend(iq1_s_grid(indices, qh).map(|g| 8 * g + shift));
        }
    }
    DecodedTensor::Int8 {
        rows: t.rows,
        cols: t.cols,
        block: 32,
        codes,
        scales,
    }
}

/// IQ1_S as 2-bit super-blocks with mins (see [`decode_iq1_s`]), given each block's `d/8`.
fn decode_iq1_s_super_blocks(t: Blocks<'_>, eighths: Vec<u16>) -> DecodedTensor {
    let mut sb = SuperBlockBuilder::new(t, 2, 32, 1, true);
    for (b, eighth) in t.iter().zip(eighths) {
        for (indices, qh) in iq1_s_sub_blocks(b) {
            let odd = (2 * ((qh >> 12) & 7) + 1) as u8;
            let (base, m) = if qh & 0x8000 != 0 {
                (1, odd)
            } else {
                (2, 7 * odd)
            };
            let codes = iq1_s_grid(indices, qh).map(|g| (g + base) as u8);
            sb.group(odd as i8, m, codes);
        }
        sb.super_block(f16_bits_at(b, 0), eighth);
    }
    sb.finish()
}

/// The eight 32-element sub-blocks of an IQ1_S block: four grid index bytes and the `qh` word
/// (index high bits, `s` in bits 12..15, shift sign in bit 15).
fn iq1_s_sub_blocks(b: &[u8]) -> impl Iterator<Item = (&[u8], u16)> {
    let (qs, qh) = (&b[2..34], &b[34..50]);
    qs.chunks_exact(4)
        .zip(qh.chunks_exact(2).map(|h| u16::from_le_bytes([h[0], h[1]])))
}

/// The 32 ternary grid values of an IQ1_S sub-block.
fn iq1_s_grid(indices: &[u8], qh: u16) -> impl Iterator<Item = i8> + '_ {
    indices.iter().enumerate().flat_map(move |(l, &low)| {
        let index = usize::from(low) | (usize::from((qh >> (3 * l)) & 7) << 8);
        IQ1S_GRID[index].to_le_bytes().map(|g| g as i8)
    })
}

/// IQ1_M: the IQ1_S grid with a 3-bit `s` per 16 elements, a shift sign `δ = ±1/8` per 8, and an
/// f16 `d` spread over the high nibbles of the scales: `w = dl·(g + δ)` with `dl = d·(2s + 1)`.
///
/// When every block's `d/8` is an f16 (always for `|d| ≥ 2^-11`) the form is 5-bit super-blocks
/// with groups of 16: codes `q = 8g + 8δ + 9` (0..18, zero point 9), sub-scales `2s + 1` and
/// super-scale `d/8`, so that `(d/8·(2s + 1))·(q − 9)` is ggml's value exactly. Otherwise it is
/// int8 with one scale `dl/8` per 16 and codes `8g + 8δ` (±1, ±7, ±9), also exact. (Int8 with a
/// scale per 32 would need codes `(2s + 1)·(8g + 8δ)`, up to ±135.)
fn decode_iq1_m(t: Blocks<'_>) -> DecodedTensor {
    let eighths: Option<Vec<u16>> = t.iter().map(|b| f16_eighth(iq1m_scale(b))).collect();
    let mut sb = SuperBlockBuilder::new(t, 5, 16, 9, false);
    let mut codes = Vec::with_capacity(t.elems());
    let mut scales = Vec::with_capacity(t.elems() / 16);
    for (i, b) in t.iter().enumerate() {
        let (qs, qh, sc) = (&b[0..32], &b[32..48], &b[48..56]);
        let sc: [u16; 4] = std::array::from_fn(|i| u16::from_le_bytes([sc[2 * i], sc[2 * i + 1]]));
        let d = iq1m_scale(b).to_f32();
        for (ib, (indices, qh)) in qs.chunks_exact(4).zip(qh.chunks_exact(2)).enumerate() {
            let index = [
                usize::from(indices[0]) | ((usize::from(qh[0]) << 8) & 0x700),
                usize::from(indices[1]) | ((usize::from(qh[0]) << 4) & 0x700),
                usize::from(indices[2]) | ((usize::from(qh[1]) << 8) & 0x700),
                usize::from(indices[3]) | ((usize::from(qh[1]) << 4) & 0x700),
            ];
            let negative = [qh[0] & 0x08, qh[0] & 0x80, qh[1] & 0x08, qh[1] & 0x80];
            // 8·(g + δ) for the 8 elements of grid entry l.
            let shifted = |l: usize| {
                let shift: i8 = if negative[l] != 0 { -1 } else { 1 };
                IQ1S_GRID[index[l]]
                    .to_le_bytes()
                    .map(|g| 8 * g as i8 + shift)
            };
            for half in 0..2 {
                let odd = 2 * ((sc[ib / 2] >> (6 * (ib % 2) + 3 * half)) & 7) + 1;
                let values = shifted(2 * half).into_iter().chain(shifted(2 * half + 1));
                if eighths.is_some() {
                    sb.group(odd as i8, 0, values.map(|v| (v + 9) as u8));
                } else {
                    scales.push(d * f32::from(odd) * IQ1_DELTA);
                    codes.extend(values);
                }
            }
        }
        if let Some(eighths) = &eighths {
            sb.super_block(eighths[i], 0);
        }
    }
    if eighths.is_some() {
        return sb.finish();
    }
    DecodedTensor::Int8 {
        rows: t.rows,
        cols: t.cols,
        block: 16,
        codes,
        scales,
    }
}

/// Q5_1: `w = d·q + m` with 5-bit `q`, groups of 32.
fn decode_q5_1(t: Blocks<'_>) -> DecodedTensor {
    let mut lb = LowBitBuilder::new(t.elems(), 32);
    for b in t.iter() {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        lb.group(d, m, q5_block(&b[4..8], &b[8..24]).into_iter());
    }
    lb.finish(t.rows, t.cols, 5)
}

/// Q2_K: 2-bit codes, 16 groups of 16 with 4-bit `sc` and `m`: `w = (d·sc)·q − dmin·m`.
fn decode_q2_k(t: Blocks<'_>) -> DecodedTensor {
    let mut sb = SuperBlockBuilder::new(t, 2, 16, 0, true);
    let mut q = [0u8; QK_K];
    for b in t.iter() {
        let sc: [u8; 16] = b[0..16].try_into().expect("16 scale bytes");
        let qs = &b[16..80];
        unpack_crumbs(qs, &mut q);
        sb.codes(&q);
        // Group g (elements 16g..16g+16) has scale and min sc[g].
        sb.scales(&sc.map(|s| (s & 0xF) as i8), &sc.map(|s| s >> 4));
        sb.super_block(f16_bits_at(b, 80), f16_bits_at(b, 82));
    }
    sb.finish()
}

/// Q3_K: 3-bit codes, 16 groups of 16 with 6-bit signed `sc`: `w = (d·sc)·(q − 4)`.
fn decode_q3_k(t: Blocks<'_>) -> DecodedTensor {
    let mut sb = SuperBlockBuilder::new(t, 3, 16, 4, false);
    let mut q = [0u8; QK_K];
    for b in t.iter() {
        let (hmask, qs) = (&b[0..32], &b[32..96]);
        let sc = q3k_scales(&b[96..108]);
        // The low two bits as in Q2_K; element 128h + 32s + i gets 4 more when bit 4h + s of
        // hmask[i] is set (ggml subtracts 4 when it is clear).
        unpack_crumbs(qs, &mut q);
        for (k, out) in q.chunks_exact_mut(32).enumerate() {
            for (o, hm) in out.chunks_exact_mut(8).zip(hmask.chunks_exact(8)) {
                // Eight bytes at once: the mask keeps each byte's own bit.
                let hm = u64::from_le_bytes(hm.try_into().expect("8 bytes"));
                let low = u64::from_le_bytes((&*o).try_into().expect("8 bytes"));
                let high = ((hm >> k) & 0x0101_0101_0101_0101) << 2;
                o.copy_from_slice(&(low | high).to_le_bytes());
            }
        }
        sb.codes(&q);
        sb.scales(&sc, &[]);
        sb.super_block(f16_bits_at(b, 108), 0);
    }
    sb.finish()
}

/// Q4_K: 4-bit codes, 8 groups of 32 with 6-bit `sc` and `m`: `w = (d·sc)·q − dmin·m`.
fn decode_q4_k(t: Blocks<'_>) -> DecodedTensor {
    let mut sb = SuperBlockBuilder::new(t, 4, 32, 0, true);
    for b in t.iter() {
        let (sc, qs) = (&b[4..16], &b[16..144]);
        for (j, chunk) in qs.chunks_exact(32).enumerate() {
            let (s1, m1) = scale_min_k4(2 * j, sc);
            let (s2, m2) = scale_min_k4(2 * j + 1, sc);
            sb.group(s1 as i8, m1, chunk.iter().map(|&q| q & 0xF));
            sb.group(s2 as i8, m2, chunk.iter().map(|&q| q >> 4));
        }
        sb.super_block(f16_bits_at(b, 0), f16_bits_at(b, 2));
    }
    sb.finish()
}

/// Q5_K: 5-bit codes, 8 groups of 32 with 6-bit `sc` and `m`: `w = (d·sc)·q − dmin·m`.
fn decode_q5_k(t: Blocks<'_>) -> DecodedTensor {
    let mut sb = SuperBlockBuilder::new(t, 5, 32, 0, true);
    for b in t.iter() {
        let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for (j, chunk) in qs.chunks_exact(32).enumerate() {
            let (s1, m1) = scale_min_k4(2 * j, sc);
            let (s2, m2) = scale_min_k4(2 * j + 1, sc);
            let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
            let high = |h: u8, u: u8| if h & u != 0 { 16 } else { 0 };
            let low = chunk.iter().zip(qh).map(|(&q, &h)| (q & 0xF) + high(h, u1));
            sb.group(s1 as i8, m1, low);
            let up = chunk.iter().zip(qh).map(|(&q, &h)| (q >> 4) + high(h, u2));
            sb.group(s2 as i8, m2, up);
        }
        sb.super_block(f16_bits_at(b, 0), f16_bits_at(b, 2));
    }
    sb.finish()
}

/// Q6_K: 6-bit codes, 16 groups of 16 with int8 `sc`: `w = (d·sc)·(q − 32)`.
fn decode_q6_k(t: Blocks<'_>) -> DecodedTensor {
    let mut sb = SuperBlockBuilder::new(t, 6, 16, 32, false);
    let mut q = [0u8; QK_K];
    for b in t.iter() {
        let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
        for half in 0..2 {
            let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
            let q = &mut q[128 * half..];
            for l in 0..32 {
                q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        // Group g (elements 16g..16g+16) has scale sc[g]: within each half, element l + 32k
        // uses sc[l / 16 + 2k].
        sb.codes(&q);
        sb.scales(bytemuck::cast_slice(sc), &[]);
        sb.super_block(f16_bits_at(b, 208), 0);
    }
    sb.finish()
}

/// TQ2_0: ternary as 2-bit codes {0,1,2}, `w = d·(q − 1)`, one group per 256-block (its d).
fn decode_tq2_0(t: Blocks<'_>) -> DecodedTensor {
    let mut lb = LowBitBuilder::new(t.elems(), QK_K);
    for b in t.iter() {
        let (qs, d) = (&b[0..64], f16_at(b, 64));
        let mut codes = [0u8; QK_K];
        unpack_crumbs(qs, &mut codes);
        lb.group_codes(d, -d, &codes);
    }
    lb.finish(t.rows, t.cols, 2)
}

/// The 256 two-bit codes of 64 bytes laid out as in Q2_K, Q3_K and TQ2_0: element
/// `128h + 32s + i` is bits `2s..2s+2` of byte `32h + i`.
fn unpack_crumbs(qs: &[u8], codes: &mut [u8; QK_K]) {
    for (h, half) in qs.chunks_exact(32).enumerate() {
        for s in 0..4 {
            let out = &mut codes[128 * h + 32 * s..][..32];
            for (o, v) in out.chunks_exact_mut(8).zip(half.chunks_exact(8)) {
                // Eight bytes at once: the mask keeps each byte's own two bits.
                let v = u64::from_le_bytes(v.try_into().expect("8 bytes"));
                o.copy_from_slice(&((v >> (2 * s)) & 0x0303_0303_0303_0303).to_le_bytes());
            }
        }
    }
}

/// TQ1_0: ternary codes {0,1,2} packed in base 3, `w = d·(q − 1)`, one group per 256-block.
fn decode_tq1_0(t: Blocks<'_>) -> DecodedTensor {
    let mut lb = LowBitBuilder::new(t.elems(), QK_K);
    for b in t.iter() {
        let (qs, qh, d) = (&b[0..48], &b[48..52], f16_at(b, 52));
        lb.group_codes(d, -d, &tq1_block(qs, qh));
    }
    lb.finish(t.rows, t.cols, 2)
}

/// I2_S (bitnet.cpp): ternary 2-bit codes {0, 1, 2} for {−1, 0, +1}, `w = s·(q − 1)` with one
/// f32 scale `s` per tensor, stored little-endian in the first 4 bytes of the 32 that follow the
/// blocks (the other 28 are padding, which writers fill differently). A block of 128 elements is
/// 32 bytes: element `32·l + m` is bits `6 − 2l..8 − 2l` of byte `m` (`quantize_i2_s` of
/// bitnet.cpp's x86 build, the layout of the published files; its ARM build packs blocks of 64
/// in 16 bytes instead, and nothing in a file says which, so such files decode wrong). Code 3,
/// which no writer emits, is 0 as in bitnet.cpp's `dequantize_row_i2_s`. The tensor decodes to
/// one group per row (the scale repeated), the form the ternary kernel takes.
fn decode_i2_s(t: Blocks<'_>) -> DecodedTensor {
    let s = f32::from_le_bytes([t.tail[0], t.tail[1], t.tail[2], t.tail[3]]);
    let mut codes = Vec::with_capacity(t.elems());
    for b in t.iter() {
        for l in 0..4 {
            codes.extend(b.iter().map(|&q| match (q >> (6 - 2 * l)) & 3 {
                3 => 1,
                q => q,
            }));
        }
    }
    DecodedTensor::LowBit {
        rows: t.rows,
        cols: t.cols,
        bits: 2,
        group_size: t.cols,
        codes,
        scales: vec![s; t.rows],
        offsets: vec![-s; t.rows],
    }
}

fn dense(rows: usize, cols: usize, values: impl Iterator<Item = f32>) -> DecodedTensor {
    DecodedTensor::Dense {
        rows,
        cols,
        values: values.collect(),
    }
}

/// The f16 at byte `at` of `b`, widened. The portable conversion inlines into the decoders'
/// loops (`to_f32` calls a run-time dispatched routine per value); both are exact.
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32_const()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn f16_bits_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Collects the groups and super-blocks of a K-quant tensor, in order.
struct SuperBlockBuilder {
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    zero_point: u8,
    codes: Vec<u8>,
    sub_scales: Vec<i8>,
    sub_mins: Option<Vec<u8>>,
    d: Vec<u16>,
    dmin: Option<Vec<u16>>,
}

impl SuperBlockBuilder {
    fn new(t: Blocks<'_>, bits: u8, group: usize, zero_point: u8, mins: bool) -> Self {
        let n = t.elems();
        SuperBlockBuilder {
            rows: t.rows,
            cols: t.cols,
            bits,
            group,
            zero_point,
            codes: Vec::with_capacity(n),
            sub_scales: Vec::with_capacity(n / group),
            sub_mins: mins.then(|| Vec::with_capacity(n / group)),
            d: Vec::with_capacity(n / QK_K),
            dmin: mins.then(|| Vec::with_capacity(n / QK_K)),
        }
    }

    /// One group: its sub-scale, its sub-min (ignored for types without mins) and its codes.
    fn group(&mut self, sc: i8, m: u8, codes: impl Iterator<Item = u8>) {
        self.codes.extend(codes);
        self.scales(&[sc], &[m]);
    }

    /// The codes of the next groups, in element order (their scales follow by
    /// [`SuperBlockBuilder::scales`]).
    fn codes(&mut self, codes: &[u8]) {
        self.codes.extend_from_slice(codes);
    }

    /// The sub-scales and sub-mins (ignored for types without mins) of the next groups.
    fn scales(&mut self, sc: &[i8], m: &[u8]) {
        self.sub_scales.extend_from_slice(sc);
        if let Some(mins) = &mut self.sub_mins {
            mins.extend_from_slice(m);
        }
    }

    /// Closes a super-block with the f16 bits of its `d` (and `dmin`).
    fn super_block(&mut self, d: u16, dmin: u16) {
        debug_assert_eq!(self.codes.len(), self.sub_scales.len() * self.group);
        self.d.push(d);
        if let Some(dm) = &mut self.dmin {
            dm.push(dmin);
        }
    }

    fn finish(self) -> DecodedTensor {
        DecodedTensor::SuperBlock {
            rows: self.rows,
            cols: self.cols,
            bits: self.bits,
            group: self.group,
            zero_point: self.zero_point,
            codes: self.codes,
            sub_scales: self.sub_scales,
            sub_mins: self.sub_mins,
            d: self.d,
            dmin: self.dmin,
        }
    }
}

/// Collects groups of codes with their scale and offset, in order.
struct LowBitBuilder {
    codes: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
    group_size: usize,
}

impl LowBitBuilder {
    fn new(n: usize, group_size: usize) -> Self {
        LowBitBuilder {
            codes: Vec::with_capacity(n),
            scales: Vec::with_capacity(n / group_size),
            offsets: Vec::with_capacity(n / group_size),
            group_size,
        }
    }

    fn group(&mut self, scale: f32, offset: f32, codes: impl Iterator<Item = u8>) {
        self.codes.extend(codes);
        self.scales.push(scale);
        self.offsets.push(offset);
        debug_assert_eq!(self.codes.len(), self.scales.len() * self.group_size);
    }

    fn group_codes(&mut self, scale: f32, offset: f32, codes: &[u8]) {
        self.codes.extend_from_slice(codes);
        self.scales.push(scale);
        self.offsets.push(offset);
        debug_assert_eq!(self.codes.len(), self.scales.len() * self.group_size);
    }

    fn finish(self, rows: usize, cols: usize, bits: u8) -> DecodedTensor {
        DecodedTensor::LowBit {
            rows,
            cols,
            bits,
            group_size: self.group_size,
            codes: self.codes,
            scales: self.scales,
            offsets: self.offsets,
        }
    }
}

/// The 32 int8 codes of an IQ4_NL block (or IQ4_XS sub-block) from its 16 bytes of indices:
/// low nibbles are elements 0..16, high nibbles 16..32.
fn iq4_nl_codes(qs: &[u8]) -> impl Iterator<Item = i8> + '_ {
    let code = |i: u8| KVALUES_IQ4NL[usize::from(i & 0xF)];
    qs.iter()
        .map(move |&q| code(q))
        .chain(qs.iter().map(move |&q| code(q >> 4)))
}

/// The IQ1_S and IQ1_M grid shift (`IQ1S_DELTA`, `IQ1M_DELTA`).
const IQ1_DELTA: f32 = 0.125;

/// `d/8` as f16 bits, when it is an f16 value.
fn f16_eighth(d: f16) -> Option<u16> {
    let eighth = d.to_f32() * 0.125;
    let h = f16::from_f32(eighth);
    (h.to_f32() == eighth).then_some(h.to_bits())
}

/// The f16 super-scale of an IQ1_M block, from the high nibbles of its four scale words.
fn iq1m_scale(b: &[u8]) -> f16 {
    let sc: [u16; 4] = std::array::from_fn(|i| u16::from_le_bytes([b[48 + 2 * i], b[49 + 2 * i]]));
    f16::from_bits(
        (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000),
    )
}

/// Eight grid values as int8 codes, negated where `signs` has the element's bit
/// (`kmask_iq2xs`).
fn signed_grid(grid: &[u8; 8], signs: u8) -> [i8; 8] {
    std::array::from_fn(|j| {
        let v = grid[j] as i8;
        if signs & KMASK_IQ2XS[j] != 0 {
            -v
        } else {
            v
        }
    })
}

/// The 32 unsigned 5-bit values of a Q5_0/Q5_1 block (`qh` as a little-endian u32).
fn q5_block(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut out = [0u8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        out[j] = (qs[j] & 0xF) | h0;
        out[j + 16] = (qs[j] >> 4) | h1;
    }
    out
}

/// The 16 signed 6-bit sub-block scales of a Q3_K block (already minus 32).
fn q3k_scales(packed: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, s) in out.iter_mut().enumerate() {
        let low = if j < 8 {
            packed[j] & 0xF
        } else {
            packed[j - 8] >> 4
        };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        *s = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 256 ternary codes (0, 1, 2) of a TQ1_0 block, in element order: five base-3 digits per
/// byte, stored as fixed-point fractions (`dequantize_row_tq1_0`).
fn tq1_block(qs: &[u8], qh: &[u8]) -> Vec<u8> {
    const POW3: [u8; 6] = [1, 3, 9, 27, 81, 243];
    let digit = |byte: u8, n: usize| ((u16::from(byte.wrapping_mul(POW3[n])) * 3) >> 8) as u8;
    let mut out = Vec::with_capacity(QK_K);
    for part in [&qs[0..32], &qs[32..48]] {
        for n in 0..5 {
            out.extend(part.iter().map(|&q| digit(q, n)));
        }
    }
    for n in 0..4 {
        out.extend(qh.iter().map(|&q| digit(q, n)));
    }
    out
}

#[cfg(test)]
mod tests;
