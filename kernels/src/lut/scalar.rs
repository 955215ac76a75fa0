//! The scalar reference tile kernel: the definition every SIMD path is tested against.
//!
//! Per row `r`, weight group `g`, token `n` (see the crate spec, §1):
//! - per activation group `a` of `g`: `S = Σ_p w_p·Σ_j T_j[nibble_{p,j}(r)]` exactly in integers
//!   (`w_p = 2^p` for uniform planes, one `S` per plane with `w_p = 1` for per-plane scales), then
//!   `F_p += tscale_a·S_p` in f32;
//! - uniform: `acc = fma(F, 0.5·s, acc)`, then `acc = fma(o, Σx_g, acc)` with the offset at the
//!   centre `o = fma(s, c, m)` (`s·c` without offsets) and `c = (2^b − 1)/2`, since
//!   `Σ(s·q + m)·x = 0.5·s·Σ_p 2^p(σ_p·x) + (s·c + m)·Σx` (`c = (2^b − 1)/2 − z` for codes centred
//!   on a zero point `z`, `w = s·(q − z)`): once per (row, group), whatever the tiling;
//! - per-plane: `acc += (F_p + Σx_g)·(0.5·s_p)` for each plane, since `Σq_p·x = 0.5·(σ_p·x + Σx)`,
//!   then `acc += m·Σx_g` when the matrix has offsets;
//! - super-block scales: the group's `s = d·sc` and `m = −dmin·m_int` are formed in f32 first
//!   (exact products), then combined as uniform planes with `c = (2^b − 1)/2 − z` for zero point `z`;
//! - weight groups of 16 take the lookups of half an activation group (4 table groups) and that
//!   half's Σx;
//! - super-block scales in weight groups of 16 (Q2_K, Q3_K, Q6_K) combine the two halves of an
//!   activation group in integers first: with the exact sums `S_h` of half `h` and its Σx in units
//!   of `2^-k` table scales, rounded (`u_h`, from [`TabView::half_units`]),
//!   `J = Σ_h sc_h·(2^k·S_h + 2c·u_h)` and `M = Σ_h m_h·u_h`; then `acc += d·((2^-k·0.5·ts)·J)`
//!   and `acc −= dmin·((2^-k·ts)·M)`: two float steps per activation group, none per weight group
//!   ([`super::HalvesCombine`] picks `k`).
//!
//! The SIMD kernels perform exactly these float operations in this order (mul then add, fused
//! only where written `fma`).

use std::ops::Range;

use super::layout::{BLOCK, LO_ROW, PLANE_BYTES, TABLES_PER_ACT, TABLE_BYTES, TILE};
use super::{Acc, PlaneSums, SuperScales, TabView, TileView, CHUNK, MAX_BITS};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Accumulates `acc[n]` for tokens `n0..n0+nb` over every weight group of the tile.
pub(crate) fn tile<const NB: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
) {
    tile_with(v, t, n0, nb, acc, lookup_accumulate);
}

/// [`tile`] with the lookups of `lookups` (see [`lookup_accumulate`] for its contract): the float
/// work is this module's whatever ISA does the lookups.
#[inline]
pub(crate) fn tile_with<const NB: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
    lookups: impl Fn(&[u8], Range<usize>, &[i8], Range<usize>, f32, &mut [f32; TILE]),
) {
    if let (true, Some(ss)) = (v.half_groups, &v.super_scales) {
        return super_halves(v, ss, t, n0, nb, acc, lookups);
    }
    let nps = v.scale_planes();
    let mut f: PlaneSums<NB> = [[[0.0; TILE]; MAX_BITS]; NB];
    let mut scales = GroupScales::new();
    for a in acc[..nb].iter_mut() {
        *a = [0.0; TILE];
    }
    for g in 0..v.groups {
        for planes in f[..nb].iter_mut() {
            for plane in planes[..nps].iter_mut() {
                *plane = [0.0; TILE];
            }
        }
        let (a0, a1, tables) = v.span(g);
        let mut c0 = a0;
        while c0 < a1 {
            let c1 = (c0 + CHUNK).min(a1);
            for (n, fn_) in f[..nb].iter_mut().enumerate() {
                for a in c0..c1 {
                    let tabs = t.tables_of(n0 + n, a);
                    let ts = t.scales[(n0 + n) * t.act_groups + a];
                    let wa = &v.weights[a * v.bits * PLANE_BYTES..][..v.bits * PLANE_BYTES];
                    if v.per_plane {
                        for (p, fp) in fn_[..v.bits].iter_mut().enumerate() {
                            lookups(wa, p..p + 1, tabs, tables.clone(), ts, fp);
                        }
                    } else {
                        lookups(wa, 0..v.bits, tabs, tables.clone(), ts, &mut fn_[0]);
                    }
                }
            }
            c0 = c1;
        }
        if let Some(ss) = &v.super_scales {
            scales.fill(ss, g);
        }
        for (n, a) in acc[..nb].iter_mut().enumerate() {
            let sx = v.group_sum(t, n0 + n, g);
            match &v.super_scales {
                Some(_) => combine_super(&f[n][0], sx, v.centre, &scales, a),
                None => combine(v, g, &f[n], sx, a),
            }
        }
    }
}

