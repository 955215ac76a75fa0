//! [`crate::Int8Matrix`] weights on the dot path: int8 codes (Q8_0) or IQ4 codebook values,
//! with one scale per block of 32 (or per half block) and no offset.
//!
//! For `vpdpbusd` (and the scalar reference) a code `q` (−128..=127) is stored as the byte
//! `q + 128`, so it is the unsigned operand; the sums start at `−128·Σq_x`, which gives the exact
//! `Σ q·q_x`. For `maddubs` ([`Unpacked::signed`]) it is stored as itself and the sums start at 0.
//! The scale is the block's (not halved: these codes count once, `factor` 1) and the offset 0.

use std::ops::Range;

use super::{DotTiles, Unpacked, CHUNK};
use crate::cpu::Cpu;
use crate::error::Result;
use crate::int8::{
    block_index, ActBlock, BlockScale, BlocksVisitor, Codes, Int8Activations, Int8Matrix,
    WeightBlock, BLOCK,
};
use crate::isa::Isa;
use crate::lut::layout::TILE;

impl Int8Matrix {
    /// The instruction [`Int8Matrix::matmul_prompt`] multiplies prompt tokens with on `cpu`
    /// (`vpdpbusd` where the CPU has AVX-512 VNNI, else `maddubs` on AVX2), or `None` where every
    /// token takes the int8 kernel of [`Int8Matrix::matmul`].
    pub fn dot_instruction(cpu: &Cpu) -> Option<&'static str> {
        super::instruction(cpu)
    }

    /// [`Int8Matrix::matmul`], where the first `prompt` tokens of `acts` go through the int8 dot
    /// GEMM when the CPU has one ([`Int8Matrix::dot_instruction`]): tiles of 64 rows unpacked
    /// once for up to 256 tokens, the path for batches of prompt tokens. The two paths sum in
    /// different orders, so a token's result depends on whether it is a prompt token, not on
    /// what else shares the batch.
    pub fn matmul_prompt(
        &self,
        cpu: &Cpu,
        acts: &Int8Activations,
        prompt: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_matmul(acts, out)?;
        let (rows, act_groups) = (self.rows(), self.cols() / BLOCK);
        let prompt = match (Int8Matrix::dot_instruction(cpu), act_groups) {
            (Some(_), 1..) => prompt.min(acts.tokens()),
            _ => 0,
        };
        let (head, tail) = out.split_at_mut(prompt * rows);
        let (x_head, x_tail) = acts.blocks().split_at(prompt * act_groups);
        if prompt > 0 {
            self.matmul_dot(cpu, x_head, head);
        }
        self.matmul_tokens(cpu, x_tail, tail);
        Ok(())
    }

    /// The dot GEMM of every token of `x` (`[tokens][cols / 32]`) into `out` (`[tokens][rows]`);
    /// shapes checked by the caller.
    pub(crate) fn matmul_dot(&self, cpu: &Cpu, x: &[ActBlock], out: &mut [f32]) {
        self.visit_blocks(DotGemm {
            cpu,
            rows: self.rows(),
            act_groups: self.cols() / BLOCK,
            x,
            out,
        });
    }
}

/// The dot GEMM of every token of `x` (`[tokens][act_groups]`) into `out` (`[tokens][rows]`).
struct DotGemm<'a> {
    cpu: &'a Cpu,
    rows: usize,
    act_groups: usize,
    x: &'a [ActBlock],
    out: &'a mut [f32],
}

impl BlocksVisitor for DotGemm<'_> {
    type Output = ();

    fn visit<S: BlockScale, C: Codes>(self, blocks: &[WeightBlock<S, C>]) {
        let (rows, act_groups) = (self.rows, self.act_groups);
        let unpack = unpacker(self.cpu.isa());
        let tiles = |_| Int8Tiles {
            blocks,
            rows,
            act_groups,
            unpack,
        };
        super::run(self.cpu, tiles, self.x, act_groups, &mut [self.out]);
    }
}

/// What the unpacked codes are centred on: the byte of code 0, signed or offset.
pub(crate) fn code_zero(signed: bool) -> i32 {
    if signed {
        0
    } else {
        128
    }
}

