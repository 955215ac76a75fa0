//! The LUT matmul kernels over the packed layout: one tile kernel per ISA (scalar reference, AVX2,
//! NEON), run over tiles and token blocks by the shared driver in [`crate::tiling`].
//!
//! Every tile kernel computes, for one tile of [`TILE`] rows and a block of up to [`NB`] tokens, the same
//! float operations in the same order (mul and add, never fused), so that the SIMD paths agree with the
//! scalar reference bit for bit: integer lookups are exact whatever their order, and the float work per
//! row is `F += tscale·S` per activation group, then one combine per weight group, except for
//! two-level scales in groups of 16, whose two halves are combined in integers first and then take
//! two float steps per activation group (see [`scalar`] and [`HalvesCombine`]).
//!
//! On AVX2, uniform planes in weight groups of 32 or 16 (Q4_0, Q4_1 and the K-quants, up to 6
//! planes, f16 or super-block scales) take a direct path from the int16 lookup sums into the
//! combine. Forms no specialised SIMD path covers (on AVX2: 5 or 6 planes with per-plane scales or
//! groups of 64 and more, two-level groups of 16 whose integer combine does not fit int16; on
//! NEON: more than 4 planes, groups of 16, super-block scales) run the scalar float work with the
//! ISA's integer lookups ([`scalar::tile_with`]): integer sums are exact, so those paths agree
//! with the reference too.

pub(crate) mod layout;
pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
#[cfg(test)]
mod tests;

use std::ops::Range;

use crate::cpu::Cpu;
use crate::isa::Isa;
use crate::tiling::{run_row_tasks, Split};
use layout::{ACT, PLANE_BYTES, TABLES_PER_ACT, TABLE_BYTES, TILE};

/// Tokens per block in the GEMM loop: a weight chunk is loaded once per block of this many tokens.
pub(crate) const NB: usize = 16;
/// Activation groups per chunk of a weight group: the chunk's weights (at most 8 KiB per tile) stay in
/// L1 while the tokens of a block go over them.
pub(crate) const CHUNK: usize = 8;

/// Tasks own whole tiles and token blocks, one contiguous range per thread (see [`crate::tiling`]).
pub(crate) const TILE_SPLIT: Split = Split {
    tile_rows: TILE,
    token_block: NB,
    tasks_per_thread: 1,
};

/// Most bit planes.
pub(crate) const MAX_BITS: usize = 6;
/// Most bit planes the specialised SIMD paths take: their int16 sums of up to 4 planes cannot overflow.
pub(crate) const MAX_FAST_BITS: usize = 4;

/// Per-token, per-row accumulators of one tile, for token blocks of up to `N` tokens (1 for GEMV, so
/// that a tile call does not clear 20 KiB of GEMM scratch).
pub(crate) type Acc<const N: usize> = [[f32; TILE]; N];
/// Per-token, per-plane, per-row float sums of one weight group.
pub(crate) type PlaneSums<const N: usize> = [[[f32; TILE]; MAX_BITS]; N];

/// A whole packed matrix, borrowed from [`crate::PackedMatrix`].
pub(crate) struct Weights<'a> {
    /// Bits per code (planes).
    pub bits: usize,
    /// Per-plane scales instead of one uniform scale per group.
    pub per_plane: bool,
    /// Row tiles.
    pub tiles: usize,
    /// Activation groups per row (K / 32).
    pub act_groups: usize,
    /// Weight groups per row.
    pub groups: usize,
    /// `[tile][act group][plane][256]`.
    pub weights: &'a [u8],
    /// f16 bits, `[tile][group][plane or 1][64]`.
    pub scales: &'a [u16],
    /// f16 bits, `[tile][group][64]`.
    pub offsets: Option<&'a [u16]>,
    /// The `c` of the uniform combine (one-level or two-level): `(2^b − 1)/2 − z` for codes
    /// centred on `z`.
    pub centre: f32,
    /// Weight groups of 16: two per activation group (`groups == 2·act_groups`).
    pub half_groups: bool,
    /// Two-level scales (then `scales` is empty and `offsets` is `None`).
    pub super_scales: Option<SuperScales<'a>>,
}

