//! The scalar reference tile kernel: the definition every SIMD path is tested against.
//!
//! Per row `r`, weight group `g`, token `n` (see the crate spec, §1):
//! - per activation group `a` of `g`: `S = Σ_p w_p·Σ_j T_j[nibble_{p,j}(r)]` exactly in integers
//!   (`w_p = 2^p` for uniform planes, one `S` per plane with `w_p = 1` for per-plane scales), then
//!   `F_p += tscale_a·S_p` in f32;
//! - uniform: `acc += s·(0.5·F + c·Σx_g)` with `c = (2^b − 1)/2`, since `Σq·x = 0.5·Σ_p 2^p(σ_p·x) + c·Σx`;
//! - per-plane: `acc += (F_p + Σx_g)·(0.5·s_p)` for each plane, since `Σq_p·x = 0.5·(σ_p·x + Σx)`;
//! - then `acc += m·Σx_g` when the matrix has offsets: once per (row, group), whatever the tiling.
//!
//! The SIMD kernels perform exactly these float operations (mul then add, no FMA) in this order.

use super::layout::{BLOCK, LO_ROW, PLANE_BYTES, TABLES_PER_ACT, TABLE_BYTES, TILE};
use super::{Acc, PlaneSums, TabView, TileView, CHUNK, MAX_BITS};
use half::f16;

/// Accumulates `acc[n]` for tokens `n0..n0+nb` over every weight group of the tile.
pub(crate) fn tile<const NB: usize>(
    v: &TileView<'_>,
    t: &TabView<'_>,
    n0: usize,
    nb: usize,
    acc: &mut Acc<NB>,
) {
    let nps = v.scale_planes();
    let mut f: PlaneSums<NB> = [[[0.0; TILE]; MAX_BITS]; NB];
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
            for (n, fn_) in f[..nb].iter_mut().enumerate() {
                for a in c0..c1 {
                    let tabs = t.tables_of(n0 + n, a);
                    let ts = t.scales[(n0 + n) * t.act_groups + a];
                    let wa = &v.weights[a * v.bits * PLANE_BYTES..][..v.bits * PLANE_BYTES];
                    if v.per_plane {
                        for (p, fp) in fn_[..v.bits].iter_mut().enumerate() {
                            let mut s = [0i32; TILE];
                            lookups(&wa[p * PLANE_BYTES..][..PLANE_BYTES], tabs, 1, &mut s);
                            accumulate(fp, &s, ts);
                        }
                    } else {
                        let mut s = [0i32; TILE];
                        for p in 0..v.bits {
                            lookups(&wa[p * PLANE_BYTES..][..PLANE_BYTES], tabs, 1 << p, &mut s);
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

/// `s[r] += pw·Σ_j T_j[nibble_j(r)]` for one plane of one activation group.
fn lookups(plane: &[u8], tabs: &[i8], pw: i32, s: &mut [i32; TILE]) {
    for (blk, tab) in plane
        .chunks_exact(BLOCK)
        .zip(tabs.chunks_exact(TABLE_BYTES))
    {
        for (&byte, &r) in blk.iter().zip(LO_ROW.iter()) {
            s[r] += pw * i32::from(tab[usize::from(byte & 0x0F)]);
            s[r + 32] += pw * i32::from(tab[usize::from(byte >> 4)]);
        }
    }
    debug_assert_eq!(tabs.len(), TABLES_PER_ACT * TABLE_BYTES);
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
    } else {
        let c = ((1u32 << v.bits) - 1) as f32 * 0.5;
        let csx = c * sx;
        let scales = &v.scales[g * TILE..][..TILE];
        for ((a, &fv), &s) in acc.iter_mut().zip(&f[0]).zip(scales) {
            let t = 0.5 * fv + csx;
            *a += f16::from_bits(s).to_f32() * t;
        }
    }
    if let Some(offsets) = v.offsets {
        for (a, &m) in acc.iter_mut().zip(&offsets[g * TILE..][..TILE]) {
            *a += f16::from_bits(m).to_f32() * sx;
        }
    }
}
