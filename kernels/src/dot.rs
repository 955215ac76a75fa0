//! The int8 dot-product GEMM over LUT-packed matrices, for batches of tokens (prefill).
//!
//! Once a batch of tokens makes a matmul compute-bound, multiplying integer codes by int8
//! activations (`maddubs` on AVX2, `vpdpbusd` with AVX-512 VNNI) does more work per instruction
//! than table lookups. This path reads the same [`crate::PackedMatrix`] as the LUT kernels (no
//! second copy of the weights): for each tile of 64 rows it unpacks the bit planes of a few
//! activation groups at a time into unsigned byte codes, four consecutive columns of a row per
//! 32-bit lane, and multiplies them with Q8_0-style activations ([`Int8Activations`]); on CPUs
//! with AMX, sixteen tokens at a time by tile products (`amx`).
//!
//! It takes uniform planes (1 to 6 bits) in weight groups of 16 or of 32 or more, with f16 scales
//! and offsets or two-level (super-block) scales. Each weight is written `s·(q − c) + o` with `c`
//! the centre of the code range, `(2^b − 1)/2`, for its group's scale `s` and offset
//! `o = s·c + m` (codes centred on a zero point `z` instead of offsets: `o = s·(c − z)`;
//! two-level: `s = d·sc`, `o = s·(c − z) − dmin·m`): only the centred part
//! multiplies rounded activations, and the offset multiplies the exact `Σx`, as in the table
//! lookups, which keeps the rounding error of the activations from growing with the offset. The
//! codes count twice, so that the centred dot is an integer: per activation block of 32 columns
//! with scale `d_x`, code sum `Σq_x` and value sum `Σx`, the integer
//! `D = 2·Σ q·q_x − (2^b − 1)·Σq_x` is exact, and every ISA computes, for each row and token, in
//! block order, `acc = fma(D, (s/2)·d_x, acc); acc = fma(o, Σx, acc)`, so all ISAs give the same
//! bits. The codes are unpacked as they are and doubled in the int32 sums (not in the bytes),
//! which keeps `maddubs`'s int16 pair sums small enough to add two to eight of them in int16.
//! With groups of 16, each block is two halves, each with its own `Σq_x`, `Σx`, scale and offset,
//! multiplied in that order.
//!
//! Per-plane (HLQ) scales, `w = z + Σ_p s_p·q_p` over the bit planes `q_p` of a `b`-bit code `q`,
//! take `b` passes over each unpacked chunk, pass `p` with the codes shifted down, `q >> p`
//! (whose plane `p'` counts `2^(p' − p)`): as `Σ_p t_p·(q >> p) = Σ_p s_p·q_p` for
//! `t_p = s_p − 2·s_{p−1}` (`t_0 = s_0`), pass `p` multiplies the centred codes of width `b − p`
//! by the scale `t_p`, and the first pass adds the offset `o = z + Σ_p s_p/2` times `Σx`. Planes
//! fitted near a uniform grid (`s_p ≈ 2·s_{p−1}`) leave the later passes small terms.
//!
//! The same tiles and multiplies take [`crate::Int8Matrix`] weights (Q8_0 codes, IQ4 codebook
//! values; [`int8_tiles`]). Their codes fill all eight bits, which `maddubs` pairs of unsigned
//! codes could overflow: `vpdpbusd` takes them offset to unsigned bytes, and `maddubs` takes them
//! signed, as `|q|` times the activation carrying the sign of `q` (a pair is at most 2·128·127,
//! inside int16). Each matrix kind is a [`DotTiles`]: how a tile is unpacked.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::cpu::Cpu;
use crate::int8::ActBlock;
#[cfg(target_arch = "x86_64")]
use crate::isa::has_avx512_vnni;
use crate::isa::Isa;
use crate::lut::layout::{LO_ROW, PLANE_BYTES, TABLES_PER_ACT, TILE};
use crate::lut::{TileView, Weights};
use crate::tiling::{run_row_tasks, Split};

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod int8_tiles;
#[cfg(test)]
mod tests;

/// Tokens per task block: the codes of a tile are unpacked once per block of this many tokens.
pub(crate) const NB: usize = 256;
/// Activation groups unpacked at a time: their codes (8 KiB per tile) and the block's activations
/// stay in L1 while the tokens go over them.
pub(crate) const CHUNK: usize = 4;