/// Two-level scales in weight groups of 16 (see the module doc and [`super::HalvesCombine`]): per
/// activation group, token and row, the integer `J` and `M` of both halves, then the two float
/// steps.
fn super_halves<const NB: usize>(
    v: &TileView<'_>,
    ss: &SuperScales<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
    lookups: impl Fn(&[u8], Range<usize>, &[i8], Range<usize>, f32, &mut [f32; TILE]),
) {
    let hc = v
        .halves_combine()
        .expect("a two-level tile in groups of 16 has an integer 2·centre");
    let mut factors = GroupScales::new();
    for a in acc[..nb].iter_mut() {
        *a = [0.0; TILE];
    }
    let wbytes = v.bits * PLANE_BYTES;
    let half = TABLES_PER_ACT / 2;
    for a in 0..v.act_groups {
        factors.select(ss, 2 * a / ss.groups_per_super);
        let (d, dmin) = (&factors.d, &factors.dmin);
        let wa = &v.weights[a * wbytes..][..wbytes];
        let sc = [2 * a, 2 * a + 1].map(|g| &ss.sub_scales[g * TILE..][..TILE]);
        let mins = ss
            .sub_mins
            .map(|m| [2 * a, 2 * a + 1].map(|g| &m[g * TILE..][..TILE]));
        for (n, acc_n) in acc[..nb].iter_mut().enumerate() {
            let tok = n0 + n;
            let tabs = t.tables_of(tok, a);
            let ts = t.scales[tok * t.act_groups + a];
            let units = &t.half_units[2 * (tok * t.act_groups + a)..][..2];
            let mut sums = [[0.0f32; TILE]; 2];
            for (h, s) in sums.iter_mut().enumerate() {
                // With a unit scale the lookups leave their exact integer sums (|S| < 2^24) in f32.
                lookups(wa, 0..v.bits, tabs, h * half..(h + 1) * half, 1.0, s);
            }
            let (fj, fm) = hc.factors(ts);
            let u = [hc.units(units[0]), hc.units(units[1])];
            for r in 0..TILE {
                let (mut j, mut m) = (0i32, 0i32);
                for h in 0..2 {
                    let s = (sums[h][r] as i32) << hc.shift;
                    j += i32::from(ss.sub_scale(sc[h][r])) * (s + hc.two_c * u[h]);
                    if let Some(mins) = &mins {
                        m += i32::from(ss.sub_min(mins[h][r])) * u[h];
                    }
                }
                acc_n[r] += d[r] * (fj * j as f32);
                if mins.is_some() {
                    acc_n[r] -= dmin[r] * (fm * m as f32);
                }
            }
        }
    }
}

/// `f[r] += ts·S[r]` (mul, then add) with the exact integer sum
/// `S[r] = Σ_{p ∈ planes} 2^(p − planes.start)·Σ_{j ∈ tables} T_j[nibble_{p,j}(r)]` of one activation
/// group: `wa` holds its planes (`bits·256` bytes), `tabs` its 8 tables; `tables` starts and ends at
/// even table groups.
pub(crate) fn lookup_accumulate(
    wa: &[u8],
    planes: Range<usize>,
    tabs: &[i8],
    tables: Range<usize>,
    ts: f32,
    f: &mut [f32; TILE],
) {
    debug_assert_eq!(tabs.len(), TABLES_PER_ACT * TABLE_BYTES);
    let mut s = [0i32; TILE];
    for p in planes.clone() {
        let pw = 1i32 << (p - planes.start);
        let plane = &wa[p * PLANE_BYTES..][..PLANE_BYTES];
        for j in tables.clone() {
            let blk = &plane[j * BLOCK..][..BLOCK];
            let tab = &tabs[j * TABLE_BYTES..][..TABLE_BYTES];
            for (&byte, &r) in blk.iter().zip(LO_ROW.iter()) {
                s[r] += pw * i32::from(tab[usize::from(byte & 0x0F)]);
                s[r + 32] += pw * i32::from(tab[usize::from(byte >> 4)]);
            }
        }
    }
    accumulate(f, &s, ts);
}

