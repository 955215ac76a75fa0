//! The AVX2 tile kernel: `vpshufb` lookups of 32 rows per instruction (a table broadcast to both lanes),
//! pairs of table groups interleaved and summed in int16 by `vpmaddubsw` (which also applies the plane
//! weight `2^p` of uniform planes), one int16→f32 conversion per activation group.
//!
//! Uniform planes in weight groups of 32 or 16, with f16 or super-block scales and up to 6 planes,
//! go from the registers of the lookups straight into the combine ([`tile_direct`]; two-level
//! groups of 16 only when their integer combine fits int16); other forms with at most 4 planes
//! take [`tile`]'s loop, and the rest the general path ([`scalar::tile_with`] with
//! [`lookup_accumulate`]).
//!
//! Float operations match [`super::scalar`] one for one (mul, add, and FMA where it fuses) so results
//! are bit-exact.

use std::arch::x86_64::*;
use std::ops::Range;

use super::layout::{BLOCK, PLANE_BYTES, TABLES_PER_ACT, TABLE_BYTES, TILE};
use super::{
    scalar, Acc, HalvesCombine, PlaneSums, SuperScales, TabView, TileView, CHUNK, MAX_BITS,
    MAX_FAST_BITS,
};

/// # Safety
/// The CPU supports avx2, fma and f16c, and `v.is_consistent(t, n0, nb)` holds.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const NB: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
) {
    // Two-level groups of 16 whose integer combine does not fit int16 take the general path.
    let halves = v.halves_combine();
    if !v.per_plane && (v.apg == 1 || v.half_groups) && halves.is_none_or(|hc| hc.fits_int16) {
        // SAFETY: same contract as this function, and the condition just checked.
        return unsafe { tile_direct(v, halves, t, n0, nb, acc) };
    }
    if v.needs_general_path() {
        // SAFETY: the closure runs only inside this call, on the CPU the caller vouched for
        // (the one feature `lookup_accumulate` needs); `lookup_accumulate` reads through bounds-checked slices that are
        // shared read-only between threads and writes only `f`, this call's own buffer.
        let lookups = |wa: &[u8], planes, tabs: &[i8], tables, ts, f: &mut [f32; TILE]| unsafe {
            lookup_accumulate(wa, planes, tabs, tables, ts, f)
        };
        return scalar::tile_with(v, t, n0, nb, acc, lookups);
    }
    let nps = v.scale_planes();
    let mut f: PlaneSums<NB> = [[[0.0; TILE]; MAX_BITS]; NB];
    let mut idx = [[[_mm256_setzero_si256(); 4]; 4]; MAX_BITS];
    let mut paired = PairedIndices::new();
    let how = Prefetch::of(v);
    for a in acc[..nb].iter_mut() {
        *a = [0.0; TILE];
    }
    for g in 0..v.groups {
        for planes in f[..nb].iter_mut() {
            for plane in planes[..nps].iter_mut() {
                *plane = [0.0; TILE];
            }
        }
        let (a0, a1) = (g * v.apg, (g + 1) * v.apg);
        let mut c0 = a0;
        while c0 < a1 {
            let c1 = (c0 + CHUNK).min(a1);
            for a in c0..c1 {
                let wa = v.weights[a * v.bits * PLANE_BYTES..][..v.bits * PLANE_BYTES].as_ptr();
                prefetch(wa, v.bits, how);
                // Several tokens: split the nibble indices once for all of them (uniform planes:
                // interleaved by plane pairs, see `PairedIndices`).
                let shared = nb > 1;
                if shared && !v.per_plane {
                    // SAFETY: `wa` holds bits·256 bytes.
                    unsafe { paired.split(wa, v.bits) };
                } else if shared {
                    for (p, plane) in idx[..v.bits].iter_mut().enumerate() {
                        // SAFETY: `wa` holds bits·256 bytes and p < bits.
                        unsafe { split(wa.add(p * PLANE_BYTES), plane) };
                    }
                }
                for (n, fn_) in f[..nb].iter_mut().enumerate() {
                    let tabs = t.tables_of(n0 + n, a).as_ptr();
                    let ts = _mm256_set1_ps(t.scales[(n0 + n) * t.act_groups + a]);
                    if shared {
                        // Tokens' tables are 4·K bytes apart: too many streams for the hardware
                        // prefetcher, so fetch this token's tables of the next chunk now.
                        let next = tabs.wrapping_add((c1 - c0) * TABLES_PER_ACT * TABLE_BYTES);
                        // Prefetching never faults, whatever the address (the intrinsic is safe).
                        _mm_prefetch::<_MM_HINT_T0>(next.cast());
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64).cast());
                    }
                    if v.per_plane {
                        for (p, fp) in fn_[..v.bits].iter_mut().enumerate() {
                            let mut s = [_mm256_setzero_si256(); 4];
                            // SAFETY: `wa` holds bits·256 bytes and p < bits; `tabs` holds 128 bytes.
                            unsafe {
                                plane_lookups(
                                    shared.then_some(&idx[p]),
                                    wa,
                                    p,
                                    tabs,
                                    _mm256_set1_epi8(1),
                                    &mut s,
                                )
                            };
                            accumulate(fp, &s, ts);
                        }
                    } else if shared {
                        let mut s = [_mm256_setzero_si256(); 4];
                        // SAFETY: `tabs` holds 128 bytes; `paired` was split from this group.
                        unsafe { paired.lookups(tabs, &mut s) };
                        accumulate(&mut fn_[0], &s, ts);
                    } else {
                        let mut s = [_mm256_setzero_si256(); 4];
                        for p in 0..v.bits {
                            let pw = _mm256_set1_epi8(1 << p);
                            // SAFETY: as above.
                            unsafe { lookups(wa.add(p * PLANE_BYTES), tabs, pw, &mut s) };
                        }
                        accumulate(&mut fn_[0], &s, ts);
                    }
                }
            }
            c0 = c1;
        }
        for (n, a) in acc[..nb].iter_mut().enumerate() {
            let sx = t.group_sum(n0 + n, a0, a1);
            combine(v, g, &f[n], sx, a);
        }
    }
}