/// Two-level scales: the scale of weight group `g` of row `r` is `d·sc` and its offset `−dmin·m`,
/// both one f32 product, with `d`, `dmin` of the super-block holding `g`. Slices are
/// `[tile][…][64 rows]` for a matrix, `[…][64 rows]` for a tile.
#[derive(Clone, Copy)]
pub(crate) struct SuperScales<'a> {
    /// Integer sub-scales `sc`, `[group][64]`.
    pub sub_scales: &'a [i8],
    /// Integer sub-mins `m`, `[group][64]`.
    pub sub_mins: Option<&'a [u8]>,
    /// f16 bits of `d`, `[super-block][64]`.
    pub d: &'a [u16],
    /// f16 bits of `dmin`, `[super-block][64]`.
    pub dmin: Option<&'a [u16]>,
    /// Weight groups per super-block.
    pub groups_per_super: usize,
    /// Each group's sub-scale and sub-min are the low and high nibbles of one byte (Q2_K's
    /// form): `sub_scales` and `sub_mins` are then the same bytes.
    pub nibbles: bool,
}

impl<'a> SuperScales<'a> {
    /// The sub-scale held by the byte `b` of `sub_scales`.
    #[inline]
    pub fn sub_scale(&self, b: i8) -> i8 {
        if self.nibbles {
            b & 0x0F
        } else {
            b
        }
    }

    /// The sub-min held by the byte `b` of `sub_mins`.
    #[inline]
    pub fn sub_min(&self, b: u8) -> u8 {
        if self.nibbles {
            b >> 4
        } else {
            b
        }
    }

    /// The weight of the centred code `q` (the code less the matrix's zero point) in row `rr` of
    /// tile `tile`, group `g` (of `groups` per row) of a whole matrix's scales, computed as ggml
    /// does: `(d·sc)·q − dmin·m`.
    pub(crate) fn dequantize(
        &self,
        tile: usize,
        rr: usize,
        g: usize,
        groups: usize,
        q: i32,
    ) -> f32 {
        let f = |h: u16| half::f16::from_bits(h).to_f32();
        let supers = groups / self.groups_per_super;
        let sb = (tile * supers + g / self.groups_per_super) * TILE + rr;
        let gi = (tile * groups + g) * TILE + rr;
        let mut w = (f(self.d[sb]) * f32::from(self.sub_scale(self.sub_scales[gi]))) * q as f32;
        if let (Some(dmin), Some(mins)) = (self.dmin, self.sub_mins) {
            w -= f(dmin[sb]) * f32::from(self.sub_min(mins[gi]));
        }
        w
    }

    /// The part of tile `tile` of a matrix with `groups` weight groups per row.
    fn tile(&self, tile: usize, groups: usize) -> SuperScales<'a> {
        let g = groups * TILE;
        let s = groups / self.groups_per_super.max(1) * TILE;
        SuperScales {
            sub_scales: &self.sub_scales[tile * g..][..g],
            sub_mins: self.sub_mins.map(|m| &m[tile * g..][..g]),
            d: &self.d[tile * s..][..s],
            dmin: self.dmin.map(|m| &m[tile * s..][..s]),
            ..*self
        }
    }

    /// Whether the slices fit a tile of `groups` weight groups.
    pub(crate) fn is_consistent(&self, groups: usize) -> bool {
        let gps = self.groups_per_super;
        gps > 0
            && groups.is_multiple_of(gps)
            && self.sub_scales.len() == groups * TILE
            && self.sub_mins.is_none_or(|m| m.len() == groups * TILE)
            && self.d.len() == groups / gps * TILE
            && self.dmin.is_none_or(|m| m.len() == groups / gps * TILE)
            && self.sub_mins.is_some() == self.dmin.is_some()
            && (!self.nibbles || self.sub_mins.is_some())
    }
}

