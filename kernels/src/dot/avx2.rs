//! AVX2 unpacking and multiply of the dot GEMM; `vpdpbusd` on 512-bit vectors where the CPU has
//! AVX-512 VNNI. Same operations in the same order as the scalar reference.

use std::arch::x86_64::*;

use std::ops::Range;

use super::int8_tiles::Int8Tiles;
use super::{Acc, Chunk, Unpacked, CHUNK, GROUP_BYTES};
use crate::int8::{avx2_load_codes, ActBlock, BlockScale, Codes};
use crate::isa::{has_avx512_vnni, Isa};
use crate::lut::avx2::load_f16;
use crate::lut::layout::{PLANE_BYTES, TABLES_PER_ACT, TILE};
use crate::lut::TileView;

/// [`unpack`] after the checks its reads rely on.
pub(super) fn unpack_checked(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    assert!(count <= CHUNK && (a0 + count) * v.bits * PLANE_BYTES <= v.weights.len());
    assert!(v.bits <= super::MAX_BITS && Isa::Avx2.is_supported());
    // SAFETY: avx2, fma and f16c were checked just above; the
    // reads cover planes `(a0 + c)·bits + p` for c < count ≤ CHUNK, checked above to lie in the
    // tile's weights, and the writes stay in `u.codes[c]` for c < CHUNK.
    unsafe { unpack(v, a0, count, u) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn unpack(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    let bits = v.bits;
    let one = _mm256_set1_epi8(1);
    for c in 0..count {
        let planes = &v.weights[(a0 + c) * bits * PLANE_BYTES..][..bits * PLANE_BYTES];
        let out = &mut u.codes[c];
        for j in 0..TABLES_PER_ACT {
            // cols[half][i]: code bytes of column 4j + i for the 32 rows of the low (half 0) or
            // high (half 1) nibbles, in the byte order of the packed block.
            let mut cols = [[_mm256_setzero_si256(); 4]; 2];
            for p in 0..bits {
                // SAFETY: plane p's block j is 32 bytes inside `planes` (p < bits, j < 8).
                let packed = unsafe {
                    _mm256_loadu_si256(planes.as_ptr().add(p * PLANE_BYTES + j * 32).cast())
                };
                for (half, col) in cols.iter_mut().enumerate() {
                    for (i, code) in col.iter_mut().enumerate() {
                        let at = 4 * half + i;
                        // Bit `at` of every byte to bit 0, masked, then to bit p. 64-bit shifts
                        // move bits across bytes, but the mask keeps only each byte's own bit.
                        let bit = _mm256_and_si256(
                            _mm256_srl_epi64(packed, _mm_cvtsi32_si128(at as i32)),
                            one,
                        );
                        let bit = _mm256_sll_epi64(bit, _mm_cvtsi32_si128(p as i32));
                        *code = _mm256_or_si256(*code, bit);
                    }
                }
            }
            for (half, col) in cols.iter().enumerate() {
                // Byte b of a block is row lo_row(b) (+32 for the high nibbles): lane l holds rows
                // 8l..8l+8 in bytes 0..8 and 16+8l..24+8l in bytes 8..16. Interleave the four
                // columns into one dword per row, then put the lanes in row order.
                let lo01 = _mm256_unpacklo_epi8(col[0], col[1]);
                let hi01 = _mm256_unpackhi_epi8(col[0], col[1]);
                let lo23 = _mm256_unpacklo_epi8(col[2], col[3]);
                let hi23 = _mm256_unpackhi_epi8(col[2], col[3]);
                let a = _mm256_unpacklo_epi16(lo01, lo23); // rows 0-3 | 8-11
                let b = _mm256_unpackhi_epi16(lo01, lo23); // rows 4-7 | 12-15
                let c2 = _mm256_unpacklo_epi16(hi01, hi23); // rows 16-19 | 24-27
                let d = _mm256_unpackhi_epi16(hi01, hi23); // rows 20-23 | 28-31
                let rows = [
                    _mm256_permute2x128_si256::<0x20>(a, b),
                    _mm256_permute2x128_si256::<0x31>(a, b),
                    _mm256_permute2x128_si256::<0x20>(c2, d),
                    _mm256_permute2x128_si256::<0x31>(c2, d),
                ];
                for (q, r) in rows.into_iter().enumerate() {
                    let at = (j * TILE + 32 * half + 8 * q) * 4;
                    debug_assert!(at + 32 <= GROUP_BYTES);
                    // SAFETY: rows 32·half + 8q .. +8 of column quad j: 32 bytes inside the
                    // GROUP_BYTES of `out` (j < 8, 32·half + 8q + 8 ≤ 64).
                    unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(at).cast(), r) };
                }
            }
        }
    }
}