/// Uniform planes with weight groups of 32 (one per activation group: Q4_0, Q4_1, Q4_K, Q5_K) or
/// 16 (two per activation group: Q2_K, Q3_K, Q6_K), f16 or super-block scales, 1 to 6 planes: runs
/// [`direct_halves`] for two-level groups of 16 (`halves`: the tile's
/// [`TileView::halves_combine`], worked out once by the caller) and [`direct`] for the rest,
/// instantiated for the tile's form.
///
/// # Safety
/// As [`tile`], `!v.per_plane && (v.apg == 1 || v.half_groups)`, and `halves` is the tile's
/// combine and, if there is one, fits int16.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_direct<const NB: usize>(
    v: &TileView<'_>,
    halves: Option<HalvesCombine>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
) {
    let form = (
        v.half_groups,
        v.bits > LO_PLANES + 1 && !v.half_groups,
        v.super_scales.is_some(),
        match &v.super_scales {
            Some(ss) => ss.sub_mins.is_some(),
            None => v.offsets.is_some(),
        },
    );
    if let (Some(hc), Some(ss)) = (halves, &v.super_scales) {
        // SAFETY: the caller's contract, and the form matches the tile (nibble pairs are the form
        // of groups of 16 with mins only, Q2_K's).
        return unsafe {
            match (ss.sub_mins.is_some(), ss.nibbles) {
                (true, true) => direct_halves::<NB, true, true>(v, ss, hc, t, n0, nb, acc),
                (true, false) => direct_halves::<NB, true, false>(v, ss, hc, t, n0, nb, acc),
                (false, _) => direct_halves::<NB, false, false>(v, ss, hc, t, n0, nb, acc),
            }
        };
    }
    macro_rules! dispatch {
        ($(($half:literal, $hi:literal, $sup:literal, $off:literal)),* $(,)?) => {
            match form {
                $(
                    // SAFETY: the caller's contract, and the form matches the tile.
                    ($half, $hi, $sup, $off) => unsafe {
                        direct::<NB, $half, $hi, $sup, $off>(v, t, n0, nb, acc)
                    },
                )*
                (true, _, true, _) => unreachable!("two-level groups of 16 took direct_halves"),
            }
        };
    }
    dispatch!(
        (false, false, false, false),
        (false, false, false, true),
        (false, false, true, false),
        (false, false, true, true),
        (false, true, false, false),
        (false, true, false, true),
        (false, true, true, false),
        (false, true, true, true),
        (true, false, false, false),
        (true, false, false, true),
        (true, true, false, false),
        (true, true, false, true),
    );
}

/// Planes summed into the int16 `lo` sums when a 6th plane would overflow them (6 planes over a
/// whole activation group, up to 63·127·8 = 64008): planes 4 and 5 then go into `hi` with weights
/// `(1, 2)` and the total is `lo + 16·hi`, formed in i32. Otherwise every plane goes into `lo`: 5
/// planes over 8 table groups reach 31·127·8 = 31496, 6 over the 4 of a group of 16 reach
/// 63·127·4 = 32004, and int16 holds both (every partial sum is bounded by the total of the
/// magnitudes, so no order overflows).
const LO_PLANES: usize = 4;

/// The direct path: each weight group's plane sum is the single product `F = ts·S`, so it goes from
/// the registers of the lookups straight into the combine. These are the float operations of the
/// general path (`0 + ts·S` is `ts·S`), without `F`'s round trip through memory. Per activation
/// group the sums of half `h` (`[0]` for groups of 32; table groups `4h..4h + 4` for groups of 16)
/// hold rows `16q..16q + 16` in `[q]`.
///
/// `HALF`: weight groups of 16 (with f16 scales; two-level ones take [`direct_halves`]). `HI`: 6
/// planes in groups of 32 (see [`LO_PLANES`]). `SUPER`: super-block scales,
/// each group's `d·sc` and `dmin·m` formed as [`scalar::GroupScales`] forms them (one exact
/// product each; `fmsub(s, c, dmin·m)` is exactly the reference's `fma(s, c, −(dmin·m))`), with
/// `d` and `dmin` converted once per super-block; else f16 scales. `OFFSET`: offsets or mins. With
/// one token the combine's factors `0.5·s` and `o` ([`DirectScales::factors`]) are formed in the
/// combine; with several, once per group for all of them.
///
/// # Safety
/// As [`tile_direct`], and the const parameters describe the tile.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn direct<
    const NB: usize,
    const HALF: bool,
    const HI: bool,
    const SUPER: bool,
    const OFFSET: bool,
>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
) {
    debug_assert!(!v.per_plane && (v.apg == 1 || v.half_groups) && v.half_groups == HALF);
    for a in acc[..nb].iter_mut() {
        *a = [0.0; TILE];
    }
    let halves = if HALF { 2 } else { 1 };
    let lo_planes = if HI { LO_PLANES } else { v.bits };
    let c = _mm256_set1_ps(v.centre);
    let mut paired = PairedIndices::new();
    let mut scales = DirectScales::new();
    let how = Prefetch::of(v);
    for a in 0..v.act_groups {
        let wa = v.weights[a * v.bits * PLANE_BYTES..][..v.bits * PLANE_BYTES].as_ptr();
        prefetch(wa, v.bits, how);
        if nb > 1 {
            // The nibble indices of this group, split once and reused by every token of the block.
            // SAFETY: `wa` holds bits·256 bytes.
            unsafe { paired.split(wa, v.bits) };
        }
        let g0 = a * halves;
        scales.select::<SUPER>(v, g0);
        let rows = [
            GroupRows::of::<SUPER, OFFSET>(v, g0),
            GroupRows::of::<SUPER, OFFSET>(v, g0 + halves - 1),
        ];
        if NB > 1 {
            for (h, rows) in rows[..halves].iter().enumerate() {
                scales.fill::<SUPER, OFFSET>(rows, h, c);
            }
        }
        for (n, acc_n) in acc[..nb].iter_mut().enumerate() {
            let tabs = t.tables_of(n0 + n, a).as_ptr();
            let mut lo = [[_mm256_setzero_si256(); 4]; 2];
            let mut hi = [[_mm256_setzero_si256(); 4]; 2];
            if nb > 1 {
                // Each token's tables are a separate stream: fetch the ones a few groups ahead.
                let next = tabs.wrapping_add(4 * TABLES_PER_ACT * TABLE_BYTES);
                // Prefetching never faults, whatever the address (the intrinsic is safe).
                _mm_prefetch::<_MM_HINT_T0>(next.cast());
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64).cast());
                for h in 0..halves {
                    let per = TABLES_PER_ACT / halves;
                    // SAFETY: `tabs` holds 128 bytes; `paired` was split from this group.
                    unsafe {
                        paired.lookups_range::<HI>(
                            tabs,
                            h * per..(h + 1) * per,
                            0,
                            &mut lo[h],
                            &mut hi[h],
                        )
                    };
                }
            } else {
                for p in 0..lo_planes {
                    let pw = _mm256_set1_epi8(1 << p);
                    for pair in 0..4 {
                        let h = if HALF { pair / 2 } else { 0 };
                        // SAFETY: plane p < bits and 64·pair + 64 <= 256 weight bytes; 32·pair +
                        // 32 <= 128 table bytes.
                        unsafe {
                            let idx = split_pair(wa.add(p * PLANE_BYTES + 64 * pair));
                            pair_lookups(tabs.add(32 * pair), &idx, pw, &mut lo[h]);
                        }
                    }
                }
                for p in lo_planes..v.bits {
                    let pw = _mm256_set1_epi8(1 << (p - lo_planes));
                    for pair in 0..4 {
                        let h = if HALF { pair / 2 } else { 0 };
                        // SAFETY: as above.
                        unsafe {
                            let idx = split_pair(wa.add(p * PLANE_BYTES + 64 * pair));
                            pair_lookups(tabs.add(32 * pair), &idx, pw, &mut hi[h]);
                        }
                    }
                }
            }
            let ts = _mm256_set1_ps(t.scales[(n0 + n) * t.act_groups + a]);
            let mut sxv = [_mm256_setzero_ps(); 2];
            for (h, sx) in sxv[..halves].iter_mut().enumerate() {
                *sx = _mm256_set1_ps(v.group_sum(t, n0 + n, g0 + h));
            }
            for q in 0..4 {
                for k in 0..2 {
                    let i = 2 * q + k;
                    let dst = &mut acc_n[8 * i..][..8];
                    // SAFETY: `dst` is 8 f32s.
                    let mut acc_v = unsafe { _mm256_loadu_ps(dst.as_ptr()) };
                    for h in 0..halves {
                        let mut s32 = widen(lo[h][q], k);
                        if HI {
                            let hi32 = _mm256_slli_epi32::<4>(widen(hi[h][q], k));
                            s32 = _mm256_add_epi32(s32, hi32);
                        }
                        let f = _mm256_mul_ps(ts, _mm256_cvtepi32_ps(s32));
                        let (hs, o) = if NB == 1 {
                            scales.factors::<SUPER, OFFSET>(&rows[h], i, c)
                        } else {
                            (scales.half_scale[h][i], scales.offset[h][i])
                        };
                        acc_v = _mm256_fmadd_ps(f, hs, acc_v);
                        acc_v = _mm256_fmadd_ps(o, sxv[h], acc_v);
                    }
                    // SAFETY: as above.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), acc_v) };
                }
            }
        }
    }
}