/// The f32 scale `d·sc` and offset `−(dmin·m)` of one weight group of a super-block tile, per row,
/// with the f32 values of the current super-block's `d` and `dmin` (converted once per super-block).
pub(crate) struct GroupScales {
    scale: [f32; TILE],
    offset: Option<[f32; TILE]>,
    d: [f32; TILE],
    dmin: [f32; TILE],
    /// The super-block `d` and `dmin` hold, if any.
    sb: Option<usize>,
}

impl GroupScales {
    fn new() -> GroupScales {
        GroupScales {
            scale: [0.0; TILE],
            offset: None,
            d: [0.0; TILE],
            dmin: [0.0; TILE],
            sb: None,
        }
    }

    /// `d` and `dmin` of super-block `sb` as f32, converted when it is a new one.
    fn select(&mut self, ss: &SuperScales<'_>, sb: usize) {
        if self.sb != Some(sb) {
            // f16 → f32 is exact, however it is converted (in bulk, with F16C where there is one).
            ss.d[sb * TILE..][..TILE]
                .reinterpret_cast::<f16>()
                .convert_to_f32_slice(&mut self.d);
            if let Some(dmin) = ss.dmin {
                dmin[sb * TILE..][..TILE]
                    .reinterpret_cast::<f16>()
                    .convert_to_f32_slice(&mut self.dmin);
            }
            self.sb = Some(sb);
        }
    }

    /// The scales of weight group `g`: each an f32 product of two exact factors, as ggml forms them.
    fn fill(&mut self, ss: &SuperScales<'_>, g: usize) {
        self.select(ss, g / ss.groups_per_super);
        let sc = &ss.sub_scales[g * TILE..][..TILE];
        for ((s, &d), &sc) in self.scale.iter_mut().zip(&self.d).zip(sc) {
            *s = d * f32::from(ss.sub_scale(sc));
        }
        self.offset = ss.sub_mins.map(|mins| {
            let mut o = [0.0f32; TILE];
            let mins = &mins[g * TILE..][..TILE];
            for ((o, &dm), &m) in o.iter_mut().zip(&self.dmin).zip(mins) {
                *o = -(dm * f32::from(ss.sub_min(m)));
            }
            o
        });
    }
}

/// Adds the contribution of one weight group with super-block scales (see the module doc):
/// `acc = fma(F, 0.5·s, acc)`, then `acc = fma(o, Σx, acc)`.
fn combine_super(f: &[f32; TILE], sx: f32, centre: f32, gs: &GroupScales, acc: &mut [f32; TILE]) {
    for (r, (a, &fv)) in acc.iter_mut().zip(f).enumerate() {
        let s = gs.scale[r];
        let o = centre_offset(s, centre, gs.offset.as_ref().map(|m| m[r]));
        *a = fv.mul_add(0.5 * s, *a);
        *a = o.mul_add(sx, *a);
    }
}

/// The offset at the centre of the codes, `o = s·c + m` in one rounding (`s·c` without an
/// offset): the weight of `Σx` in a uniform group's combine.
#[inline]
fn centre_offset(s: f32, centre: f32, m: Option<f32>) -> f32 {
    match m {
        Some(m) => s.mul_add(centre, m),
        None => s * centre,
    }
}

/// `f[r] += ts·S[r]` (mul, then add).
fn accumulate(f: &mut [f32; TILE], s: &[i32; TILE], ts: f32) {
    for (f, &s) in f.iter_mut().zip(s) {
        *f += ts * s as f32;
    }
}

/// Adds the contribution of weight group `g` to the row accumulators (see the module doc).
pub(crate) fn combine(
    v: &TileView<'_>,
    g: usize,
    f: &[[f32; TILE]; MAX_BITS],
    sx: f32,
    acc: &mut [f32; TILE],
) {
    let nps = v.scale_planes();
    if v.per_plane {
        for (p, fp) in f[..v.bits].iter().enumerate() {
            let scales = &v.scales[(g * nps + p) * TILE..][..TILE];
            for ((a, &fv), &s) in acc.iter_mut().zip(fp).zip(scales) {
                let h = 0.5 * f16::from_bits(s).to_f32();
                *a += (fv + sx) * h;
            }
        }
        if let Some(offsets) = v.offsets {
            for (a, &m) in acc.iter_mut().zip(&offsets[g * TILE..][..TILE]) {
                *a += f16::from_bits(m).to_f32() * sx;
            }
        }
    } else {
        let scales = &v.scales[g * TILE..][..TILE];
        for (r, (a, &fv)) in acc.iter_mut().zip(&f[0]).enumerate() {
            let s = f16::from_bits(scales[r]).to_f32();
            let m = v.offsets.map(|o| f16::from_bits(o[g * TILE + r]).to_f32());
            *a = fv.mul_add(0.5 * s, *a);
            *a = centre_offset(s, v.centre, m).mul_add(sx, *a);
        }
    }
}