impl Weights<'_> {
    /// Scale planes per group: `bits` for per-plane scales, else 1.
    pub fn scale_planes(&self) -> usize {
        if self.per_plane {
            self.bits
        } else {
            1
        }
    }

    /// The slices of one tile; panics only if the packed buffers break their own invariants.
    pub(crate) fn tile(&self, tile: usize) -> TileView<'_> {
        let wbytes = self.act_groups * self.bits * PLANE_BYTES;
        let sbytes = self.groups * self.scale_planes() * TILE;
        let obytes = self.groups * TILE;
        let (scales, super_scales) = match &self.super_scales {
            Some(s) => (&self.scales[..0], Some(s.tile(tile, self.groups))),
            None => (&self.scales[tile * sbytes..][..sbytes], None),
        };
        TileView {
            bits: self.bits,
            per_plane: self.per_plane,
            act_groups: self.act_groups,
            groups: self.groups,
            apg: self.act_groups / self.groups,
            weights: &self.weights[tile * wbytes..][..wbytes],
            scales,
            offsets: self.offsets.map(|o| &o[tile * obytes..][..obytes]),
            centre: self.centre,
            half_groups: self.half_groups,
            super_scales,
        }
    }
}

/// One tile of a packed matrix.
pub(crate) struct TileView<'a> {
    pub bits: usize,
    pub per_plane: bool,
    pub act_groups: usize,
    pub groups: usize,
    /// Activation groups per weight group.
    pub apg: usize,
    /// `[act group][plane][256]`.
    pub weights: &'a [u8],
    /// `[group][plane or 1][64]`.
    pub scales: &'a [u16],
    /// `[group][64]`.
    pub offsets: Option<&'a [u16]>,
    /// As [`Weights::centre`].
    pub centre: f32,
    /// Weight groups of 16 (then `apg` is 0).
    pub half_groups: bool,
    /// Two-level scales instead of `scales` and `offsets`.
    pub super_scales: Option<SuperScales<'a>>,
}

impl TileView<'_> {
    /// Whether the tile needs the general path ([`scalar::tile_with`]) rather than the specialised
    /// one for at most 4 planes in groups of 32 or more with f16 scales (AVX2 checks for its
    /// direct path first).
    pub fn needs_general_path(&self) -> bool {
        self.bits > MAX_FAST_BITS || self.half_groups || self.super_scales.is_some()
    }

    /// The activation groups `a0..a1` of weight group `g` and its table groups within each of them.
    #[inline]
    pub fn span(&self, g: usize) -> (usize, usize, Range<usize>) {
        if self.half_groups {
            let half = TABLES_PER_ACT / 2;
            (g / 2, g / 2 + 1, g % 2 * half..(g % 2 + 1) * half)
        } else {
            (g * self.apg, (g + 1) * self.apg, 0..TABLES_PER_ACT)
        }
    }

    /// The weight group holding half `h` of activation group `a` (`h` is 0 unless groups are 16
    /// wide): the inverse of [`TileView::span`].
    #[inline]
    pub fn group_of(&self, a: usize, h: usize) -> usize {
        if self.half_groups {
            2 * a + h
        } else {
            a / self.apg
        }
    }

    /// Σx of one token over weight group `g` (as [`TabView::group_sum`] for whole activation groups).
    #[inline]
    pub fn group_sum(&self, t: &TabView<'_>, token: usize, g: usize) -> f32 {
        if self.half_groups {
            t.half_sums[token * 2 * t.act_groups + g]
        } else {
            t.group_sum(token, g * self.apg, (g + 1) * self.apg)
        }
    }

    /// Scale planes per group.
    pub fn scale_planes(&self) -> usize {
        if self.per_plane {
            self.bits
        } else {
            1
        }
    }

    /// How the tile combines the halves of its activation groups in integers, when it has
    /// two-level scales in weight groups of 16 and an integer `2c` of magnitude at most 63 (every
    /// code width up to 6 with a zero point in the code range).
    pub fn halves_combine(&self) -> Option<HalvesCombine> {
        let c2 = 2.0 * self.centre;
        let integer = c2.fract() == 0.0 && c2.abs() <= 63.0;
        (self.half_groups && self.super_scales.is_some() && integer)
            .then(|| HalvesCombine::new(self.bits, c2 as i32))
    }

    /// Whether every slice has the length the kernels index it with (what makes the SIMD reads sound).
    fn is_consistent(&self, t: &TabView<'_>, n0: usize, nb: usize, capacity: usize) -> bool {
        let scales_fit = match &self.super_scales {
            Some(s) => {
                s.is_consistent(self.groups)
                    && !self.per_plane
                    && self.scales.is_empty()
                    && self.offsets.is_none()
            }
            None => {
                self.scales.len() == self.groups * self.scale_planes() * TILE
                    && self.offsets.is_none_or(|o| o.len() == self.groups * TILE)
            }
        };
        let groups_fit = if self.half_groups {
            self.groups == 2 * self.act_groups
        } else {
            self.apg * self.groups == self.act_groups
        };
        let integer_centre =
            !self.half_groups || self.super_scales.is_none() || self.halves_combine().is_some();
        (1..=MAX_BITS).contains(&self.bits)
            && integer_centre
            && self.groups > 0
            && groups_fit
            && scales_fit
            && self.weights.len() == self.act_groups * self.bits * PLANE_BYTES
            && t.act_groups == self.act_groups
            && nb <= capacity
            && n0 + nb <= t.tokens
            && t.tables.len() == t.tokens * t.act_groups * TABLES_PER_ACT * TABLE_BYTES
            && t.scales.len() == t.tokens * t.act_groups
            && t.sums.len() == t.tokens * t.act_groups
            && t.half_sums.len() == 2 * t.tokens * t.act_groups
            && t.half_units.len() == 2 * t.tokens * t.act_groups
    }
}