/// Most bit planes: unsigned codes below 128 under `maddubs` (a pair of 6-bit codes times int8
/// stays inside int16).
pub(crate) const MAX_BITS: usize = 6;
/// Bytes of unpacked codes per activation group of a tile: 8 column quads × 64 rows × 4.
pub(crate) const GROUP_BYTES: usize = TABLES_PER_ACT * TILE * 4;

/// The instruction the dot path multiplies with on `cpu`, or `None` where it has no SIMD form.
pub(crate) fn instruction(cpu: &Cpu) -> Option<&'static str> {
    multiplier(cpu.isa(), false).instruction
}

/// Fills part of an [`Unpacked`] from a chunk of a tile's activation groups (`a0`, `count`): the
/// byte codes ([`unpack_scalar`]) or the scales and offsets ([`unpack_scales`]).
pub(crate) type UnpackFn = fn(&TileView<'_>, usize, usize, &mut Unpacked);

/// How an ISA unpacks bit planes into byte codes, and their groups' f16 or two-level scales into
/// f32 scales and offsets.
#[derive(Clone, Copy)]
pub(crate) struct Unpacker {
    pub unpack: UnpackFn,
    /// Fills the scales, offsets and integer constants of an [`Unpacked`] chunk, as
    /// [`unpack_scales`] does, bit for bit.
    pub scales: UnpackFn,
    /// The instruction that unpacks the codes where it is not shifts and masks.
    pub instruction: Option<&'static str>,
}

/// The fastest unpacking of bit planes on `isa` and this CPU: GFNI bit-matrix transposes where
/// AVX-512 VBMI and GFNI exist, else AVX2 shifts and masks, else scalar; scales eight rows at a
/// time with F16C on AVX2, else scalar.
pub(crate) fn unpacker(isa: Isa) -> Unpacker {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if avx2::has_gfni() => Unpacker {
            unpack: avx2::unpack_gfni_checked,
            scales: avx2::unpack_scales_checked,
            instruction: Some("gf2p8affineqb"),
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Unpacker {
            unpack: avx2::unpack_checked,
            scales: avx2::unpack_scales_checked,
            instruction: None,
        },
        _ => Unpacker {
            unpack: unpack_scalar,
            scales: unpack_scales,
            instruction: None,
        },
    }
}

/// Tasks own whole tiles and blocks of at most [`NB`] tokens, the blocks of one size, so that
/// the threads' shares of (block, tile) units are equal work: 300 tokens are two blocks of 150
/// (blocks of 256 and 44 left one of two threads with 85% of the work). When the units do not
/// share out evenly over `threads` (`tiles` in all: 9 tiles on 2 threads) and there are tokens
/// enough, the blocks are a multiple of `threads` in number, so every thread goes through every
/// tile for its share of the tokens (unpacking each tile once more, none idle for a whole tile).
fn dot_split(tiles: usize, tokens: usize, threads: usize) -> Split {
    let mut blocks = tokens.div_ceil(NB).max(1);
    if threads > 1 && !(blocks * tiles).is_multiple_of(threads) && tokens >= 8 * threads {
        blocks = blocks.next_multiple_of(threads);
    }
    Split {
        tile_rows: TILE,
        token_block: tokens.div_ceil(blocks),
        tasks_per_thread: 1,
    }
}

/// A chunk of one tile unpacked for the dot kernels.
///
/// `codes[a][j][r][i]` is the code of row `r`, column `32a + 4j + i` of the chunk;
/// `scale[2a + h][r]` is half the scale and `offset[2a + h][r]` the offset of the centred codes of
/// the group holding half `h` of activation group `a` of row `r` (0 for padded rows), where there
/// are `halves` (1, or 2 for weight groups of 16) halves per activation group; `top` is `2^b − 1`
/// (`2^(b − p)` − 1 on pass `p` of per-plane scales) and `factor` 2: a block's integer dot is
/// `factor·Σ q·q_x − top·Σq_x`.
/// With `signed` (set by the multiply before unpacking, only for [`DotTiles::WIDE_CODES`]) the
/// code bytes are two's complement int8 values and `top` is 0; [`int8_tiles`] documents the
/// scale, offset, `top` and `factor` of those.
#[repr(C, align(64))]
pub(crate) struct Unpacked {
    pub codes: [[u8; GROUP_BYTES]; CHUNK],
    pub scale: [[f32; TILE]; 2 * CHUNK],
    pub offset: [[f32; TILE]; 2 * CHUNK],
    pub top: i32,
    pub factor: i32,
    pub halves: usize,
    pub signed: bool,
}

impl Unpacked {
    /// Sets the integer constants of a chunk of tile `v`: `top`, `factor` and `halves`.
    pub(crate) fn set_form(&mut self, v: &TileView<'_>) {
        self.top = (1 << v.bits) - 1;
        self.factor = 2;
        self.halves = if v.half_groups { 2 } else { 1 };
    }

    fn new() -> Unpacked {
        Unpacked {
            codes: [[0; GROUP_BYTES]; CHUNK],
            scale: [[0.0; TILE]; 2 * CHUNK],
            offset: [[0.0; TILE]; 2 * CHUNK],
            top: 0,
            factor: 1,
            halves: 1,
            signed: false,
        }
    }
}

/// Per-token, per-row accumulators of one tile and token block.
pub(crate) type Acc = [[f32; TILE]];

/// The activations one unpacked chunk multiplies: a task's tokens `x` (`[token][per_row]`
/// blocks) and the chunk's `count` activation groups from `a0`.
#[derive(Clone, Copy)]
pub(crate) struct Chunk<'a> {
    pub x: &'a [ActBlock],
    pub per_row: usize,
    pub a0: usize,
    pub count: usize,
}

