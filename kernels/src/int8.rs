//! 8-bit weights (Q8_0 style: int8 codes, one scale per 32) times int8-quantized activations.
//!
//! Used for the token embedding / tied LM head of small models, which are Q8_0 in GGUF files: an
//! int8 dot kernel moves 8.5 bits per weight, where bit-serial LUT planes would need 8 lookups.
//! IQ4_NL and IQ4_XS weights stay 4-bit indices into [`KVALUES_IQ4NL`] ([`Nibbles`]), looked up
//! into the same int8 codes as each block is loaded, so both code storages share one kernel.
//!
//! Every ISA computes the same thing in the same order, so results are bit-identical:
//! per block of 32, eight int32 lanes hold the exact sums of elements `4j..4j+4`; each lane is
//! converted to f32 and fused-multiply-added with `d_w·d_x` (`d_w` the scale of the lane's
//! 16-element half) into a per-lane f32 accumulator; the eight lanes are summed at the end in the
//! tree order of [`hsum8`].

use half::f16;

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::tiling::{run_row_tasks, Split, ROW_TILE};

/// Evaluates `$body` with `$b` bound to the block vector of whichever form `$blocks` holds.
macro_rules! with_blocks {
    ($blocks:expr, $b:ident => $body:expr) => {
        match $blocks {
            Blocks::Half($b) => $body,
            Blocks::Single($b) => $body,
            Blocks::Split($b) => $body,
            Blocks::NibbleHalf($b) => $body,
            Blocks::NibbleSingle($b) => $body,
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(test)]
pub(crate) mod tests;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::{hsum as avx2_hsum, load_codes as avx2_load_codes};
#[cfg(target_arch = "aarch64")]
pub(crate) use neon::hsum as neon_hsum;

/// Elements per quantization block (one scale each), as in GGUF Q8_0.
pub const BLOCK: usize = 32;

/// Whole interleaved row tiles per task (so a task's rows are one run of blocks), all tokens at
/// once, a few tasks per thread to balance uneven progress.
const ROW_SPLIT: Split = Split {
    tile_rows: ROW_TILE,
    token_block: usize::MAX,
    tasks_per_thread: 4,
};

/// A block scale as stored in an [`Int8Matrix`]: f16 (as GGUF Q8_0 stores it), f32 (for scales
/// that f16 cannot hold exactly, e.g. IQ4_XS's `d·(ls − 32)`), or one f32 per 16-element half
/// ([`HalfScales`], e.g. IQ2_XS).
pub(crate) trait BlockScale: Copy + Default + Send + Sync + 'static {
    /// Whether the two halves of a block may have different scales (else the kernels broadcast
    /// one scale to all eight lanes).
    const PER_HALF: bool = false;

    /// The scales of elements 0..16 and 16..32 as f32 (exact); equal unless the block has one
    /// scale per half.
    fn halves(self) -> [f32; 2];
    /// The scale itself when it is an f16, so that the AVX2 kernel can widen it with F16C.
    #[cfg(target_arch = "x86_64")]
    fn as_f16(self) -> Option<f16>;
}

impl BlockScale for f16 {
    #[inline(always)]
    fn halves(self) -> [f32; 2] {
        [f16::to_f32(self); 2]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn as_f16(self) -> Option<f16> {
        Some(self)
    }
}

impl BlockScale for f32 {
    #[inline(always)]
    fn halves(self) -> [f32; 2] {
        [self; 2]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn as_f16(self) -> Option<f16> {
        None
    }
}

/// One f32 scale for each 16-element half of a block (ggml types whose scales change every 16
/// elements, such as IQ2_XS and IQ2_S).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub(crate) struct HalfScales(pub(crate) [f32; 2]);

impl BlockScale for HalfScales {
    const PER_HALF: bool = true;

    #[inline(always)]
    fn halves(self) -> [f32; 2] {
        self.0
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn as_f16(self) -> Option<f16> {
        None
    }
}

/// The non-uniform 4-bit codebook of IQ4_NL and IQ4_XS (`kvalues_iq4nl` in ggml's
/// `ggml-common.h`): the int8 code each 4-bit index stands for.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The 32 codes of a weight block as stored: int8 values (`[i8; 32]`) or 4-bit codebook indices
/// ([`Nibbles`]). The kernels turn either into the same int8 codes before multiplying.
pub(crate) trait Codes: Copy + Default + Send + Sync + 'static {
    /// Whether the storage is [`Nibbles`] (16 bytes), else 32 int8 codes.
    const NIBBLES: bool;

    /// The block's 32 int8 codes, element order.
    fn codes(&self) -> [i8; BLOCK];
}

impl Codes for [i8; BLOCK] {
    const NIBBLES: bool = false;

    #[inline(always)]
    fn codes(&self) -> [i8; BLOCK] {
        *self
    }
}

/// 32 indices into [`KVALUES_IQ4NL`] in ggml's IQ4_NL order: byte `j` holds element `j` in its
/// low nibble and element `j + 16` in its high nibble.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(transparent)]
pub(crate) struct Nibbles(pub(crate) [u8; BLOCK / 2]);

impl Codes for Nibbles {
    const NIBBLES: bool = true;

    #[inline(always)]
    fn codes(&self) -> [i8; BLOCK] {
        std::array::from_fn(|e| {
            let byte = self.0[e % 16];
            KVALUES_IQ4NL[usize::from((byte >> (4 * (e / 16))) & 0xF)]
        })
    }
}

/// One block of weights: a scale and 32 codes. With an f16 scale and int8 codes exactly GGUF
/// Q8_0's block (34 bytes, no padding); with an f16 scale and [`Nibbles`] exactly IQ4_NL's (18).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct WeightBlock<S, C = [i8; BLOCK]> {
    pub(crate) d: S,
    pub(crate) q: C,
}

/// One block of quantized activations: codes, scale, the sum of the codes and of the values.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(8))]
pub(crate) struct ActBlock {
    pub(crate) q: [i8; BLOCK],
    pub(crate) d: f32,
    /// `Σ q`, for weight formats with a per-block offset.
    pub(crate) sum: i32,
    /// `Σ x` of the unquantized values ([`block_sum`]): the dot path multiplies the offset of
    /// centred codes by it, so that offsets add no rounding of the activations.
    pub(crate) xsum: f32,
    /// `Σ q` of the first 16 codes, and `Σ x` of each half of the block ([`half_sums`]), for
    /// weight groups of 16.
    pub(crate) sum_lo: i32,
    pub(crate) xsum_halves: [f32; 2],
}

impl ActBlock {
    /// `Σ q` over half `h` of the block when `halves` is 2, over the whole block when it is 1.
    #[inline(always)]
    pub(crate) fn code_sum(&self, halves: usize, h: usize) -> i32 {
        match (halves, h) {
            (1, _) => self.sum,
            (_, 0) => self.sum_lo,
            _ => self.sum - self.sum_lo,
        }
    }

    /// `Σ x` over half `h` of the block when `halves` is 2, over the whole block when it is 1.
    #[inline(always)]
    pub(crate) fn value_sum(&self, halves: usize, h: usize) -> f32 {
        if halves == 1 {
            self.xsum
        } else {
            self.xsum_halves[h]
        }
    }
}

/// The weight blocks of a matrix, with the narrowest scale type that holds every scale exactly.
#[derive(Clone, Debug)]
pub(crate) enum Blocks {
    /// f16 scales (34-byte blocks).
    Half(Vec<WeightBlock<f16>>),
    /// f32 scales (36-byte blocks).
    Single(Vec<WeightBlock<f32>>),
    /// Two f32 scales, one per 16 elements (40-byte blocks).
    Split(Vec<WeightBlock<HalfScales>>),
    /// IQ4 codebook indices with f16 scales (18-byte blocks).
    NibbleHalf(Vec<WeightBlock<f16, Nibbles>>),
    /// IQ4 codebook indices with f32 scales (20-byte blocks).
    NibbleSingle(Vec<WeightBlock<f32, Nibbles>>),
}

/// An int8 weight matrix with one scale per block of 32 elements along K, or one per 16
/// ([`Int8Matrix::with_half_block_scales`]).
///
/// Scales are kept exactly: as f16 when every scale is an f16 value (GGUF Q8_0, IQ4_NL), as f32
/// otherwise (IQ4_XS sub-block scales, Q8_K), as two f32 per block when they change every 16
/// elements (IQ2_XS, IQ2_S). The kernel multiplies each 16-element half's exact int32 sums by
/// its own scale, so all three forms share one summation order.
///
/// Layout: rows are grouped in tiles of 4 and a tile's blocks are interleaved (`[tile][block][row]`),
/// so a tile streams as one sequential run; the last `rows % 4` rows follow row-major. Either way
/// rows `a..b` (a a multiple of 4) occupy blocks `a·K/32 .. b·K/32`.
///
/// IQ4_NL / IQ4_XS weights ([`Int8Matrix::from_iq4_nibbles`]) keep their 4-bit indices (18- or
/// 20-byte blocks); the result is bit-identical to [`Int8Matrix::new`] with the looked-up codes.
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    pub(crate) blocks: Blocks,
}

impl Int8Matrix {
    /// Builds the matrix from row-major codes `[rows][cols]` and finite scales `[rows][cols/32]`.
    pub fn new(rows: usize, cols: usize, codes: &[i8], scales: &[f32]) -> Result<Int8Matrix> {
        if let Some(half_scales) = exact_f16(scales)? {
            return Int8Matrix::from_f16_scales(rows, cols, codes, &half_scales);
        }
        let blocks = interleave(rows, cols, scales, codes, BLOCK, int8_codes)?;
        Ok(Int8Matrix {
            rows,
            cols,
            blocks: Blocks::Single(blocks),
        })
    }

    /// Builds the matrix from 4-bit indices into [`KVALUES_IQ4NL`] (IQ4_NL, IQ4_XS) and finite
    /// scales `[rows][cols/32]`: `nibbles` is `[rows][cols/32][16]` bytes in ggml's IQ4_NL order
    /// (byte `j` of a block: element `j` in the low nibble, element `j + 16` in the high one).
    /// Computes exactly what [`Int8Matrix::new`] computes from the looked-up codes, from 4.5 bits
    /// per weight (f16 scales) or 5 (scales that f16 cannot hold).
    pub fn from_iq4_nibbles(
        rows: usize,
        cols: usize,
        nibbles: &[u8],
        scales: &[f32],
    ) -> Result<Int8Matrix> {
        const BYTES: usize = BLOCK / 2;
        let unpack = |c: &[u8]| {
            let mut q = Nibbles::default();
            q.0.copy_from_slice(c);
            q
        };
        let blocks = match exact_f16(scales)? {
            Some(half) => {
                Blocks::NibbleHalf(interleave(rows, cols, &half, nibbles, BYTES, unpack)?)
            }
            None => Blocks::NibbleSingle(interleave(rows, cols, scales, nibbles, BYTES, unpack)?),
        };
        Ok(Int8Matrix { rows, cols, blocks })
    }

    /// Builds the matrix from row-major codes `[rows][cols]` and finite scales `[rows][cols/16]`,
    /// one per 16 elements. When every block's two scales are equal it is [`Int8Matrix::new`]'s
    /// matrix.
    pub fn with_half_block_scales(
        rows: usize,
        cols: usize,
        codes: &[i8],
        scales: &[f32],
    ) -> Result<Int8Matrix> {
        if let Some(index) = scales.iter().position(|s| !s.is_finite()) {
            let value = scales[index];
            return Err(KernelError::ScaleOutOfRange { index, value });
        }
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::KNotMultipleOf32(cols));
        }
        check_len(
            "int8 weight half-block scales",
            rows * cols / 16,
            scales.len(),
        )?;
        let pairs = scales.chunks_exact(2);
        if pairs.clone().all(|p| p[0].to_bits() == p[1].to_bits()) {
            let per_block: Vec<f32> = pairs.map(|p| p[0]).collect();
            return Int8Matrix::new(rows, cols, codes, &per_block);
        }
        let per_block: Vec<HalfScales> = pairs.map(|p| HalfScales([p[0], p[1]])).collect();
        let blocks = interleave(rows, cols, &per_block, codes, BLOCK, int8_codes)?;
        Ok(Int8Matrix {
            rows,
            cols,
            blocks: Blocks::Split(blocks),
        })
    }

    /// Like [`Int8Matrix::new`] with f16 scales, as GGUF Q8_0 stores them.
    pub fn from_f16_scales(
        rows: usize,
        cols: usize,
        codes: &[i8],
        scales: &[f16],
    ) -> Result<Int8Matrix> {
        let blocks = interleave(rows, cols, scales, codes, BLOCK, int8_codes)?;
        Ok(Int8Matrix {
            rows,
            cols,
            blocks: Blocks::Half(blocks),
        })
    }

    /// Whether the scales are stored as f16 (else f32, one or two per block).
    pub fn has_f16_scales(&self) -> bool {
        matches!(self.blocks, Blocks::Half(_) | Blocks::NibbleHalf(_))
    }

    /// Whether the codes are stored as 4-bit IQ4 codebook indices
    /// ([`Int8Matrix::from_iq4_nibbles`]), else as int8 values.
    pub fn has_nibble_codes(&self) -> bool {
        matches!(self.blocks, Blocks::NibbleHalf(_) | Blocks::NibbleSingle(_))
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of codes and scales.
    pub fn bytes(&self) -> usize {
        with_blocks!(&self.blocks, b => std::mem::size_of_val(b.as_slice()))
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` with `x` quantized in `acts`; `out` is `[n][rows]`.
    /// (`Int8Matrix::matmul_prompt` takes prompt tokens through the dot GEMM.)
    pub fn matmul(&self, cpu: &Cpu, acts: &Int8Activations, out: &mut [f32]) -> Result<()> {
        self.check_matmul(acts, out)?;
        self.matmul_tokens(cpu, acts.blocks(), out);
        Ok(())
    }

    /// The shape checks of a product with `acts` into `out`.
    pub(crate) fn check_matmul(&self, acts: &Int8Activations, out: &[f32]) -> Result<()> {
        if acts.cols != self.cols {
            return Err(KernelError::ShapeMismatch {
                matrix: self.cols,
                activations: acts.cols,
            });
        }
        check_len("int8 matmul output", acts.tokens * self.rows, out.len())
    }

    /// The int8 kernel over every token of `x` (`[tokens][cols / 32]`) into `out`
    /// (`[tokens][rows]`); shapes checked by the caller.
    pub(crate) fn matmul_tokens(&self, cpu: &Cpu, x: &[ActBlock], out: &mut [f32]) {
        let per_row = self.cols / BLOCK;
        if per_row == 0 {
            out.fill(0.0);
            return;
        }
        with_blocks!(&self.blocks, b => matmul_blocks(cpu, b, self.rows, x, per_row, out, false));
    }

    /// [`Int8Matrix::matmul`] with AVX2's `maddubs` lane sums even where the CPU has `vpdpbusd`,
    /// so that tests check both against the scalar kernel.
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) fn matmul_madd(&self, cpu: &Cpu, acts: &Int8Activations, out: &mut [f32]) {
        self.check_matmul(acts, out).unwrap();
        let per_row = self.cols / BLOCK;
        with_blocks!(&self.blocks, b => matmul_blocks(cpu, b, self.rows, acts.blocks(), per_row, out, true));
    }

    /// Runs `visitor` on the matrix's blocks, whichever scale and code form they have.
    pub(crate) fn visit_blocks<V: BlocksVisitor>(&self, visitor: V) -> V::Output {
        with_blocks!(&self.blocks, b => visitor.visit(b))
    }

    /// Dequantized row `r` (embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows {
            return Err(KernelError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        check_len("dequantized row", self.cols, out.len())?;
        with_blocks!(&self.blocks, b => dequantize_blocks(b, self.rows, row, out));
        Ok(())
    }
}

/// Work on the blocks of an [`Int8Matrix`] generic over their scale and code forms.
pub(crate) trait BlocksVisitor {
    /// What the work gives.
    type Output;
    /// Does the work on `blocks` (the tile-interleaved layout of [`Int8Matrix`]).
    fn visit<S: BlockScale, C: Codes>(self, blocks: &[WeightBlock<S, C>]) -> Self::Output;
}

/// Scales as f16 when every one is an f16 value, else `None`; an error names the first one that
/// is not finite.
fn exact_f16(scales: &[f32]) -> Result<Option<Vec<f16>>> {
    let mut half_scales = Vec::with_capacity(scales.len());
    for (index, &value) in scales.iter().enumerate() {
        if !value.is_finite() {
            return Err(KernelError::ScaleOutOfRange { index, value });
        }
        let d = f16::from_f32(value);
        if d.to_f32().to_bits() == value.to_bits() {
            half_scales.push(d);
        }
    }
    Ok((half_scales.len() == scales.len()).then_some(half_scales))
}

/// One block's int8 codes from its 32 stored values.
fn int8_codes(c: &[i8]) -> [i8; BLOCK] {
    let mut q = [0; BLOCK];
    q.copy_from_slice(c);
    q
}

/// The blocks of row-major stored codes `[rows][cols/32][per_block]` (`code` builds one block's
/// storage from its `per_block` items) and scales `[rows][cols/32]`, tile-interleaved.
fn interleave<S: BlockScale, T, C: Codes>(
    rows: usize,
    cols: usize,
    scales: &[S],
    codes: &[T],
    per_block: usize,
    code: impl Fn(&[T]) -> C,
) -> Result<Vec<WeightBlock<S, C>>> {
    if !cols.is_multiple_of(BLOCK) {
        return Err(KernelError::KNotMultipleOf32(cols));
    }
    let per_row = cols / BLOCK;
    check_len("int8 weight codes", rows * per_row * per_block, codes.len())?;
    check_len("int8 weight scales", rows * per_row, scales.len())?;
    let mut blocks = vec![WeightBlock::<S, C>::default(); rows * per_row];
    for row in 0..rows {
        for b in 0..per_row {
            let src = row * per_row + b;
            let block = &mut blocks[block_index(rows, per_row, row, b)];
            block.d = scales[src];
            block.q = code(&codes[src * per_block..(src + 1) * per_block]);
        }
    }
    Ok(blocks)
}

/// The int8 kernel of [`Int8Matrix::matmul`] over blocks with scales of type `S`, for the tokens
/// of `x` (`[tokens][per_row]`; shapes checked); `madd_only` keeps AVX2 on `maddubs` where it
/// would take `vpdpbusd` (tests of both).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn matmul_blocks<S: BlockScale, C: Codes>(
    cpu: &Cpu,
    blocks: &[WeightBlock<S, C>],
    rows: usize,
    x: &[ActBlock],
    per_row: usize,
    out: &mut [f32],
    madd_only: bool,
) {
    let isa = cpu.isa();
    run_row_tasks(
        cpu,
        &mut [out],
        |_| rows,
        x.len() / per_row,
        ROW_SPLIT,
        |_, range| {
            let w = &blocks[range.start() * per_row..range.end() * per_row];
            let x = &x[range.tokens().start * per_row..range.tokens().end * per_row];
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2::matmul_rows(w, x, per_row, range, madd_only),
                #[cfg(target_arch = "aarch64")]
                Isa::Neon => neon::matmul_rows(w, x, per_row, range),
                _ => scalar::matmul_rows(w, x, per_row, range),
            }
        },
    );
}

/// Row `row` of a matrix of `rows` rows stored as `blocks`, dequantized into `out` (K values).
fn dequantize_blocks<S: BlockScale, C: Codes>(
    blocks: &[WeightBlock<S, C>],
    rows: usize,
    row: usize,
    out: &mut [f32],
) {
    let per_row = out.len() / BLOCK;
    for (b, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
        let block = &blocks[block_index(rows, per_row, row, b)];
        let halves = block.d.halves();
        for (e, (o, q)) in dst.iter_mut().zip(block.q.codes()).enumerate() {
            *o = halves[e / 16] * f32::from(q);
        }
    }
}

impl std::fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("f16_scales", &self.has_f16_scales())
            .field("nibble_codes", &self.has_nibble_codes())
            .finish()
    }
}

/// Activations quantized to int8 with one scale per 32 elements, for [`Int8Matrix::matmul`].
///
/// Quantization follows llama.cpp's Q8_0: `d = max|x| / 127`, `q = round(x / d)`, with the scale
/// kept in f32. Buffers grow to the largest batch seen and are reused.
#[derive(Debug)]
pub struct Int8Activations {
    cols: usize,
    tokens: usize,
    /// `[tokens][cols / 32]`.
    blocks: Vec<ActBlock>,
}

impl Int8Activations {
    /// Empty buffers for inputs of `cols` elements (a multiple of 32).
    pub fn new(cols: usize) -> Int8Activations {
        Int8Activations {
            cols,
            tokens: 0,
            blocks: Vec::new(),
        }
    }

    /// Quantizes `tokens` vectors stored back to back in `x`.
    pub fn build(&mut self, cpu: &Cpu, x: &[f32], tokens: usize) -> Result<()> {
        if !self.cols.is_multiple_of(BLOCK) {
            return Err(KernelError::KNotMultipleOf32(self.cols));
        }
        check_len("int8 activations", tokens * self.cols, x.len())?;
        let per_row = self.cols / BLOCK;
        let count = tokens * per_row;
        if self.blocks.len() < count {
            self.blocks.resize(count, ActBlock::default());
        }
        // Quantizing is linear in K and tiny next to the matmul; split by tokens only when many.
        let chunk = per_row.max(1) * tokens.div_ceil(cpu.threads()).max(1);
        let isa = cpu.isa();
        cpu.for_each_chunk(&mut self.blocks[..count], chunk, |first, part| {
            let src = &x[first * BLOCK..first * BLOCK + part.len() * BLOCK];
            quantize_blocks(isa, src, part);
        });
        self.tokens = tokens;
        Ok(())
    }

    /// Input length.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Tokens quantized by the last build.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The quantized blocks of the last build, `[tokens][cols / 32]`.
    pub(crate) fn blocks(&self) -> &[ActBlock] {
        &self.blocks[..self.tokens * (self.cols / BLOCK)]
    }
}

/// Quantizes `x` (32 values per block) into `blocks` on `isa`; every ISA gives exactly the blocks
/// of [`quantize_block`].
fn quantize_blocks(isa: Isa, x: &[f32], blocks: &mut [ActBlock]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::quantize(x, blocks),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::quantize(x, blocks),
        _ => {
            for (block, xs) in blocks.iter_mut().zip(x.chunks_exact(BLOCK)) {
                quantize_block(xs, block);
            }
        }
    }
}

/// `Σ x` of each 16-value half of a block in one order on every ISA: eight lanes of `x[i] +
/// x[i + 8]`, then [`hsum8`].
fn half_sums(x: &[f32]) -> [f32; 2] {
    [0, 1].map(|h| {
        let half = &x[16 * h..16 * h + 16];
        hsum8(std::array::from_fn(|i| half[i] + half[i + 8]))
    })
}

/// `Σ x` of one block in one order on every ISA: eight lanes of every eighth value, then
/// [`hsum8`].
fn block_sum(x: &[f32]) -> f32 {
    let mut lanes: [f32; 8] = std::array::from_fn(|i| x[i]);
    for part in x[8..].chunks_exact(8) {
        for (l, &v) in lanes.iter_mut().zip(part) {
            *l += v;
        }
    }
    hsum8(lanes)
}

/// Q8_0 quantization of one block, with its code and value sums: the reference the SIMD
/// quantizers match bit for bit. NaN values are left out of `max|x|` and get code 0.
fn quantize_block(x: &[f32], block: &mut ActBlock) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (d, inv) = block_scale(amax);
    for (q, &v) in block.q.iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0), so odd inputs cannot wrap.
        *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    let code_sum = |q: &[i8]| q.iter().map(|&q| i32::from(q)).sum::<i32>();
    block.d = d;
    block.sum = code_sum(&block.q);
    block.sum_lo = code_sum(&block.q[..BLOCK / 2]);
    block.xsum = block_sum(x);
    block.xsum_halves = half_sums(x);
}

/// The scale `d = amax / 127` of a block with largest magnitude `amax`, and the factor `1 / d`
/// (0 when `d` is 0) its values are multiplied by before rounding.
#[inline(always)]
fn block_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    (d, inv)
}

/// Position of block `b` of `row` in the tile-interleaved layout (see [`Int8Matrix`]).
pub(crate) fn block_index(rows: usize, per_row: usize, row: usize, b: usize) -> usize {
    if row < rows / ROW_TILE * ROW_TILE {
        (row / ROW_TILE * per_row + b) * ROW_TILE + row % ROW_TILE
    } else {
        row * per_row + b
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

/// Sum of eight lanes in the order every ISA uses: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
#[inline]
pub(crate) fn hsum8(l: [f32; 8]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}