/// Two-level scales in weight groups of 16 (Q2_K, Q3_K, Q6_K): [`scalar`]'s integer combine of an
/// activation group's two halves, 8 rows at a time. The halves' int16 sums of 8 rows are
/// interleaved into pairs (`unpacklo/hi` and a lane permute), the token's `2c·u_h` pair added in
/// int16 (the lookups weight the planes by `2^k` more, which gives `2^k·S_h`), and one `madd` by
/// the rows' interleaved sub-scales gives `J = Σ_h sc_h·(2^k·S_h + 2c·u_h)` in i32; a second
/// `madd` forms `M = Σ_h m_h·u_h`. Then the reference's two float steps (see
/// [`super::HalvesCombine`]). The sums fit: `|2^k·S_h + 2c·u_h| < 2^15`, times a sub-scale of at
/// most 128 in magnitude, two of them: under 2^23, so the i32 → f32 conversion is exact too.
///
/// `OFFSET`: the tile has mins. `NIBBLES`: sub-scale and sub-min are the two nibbles of one byte.
/// With one token the scale pairs are formed as the rows are combined; with several, once per
/// activation group for all of them.
///
/// # Safety
/// As [`tile_direct`], `ss` is the tile's two-level scales, the tile's groups are 16 wide, `hc`
/// is its [`TileView::halves_combine`] and fits int16, and the const parameters describe `ss`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn direct_halves<const NB: usize, const OFFSET: bool, const NIBBLES: bool>(
    v: &TileView<'_>,
    ss: &SuperScales<'_>,
    hc: HalvesCombine,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
) {
    debug_assert!(v.half_groups && !v.per_plane && ss.sub_mins.is_some() == OFFSET);
    debug_assert!(hc.fits_int16);
    for a in acc[..nb].iter_mut() {
        *a = [0.0; TILE];
    }
    let mut paired = PairedIndices::new();
    let mut d = [_mm256_setzero_ps(); 8];
    let mut dmin = [_mm256_setzero_ps(); 8];
    let mut sb = None;
    let mut pairs = [[_mm256_setzero_si256(); 8]; 2];
    let half = TABLES_PER_ACT / 2;
    // `2^(p + k)`, at most 2^5: `fits_int16` bounds (2^b − 1)·2^k by 32767 / 508 (so b − 1 + k
    // is at most 5), and `lookups_range` needs b − 1 + k ≤ 7.
    let mut plane_weights = [_mm256_setzero_si256(); MAX_BITS];
    for (p, w) in plane_weights[..v.bits].iter_mut().enumerate() {
        *w = _mm256_set1_epi8((1u8 << (p as u32 + hc.shift)) as i8);
    }
    let how = Prefetch::of(v);
    for a in 0..v.act_groups {
        let wa = v.weights[a * v.bits * PLANE_BYTES..][..v.bits * PLANE_BYTES].as_ptr();
        prefetch(wa, v.bits, how);
        if nb > 1 {
            // SAFETY: `wa` holds bits·256 bytes.
            unsafe { paired.split(wa, v.bits) };
        }
        let b = 2 * a / ss.groups_per_super;
        if sb != Some(b) {
            let rows = &ss.d[b * TILE..][..TILE];
            for (i, dv) in d.iter_mut().enumerate() {
                *dv = load_f16(&rows[8 * i..][..8]);
            }
            if let Some(m) = ss.dmin.filter(|_| OFFSET) {
                let rows = &m[b * TILE..][..TILE];
                for (i, dv) in dmin.iter_mut().enumerate() {
                    *dv = load_f16(&rows[8 * i..][..8]);
                }
            }
            sb = Some(b);
        }
        let scale_rows = HalvesRows::of(ss, a);
        if NB > 1 {
            for q in 0..4 {
                let (sc, m) = scale_rows.pairs::<OFFSET, NIBBLES>(q);
                pairs[0][2 * q..][..2].copy_from_slice(&sc);
                pairs[1][2 * q..][..2].copy_from_slice(&m);
            }
        }
        for (n, acc_n) in acc[..nb].iter_mut().enumerate() {
            let tok = n0 + n;
            let tabs = t.tables_of(tok, a).as_ptr();
            let mut lo = [[_mm256_setzero_si256(); 4]; 2];
            if nb > 1 {
                // Each token's tables are a separate stream: fetch the ones a few groups ahead.
                let next = tabs.wrapping_add(4 * TABLES_PER_ACT * TABLE_BYTES);
                // Prefetching never faults, whatever the address (the intrinsic is safe).
                _mm_prefetch::<_MM_HINT_T0>(next.cast());
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64).cast());
                let mut unused = [_mm256_setzero_si256(); 4];
                for (h, lo_h) in lo.iter_mut().enumerate() {
                    // SAFETY: `tabs` holds 128 bytes; `paired` was split from this group; bits − 1 +
                    // shift ≤ 5 (see `plane_weights`).
                    unsafe {
                        paired.lookups_range::<false>(
                            tabs,
                            h * half..(h + 1) * half,
                            hc.shift,
                            lo_h,
                            &mut unused,
                        )
                    };
                }
            } else {
                for (p, &pw) in plane_weights[..v.bits].iter().enumerate() {
                    for pair in 0..4 {
                        // SAFETY: plane p < bits and 64·pair + 64 <= 256 weight bytes; 32·pair +
                        // 32 <= 128 table bytes.
                        unsafe {
                            let idx = split_pair(wa.add(p * PLANE_BYTES + 64 * pair));
                            pair_lookups(tabs.add(32 * pair), &idx, pw, &mut lo[pair / 2]);
                        }
                    }
                }
            }
            let (fj, fm) = hc.factors(t.scales[tok * t.act_groups + a]);
            let (fj, fm) = (_mm256_set1_ps(fj), _mm256_set1_ps(fm));
            let units = &t.half_units[2 * (tok * t.act_groups + a)..][..2];
            let (u0, u1) = (hc.units(units[0]), hc.units(units[1]));
            // Low int16 of each pair: half 0. `2c·u` fits int16 (`fits_int16`).
            let cu = _mm256_set1_epi32(pair16(hc.two_c * u0, hc.two_c * u1));
            let mu = _mm256_set1_epi32(pair16(u0, u1));
            for q in 0..4 {
                let (l, h) = (
                    _mm256_unpacklo_epi16(lo[0][q], lo[1][q]),
                    _mm256_unpackhi_epi16(lo[0][q], lo[1][q]),
                );
                // Rows 16q..16q + 8 and 16q + 8..16q + 16: the unpacks hold rows 0..4 | 8..12 and
                // 4..8 | 12..16 in their 128-bit lanes.
                let sums = [
                    _mm256_permute2x128_si256::<0x20>(l, h),
                    _mm256_permute2x128_si256::<0x31>(l, h),
                ];
                let (sc, m) = if NB == 1 {
                    scale_rows.pairs::<OFFSET, NIBBLES>(q)
                } else {
                    (
                        [pairs[0][2 * q], pairs[0][2 * q + 1]],
                        [pairs[1][2 * q], pairs[1][2 * q + 1]],
                    )
                };
                for k in 0..2 {
                    let i = 2 * q + k;
                    let j = _mm256_madd_epi16(_mm256_add_epi16(sums[k], cu), sc[k]);
                    let dst = &mut acc_n[8 * i..][..8];
                    // SAFETY: `dst` is 8 f32s.
                    let mut acc_v = unsafe { _mm256_loadu_ps(dst.as_ptr()) };
                    let y = _mm256_mul_ps(fj, _mm256_cvtepi32_ps(j));
                    acc_v = _mm256_add_ps(acc_v, _mm256_mul_ps(d[i], y));
                    if OFFSET {
                        let mm = _mm256_madd_epi16(mu, m[k]);
                        let y = _mm256_mul_ps(fm, _mm256_cvtepi32_ps(mm));
                        acc_v = _mm256_sub_ps(acc_v, _mm256_mul_ps(dmin[i], y));
                    }
                    // SAFETY: as above.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), acc_v) };
                }
            }
        }
    }
}