/// Whether the CPU has what [`unpack_gfni`] needs: AVX-512 F, BW and VBMI, and GFNI.
pub(crate) fn has_gfni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("gfni")
}

/// [`unpack_gfni`]'s gather indices of lane register `k` (rows `8k..8k + 8`, one per 64-bit lane):
/// byte `7 − p` of lane `s` is plane `p`'s byte of row `8k + s`. Planes 0..4 come from two
/// registers of two planes each (index `32p + byte`: `GATHER_LOW`), planes 4 and 5 from a third
/// (index `32(p − 4) + byte`: `GATHER_HIGH`).
const fn gather_indices(high: bool) -> [[u8; 64]; 4] {
    use crate::lut::layout::ROW_BYTE;
    let mut t = [[0u8; 64]; 4];
    let mut k = 0;
    while k < 4 {
        let mut s = 0;
        while s < 8 {
            let byte = ROW_BYTE[8 * k + s] as u8;
            let mut p = 0;
            while p < super::MAX_BITS {
                if (p >= 4) == high {
                    t[k][8 * s + 7 - p] = 32 * (p % 4) as u8 + byte;
                }
                p += 1;
            }
            s += 1;
        }
        k += 1;
    }
    t
}

const GATHER_LOW: [[u8; 64]; 4] = gather_indices(false);
const GATHER_HIGH: [[u8; 64]; 4] = gather_indices(true);

/// [`unpack_gfni`] after the checks its reads rely on.
pub(super) fn unpack_gfni_checked(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    assert!(count <= CHUNK && (a0 + count) * v.bits * PLANE_BYTES <= v.weights.len());
    assert!(v.bits <= super::MAX_BITS && has_gfni());
    // SAFETY: AVX-512 F, BW, VBMI and GFNI were checked just above; the reads cover planes
    // `(a0 + c)·bits + p` for c < count ≤ CHUNK and p < bits, checked above to lie in the tile's
    // weights, and the writes stay in `u.codes[c]` for c < CHUNK.
    unsafe { unpack_gfni(v, a0, count, u) }
}