/// Σx of half an activation group is kept in units of `2^-HALF_UNIT_BITS` table scales
/// ([`TabView::half_units`]).
pub(crate) const HALF_UNIT_BITS: u32 = 3;

/// Largest |Σx| of half an activation group in those units: 16 activations are 4 table groups,
/// each at most 127 table scales in magnitude (508; with float rounding a little over).
pub(crate) const MAX_HALF_UNITS: i16 = 511 << HALF_UNIT_BITS;

/// The integer combine of two-level weight groups of 16 ([`scalar`]'s module doc): per row and
/// activation group `J = Σ_h sc_h·(2^k·S_h + 2c·u_h)` and `M = Σ_h m_h·u_h`, with `u_h` the Σx of
/// half `h` in units of `2^-k` table scales, then `acc += d·((2^-k·0.5·ts)·J)` and
/// `acc −= dmin·((2^-k·ts)·M)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HalvesCombine {
    /// `2c`, twice the centre of the codes.
    pub two_c: i32,
    /// `k`: the largest, up to [`HALF_UNIT_BITS`], for which `2^k·S_h + 2c·u_h` fits int16, or 0.
    pub shift: u32,
    /// Whether `2^k·S_h + 2c·u_h` fits int16 (what AVX2's direct path needs).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fits_int16: bool,
    /// `2^-k`.
    unit: f32,
}

impl HalvesCombine {
    fn new(bits: usize, two_c: i32) -> HalvesCombine {
        // |S_h| ≤ (2^b − 1)·127·4; |u_h| at shift k ≤ 511·2^k (`units` of MAX_HALF_UNITS).
        let sums = ((1i32 << bits) - 1) * 127 * 4;
        let fits = |k: u32| (sums + two_c.abs() * 511) << k <= i32::from(i16::MAX);
        let shift = (0..=HALF_UNIT_BITS).rev().find(|&k| fits(k)).unwrap_or(0);
        HalvesCombine {
            two_c,
            shift,
            fits_int16: fits(shift),
            unit: 1.0 / (1u32 << shift) as f32,
        }
    }

    /// `u_h` at this combine's shift from the tables' units ([`TabView::half_units`]), rounded
    /// (halves up).
    #[inline]
    pub fn units(&self, u: i16) -> i32 {
        let drop = HALF_UNIT_BITS - self.shift;
        if drop == 0 {
            i32::from(u)
        } else {
            (i32::from(u) + (1 << (drop - 1))) >> drop
        }
    }