/// `lo` in the low and `hi` in the high int16 of a 32-bit lane.
#[inline]
fn pair16(lo: i32, hi: i32) -> i32 {
    ((lo as u32 & 0xFFFF) | ((hi as u32) << 16)) as i32
}

/// The sub-scale (and sub-min) bytes of both weight groups of one activation group's 64 rows.
struct HalvesRows<'a> {
    sub_scales: [&'a [i8; TILE]; 2],
    sub_mins: [&'a [u8; TILE]; 2],
}

impl<'a> HalvesRows<'a> {
    /// The bytes of activation group `a` (weight groups `2a`, `2a + 1`); without mins
    /// `sub_mins` repeats the sub-scales' bytes, unread.
    #[inline(always)]
    fn of(ss: &SuperScales<'a>, a: usize) -> HalvesRows<'a> {
        fn rows<T>(s: &[T], g: usize) -> &[T; TILE] {
            s[g * TILE..][..TILE]
                .try_into()
                .expect("a slice of TILE elements is an array of TILE")
        }
        let mins: &[u8] = ss.sub_mins.unwrap_or(bytemuck::cast_slice(ss.sub_scales));
        HalvesRows {
            sub_scales: [rows(ss.sub_scales, 2 * a), rows(ss.sub_scales, 2 * a + 1)],
            sub_mins: [rows(mins, 2 * a), rows(mins, 2 * a + 1)],
        }
    }

    /// For rows `16q..16q + 8` and `16q + 8..16q + 16`: each row's two sub-scales as an int16
    /// pair (half 0 low), and likewise its sub-mins (zeros without `OFFSET`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pairs<const OFFSET: bool, const NIBBLES: bool>(
        &self,
        q: usize,
    ) -> ([__m256i; 2], [__m256i; 2]) {
        let load = |b: &[u8]| {
            debug_assert_eq!(b.len(), 16);
            // SAFETY: `b` is 16 bytes, what the load reads.
            unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
        };
        let sc: [&[u8]; 2] = self
            .sub_scales
            .map(|r| bytemuck::cast_slice(&r[16 * q..][..16]));
        let (s0, s1) = (load(sc[0]), load(sc[1]));
        let bytes = [_mm_unpacklo_epi8(s0, s1), _mm_unpackhi_epi8(s0, s1)];
        let zero = _mm256_setzero_si256();
        if NIBBLES {
            let low = _mm256_set1_epi16(0x0F);
            let both = bytes.map(|b| _mm256_cvtepu8_epi16(b));
            let sc = both.map(|w| _mm256_and_si256(w, low));
            let m = both.map(|w| _mm256_srli_epi16::<4>(w));
            (sc, if OFFSET { m } else { [zero; 2] })
        } else {
            let sc = bytes.map(|b| _mm256_cvtepi8_epi16(b));
            let m = if OFFSET {
                let (m0, m1) = (
                    load(&self.sub_mins[0][16 * q..][..16]),
                    load(&self.sub_mins[1][16 * q..][..16]),
                );
                [_mm_unpacklo_epi8(m0, m1), _mm_unpackhi_epi8(m0, m1)]
                    .map(|b| _mm256_cvtepu8_epi16(b))
            } else {
                [zero; 2]
            };
            (sc, m)
        }
    }
}

/// Half `k` (rows `8k..8k + 8` of the 16) of an int16 row vector, widened to i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen(v: __m256i, k: usize) -> __m256i {
    if k == 0 {
        _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v))
    } else {
        _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v))
    }
}