/// [`unpack`] by bit-matrix transposes. For each column quad `j` of an activation group, the
/// planes' bytes of one packed byte position (row `r`: columns `4j..4j + 4` in the low nibble,
/// row `r + 32`'s in the high one) are gathered into one 64-bit lane, plane `p` in byte `7 − p`
/// (`vpermt2b`, zeros past the planes), with the lanes in row order; `gf2p8affineqb` with the unit
/// bytes `1 << k` as operand transposes each lane's 8×8 bit matrix, so that byte `k` holds bit
/// `k` of every plane: the code of row `r`, column `4j + k` (`k < 4`), or of row `r + 32`,
/// column `4j + k − 4`. Two-source dword permutes then put the rows in order.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni")]
fn unpack_gfni(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    let bits = v.bits;
    // SAFETY: 64 readable bytes each; loadu has no alignment requirement.
    let low = GATHER_LOW.map(|l| unsafe { _mm512_loadu_si512(l.as_ptr().cast()) });
    let high = GATHER_HIGH.map(|h| unsafe { _mm512_loadu_si512(h.as_ptr().cast()) });
    // Bytes 7 − p of every lane for the planes that exist, split as the sources are.
    let lane_mask = |planes: std::ops::Range<usize>| -> u64 {
        let lane = planes.fold(0u64, |m, p| m | 1 << (7 - p));
        (0..8).fold(0u64, |m, s| m | lane << (8 * s))
    };
    let (mask_low, mask_high) = (lane_mask(0..bits.min(4)), lane_mask(4.min(bits)..bits));
    let unit = _mm512_set1_epi64(0x8040_2010_0804_0201_u64 as i64);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for c in 0..count {
        let planes = &v.weights[(a0 + c) * bits * PLANE_BYTES..][..bits * PLANE_BYTES];
        let out = &mut u.codes[c];
        for j in 0..TABLES_PER_ACT {
            // Plane p's 32 bytes of quad j, or zeros past the planes (masked out below).
            let block = |p: usize| {
                if p < bits {
                    // SAFETY: plane p's block j is 32 bytes inside `planes` (p < bits, j < 8).
                    unsafe {
                        _mm256_loadu_si256(planes.as_ptr().add(p * PLANE_BYTES + j * 32).cast())
                    }
                } else {
                    _mm256_setzero_si256()
                }
            };
            let pair =
                |p: usize| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(block(p)), block(p + 1));
            let (p01, p23) = (pair(0), pair(2));
            let p45 = if bits > 4 {
                pair(4)
            } else {
                _mm512_setzero_si512()
            };
            let mut lanes = [_mm512_setzero_si512(); 4];
            for (k, lane) in lanes.iter_mut().enumerate() {
                let mut g = _mm512_maskz_permutex2var_epi8(mask_low, p01, low[k], p23);
                if bits > 4 {
                    g = _mm512_mask_permutexvar_epi8(g, mask_high, high[k], p45);
                }
                *lane = _mm512_gf2p8affine_epi64_epi8::<0>(unit, g);
            }
            // Lane register k holds row 8k + s in dword 2s and row 8k + s + 32 in dword 2s + 1.
            let rows = [
                _mm512_permutex2var_epi32(lanes[0], even, lanes[1]),
                _mm512_permutex2var_epi32(lanes[2], even, lanes[3]),
                _mm512_permutex2var_epi32(lanes[0], odd, lanes[1]),
                _mm512_permutex2var_epi32(lanes[2], odd, lanes[3]),
            ];
            for (q, r) in rows.into_iter().enumerate() {
                let at = (j * TILE + 16 * q) * 4;
                let dst = &mut out[at..at + 64];
                // SAFETY: `dst` is 64 writable bytes; storeu has no alignment requirement.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), r) };
            }
        }
    }
}

/// [`unpack_scales`] after the checks its reads rely on.
pub(super) fn unpack_scales_checked(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    assert!(count <= CHUNK && Isa::Avx2.is_supported());
    // SAFETY: avx2, fma and f16c were checked just above; every read and write goes through a
    // bounds-checked slice of exactly the lanes it touches.
    unsafe { unpack_scales(v, a0, count, u) }
}