impl Chunk<'_> {
    /// Tokens in `x`.
    pub fn tokens(&self) -> usize {
        self.x.len() / self.per_row
    }

    /// Whether the indices the multiplies use lie in `x` and in accumulators for `capacity`
    /// tokens.
    pub fn fits(&self, capacity: usize) -> bool {
        self.per_row > 0
            && self.count <= CHUNK
            && self.a0 + self.count <= self.per_row
            && self.x.len() == self.tokens() * self.per_row
            && self.tokens() <= capacity
    }

    /// Token `n`'s block of the chunk's activation group `c`.
    #[inline(always)]
    pub fn block(&self, n: usize, c: usize) -> &ActBlock {
        &self.x[n * self.per_row + self.a0 + c]
    }
}

/// Whether the dot path can multiply a matrix of this form: any uniform form, and per-plane
/// scales in weight groups of 32 or more.
pub(crate) fn supports(w: &Weights<'_>) -> bool {
    let per_plane_fits = !w.per_plane || (!w.half_groups && w.super_scales.is_none());
    per_plane_fits && (1..=MAX_BITS).contains(&w.bits) && w.groups > 0
}

/// A matrix the dot path multiplies, as tiles of [`TILE`] rows unpacked a chunk of activation
/// groups at a time.
pub(crate) trait DotTiles: Sync {
    /// Whether codes fill eight bits: then they are unpacked as signed bytes when
    /// [`Unpacked::signed`] is set (for `maddubs`, whose pairs of unsigned codes that wide would
    /// overflow int16), else offset to unsigned bytes.
    const WIDE_CODES: bool;

    /// Output rows.
    fn rows(&self) -> usize;

    /// For each chunk of at most [`CHUNK`] activation groups (`a0`, `count`) of tile `t` (rows
    /// `TILE·t..`), in order, fills `u` with the chunk's codes, scales and offsets and calls
    /// `multiply(u, a0, count)`. `act_groups` is the activations' groups per token.
    fn each_chunk(
        &self,
        t: usize,
        act_groups: usize,
        u: &mut Unpacked,
        multiply: impl FnMut(&Unpacked, usize, usize),
    );
}

/// LUT-packed bit planes ([`crate::PackedMatrix`]) of `rows` rows, all [`supports`]ed, and how
/// they are unpacked ([`unpacker`], chosen once per dispatch).
pub(crate) struct Planes<'w> {
    pub w: Weights<'w>,
    pub rows: usize,
    pub unpacker: Unpacker,
}