/// The combine factors of [`direct`], 8 rows a vector: half the scale and the offset at the centre
/// ([`DirectScales::factors`]), from f16 values or from `d·sc` and `dmin·m` of super-block scales.
struct DirectScales {
    /// Half the scales of the one or two groups of an activation group, for several tokens.
    half_scale: [[__m256; 8]; 2],
    /// Their offsets at the centre of the codes ([`DirectScales::factors`]).
    offset: [[__m256; 8]; 2],
    d: [__m256; 8],
    dmin: [__m256; 8],
    /// The super-block `d` and `dmin` hold, if any.
    sb: Option<usize>,
}

impl DirectScales {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new() -> DirectScales {
        let z = _mm256_setzero_ps();
        DirectScales {
            half_scale: [[z; 8]; 2],
            offset: [[z; 8]; 2],
            d: [z; 8],
            dmin: [z; 8],
            sb: None,
        }
    }

    /// Converts `d` and `dmin` of the super-block of weight group `g` when it is a new one.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn select<const SUPER: bool>(&mut self, v: &TileView<'_>, g: usize) {
        let Some(ss) = v.super_scales.as_ref().filter(|_| SUPER) else {
            return;
        };
        let sb = g / ss.groups_per_super;
        if self.sb != Some(sb) {
            self.convert(ss, sb);
        }
    }

    /// `d` and `dmin` of super-block `sb` as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn convert(&mut self, ss: &SuperScales<'_>, sb: usize) {
        let d = &ss.d[sb * TILE..][..TILE];
        for (i, dv) in self.d.iter_mut().enumerate() {
            *dv = load_f16(&d[8 * i..][..8]);
        }
        if let Some(dmin) = ss.dmin {
            let dmin = &dmin[sb * TILE..][..TILE];
            for (i, dv) in self.dmin.iter_mut().enumerate() {
                *dv = load_f16(&dmin[8 * i..][..8]);
            }
        }
        self.sb = Some(sb);
    }

    /// Scale and offset (zero without `OFFSET`) of rows `8i..8i + 8` of the weight group whose
    /// scale bytes are `rows` and whose super-block [`DirectScales::select`] converted.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn vectors<const SUPER: bool, const OFFSET: bool>(
        &self,
        rows: &GroupRows<'_>,
        i: usize,
    ) -> (__m256, __m256) {
        let mut m = _mm256_setzero_ps();
        if SUPER {
            let sc = &rows.sub_scales[8 * i..][..8];
            // SAFETY: `sc` is 8 bytes, what the 64-bit load reads.
            let sc8 = unsafe { _mm_loadl_epi64(sc.as_ptr().cast()) };
            let (sc32, m32) = if OFFSET {
                let mins = &rows.sub_mins[8 * i..][..8];
                // SAFETY: `mins` is 8 bytes, what the 64-bit load reads.
                let m8 = unsafe { _mm_loadl_epi64(mins.as_ptr().cast()) };
                (_mm256_cvtepi8_epi32(sc8), _mm256_cvtepu8_epi32(m8))
            } else {
                (_mm256_cvtepi8_epi32(sc8), _mm256_setzero_si256())
            };
            let s = _mm256_mul_ps(self.d[i], _mm256_cvtepi32_ps(sc32));
            if OFFSET {
                m = _mm256_mul_ps(self.dmin[i], _mm256_cvtepi32_ps(m32));
            }
            (s, m)
        } else {
            if OFFSET {
                m = load_f16(&rows.offsets[8 * i..][..8]);
            }
            (load_f16(&rows.scales[8 * i..][..8]), m)
        }
    }

    /// The combine's factors of rows `8i..8i + 8` of the weight group of `rows`, for codes
    /// centred at `c`: half the scale, `0.5·s`, and the offset at the centre, `o = s·c + m`
    /// (one rounding; `s·c` without offsets, `s·c − dmin·m` for super-block mins), as
    /// [`scalar`] forms them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn factors<const SUPER: bool, const OFFSET: bool>(
        &self,
        rows: &GroupRows<'_>,
        i: usize,
        c: __m256,
    ) -> (__m256, __m256) {
        let (s, m) = self.vectors::<SUPER, OFFSET>(rows, i);
        let o = match (OFFSET, SUPER) {
            (false, _) => _mm256_mul_ps(s, c),
            (true, true) => _mm256_fmsub_ps(s, c, m),
            (true, false) => _mm256_fmadd_ps(s, c, m),
        };
        (_mm256_mul_ps(_mm256_set1_ps(0.5), s), o)
    }

    /// The factors of the weight group of `rows` into half `h`, for every token of a block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fill<const SUPER: bool, const OFFSET: bool>(
        &mut self,
        rows: &GroupRows<'_>,
        h: usize,
        c: __m256,
    ) {
        for i in 0..TILE / 8 {
            (self.half_scale[h][i], self.offset[h][i]) = self.factors::<SUPER, OFFSET>(rows, i, c);
        }
    }
}

/// The scale bytes of one weight group's 64 rows, as arrays so that the row vectors index them
/// without checks; the fields a form does not have are zeros.
#[derive(Clone, Copy)]
struct GroupRows<'a> {
    /// f16 scales.
    scales: &'a [u16; TILE],
    /// f16 offsets.
    offsets: &'a [u16; TILE],
    /// Super-block sub-scales.
    sub_scales: &'a [i8; TILE],
    /// Super-block sub-mins.
    sub_mins: &'a [u8; TILE],
}