/// [`super::unpack_scales`] eight rows at a time, with the same f32 operations in the same order
/// (products and sums unfused), so the same bits. A half whose weight group is that of the half
/// before it (groups wider than 32) copies that half's values.
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_scales(v: &TileView<'_>, a0: usize, count: usize, u: &mut Unpacked) {
    u.set_form(v);
    let centre = _mm256_set1_ps(v.centre);
    let half = _mm256_set1_ps(0.5);
    let widen = |h: &[u16]| load_f16(&h[..8]);
    // Eight bytes as the low half of a vector.
    let bytes = |b: &[u8]| {
        let b = &b[..8];
        // SAFETY: 8 readable bytes (checked by the slice above), unaligned load.
        unsafe { _mm_loadl_epi64(b.as_ptr().cast()) }
    };
    let low_nibbles = _mm_set1_epi8(0x0F);
    let store = |dst: &mut [f32], x: __m256| {
        let dst = &mut dst[..8];
        // SAFETY: 8 writable f32s (checked by the slice above), unaligned store.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), x) }
    };
    let mut last: Option<(usize, usize)> = None;
    for i in (0..2 * count).filter(|i| i % 2 < u.halves) {
        let g = v.group_of(a0 + i / 2, i % 2);
        if let Some((_, li)) = last.filter(|&(lg, _)| lg == g) {
            (u.scale[i], u.offset[i]) = (u.scale[li], u.offset[li]);
            continue;
        }
        last = Some((g, i));
        let rows = g * TILE..(g + 1) * TILE;
        match &v.super_scales {
            None => {
                let (scales, offsets) = (&v.scales[rows.clone()], v.offsets.map(|o| &o[rows]));
                for k in (0..TILE).step_by(8) {
                    let s = widen(&scales[k..]);
                    let o = offsets.map_or(_mm256_setzero_ps(), |o| widen(&o[k..]));
                    store(
                        &mut u.offset[i][k..],
                        _mm256_add_ps(o, _mm256_mul_ps(s, centre)),
                    );
                    store(&mut u.scale[i][k..], _mm256_mul_ps(s, half));
                }
            }
            Some(s) => {
                let sb = g / s.groups_per_super;
                let d = &s.d[sb * TILE..(sb + 1) * TILE];
                let sub_scales = bytemuck::cast_slice::<i8, u8>(&s.sub_scales[rows.clone()]);
                let mins = match (s.dmin, s.sub_mins) {
                    (Some(dmin), Some(m)) => Some((&dmin[sb * TILE..(sb + 1) * TILE], &m[rows])),
                    _ => None,
                };
                for k in (0..TILE).step_by(8) {
                    let mut q = bytes(&sub_scales[k..]);
                    if s.nibbles {
                        q = _mm_and_si128(q, low_nibbles);
                    }
                    let sc =
                        _mm256_mul_ps(widen(&d[k..]), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
                    let mut o = _mm256_mul_ps(sc, centre);
                    if let Some((dmin, m)) = mins {
                        let mut m = bytes(&m[k..]);
                        if s.nibbles {
                            m = _mm_and_si128(_mm_srli_epi16::<4>(m), low_nibbles);
                        }
                        let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m));
                        o = _mm256_sub_ps(o, _mm256_mul_ps(widen(&dmin[k..]), m));
                    }
                    store(&mut u.offset[i][k..], o);
                    store(&mut u.scale[i][k..], _mm256_mul_ps(sc, half));
                }
            }
        }
    }
}

/// [`unpack_int8`] after the checks its writes rely on.
pub(super) fn unpack_int8_checked<S: BlockScale, C: Codes>(
    m: &Int8Tiles<'_, S, C>,
    rows: Range<usize>,
    a0: usize,
    count: usize,
    u: &mut Unpacked,
) {
    assert!(count <= CHUNK && a0 + count <= m.act_groups && rows.len() == TILE);
    assert!(Isa::Avx2.is_supported());
    // SAFETY: avx2, fma and f16c were checked just above; the stores are bounds-checked slices.
    unsafe { unpack_int8(m, rows, a0, count, u) }
}

/// The codes of int8 blocks as bytes (`q + 128`, or `q` itself when `u.signed`), eight rows at a
/// time: each row's 32
/// codes are one vector of eight column quads, and an 8×8 transpose of 32-bit lanes gives each
/// quad's eight rows, stored together. Rows past the matrix go through the scalar row step.
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_int8<S: BlockScale, C: Codes>(
    m: &Int8Tiles<'_, S, C>,
    rows: Range<usize>,
    a0: usize,
    count: usize,
    u: &mut Unpacked,
) {
    let flip = _mm256_set1_epi8(super::int8_tiles::code_zero(u.signed) as u8 as i8);
    for c in 0..count {
        for r8 in (0..TILE).step_by(8) {
            let first = rows.start + r8;
            if first + 8 > m.rows {
                for r in r8..r8 + 8 {
                    m.unpack_row(rows.start + r, a0 + c, r, c, u);
                }
                continue;
            }
            let mut v = [_mm256_setzero_si256(); 8];
            for (i, v) in v.iter_mut().enumerate() {
                *v = _mm256_xor_si256(avx2_load_codes(&m.block(first + i, a0 + c).q), flip);
            }
            // Row i's lane j is quad j of row i; after the transpose vector j holds quad j of
            // the eight rows.
            let t: [__m256i; 8] = [
                _mm256_unpacklo_epi32(v[0], v[1]),
                _mm256_unpackhi_epi32(v[0], v[1]),
                _mm256_unpacklo_epi32(v[2], v[3]),
                _mm256_unpackhi_epi32(v[2], v[3]),
                _mm256_unpacklo_epi32(v[4], v[5]),
                _mm256_unpackhi_epi32(v[4], v[5]),
                _mm256_unpacklo_epi32(v[6], v[7]),
                _mm256_unpackhi_epi32(v[6], v[7]),
            ];
            // s[k] holds quad k of rows 0..4 (low 128 bits of each pair: quads 0..4; high: 4..8).
            let s: [__m256i; 8] = [
                _mm256_unpacklo_epi64(t[0], t[2]),
                _mm256_unpackhi_epi64(t[0], t[2]),
                _mm256_unpacklo_epi64(t[1], t[3]),
                _mm256_unpackhi_epi64(t[1], t[3]),
                _mm256_unpacklo_epi64(t[4], t[6]),
                _mm256_unpackhi_epi64(t[4], t[6]),
                _mm256_unpacklo_epi64(t[5], t[7]),
                _mm256_unpackhi_epi64(t[5], t[7]),
            ];
            for k in 0..4 {
                let quads = [
                    (k, _mm256_permute2x128_si256::<0x20>(s[k], s[k + 4])),
                    (k + 4, _mm256_permute2x128_si256::<0x31>(s[k], s[k + 4])),
                ];
                for (j, quad) in quads {
                    let at = (j * TILE + r8) * 4;
                    let out = &mut u.codes[c][at..at + 32];
                    // SAFETY: `out` is 32 writable bytes; storeu has no alignment requirement.
                    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), quad) };
                }
            }
        }
    }
}