impl DotTiles for Planes<'_> {
    const WIDE_CODES: bool = false;

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
        let tile = self.w.tile(t);
        assert!(
            tile_is_consistent(&tile, act_groups),
            "inconsistent packed tile"
        );
        // A per-plane tile's chunk scales, widened once for all the chunk's passes.
        let mut planes = tile.per_plane.then_some([[[0.0; TILE]; MAX_BITS]; CHUNK]);
        for a0 in (0..act_groups).step_by(CHUNK) {
            let count = CHUNK.min(act_groups - a0);
            let Some(planes) = planes.as_mut() else {
                (self.unpacker.scales)(&tile, a0, count, u);
                (self.unpacker.unpack)(&tile, a0, count, u);
                multiply(u, a0, count);
                continue;
            };
            (self.unpacker.unpack)(&tile, a0, count, u);
            widen_plane_scales(&tile, a0, count, planes);
            for p in 0..tile.bits {
                if p > 0 {
                    shift_codes_down(u, count);
                }
                plane_pass_scales(&tile, planes, a0, count, p, u);
                multiply(u, a0, count);
            }
        }
    }
}

/// `outs[p][n][r]` for every token `n` of the activation blocks `x` (`[tokens][act_groups]`) and
/// every row `r` of each matrix `p`, in one dispatch. The caller checked that every matrix agrees
/// with `x` on K and that `outs[p].len() == tokens · rows`.
pub(crate) fn run<M: DotTiles>(
    cpu: &Cpu,
    matrix: impl Fn(usize) -> M + Sync,
    x: &[ActBlock],
    act_groups: usize,
    outs: &mut [&mut [f32]],
) {
    let tokens = x.len() / act_groups.max(1);
    let isa = cpu.isa();
    let Multiplier {
        multiply, signed, ..
    } = multiplier(isa, M::WIDE_CODES);
    let tiles = (0..outs.len())
        .map(|p| matrix(p).rows().div_ceil(TILE))
        .sum();
    run_row_tasks(
        cpu,
        outs,
        |p| matrix(p).rows(),
        tokens,
        dot_split(tiles, tokens, cpu.threads()),
        |p, out| {
            let m = matrix(p);
            let tokens = out.tokens();
            let x = &x[tokens.start * act_groups..tokens.end * act_groups];
            let mut unpacked = Unpacked::new();
            unpacked.signed = signed;
            // A few tokens (short prompts) need not zero a whole block's 64 KiB of accumulators.
            let mut few = [[0.0f32; TILE]; 8];
            let mut big;
            let acc: &mut Acc = if tokens.len() <= few.len() {
                &mut few
            } else {
                big = [[0.0f32; TILE]; NB];
                &mut big
            };
            for r0 in (out.start()..out.end()).step_by(TILE) {
                for row in &mut acc[..tokens.len()] {
                    row.fill(0.0);
                }
                m.each_chunk(r0 / TILE, act_groups, &mut unpacked, |u, a0, count| {
                    let chunk = Chunk {
                        x,
                        per_row: act_groups,
                        a0,
                        count,
                    };
                    multiply(u, chunk, acc);
                });
                out.write_tile(tokens.start, r0, &acc[..tokens.len()]);
            }
        },
    );
}

/// Whether the tile's slices have the lengths the unpackers index (what makes SIMD reads sound).
fn tile_is_consistent(v: &TileView<'_>, act_groups: usize) -> bool {
    let scales_fit = match &v.super_scales {
        Some(s) => {
            s.is_consistent(v.groups) && !v.per_plane && v.scales.is_empty() && v.offsets.is_none()
        }
        None => {
            v.scales.len() == v.groups * v.scale_planes() * TILE
                && v.offsets.is_none_or(|o| o.len() == v.groups * TILE)
                && !(v.per_plane && v.half_groups)
        }
    };
    let groups_fit = if v.half_groups {
        v.groups == 2 * v.act_groups
    } else {
        v.groups > 0 && v.apg * v.groups == v.act_groups
    };
    (1..=MAX_BITS).contains(&v.bits)
        && v.act_groups == act_groups
        && groups_fit
        && v.weights.len() == v.act_groups * v.bits * PLANE_BYTES
        && scales_fit
}