    /// The float factors of `J` and `M` for table scale `ts`: `(2^-k·0.5·ts, 2^-k·ts)` (exact
    /// scalings by powers of two).
    #[inline]
    pub fn factors(&self, ts: f32) -> (f32, f32) {
        ((0.5 * self.unit) * ts, self.unit * ts)
    }
}

/// Built activation tables, borrowed from [`crate::ActivationTables`].
pub(crate) struct TabView<'a> {
    pub tokens: usize,
    pub act_groups: usize,
    /// `[token][act group][8][16]` int8.
    pub tables: &'a [i8],
    /// `[token][act group]`.
    pub scales: &'a [f32],
    /// `[token][act group]`: Σx.
    pub sums: &'a [f32],
    /// `[token][act group][2]`: Σx of each half (16 columns) of an activation group.
    pub half_sums: &'a [f32],
    /// `[token][act group][2]`: `half_sums` in units of `2^-HALF_UNIT_BITS` of the group's table
    /// scale, rounded, at most [`MAX_HALF_UNITS`] in magnitude.
    pub half_units: &'a [i16],
}

impl TabView<'_> {
    /// The 8 tables (128 bytes) of one activation group of one token.
    #[inline]
    pub fn tables_of(&self, token: usize, act: usize) -> &[i8] {
        const BYTES: usize = TABLES_PER_ACT * TABLE_BYTES;
        &self.tables[(token * self.act_groups + act) * BYTES..][..BYTES]
    }

    /// Σx over activation groups `a0..a1` of one token, summed in order (the same in every ISA).
    #[inline]
    pub fn group_sum(&self, token: usize, a0: usize, a1: usize) -> f32 {
        let base = token * self.act_groups;
        let mut sx = 0.0f32;
        for &s in &self.sums[base + a0..base + a1] {
            sx += s;
        }
        sx
    }
}

const _: () = assert!(ACT == 32 && TILE == 64);

type TileKernel<const N: usize> = fn(&TileView<'_>, &TabView<'_>, usize, usize, &mut Acc<N>);

/// The tile kernel of `isa` for token blocks of up to `N` tokens. Each checks its slices before
/// indexing them.
fn kernel<const N: usize>(isa: Isa) -> TileKernel<N> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2_tile::<N>,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon_tile::<N>,
        _ => scalar_tile::<N>,
    }
}

fn scalar_tile<const N: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<N>,
) {
    assert!(v.is_consistent(t, n0, nb, N), "inconsistent packed tile");
    scalar::tile(v, t, n0, nb, acc);
}

/// Only reachable through [`kernel`] with `Isa::Avx2`, which a [`Cpu`] holds only when supported.
#[cfg(target_arch = "x86_64")]
fn avx2_tile<const N: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<N>,
) {
    assert!(v.is_consistent(t, n0, nb, N), "inconsistent packed tile");
    // SAFETY: `Cpu::with_isa` checked avx2+fma+f16c before a Cpu with Isa::Avx2 could exist, and the
    // slice lengths the kernel relies on were checked just above.
    unsafe { avx2::tile(v, t, n0, nb, acc) }
}

/// Only reachable through [`kernel`] with `Isa::Neon`, which a [`Cpu`] holds only when supported.
#[cfg(target_arch = "aarch64")]
fn neon_tile<const N: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<N>,
) {
    assert!(v.is_consistent(t, n0, nb, N), "inconsistent packed tile");
    // SAFETY: `Cpu::with_isa` checked NEON support, and the slice lengths were checked just above.
    unsafe { neon::tile(v, t, n0, nb, acc) }
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
    let (gemv, gemm) = (kernel::<1>(cpu.isa()), kernel::<NB>(cpu.isa()));
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
                    gemv(&w.tile(r0 / TILE), t, 0, 1, &mut acc);
                    out.write_tile(0, r0, &acc);
                }
                return;
            }
            let (first, nb) = (out.tokens().start, out.tokens().len());
            let mut acc = [[0.0f32; TILE]; NB];
            for r0 in tiles {
                gemm(&w.tile(r0 / TILE), t, first, nb, &mut acc);
                out.write_tile(first, r0, &acc[..nb]);
            }
        },
    );
}