/// The instruction that multiplies codes by activations.
#[derive(Clone, Copy)]
enum Multiply {
    /// `maddubs` + `madd` on 256-bit vectors (AVX2), unsigned codes below 128.
    Madd,
    /// `maddubs(|q|, sign(x, q))` + `madd` on 256-bit vectors (AVX2), signed codes
    /// ([`Unpacked::signed`]).
    MaddSigned,
    /// `vpdpbusd` on 512-bit vectors (AVX-512 VNNI).
    Vnni,
}

/// The `vpdpbusd` multiply; the caller checked [`has_avx512_vnni`].
pub(super) fn multiply_vnni_checked(u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
    multiply_with(Multiply::Vnni, u, chunk, acc);
}

/// The `maddubs` multiply, for codes below 128.
pub(super) fn multiply_madd_checked(u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
    multiply_with(Multiply::Madd, u, chunk, acc);
}

/// The `maddubs` multiply of signed codes.
pub(super) fn multiply_madd_signed_checked(u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
    multiply_with(Multiply::MaddSigned, u, chunk, acc);
}

/// [`multiply_madd`], [`multiply_madd_signed`] or [`multiply_vnni`] after the checks their reads
/// rely on.
fn multiply_with(choice: Multiply, u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
    assert!(chunk.fits(acc.len()) && Isa::Avx2.is_supported());
    match choice {
        Multiply::Vnni => {
            assert!(has_avx512_vnni(), "vpdpbusd needs AVX-512 F, BW and VNNI");
            // SAFETY: AVX-512 F, BW and VNNI, AVX2, FMA and F16C were checked above; indices are
            // bounded by the assertions.
            unsafe { multiply_vnni(u, chunk, acc) }
        }
        Multiply::Madd => {
            // Pairs of codes of 128 or more times int8 could overflow `maddubs`'s int16 sums.
            assert!(!u.signed && u.top < 128, "maddubs takes codes below 128");
            // SAFETY: avx2, fma and f16c were checked above; indices as above.
            unsafe { multiply_madd(u, chunk, acc) }
        }
        Multiply::MaddSigned => {
            assert!(u.signed && u.top == 0, "signed codes are not centred");
            // SAFETY: avx2, fma and f16c were checked above; indices as above.
            unsafe { multiply_madd_signed(u, chunk, acc) }
        }
    }
}