/// How the dot path multiplies on an ISA.
struct Multiplier {
    /// The SIMD instruction, `None` for the scalar reference.
    instruction: Option<&'static str>,
    multiply: fn(&Unpacked, Chunk<'_>, &mut Acc),
    /// Whether wide codes are unpacked signed ([`Unpacked::signed`]).
    signed: bool,
}

/// The multiply for `isa` and codes of [`DotTiles::WIDE_CODES`] `wide_codes`: AMX tiles
/// (`tdpbssd`) where the CPU has them and Linux grants them, else `vpdpbusd` where the CPU has
/// AVX-512 VNNI, else `maddubs` on AVX2 (wide codes signed), else the scalar reference.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn multiplier(isa: Isa, wide_codes: bool) -> Multiplier {
    let (instruction, multiply, signed): (_, fn(&Unpacked, Chunk<'_>, &mut Acc), _) = match isa {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Isa::Avx2 if amx::has_amx() => (Some("tdpbssd"), amx::multiply_amx_checked, false),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if has_avx512_vnni() => (Some("vpdpbusd"), avx2::multiply_vnni_checked, false),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if wide_codes => (Some("maddubs"), avx2::multiply_madd_signed_checked, true),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (Some("maddubs"), avx2::multiply_madd_checked, false),
        _ => (None, multiply_scalar, false),
    };
    Multiplier {
        instruction,
        multiply,
        signed,
    }
}

/// Fills `u.scale` and `u.offset` for the halves of activation groups `a0..a0 + count` (the
/// scalar reference).
fn unpack_scales(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    u.set_form(v);
    let centre = v.centre;
    for (c, h) in (0..count).flat_map(|c| (0..u.halves).map(move |h| (c, h))) {
        let g = v.group_of(a0 + c, h);
        let (scale, offset) = (&mut u.scale[2 * c + h], &mut u.offset[2 * c + h]);
        match &v.super_scales {
            None => {
                widen_rows(v.scales, g, scale);
                widen_offsets(v, g, offset);
                for (o, &s) in offset.iter_mut().zip(scale.iter()) {
                    // Not fused: a plain `mul_add` here is a libm call per element on x86.
                    *o += s * centre;
                }
            }
            Some(s) => {
                let sb = g / s.groups_per_super;
                let rows = |v: &'_ [u16], at: usize| {
                    let mut out = [0.0f32; TILE];
                    widen_rows(v, at, &mut out);
                    out
                };
                // Whole rows at a time (the f16 widening and the products vectorize); `centre`
                // is `c − z`.
                let d = rows(s.d, sb);
                for ((sc, o), (&d, &q)) in scale
                    .iter_mut()
                    .zip(offset.iter_mut())
                    .zip(d.iter().zip(&s.sub_scales[g * TILE..(g + 1) * TILE]))
                {
                    *sc = d * f32::from(s.sub_scale(q));
                    *o = *sc * centre;
                }
                if let (Some(dmin), Some(mins)) = (s.dmin, s.sub_mins) {
                    let dmin = rows(dmin, sb);
                    for ((o, &dm), &m) in offset
                        .iter_mut()
                        .zip(&dmin)
                        .zip(&mins[g * TILE..(g + 1) * TILE])
                    {
                        *o -= dm * f32::from(s.sub_min(m));
                    }
                }
            }
        }
        // The codes count twice: halving is exact.
        scale.iter_mut().for_each(|s| *s *= 0.5);
    }
}

/// Widens the `index`-th run of [`TILE`] f16 values of `src` (one value per row of a tile) into
/// `out`.
fn widen_rows(src: &[u16], index: usize, out: &mut [f32]) {
    src[index * TILE..(index + 1) * TILE]
        .reinterpret_cast::<f16>()
        .convert_to_f32_slice(out);
}

/// The f32 offsets of weight group `g`'s rows of tile `v` into `out` (0 for a tile without
/// offsets).
fn widen_offsets(v: &TileView<'_>, g: usize, out: &mut [f32]) {
    match v.offsets {
        Some(o) => widen_rows(o, g, out),
        None => out.fill(0.0),
    }
}

/// The f32 scales of a per-plane tile's chunk, `[activation group][plane][row]`.
type ChunkPlaneScales = [[[f32; TILE]; MAX_BITS]; CHUNK];