/// The blocks of an int8 matrix of `rows` rows and `act_groups` blocks per row, in the
/// tile-interleaved layout of [`crate::Int8Matrix`], and how they are unpacked ([`unpacker`],
/// chosen once per dispatch).
pub(crate) struct Int8Tiles<'w, S, C> {
    pub blocks: &'w [WeightBlock<S, C>],
    pub rows: usize,
    pub act_groups: usize,
    pub unpack: UnpackCodes<S, C>,
}

impl<S: BlockScale, C: Codes> Int8Tiles<'_, S, C> {
    /// The block of activation group `a` of row `row`.
    #[inline(always)]
    pub(crate) fn block(&self, row: usize, a: usize) -> &WeightBlock<S, C> {
        &self.blocks[block_index(self.rows, self.act_groups, row, a)]
    }

    /// Writes tile row `r`'s codes of activation group `a` (matrix row `row`, or a padded row of
    /// code 0 when `row` is past the end) into chunk slot `c`, signed or offset as `u.signed`
    /// says.
    pub(crate) fn unpack_row(&self, row: usize, a: usize, r: usize, c: usize, u: &mut Unpacked) {
        let zero = code_zero(u.signed) as u8;
        let bytes = if row < self.rows {
            self.block(row, a).q.codes().map(|q| (q as u8) ^ zero)
        } else {
            [zero; BLOCK]
        };
        for (j, quad) in bytes.chunks_exact(4).enumerate() {
            let at = (j * TILE + r) * 4;
            u.codes[c][at..at + 4].copy_from_slice(quad);
        }
    }
}

/// Unpacks the codes of activation groups `a0..a0 + count` into chunk slots `0..count` for the
/// [`TILE`] rows `rows` of one tile.
pub(crate) type UnpackCodes<S, C> =
    fn(&Int8Tiles<'_, S, C>, Range<usize>, usize, usize, &mut Unpacked);

/// The unpacking of int8 blocks on `isa`: AVX2 where it is, else scalar.
fn unpacker<S: BlockScale, C: Codes>(isa: Isa) -> UnpackCodes<S, C> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::avx2::unpack_int8_checked,
        _ => unpack_scalar,
    }
}

/// [`UnpackCodes`] row by row.
pub(crate) fn unpack_scalar<S: BlockScale, C: Codes>(
    m: &Int8Tiles<'_, S, C>,
    rows: Range<usize>,
    a0: usize,
    count: usize,
    u: &mut Unpacked,
) {
    for c in 0..count {
        for r in 0..TILE {
            m.unpack_row(rows.start + r, a0 + c, r, c, u);
        }
    }
}

impl<S: BlockScale, C: Codes> DotTiles for Int8Tiles<'_, S, C> {
    const WIDE_CODES: bool = true;

    fn rows(&self) -> usize {
        self.rows
    }

    fn each_chunk(
        &self,
        t: usize,
        act_groups: usize,
        u: &mut Unpacked,
        mut multiply: impl FnMut(&Unpacked, usize, usize),
    ) {
        assert!(
            act_groups == self.act_groups && self.blocks.len() == self.rows * act_groups,
            "int8 blocks do not match the activations"
        );
        u.top = code_zero(u.signed);
        u.factor = 1;
        u.halves = if S::PER_HALF { 2 } else { 1 };
        let rows = TILE * t..TILE * (t + 1);
        for a0 in (0..act_groups).step_by(CHUNK) {
            let count = CHUNK.min(act_groups - a0);
            (self.unpack)(self, rows.clone(), a0, count, u);
            for c in 0..count {
                for (r, row) in rows.clone().enumerate() {
                    // Padded rows: scale 0.
                    let scales = match row < self.rows {
                        true => self.block(row, a0 + c).d.halves(),
                        false => [0.0; 2],
                    };
                    for (h, &scale) in scales[..u.halves].iter().enumerate() {
                        u.scale[2 * c + h][r] = scale;
                        u.offset[2 * c + h][r] = 0.0;
                    }
                }
            }
            multiply(u, a0, count);
        }
    }
}