/// Generates, for one vector width and instruction, a register tile of `RV` vectors of `$L` rows
/// and `T` tokens (`$tile`), and a multiply over all rows and tokens of a chunk (`$name`) with
/// register tiles of `$RV × $T` (single tokens at the end). `$v` names the width's operations
/// (module-like: `$v::dot` adds `Σ4 w·x` of each 32-bit lane into a partial sum, `$v::flush` adds
/// `factor` times a partial sum into the int32 sums; `$v::quads_per_flush(top)` says how many
/// column quads one partial sum may take for codes up to `top`: `maddubs` partial sums are int16).
macro_rules! multiply_fn {
    ($name:ident, $tile:ident, $features:literal, $RV:literal, $T:literal, $v:ident) => {
        #[target_feature(enable = $features)]
        fn $tile<const RV: usize, const T: usize, const H: usize, const K: usize>(
            u: &Unpacked,
            chunk: Chunk<'_>,
            acc: &mut Acc,
            r0: usize,
            n0: usize,
        ) {
            const L: usize = $v::L;
            let mut accf = [[$v::zero_ps(); T]; RV];
            for (rv, lane) in accf.iter_mut().enumerate() {
                for (t, a) in lane.iter_mut().enumerate() {
                    *a = $v::load_ps(&acc[n0 + t][r0 + L * rv..][..L]);
                }
            }
            let (x, per_row, a0) = (chunk.x, chunk.per_row, chunk.a0);
            // Each activation block in H parts (2 for weight groups of 16), each with its scale.
            let quads = TABLES_PER_ACT / H;
            for c in 0..chunk.count {
                let codes = &u.codes[c];
                let blocks: [&ActBlock; T] =
                    std::array::from_fn(|t| &x[(n0 + t) * per_row + a0 + c]);
                for h in 0..H {
                    // The sums start at −(2^b − 1)·Σq_x, which centres the codes counted twice.
                    let start: [_; T] =
                        std::array::from_fn(|t| $v::set1_epi32(-u.top * blocks[t].code_sum(H, h)));
                    let mut isum = [start; RV];
                    // K quads per partial sum (exact: see `quads_per_flush`).
                    for j0 in (h * quads..(h + 1) * quads).step_by(K) {
                        let mut part = [[$v::zero_si(); T]; RV];
                        for j in j0..(j0 + K).min((h + 1) * quads) {
                            let w: [_; RV] = std::array::from_fn(|rv| {
                                let at = (j * TILE + r0 + L * rv) * 4;
                                $v::load_codes(&codes[at..at + 4 * L])
                            });
                            for t in 0..T {
                                let q = &blocks[t].q[4 * j..4 * j + 4];
                                let xq = $v::set1_epi32(i32::from_le_bytes([
                                    q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8,
                                ]));
                                for rv in 0..RV {
                                    part[rv][t] = $v::dot(part[rv][t], w[rv], xq);
                                }
                            }
                        }
                        for rv in 0..RV {
                            for t in 0..T {
                                isum[rv][t] = $v::flush(isum[rv][t], part[rv][t], u.factor);
                            }
                        }
                    }
                    for rv in 0..RV {
                        let rows = r0 + L * rv..r0 + L * rv + L;
                        let scale = $v::load_ps(&u.scale[2 * c + h][rows.clone()]);
                        let offset = $v::load_ps(&u.offset[2 * c + h][rows]);
                        for t in 0..T {
                            let a = $v::fmadd_ps(
                                $v::cvt(isum[rv][t]),
                                $v::mul_ps(scale, $v::set1_ps(blocks[t].d)),
                                accf[rv][t],
                            );
                            let xsum = $v::set1_ps(blocks[t].value_sum(H, h));
                            accf[rv][t] = $v::fmadd_ps(offset, xsum, a);
                        }
                    }
                }
            }
            for (rv, lane) in accf.iter().enumerate() {
                for (t, a) in lane.iter().enumerate() {
                    $v::store_ps(&mut acc[n0 + t][r0 + L * rv..][..L], *a);
                }
            }
        }

        #[target_feature(enable = $features)]
        fn $name(u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
            /// The register tiles over every row and token of the chunk, with `H` parts per
            /// activation block (`u.halves`, the same for the whole chunk) and `K` quads per
            /// partial sum.
            #[target_feature(enable = $features)]
            fn tiles<const H: usize, const K: usize>(
                u: &Unpacked,
                chunk: Chunk<'_>,
                acc: &mut Acc,
            ) {
                // Tokens outermost: a register tile's activation blocks stay in L1 while it goes
                // down the tile's rows (rows outermost streams every token's blocks once per row
                // vector).
                let tokens = chunk.tokens();
                let mut n0 = 0;
                while n0 + $T <= tokens {
                    for r0 in (0..TILE).step_by($v::L * $RV) {
                        $tile::<$RV, $T, H, K>(u, chunk, acc, r0, n0);
                    }
                    n0 += $T;
                }
                while n0 < tokens {
                    for r0 in (0..TILE).step_by($v::L * $RV) {
                        $tile::<$RV, 1, H, K>(u, chunk, acc, r0, n0);
                    }
                    n0 += 1;
                }
            }
            match (u.halves, $v::quads_per_flush(u.top)) {
                (2, 1) => tiles::<2, 1>(u, chunk, acc),
                (2, 2) => tiles::<2, 2>(u, chunk, acc),
                (2, _) => tiles::<2, 4>(u, chunk, acc),
                (_, 1) => tiles::<1, 1>(u, chunk, acc),
                (_, 2) => tiles::<1, 2>(u, chunk, acc),
                (_, 4) => tiles::<1, 4>(u, chunk, acc),
                _ => tiles::<1, 8>(u, chunk, acc),
            }
        }
    };
}