/// Widens the plane scales of the weight groups of activation groups `a0..a0 + count` of
/// per-plane tile `v` into `out`.
fn widen_plane_scales(v: &TileView<'_>, a0: usize, count: usize, out: &mut ChunkPlaneScales) {
    for (c, planes) in out[..count].iter_mut().enumerate() {
        let g = v.group_of(a0 + c, 0);
        for (q, plane) in planes[..v.bits].iter_mut().enumerate() {
            widen_rows(v.scales, g * v.bits + q, plane);
        }
    }
}

/// Fills `u` for pass `p` of a per-plane tile's chunk (activation groups `a0..a0 + count`, plane
/// scales `planes` from [`widen_plane_scales`]; see the module doc): codes `q >> p` up to
/// `top = 2^(b − p) − 1`, half the scale `t_p`, and the offset `o` on the first pass (0 on the
/// others). The same on every ISA.
fn plane_pass_scales(
    v: &TileView<'_>,
    planes: &ChunkPlaneScales,
    a0: usize,
    count: usize,
    p: usize,
    u: &mut Unpacked,
) {
    u.top = (1 << (v.bits - p)) - 1;
    u.factor = 2;
    u.halves = 1;
    for (c, s) in planes[..count].iter().enumerate() {
        let (scale, offset) = (&mut u.scale[2 * c], &mut u.offset[2 * c]);
        if p == 0 {
            widen_offsets(v, v.group_of(a0 + c, 0), offset);
            for sq in &s[..v.bits] {
                for (o, &sq) in offset.iter_mut().zip(sq) {
                    *o += 0.5 * sq;
                }
            }
            for (h, &s) in scale.iter_mut().zip(&s[0]) {
                *h = 0.5 * s;
            }
        } else {
            for ((h, &s), &b) in scale.iter_mut().zip(&s[p]).zip(&s[p - 1]) {
                *h = 0.5 * (s - 2.0 * b);
            }
            offset.fill(0.0);
        }
    }
}

/// `q >> 1` for every unpacked code of the chunk's `count` activation groups.
fn shift_codes_down(u: &mut Unpacked, count: usize) {
    for codes in &mut u.codes[..count] {
        for q in codes.iter_mut() {
            *q >>= 1;
        }
    }
}

/// Scalar unpacking: every plane bit of every code, one at a time.
pub(crate) fn unpack_scalar(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    for c in 0..count {
        let codes = &mut u.codes[c];
        codes.fill(0);
        for p in 0..v.bits {
            let plane = &v.weights[((a0 + c) * v.bits + p) * PLANE_BYTES..][..PLANE_BYTES];
            for (j, block) in plane.chunks_exact(32).enumerate() {
                for (b, &byte) in block.iter().enumerate() {
                    for (row, nibble) in [(LO_ROW[b], byte & 0xF), (LO_ROW[b] + 32, byte >> 4)] {
                        for i in 0..4 {
                            codes[(j * TILE + row) * 4 + i] |= ((nibble >> i) & 1) << p;
                        }
                    }
                }
            }
        }
    }
}

/// The reference multiply: exact integer dots, then the two fused steps per block.
pub(crate) fn multiply_scalar(u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
    assert!(chunk.fits(acc.len()), "chunk outside its activations");
    let quads = TABLES_PER_ACT / u.halves;
    for (n, row_acc) in acc[..chunk.tokens()].iter_mut().enumerate() {
        for c in 0..chunk.count {
            let xb = chunk.block(n, c);
            for h in 0..u.halves {
                let (scale, offset) = (&u.scale[2 * c + h], &u.offset[2 * c + h]);
                for (r, out) in row_acc.iter_mut().enumerate() {
                    let mut dot = 0i32;
                    for j in h * quads..(h + 1) * quads {
                        let w = &u.codes[c][(j * TILE + r) * 4..][..4];
                        for (&w, &x) in w.iter().zip(&xb.q[4 * j..4 * j + 4]) {
                            let w = match u.signed {
                                true => i32::from(w as i8),
                                false => i32::from(w),
                            };
                            dot += w * i32::from(x);
                        }
                    }
                    dot = u.factor * dot - u.top * xb.code_sum(u.halves, h);
                    let mut a = (dot as f32).mul_add(scale[r] * xb.d, *out);
                    a = offset[r].mul_add(xb.value_sum(u.halves, h), a);
                    *out = a;
                }
            }
        }
    }
}