impl<'a> GroupRows<'a> {
    /// The rows of weight group `g` of tile `v`.
    #[inline(always)]
    fn of<const SUPER: bool, const OFFSET: bool>(v: &TileView<'a>, g: usize) -> GroupRows<'a> {
        const Z16: [u16; TILE] = [0; TILE];
        const ZI8: [i8; TILE] = [0; TILE];
        const ZU8: [u8; TILE] = [0; TILE];
        fn rows<T>(s: &[T], g: usize) -> &[T; TILE] {
            s[g * TILE..][..TILE]
                .try_into()
                .expect("a slice of TILE elements is an array of TILE")
        }
        match v.super_scales.as_ref().filter(|_| SUPER) {
            Some(ss) => GroupRows {
                scales: &Z16,
                offsets: &Z16,
                sub_scales: rows(ss.sub_scales, g),
                sub_mins: ss.sub_mins.filter(|_| OFFSET).map_or(&ZU8, |m| rows(m, g)),
            },
            None => GroupRows {
                scales: rows(v.scales, g),
                offsets: v.offsets.filter(|_| OFFSET).map_or(&Z16, |o| rows(o, g)),
                sub_scales: &ZI8,
                sub_mins: &ZU8,
            },
        }
    }
}

/// [`scalar::lookup_accumulate`] with `vpshufb` lookups: planes in runs of at most [`MAX_FAST_BITS`]
/// summed in int16 (at most 15·127·8 per row, no overflow), each run widened to i32 and shifted by
/// its first plane's weight, then `f += ts·S` as [`accumulate`] does it. Every read goes through a
/// bounds-checked slice.
///
/// # Safety
/// The CPU supports avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lookup_accumulate(
    wa: &[u8],
    planes: Range<usize>,
    tabs: &[i8],
    tables: Range<usize>,
    ts: f32,
    f: &mut [f32; TILE],
) {
    debug_assert!(tables.start.is_multiple_of(2) && tables.end.is_multiple_of(2));
    // `total[2q + h]`: rows 16q + 8h .. + 8.
    let mut total = [_mm256_setzero_si256(); 8];
    let mut p0 = planes.start;
    while p0 < planes.end {
        let p1 = (p0 + MAX_FAST_BITS).min(planes.end);
        let mut s = [_mm256_setzero_si256(); 4];
        for p in p0..p1 {
            let plane = &wa[p * PLANE_BYTES..][..PLANE_BYTES];
            let pw = _mm256_set1_epi8(1 << (p - p0));
            for pair in tables.start / 2..tables.end / 2 {
                let blocks = &plane[2 * BLOCK * pair..][..2 * BLOCK];
                let pair_tabs = &tabs[2 * TABLE_BYTES * pair..][..2 * TABLE_BYTES];
                // SAFETY: `blocks` is 64 bytes and `pair_tabs` 32, what the two functions read.
                unsafe {
                    let idx = split_pair(blocks.as_ptr());
                    pair_lookups(pair_tabs.as_ptr(), &idx, pw, &mut s);
                }
            }
        }
        let shift = _mm_cvtsi32_si128((p0 - planes.start) as i32);
        for (q, &sq) in s.iter().enumerate() {
            let halves = [
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sq)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(sq)),
            ];
            for (h, &v) in halves.iter().enumerate() {
                total[2 * q + h] = _mm256_add_epi32(total[2 * q + h], _mm256_sll_epi32(v, shift));
            }
        }
        p0 = p1;
    }
    let ts = _mm256_set1_ps(ts);
    for (i, &s) in total.iter().enumerate() {
        let dst = &mut f[8 * i..][..8];
        // SAFETY: `dst` is 8 f32s.
        let old = unsafe { _mm256_loadu_ps(dst.as_ptr()) };
        let new = _mm256_add_ps(old, _mm256_mul_ps(ts, _mm256_cvtepi32_ps(s)));
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), new) };
    }
}

/// Activation groups of weights fetched ahead into L1: the hardware prefetcher alone leaves the
/// stream at about half the memory bandwidth.
const PREFETCH_AHEAD: usize = 6;

/// Bytes of weights fetched ahead into L2 instead, for the tiles whose lookups and two-level
/// combine take the longest per byte (super-block scales with 4 to 6 planes): L1 prefetches a few
/// groups ahead leave too few misses in flight behind their longer work.
const PREFETCH_FAR_BYTES: usize = 24 << 10;

/// How a kernel prefetches its tile's weights.
#[derive(Clone, Copy)]
enum Prefetch {
    /// [`PREFETCH_AHEAD`] groups ahead into L1.
    Near,
    /// [`PREFETCH_FAR_BYTES`] ahead into L2.
    Far,
}

impl Prefetch {
    /// The prefetch for tile `v`.
    fn of(v: &TileView<'_>) -> Prefetch {
        if v.super_scales.is_some() && v.bits >= 4 {
            Prefetch::Far
        } else {
            Prefetch::Near
        }
    }
}

/// Prefetches the weights ahead of the activation group at `wa` (possibly in the next tile, which
/// follows in memory; a prefetch past the end of the buffer is harmless).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch(wa: *const u8, bits: usize, how: Prefetch) {
    let group_bytes = bits * PLANE_BYTES;
    let ahead = match how {
        Prefetch::Near => wa.wrapping_add(PREFETCH_AHEAD * group_bytes),
        Prefetch::Far => wa.wrapping_add(PREFETCH_FAR_BYTES),
    };
    for line in (0..group_bytes)
        .step_by(64)
        .map(|at| ahead.wrapping_add(at).cast())
    {
        // Prefetching never faults, whatever the address (the intrinsic is safe).
        match how {
            Prefetch::Near => _mm_prefetch::<_MM_HINT_T0>(line),
            Prefetch::Far => _mm_prefetch::<_MM_HINT_T1>(line),
        }
    }
}

/// `s += pw·Σ_j T_j[nibble]` for one plane of one activation group; `s[q]` holds rows `16q..16q+16`.
///
/// # Safety
/// `plane` points to 256 readable bytes, `tabs` to 128.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lookups(plane: *const u8, tabs: *const i8, pw: __m256i, s: &mut [__m256i; 4]) {
    for pair in 0..4 {
        // SAFETY: 64·pair + 64 <= 256 weight bytes.
        let idx = unsafe { split_pair(plane.add(64 * pair)) };
        // SAFETY: 32·pair + 32 <= 128 table bytes.
        unsafe { pair_lookups(tabs.add(32 * pair), &idx, pw, s) };
    }
}

/// The low and high nibbles of two consecutive 32-byte blocks (`lo0, hi0, lo1, hi1`): the lookup
/// indices of one pair of table groups.
///
/// # Safety
/// `blocks` points to 64 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split_pair(blocks: *const u8) -> [__m256i; 4] {
    let mask = _mm256_set1_epi8(0x0F);
    // SAFETY: 64 readable bytes.
    let (w0, w1) = unsafe {
        (
            _mm256_loadu_si256(blocks.cast()),
            _mm256_loadu_si256(blocks.add(32).cast()),
        )
    };
    [
        _mm256_and_si256(w0, mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(w0), mask),
        _mm256_and_si256(w1, mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(w1), mask),
    ]
}