/// Generates a width's operations for [`multiply_fn`]: `#[inline(always)]` wrappers that only run
/// inlined into the multiply of the same width, whose target features include `$features`.
macro_rules! vector_ops {
    ($v:ident, $L:literal, $I:ty, $F:ty, $features:literal,
     $zero:ident, $zero_si:ident, $loadu_ps:ident, $storeu_ps:ident, $loadu_si:ident,
     $set1_epi32:ident, $set1_ps:ident, $cvt:ident, $mul:ident, $fmadd:ident, $dot:expr,
     $flush:expr, $quads_per_flush:expr) => {
        pub(super) mod $v {
            use std::arch::x86_64::*;

            /// Rows per vector.
            pub const L: usize = $L;

            #[inline(always)]
            pub fn zero_ps() -> $F {
                // SAFETY: only called inlined into functions with `$features` enabled.
                unsafe { $zero() }
            }
            #[inline(always)]
            pub fn load_ps(s: &[f32]) -> $F {
                assert!(s.len() >= L);
                // SAFETY: L f32s checked above; features as in `zero_ps`.
                unsafe { $loadu_ps(s.as_ptr()) }
            }
            #[inline(always)]
            pub fn store_ps(s: &mut [f32], v: $F) {
                assert!(s.len() >= L);
                // SAFETY: L f32s checked above; features as in `zero_ps`.
                unsafe { $storeu_ps(s.as_mut_ptr(), v) }
            }
            #[inline(always)]
            pub fn load_codes(s: &[u8]) -> $I {
                assert!(s.len() >= 4 * L);
                // SAFETY: 4L bytes checked above; features as in `zero_ps`.
                unsafe { $loadu_si(s.as_ptr().cast()) }
            }
            #[inline(always)]
            pub fn set1_epi32(x: i32) -> $I {
                // SAFETY: features as in `zero_ps`.
                unsafe { $set1_epi32(x) }
            }
            #[inline(always)]
            pub fn set1_ps(x: f32) -> $F {
                // SAFETY: features as in `zero_ps`.
                unsafe { $set1_ps(x) }
            }
            #[inline(always)]
            pub fn cvt(x: $I) -> $F {
                // SAFETY: features as in `zero_ps`.
                unsafe { $cvt(x) }
            }
            #[inline(always)]
            pub fn mul_ps(a: $F, b: $F) -> $F {
                // SAFETY: features as in `zero_ps`.
                unsafe { $mul(a, b) }
            }
            #[inline(always)]
            pub fn fmadd_ps(a: $F, b: $F, c: $F) -> $F {
                // SAFETY: features as in `zero_ps`.
                unsafe { $fmadd(a, b, c) }
            }
            #[inline(always)]
            pub fn zero_si() -> $I {
                // SAFETY: features as in `zero_ps`.
                unsafe { $zero_si() }
            }
            #[inline(always)]
            pub fn dot(part: $I, w: $I, x: $I) -> $I {
                // SAFETY: features as in `zero_ps`.
                unsafe { $dot(part, w, x) }
            }
            /// `isum + factor·part`, widened to int32.
            #[inline(always)]
            pub fn flush(isum: $I, part: $I, factor: i32) -> $I {
                // SAFETY: features as in `zero_ps`.
                unsafe { $flush(isum, part, factor) }
            }
            /// Column quads one partial sum may take for codes up to `top` (1, 2, 4 or 8).
            #[inline(always)]
            pub fn quads_per_flush(top: i32) -> usize {
                $quads_per_flush(top)
            }
        }
    };
}