/// `s += pw·(T_j[idx] + T_{j+1}[idx])` for one pair of table groups (`tabs` at group `j`): both
/// 16-entry tables broadcast to the two lanes, looked up by the low and high nibbles, and the two
/// groups interleaved byte-wise so that maddubs adds them per row (|sum| ≤ 2032).
///
/// # Safety
/// `tabs` points to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_lookups(tabs: *const i8, idx: &[__m256i; 4], pw: __m256i, s: &mut [__m256i; 4]) {
    // SAFETY: 32 readable bytes.
    let (t0, t1) = unsafe {
        (
            _mm256_broadcastsi128_si256(_mm_loadu_si128(tabs.cast())),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(tabs.add(16).cast())),
        )
    };
    let rl0 = _mm256_shuffle_epi8(t0, idx[0]);
    let rh0 = _mm256_shuffle_epi8(t0, idx[1]);
    let rl1 = _mm256_shuffle_epi8(t1, idx[2]);
    let rh1 = _mm256_shuffle_epi8(t1, idx[3]);
    let lo = [
        _mm256_unpacklo_epi8(rl0, rl1),
        _mm256_unpackhi_epi8(rl0, rl1),
    ];
    let hi = [
        _mm256_unpacklo_epi8(rh0, rh1),
        _mm256_unpackhi_epi8(rh0, rh1),
    ];
    for (q, v) in lo.into_iter().chain(hi).enumerate() {
        s[q] = _mm256_add_epi16(s[q], _mm256_maddubs_epi16(pw, v));
    }
}

/// The lookup indices of one plane of one activation group, [`split_pair`] for each of its four
/// pairs of table groups.
///
/// # Safety
/// `plane` points to 256 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split(plane: *const u8, idx: &mut [[__m256i; 4]; 4]) {
    for (pair, pair_idx) in idx.iter_mut().enumerate() {
        // SAFETY: 64·pair + 64 <= 256 weight bytes.
        *pair_idx = unsafe { split_pair(plane.add(64 * pair)) };
    }
}

/// `s += pw·lookups` of plane `p`: from the indices `split` already made when there are some, else
/// from the packed weights at `wa`.
///
/// # Safety
/// `wa` points to `(p + 1)·256` readable bytes, `tabs` to 128.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn plane_lookups(
    split_idx: Option<&[[__m256i; 4]; 4]>,
    wa: *const u8,
    p: usize,
    tabs: *const i8,
    pw: __m256i,
    s: &mut [__m256i; 4],
) {
    match split_idx {
        // SAFETY: the caller's contract.
        Some(idx) => unsafe { split_lookups(idx, tabs, pw, s) },
        // SAFETY: the caller's contract.
        None => unsafe { lookups(wa.add(p * PLANE_BYTES), tabs, pw, s) },
    }
}

/// The lookup indices of one activation group of uniform planes, split once for every token of a
/// block, with the two planes of each pair `(2i, 2i + 1)` interleaved byte by byte.
///
/// A plane pair shares each table group's table, so one `pshufb` of the interleaved indices looks up
/// both planes of 16 rows at once, and `maddubs` by `(2^{2i}, 2^{2i+1})` (times `2^shift` where
/// [`PairedIndices::lookups_range`] is given one) adds them per row: no
/// unpacking per token (the per-pair-of-table-groups scheme of [`lookups`] interleaves two tables'
/// results, which has to happen after the lookups). The row order of the sums is the same
/// (`s[q]` = rows 16q..16q+16): `unpacklo/hi` of the nibbles of a block give rows 0..16 and 16..32
/// (layout::lo_row), the high nibbles the same rows + 32. An odd last plane keeps [`split`]'s form.
/// The integer sums are those of the other schemes, exactly.
struct PairedIndices {
    /// `[pair][table group][q]`.
    pairs: [[[__m256i; 4]; TABLES_PER_ACT]; MAX_BITS / 2],
    /// The odd last plane, as [`split`] makes it.
    single: [[__m256i; 4]; 4],
    bits: usize,
}

impl PairedIndices {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new() -> PairedIndices {
        PairedIndices {
            pairs: [[[_mm256_setzero_si256(); 4]; TABLES_PER_ACT]; MAX_BITS / 2],
            single: [[_mm256_setzero_si256(); 4]; 4],
            bits: 0,
        }
    }