/// [`vector_ops`] on 256-bit vectors (AVX2) with the given `maddubs` step: its int16 partial
/// sums are widened (and multiplied by the codes' factor, 1 or 2) by `madd` and added to the int32
/// sums.
macro_rules! ymm_ops {
    ($v:ident, $dot:expr, $quads_per_flush:expr) => {
        vector_ops!(
            $v,
            8,
            __m256i,
            __m256,
            "avx2,fma,f16c",
            _mm256_setzero_ps,
            _mm256_setzero_si256,
            _mm256_loadu_ps,
            _mm256_storeu_ps,
            _mm256_loadu_si256,
            _mm256_set1_epi32,
            _mm256_set1_ps,
            _mm256_cvtepi32_ps,
            _mm256_mul_ps,
            _mm256_fmadd_ps,
            $dot,
            |isum: __m256i, part: __m256i, factor: i32| {
                let factor = _mm256_set1_epi16(factor as i16);
                _mm256_add_epi32(isum, _mm256_madd_epi16(part, factor))
            },
            $quads_per_flush
        );
    };
}

ymm_ops!(
    ymm,
    // Codes ≤ top < 128 times int8: each pair sum is at most 2·top·127 in magnitude, inside
    // int16; `quads_per_flush` such sums are added in int16 before widening.
    |part: __m256i, w: __m256i, x: __m256i| _mm256_add_epi16(part, _mm256_maddubs_epi16(w, x)),
    |top: i32| super::madd_quads(2 * top * 127)
);
ymm_ops!(
    ymm_signed,
    // |q| ≤ 128 (as an unsigned byte) times int8 activations of magnitude ≤ 127 carrying the
    // sign of q (0 where q is 0): each pair sum is at most 2·128·127, inside int16, and the
    // products are exactly q·x.
    |part: __m256i, w: __m256i, x: __m256i| {
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_add_epi16(part, pairs)
    },
    |_top: i32| super::madd_quads(2 * 128 * 127)
);
vector_ops!(
    zmm,
    16,
    __m512i,
    __m512,
    "avx512f,avx512bw,avx512vnni",
    _mm512_setzero_ps,
    _mm512_setzero_si512,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_loadu_si512,
    _mm512_set1_epi32,
    _mm512_set1_ps,
    _mm512_cvtepi32_ps,
    _mm512_mul_ps,
    _mm512_fmadd_ps,
    _mm512_dpbusd_epi32,
    // `factor` is 1 or 2 (`Unpacked`): doubling by an add keeps the flush off the multiplier,
    // which `vpdpbusd` and the float steps share on cores with one 512-bit unit.
    |isum: __m512i, part: __m512i, factor: i32| {
        debug_assert!(factor == 1 || factor == 2);
        let part = if factor == 2 {
            _mm512_add_epi32(part, part)
        } else {
            part
        };
        _mm512_add_epi32(isum, part)
    },
    // int32 partial sums: every quad of an activation block in one.
    |_top: i32| 8
);

/// Column quads whose `maddubs` pair sums, each at most `pair` in magnitude, one int16 partial sum
/// may add exactly: the largest of 1, 2, 4, 8 whose total stays within `i16::MAX`.
#[inline(always)]
fn madd_quads(pair: i32) -> usize {
    match i32::from(i16::MAX) / pair.max(1) {
        8.. => 8,
        4.. => 4,
        2.. => 2,
        _ => 1,
    }
}

// One vector × 4 tokens of partial sums, sums and accumulators (2 × 2 spills the signed form's
// extra operands).
multiply_fn!(multiply_madd, tile_madd, "avx2,fma,f16c", 1, 4, ymm);
multiply_fn!(
    multiply_madd_signed,
    tile_madd_signed,
    "avx2,fma,f16c",
    1,
    4,
    ymm_signed
);
// 32 registers: the whole 64-row tile (4 vectors) × 2 tokens, measured the fastest of 1–4 vectors
// × 2–8 tokens.
multiply_fn!(
    multiply_vnni,
    tile_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    4,
    2,
    zmm
);