    /// Splits the `bits` planes of one activation group at `wa`.
    ///
    /// # Safety
    /// `wa` points to `bits·256` readable bytes, `bits <= MAX_BITS`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn split(&mut self, wa: *const u8, bits: usize) {
        let mask = _mm256_set1_epi8(0x0F);
        self.bits = bits;
        for (i, pair) in self.pairs[..bits / 2].iter_mut().enumerate() {
            for (j, q) in pair.iter_mut().enumerate() {
                // SAFETY: planes 2i, 2i + 1 < bits and block j < 8 lie in the bits·256 bytes.
                let (w0, w1) = unsafe {
                    (
                        _mm256_loadu_si256(wa.add(2 * i * PLANE_BYTES + BLOCK * j).cast()),
                        _mm256_loadu_si256(wa.add((2 * i + 1) * PLANE_BYTES + BLOCK * j).cast()),
                    )
                };
                let (l0, l1) = (_mm256_and_si256(w0, mask), _mm256_and_si256(w1, mask));
                let (h0, h1) = (
                    _mm256_and_si256(_mm256_srli_epi16::<4>(w0), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(w1), mask),
                );
                *q = [
                    _mm256_unpacklo_epi8(l0, l1),
                    _mm256_unpackhi_epi8(l0, l1),
                    _mm256_unpacklo_epi8(h0, h1),
                    _mm256_unpackhi_epi8(h0, h1),
                ];
            }
        }
        if bits % 2 == 1 {
            // SAFETY: plane bits − 1 lies in the bits·256 bytes.
            unsafe { split(wa.add((bits - 1) * PLANE_BYTES), &mut self.single) };
        }
    }

    /// `s += Σ_p 2^p·Σ_j T_j[nibble_{p,j}]` for the planes last split (at most 4).
    ///
    /// # Safety
    /// `tabs` points to 128 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lookups(&self, tabs: *const i8, s: &mut [__m256i; 4]) {
        debug_assert!(self.bits <= MAX_FAST_BITS);
        let mut unused = [_mm256_setzero_si256(); 4];
        // SAFETY: the caller's contract.
        unsafe { self.lookups_range::<false>(tabs, 0..TABLES_PER_ACT, 0, s, &mut unused) };
    }

    /// The lookups of table groups `tables` (starting and ending at even groups) into `lo`, plane
    /// `p` weighted by `2^(p + shift)`, except with `HI` the third pair (planes 4 and 5), which
    /// goes into `hi` weighted by `(1, 2)` (see [`LO_PLANES`]).
    ///
    /// # Safety
    /// `tabs` points to 128 readable bytes; with `HI`, 6 planes were split and `shift` is 0;
    /// `bits − 1 + shift <= 7`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lookups_range<const HI: bool>(
        &self,
        tabs: *const i8,
        tables: Range<usize>,
        shift: u32,
        lo: &mut [__m256i; 4],
        hi: &mut [__m256i; 4],
    ) {
        debug_assert!(tables.start.is_multiple_of(2) && tables.end <= TABLES_PER_ACT);
        debug_assert!(!HI || (self.bits == MAX_BITS && shift == 0));
        debug_assert!(self.bits - 1 + shift as usize <= 7);
        let lo_pairs = &self.pairs[..if HI { LO_PLANES / 2 } else { self.bits / 2 }];
        // Byte weights of each pair, low byte first: (1, 2), (4, 8), (16, 32), times 2^shift
        // (no byte passes 2^7, so none carries into the next).
        let weights = [
            _mm256_set1_epi16((0x0201u16 << shift) as i16),
            _mm256_set1_epi16((0x0804u16 << shift) as i16),
            _mm256_set1_epi16((0x2010u16 << shift) as i16),
        ];
        for j in tables.clone() {
            // SAFETY: 16·j + 16 <= 128 table bytes.
            let t = unsafe {
                _mm256_broadcastsi128_si256(_mm_loadu_si128(tabs.add(TABLE_BYTES * j).cast()))
            };
            for (pair, &w) in lo_pairs.iter().zip(&weights) {
                for (sq, &iq) in lo.iter_mut().zip(&pair[j]) {
                    *sq =
                        _mm256_add_epi16(*sq, _mm256_maddubs_epi16(w, _mm256_shuffle_epi8(t, iq)));
                }
            }
            if HI {
                for (sq, &iq) in hi.iter_mut().zip(&self.pairs[LO_PLANES / 2][j]) {
                    let w = weights[0];
                    *sq =
                        _mm256_add_epi16(*sq, _mm256_maddubs_epi16(w, _mm256_shuffle_epi8(t, iq)));
                }
            }
        }
        if self.bits % 2 == 1 {
            let pw = _mm256_set1_epi8((1u8 << (self.bits as u32 - 1 + shift)) as i8);
            for pair in tables.start / 2..tables.end / 2 {
                // SAFETY: 32·pair + 32 <= 128 table bytes.
                unsafe { pair_lookups(tabs.add(32 * pair), &self.single[pair], pw, lo) };
            }
        }
    }
}

/// [`lookups`] from indices already [`split`].
///
/// # Safety
/// `tabs` points to 128 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split_lookups(
    idx: &[[__m256i; 4]; 4],
    tabs: *const i8,
    pw: __m256i,
    s: &mut [__m256i; 4],
) {
    for (pair, pair_idx) in idx.iter().enumerate() {
        // SAFETY: 32·pair + 32 <= 128 table bytes.
        unsafe { pair_lookups(tabs.add(32 * pair), pair_idx, pw, s) };
    }
}

/// `f[r] += ts·S[r]` (also the ternary kernel's, whose sums come in the same row order).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn accumulate(f: &mut [f32; TILE], s: &[__m256i; 4], ts: __m256) {
    for (q, &sq) in s.iter().enumerate() {
        let halves = [
            _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sq)),
            _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(sq)),
        ];
        for (h, &v) in halves.iter().enumerate() {
            let dst = &mut f[16 * q + 8 * h..][..8];
            // SAFETY: `dst` is 8 f32s.
            let old = unsafe { _mm256_loadu_ps(dst.as_ptr()) };
            let new = _mm256_add_ps(old, _mm256_mul_ps(ts, _mm256_cvtepi32_ps(v)));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), new) };
        }
    }
}

/// 8 f16 values from `bits` (exactly 8 long) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load_f16(bits: &[u16]) -> __m256 {
    assert_eq!(bits.len(), 8);
    // SAFETY: 8 u16 = 16 readable bytes (checked above).
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bits.as_ptr().cast()) })
}

/// Same operations as [`super::scalar::combine`], 8 rows at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn combine(
    v: &TileView<'_>,
    g: usize,
    f: &[[f32; TILE]; MAX_BITS],
    sx: f32,
    acc: &mut [f32; TILE],
) {
    let nps = v.scale_planes();
    let half = _mm256_set1_ps(0.5);
    let sxv = _mm256_set1_ps(sx);
    let centre = _mm256_set1_ps(v.centre);
    for c in 0..TILE / 8 {
        let r = 8 * c;
        // SAFETY: r + 8 <= TILE.
        let mut a = unsafe { _mm256_loadu_ps(acc[r..].as_ptr()) };
        if v.per_plane {
            for (p, fp) in f[..v.bits].iter().enumerate() {
                let s = load_f16(&v.scales[(g * nps + p) * TILE + r..][..8]);
                let h = _mm256_mul_ps(half, s);
                // SAFETY: r + 8 <= TILE.
                let fv = unsafe { _mm256_loadu_ps(fp[r..].as_ptr()) };
                a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_add_ps(fv, sxv), h));
            }
            if let Some(offsets) = v.offsets {
                let m = load_f16(&offsets[g * TILE + r..][..8]);
                a = _mm256_add_ps(a, _mm256_mul_ps(m, sxv));
            }
        } else {
            let s = load_f16(&v.scales[g * TILE + r..][..8]);
            let o = match v.offsets {
                Some(offsets) => {
                    _mm256_fmadd_ps(s, centre, load_f16(&offsets[g * TILE + r..][..8]))
                }
                None => _mm256_mul_ps(s, centre),
            };
            // SAFETY: r + 8 <= TILE.
            let fv = unsafe { _mm256_loadu_ps(f[0][r..].as_ptr()) };
            a = _mm256_fmadd_ps(fv, _mm256_mul_ps(half, s), a);
            a = _mm256_fmadd_ps(o, sxv, a);
        }
        // SAFETY: r + 8 <= TILE.
        unsafe { _mm256_storeu_ps(acc[r..].as_mut_ptr(), a) };
    }
}
