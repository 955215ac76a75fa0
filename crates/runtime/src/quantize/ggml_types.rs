//! ggml's standard block types (Q4_0, Q5_0, Q8_0, IQ4_NL and the K-quants Q2_K..Q6_K) as
//! quantization grids, with encoders that write exactly ggml's block bytes.
//!
//! A block of a [`GgmlTarget`] grid is one ggml block: 32 weights for the legacy types and IQ4_NL,
//! a super-block of 256 for the K-quants. [`GgmlBlock`] holds what the block stores (f16 `d` and
//! `dmin`, integer sub-scales and sub-mins), and [`Grid::level`] computes a code's value with the
//! same f32 operations, in the same order, as lutra's decoder ([`crate::weights::decode_ggml`])
//! and ggml's dequantizers: what a grid promises is what llama.cpp reads back.
//!
//! Fitting searches scales the way ggml's reference quantizers do (`make_qx_quants`,
//! `make_qkx2_quants`, the IQ4_NL scale sweep), weighting each squared error by the caller's
//! importance, and then chooses among candidates by the error of the f16-rounded scales and
//! integer sub-scales actually stored, which ggml's reference does not do.

use std::str::FromStr;

use half::f16;
use lutra_kernels::KVALUES_IQ4NL;

use crate::error::{Error, Result};
use crate::weights::GgmlType;

use super::grid::Grid;

/// The ggml block types lutra writes (`--type`).
#[allow(non_camel_case_types, missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlTarget {
    Q4_0,
    Q5_0,
    Q8_0,
    IQ4_NL,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// K-quant candidates (super-scales from both group fits) refined by least squares and a search
/// of the integer sub-scales.
const REFINED_CANDIDATES: usize = 3;

/// The K-quant super-block size.
const QK_K: usize = 256;

/// How a code maps to a value within one group of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Levels {
    /// `d·q + (−zero·d)`: Q4_0, Q5_0 (the decoder's offset form, one group).
    Offset { zero: i16 },
    /// `(d·sc)·(q − zero)`: Q8_0 (`sc` = 1; codes are the int8 value + 127, ggml's −127..=127,
    /// never −128), Q3_K, Q6_K.
    Signed { zero: i16 },
    /// `(d·sc)·q − dmin·m`: Q2_K, Q4_K, Q5_K.
    Min,
    /// `d·kvalues[q]`: IQ4_NL.
    Table,
}

/// How the per-group scales of a K-quant are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubScales {
    /// One f16 `d` per block, no sub-scales (legacy types, IQ4_NL).
    None,
    /// Unsigned sub-scales and sub-mins `0..=max` (Q2_K: 15, Q4_K/Q5_K: 63).
    Unsigned { max: u8 },
    /// Signed sub-scales `lo..=hi` (Q3_K: −32..=31, Q6_K: −128..=127).
    Signed { lo: i16, hi: i16 },
}

const fn legacy_spec(ty: GgmlType, codes: usize, levels: Levels) -> Spec {
    Spec {
        ty,
        block_len: 32,
        group_len: 32,
        codes,
        levels,
        sub: SubScales::None,
        sweep: (0.0, 0.0, 0),
    }
}

const fn k_spec(
    ty: GgmlType,
    group_len: usize,
    codes: usize,
    levels: Levels,
    sub: SubScales,
    sweep: (f32, f32, usize),
) -> Spec {
    Spec {
        ty,
        block_len: QK_K,
        group_len,
        codes,
        levels,
        sub,
        sweep,
    }
}

/// The specs of the targets, in declaration order (`GgmlTarget as usize`).
const SPECS: [Spec; 9] = [
    GgmlTarget::Q4_0.build_spec(),
    GgmlTarget::Q5_0.build_spec(),
    GgmlTarget::Q8_0.build_spec(),
    GgmlTarget::IQ4_NL.build_spec(),
    GgmlTarget::Q2_K.build_spec(),
    GgmlTarget::Q3_K.build_spec(),
    GgmlTarget::Q4_K.build_spec(),
    GgmlTarget::Q5_K.build_spec(),
    GgmlTarget::Q6_K.build_spec(),
];

/// Everything about one target that the grid and the encoder need.
#[derive(Clone, Copy, Debug)]
struct Spec {
    ty: GgmlType,
    block_len: usize,
    group_len: usize,
    codes: usize,
    levels: Levels,
    sub: SubScales,
    /// `make_qkx2_quants`'s range sweep (`rmin`, `rdelta`, `nstep`) for the types with mins.
    sweep: (f32, f32, usize),
}

impl GgmlTarget {
    /// Every target, in ggml id order.
    pub const ALL: [GgmlTarget; 9] = [
        GgmlTarget::Q4_0,
        GgmlTarget::Q5_0,
        GgmlTarget::Q8_0,
        GgmlTarget::Q2_K,
        GgmlTarget::Q3_K,
        GgmlTarget::Q4_K,
        GgmlTarget::Q5_K,
        GgmlTarget::Q6_K,
        GgmlTarget::IQ4_NL,
    ];

    /// What the grid and the encoder need to know about this target.
    fn spec(self) -> &'static Spec {
        &SPECS[self as usize]
    }

    const fn build_spec(self) -> Spec {
        match self {
            GgmlTarget::Q4_0 => legacy_spec(GgmlType::Q4_0, 16, Levels::Offset { zero: 8 }),
            GgmlTarget::Q5_0 => legacy_spec(GgmlType::Q5_0, 32, Levels::Offset { zero: 16 }),
            GgmlTarget::Q8_0 => legacy_spec(GgmlType::Q8_0, 255, Levels::Signed { zero: 127 }),
            GgmlTarget::IQ4_NL => legacy_spec(GgmlType::IQ4_NL, 16, Levels::Table),
            GgmlTarget::Q2_K => k_spec(
                GgmlType::Q2_K,
                16,
                4,
                Levels::Min,
                SubScales::Unsigned { max: 15 },
                (-0.5, 0.1, 15),
            ),
            GgmlTarget::Q3_K => k_spec(
                GgmlType::Q3_K,
                16,
                8,
                Levels::Signed { zero: 4 },
                SubScales::Signed { lo: -32, hi: 31 },
                (0.0, 0.0, 0),
            ),
            GgmlTarget::Q4_K => k_spec(
                GgmlType::Q4_K,
                32,
                16,
                Levels::Min,
                SubScales::Unsigned { max: 63 },
                (-1.0, 0.1, 20),
            ),
            GgmlTarget::Q5_K => k_spec(
                GgmlType::Q5_K,
                32,
                32,
                Levels::Min,
                SubScales::Unsigned { max: 63 },
                (-0.5, 0.1, 15),
            ),
            GgmlTarget::Q6_K => k_spec(
                GgmlType::Q6_K,
                16,
                64,
                Levels::Signed { zero: 32 },
                SubScales::Signed { lo: -128, hi: 127 },
                (0.0, 0.0, 0),
            ),
        }
    }

    /// The ggml tensor type written.
    pub fn ggml_type(self) -> GgmlType {
        self.spec().ty
    }

    /// The ggml type id (`GGML_TYPE_*`).
    pub fn id(self) -> u32 {
        self.ggml_type().id()
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        self.spec().block_len
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml_type().block_bytes()
    }

    /// The name as llama.cpp spells it (`"Q4_K"`).
    pub fn name(self) -> String {
        self.ggml_type().name()
    }

    /// Groups (sub-blocks with their own scale) per block.
    fn groups(self) -> usize {
        let s = self.spec();
        s.block_len / s.group_len
    }

    /// Bytes of a row of `len` weights, or an error naming the length when it is not a whole
    /// number of blocks.
    pub fn row_bytes(self, len: usize) -> Result<usize> {
        let n = self.block_len();
        if len == 0 || !len.is_multiple_of(n) {
            return Err(Error::InvalidOption(format!(
                "a row of {len} weights cannot be stored as {}: its blocks hold {n} weights",
                self.name()
            )));
        }
        Ok(len / n * self.block_bytes())
    }
}

impl FromStr for GgmlTarget {
    type Err = Error;

    /// The target named as llama.cpp names it (`Q4_0`, `IQ4_NL`, `Q4_K`, ...; any case).
    fn from_str(s: &str) -> Result<Self> {
        GgmlTarget::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<String> = GgmlTarget::ALL.iter().map(|t| t.name()).collect();
                Error::InvalidOption(format!(
                    "unknown ggml type '{s}': use one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// The stored parameters of one ggml block, with the per-group factors the decoder computes
/// from them.
#[derive(Clone, Debug, PartialEq)]
pub struct GgmlBlock {
    /// The block's f16 scale.
    pub d: f16,
    /// The f16 scale of the sub-mins (Q2_K, Q4_K, Q5_K; zero otherwise).
    pub dmin: f16,
    /// Integer sub-scales, one per group (K-quants; unused otherwise).
    pub scales: [i16; 16],
    /// Integer sub-mins, one per group (Q2_K, Q4_K, Q5_K; unused otherwise).
    pub mins: [u8; 16],
    /// Per group: `d·sc` (`d` for the types without sub-scales), in f32 as the decoder computes.
    step: [f32; 16],
    /// Per group: `dmin·m` for the types with mins, `−zero·d` for Q4_0/Q5_0.
    offset: [f32; 16],
}

impl GgmlBlock {
    fn new(spec: &Spec, d: f16, dmin: f16, scales: [i16; 16], mins: [u8; 16]) -> GgmlBlock {
        let (df, mf) = (d.to_f32(), dmin.to_f32());
        let mut step = [0.0; 16];
        let mut offset = [0.0; 16];
        match (spec.sub, spec.levels) {
            (SubScales::None, Levels::Offset { zero }) => {
                step[0] = df;
                offset[0] = -f32::from(zero) * df;
            }
            (SubScales::None, _) => step[0] = df,
            _ => {
                for g in 0..spec.block_len / spec.group_len {
                    step[g] = df * f32::from(scales[g]);
                    offset[g] = mf * f32::from(mins[g]);
                }
            }
        }
        GgmlBlock {
            d,
            dmin,
            scales,
            mins,
            step,
            offset,
        }
    }
}

/// `v` rounded to f16, kept finite (ggml would store an infinity for |v| > 65504).
fn to_f16(v: f32) -> f16 {
    if !v.is_finite() {
        return f16::ZERO;
    }
    f16::from_f32(v.clamp(-65504.0, 65504.0))
}

/// The element of largest magnitude (signed), as ggml's reference quantizers pick it.
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

impl GgmlTarget {
    /// Weighted squared error of `weights` against the levels of `codes`.
    fn error_with(&self, b: &GgmlBlock, w: &[f32], h: &[f32], codes: &[u8]) -> f64 {
        let mut e = 0.0f64;
        for i in 0..w.len() {
            let d = w[i] - self.level(b, i, codes[i]);
            e += f64::from(h[i]) * f64::from(d) * f64::from(d);
        }
        e
    }

    /// The nearest codes of `w` and their weighted squared error.
    fn codes_and_error(&self, b: &GgmlBlock, w: &[f32], h: &[f32]) -> (Vec<u8>, f64) {
        let codes: Vec<u8> = w
            .iter()
            .enumerate()
            .map(|(i, &x)| self.nearest(b, i, x))
            .collect();
        let e = self.error_with(b, w, h, &codes);
        (codes, e)
    }

    /// The weighted squared error of `w` against the levels of its nearest codes.
    fn nearest_error(&self, b: &GgmlBlock, w: &[f32], h: &[f32]) -> f64 {
        let mut e = 0.0f32;
        for (i, (&x, &hh)) in w.iter().zip(h).enumerate() {
            let d = x - self.level(b, i, self.nearest(b, i, x));
            e += hh * d * d;
        }
        f64::from(e)
    }

    /// The block of a type without sub-scales with scale `d`.
    fn single(&self, d: f32) -> GgmlBlock {
        GgmlBlock::new(self.spec(), to_f16(d), f16::ZERO, [0; 16], [0; 16])
    }

    /// The integer multiples of `d` the codes of a type without sub-scales stand for.
    fn multiplier(&self, code: u8) -> f32 {
        match self.spec().levels {
            Levels::Offset { zero } | Levels::Signed { zero } => f32::from(i16::from(code) - zero),
            Levels::Table => f32::from(KVALUES_IQ4NL[usize::from(code)]),
            Levels::Min => f32::from(code),
        }
    }

    /// Smallest and largest multiplier of `d` (types without sub-scales, and the groups of
    /// Q3_K/Q6_K).
    fn multiplier_range(&self) -> (f32, f32) {
        let s = self.spec();
        match s.levels {
            Levels::Table => (-127.0, 113.0),
            Levels::Offset { zero } | Levels::Signed { zero } => {
                (-f32::from(zero), (s.codes as f32) - 1.0 - f32::from(zero))
            }
            Levels::Min => (0.0, (s.codes as f32) - 1.0),
        }
    }

    /// Legacy types and IQ4_NL: scales `xmax / t` for `t` around either end of the multiplier
    /// range (ggml's reference is `t` = the negative end; Q8_0's the positive), each rounded to
    /// f16; the best few are refitted by weighted least squares to their codes, and the least
    /// error wins.
    fn fit_single(&self, w: &[f32], h: &[f32]) -> GgmlBlock {
        let xm = signed_absmax(w);
        if xm == 0.0 {
            return self.single(0.0);
        }
        let (lo, hi) = self.multiplier_range();
        let mut cands: Vec<(GgmlBlock, f64)> = Vec::with_capacity(36);
        let mut push = |b: GgmlBlock| {
            let e = self.nearest_error(&b, w, h);
            cands.push((b, e));
        };
        if self == &GgmlTarget::Q8_0 {
            push(self.single(xm.abs() / hi));
        }
        for end in [lo, hi] {
            for i in -8..=8 {
                push(self.single(xm / (end * (1.0 + 0.0125 * i as f32))));
            }
        }
        cands.sort_by(|a, b| a.1.total_cmp(&b.1));
        cands.truncate(REFINED_CANDIDATES);
        cands
            .into_iter()
            .map(|(mut b, _)| {
                let (codes, _) = self.codes_and_error(&b, w, h);
                self.refit(&mut b, w, h, &codes);
                let e = self.nearest_error(&b, w, h);
                (b, e)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(b, _)| b)
            .unwrap_or_else(|| self.single(xm / lo))
    }

    /// Q3_K/Q6_K groups: the float scale `s` of `(q − zero)·s` with least weighted error.
    fn fit_group_signed(&self, x: &[f32], h: &[f32]) -> f32 {
        let xm = signed_absmax(x);
        if xm == 0.0 {
            return 0.0;
        }
        let (lo, hi) = self.multiplier_range();
        let err = |s: f32| -> (f32, f32, f32) {
            // (error, Σh·x·k, Σh·k²) with k the nearest multiplier.
            let (mut e, mut sxk, mut skk) = (0.0f32, 0.0f32, 0.0f32);
            for (&v, &w) in x.iter().zip(h) {
                let k = (v / s).round().clamp(lo, hi);
                let d = v - s * k;
                e += w * d * d;
                sxk += w * v * k;
                skk += w * k * k;
            }
            (e, sxk, skk)
        };
        let mut best = (xm / lo, err(xm / lo).0);
        for end in [lo, hi] {
            for i in -9..=9 {
                let s = xm / (end + 0.1 * i as f32 * end.signum());
                let (e, sxk, skk) = err(s);
                if e < best.1 {
                    best = (s, e);
                }
                if skk > 0.0 {
                    let s2 = sxk / skk;
                    let e2 = err(s2).0;
                    if e2 < best.1 {
                        best = (s2, e2);
                    }
                }
            }
        }
        best.0
    }

    /// Q2_K/Q4_K/Q5_K groups: `(s, m)` of `s·q − m` (s ≥ 0, m ≥ 0) by `make_qkx2_quants`'s sweep
    /// of the min/max range with weighted least squares for each candidate's codes.
    fn fit_group_min(&self, x: &[f32], h: &[f32]) -> (f32, f32) {
        let s = self.spec();
        let nmax = (s.codes - 1) as f32;
        let (rmin, rdelta, nstep) = s.sweep;
        let mut min = x.iter().copied().fold(f32::INFINITY, f32::min);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if min > 0.0 {
            min = 0.0;
        }
        if max <= min {
            return (0.0, -min);
        }
        let err = |sc: f32, mn: f32| -> f32 {
            // level = sc·q − mn with q nearest
            let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
            x.iter()
                .zip(h)
                .map(|(&v, &w)| {
                    let q = ((v + mn) * inv).round().clamp(0.0, nmax);
                    let d = sc * q - mn - v;
                    w * d * d
                })
                .sum()
        };
        let mut best = ((max - min) / nmax, -min);
        let mut best_err = err(best.0, best.1);
        for is in 0..=nstep {
            let iscale = (rmin + rdelta * is as f32 + nmax) / (max - min);
            let (mut sw, mut sx, mut sl, mut sl2, mut sxl) = (0.0f32, 0.0, 0.0, 0.0, 0.0);
            for (&v, &w) in x.iter().zip(h) {
                let l = (iscale * (v - min)).round().clamp(0.0, nmax);
                sw += w;
                sx += w * v;
                sl += w * l;
                sl2 += w * l * l;
                sxl += w * v * l;
            }
            let det = sw * sl2 - sl * sl;
            if det <= 0.0 {
                continue;
            }
            let mut this_scale = (sw * sxl - sx * sl) / det;
            let mut this_min = (sl2 * sx - sl * sxl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sxl / sl2;
            }
            if this_scale <= 0.0 {
                continue;
            }
            let e = err(this_scale, -this_min);
            if e < best_err {
                (best, best_err) = ((this_scale, -this_min), e);
            }
        }
        best
    }

    /// K-quants: per-group float scales (and mins), fitted once with `importance` and once with
    /// ggml's own weights; integer sub-scales for a few super-scales `d` (and `dmin`) around
    /// ggml's choice; the best few candidates after rounding refined (least-squares `d`/`dmin`,
    /// search of the integer sub-scales), the least error winning.
    fn fit_k(&self, w: &[f32], h: &[f32]) -> GgmlBlock {
        let spec = self.spec();
        let (gl, ng) = (spec.group_len, self.groups());
        // Every candidate with the error of its nearest codes; the best few are then refined.
        let mut best: Vec<(GgmlBlock, f64)> = Vec::new();
        let consider = |b: GgmlBlock, best: &mut Vec<(GgmlBlock, f64)>| {
            let e = self.nearest_error(&b, w, h);
            best.push((b, e));
        };
        match spec.sub {
            SubScales::Signed { lo, hi } => {
                for hw in [h.to_vec(), self.ggml_weights(w, h)] {
                    let s: Vec<f32> = (0..ng)
                        .map(|g| self.fit_group_signed(&w[g * gl..][..gl], &hw[g * gl..][..gl]))
                        .collect();
                    let sm = signed_absmax(&s);
                    if sm == 0.0 {
                        continue;
                    }
                    let (flo, fhi) = (f32::from(lo), f32::from(hi));
                    for end in [flo, fhi] {
                        for i in -4..=4 {
                            let d = to_f16(sm / (end * (1.0 + 0.01 * i as f32)));
                            let df = d.to_f32();
                            if df == 0.0 {
                                continue;
                            }
                            let mut sc = [0i16; 16];
                            for g in 0..ng {
                                sc[g] = (s[g] / df).round().clamp(flo, fhi) as i16;
                            }
                            consider(GgmlBlock::new(spec, d, f16::ZERO, sc, [0; 16]), &mut best);
                        }
                    }
                }
            }
            SubScales::Unsigned { max } => {
                for hw in [h.to_vec(), self.ggml_weights(w, h)] {
                    let (s, m): (Vec<f32>, Vec<f32>) = (0..ng)
                        .map(|g| self.fit_group_min(&w[g * gl..][..gl], &hw[g * gl..][..gl]))
                        .unzip();
                    let smax = s.iter().copied().fold(0.0f32, f32::max);
                    let mmax = m.iter().copied().fold(0.0f32, f32::max);
                    let fmax = f32::from(max);
                    let ints = |v: &[f32], d: f32| -> [u8; 16] {
                        let mut out = [0u8; 16];
                        if d > 0.0 {
                            for g in 0..ng {
                                out[g] = (v[g] / d).round().clamp(0.0, fmax) as u8;
                            }
                        }
                        out
                    };
                    let dmin = to_f16(mmax / fmax);
                    for i in 0..6 {
                        let d = to_f16(smax / (fmax * (1.0 - 0.02 * i as f32)));
                        let sc = ints(&s, d.to_f32()).map(i16::from);
                        for j in 0..4 {
                            let dm = if j == 0 {
                                dmin
                            } else {
                                to_f16(mmax / (fmax * (1.0 - 0.03 * j as f32)))
                            };
                            let mi = ints(&m, dm.to_f32());
                            consider(GgmlBlock::new(spec, d, dm, sc, mi), &mut best);
                        }
                    }
                }
            }
            SubScales::None => return self.fit_single(w, h),
        }
        best.sort_by(|a, b| a.1.total_cmp(&b.1));
        best.truncate(REFINED_CANDIDATES);
        best.into_iter()
            .map(|(mut r, _)| {
                let (codes, _) = self.codes_and_error(&r, w, h);
                self.refit(&mut r, w, h, &codes);
                self.improve_groups(&mut r, w, h);
                let (codes, _) = self.codes_and_error(&r, w, h);
                self.refit(&mut r, w, h, &codes);
                let e = self.nearest_error(&r, w, h);
                (r, e)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(b, _)| b)
            .unwrap_or_else(|| GgmlBlock::new(spec, f16::ZERO, f16::ZERO, [0; 16], [0; 16]))
    }

    /// The weights ggml's reference K-quantizers fit each group's scale with, times `h`:
    /// `|x|` (Q2_K), `rms(group) + |x|` (Q4_K, Q5_K), `x²` (Q3_K, Q6_K). Fitting with them too
    /// keeps ggml's own choice among the candidates.
    fn ggml_weights(&self, w: &[f32], h: &[f32]) -> Vec<f32> {
        let gl = self.spec().group_len;
        let mut out = Vec::with_capacity(w.len());
        for (x, hh) in w.chunks_exact(gl).zip(h.chunks_exact(gl)) {
            let av = (x.iter().map(|v| v * v).sum::<f32>() / gl as f32).sqrt();
            out.extend(x.iter().zip(hh).map(|(&v, &hv)| {
                hv * match self {
                    GgmlTarget::Q2_K => v.abs(),
                    GgmlTarget::Q4_K | GgmlTarget::Q5_K => av + v.abs(),
                    _ => v * v,
                }
            }));
        }
        out
    }

    /// K-quants: moves each group's integer sub-scale (by up to 2) and sub-min (by up to 4) where that lowers
    /// the group's error with nearest codes (rounding each on its own is not the best pair).
    fn improve_groups(&self, b: &mut GgmlBlock, w: &[f32], h: &[f32]) {
        let spec = self.spec();
        let gl = spec.group_len;
        let (lo, hi, mhi) = match spec.sub {
            SubScales::None => return,
            SubScales::Signed { lo, hi } => (lo, hi, 0),
            SubScales::Unsigned { max } => (0, i16::from(max), max),
        };
        let group_error = |b: &GgmlBlock, g: usize| -> f64 {
            let mut e = 0.0f64;
            for i in g * gl..(g + 1) * gl {
                let d = w[i] - self.level(b, i, self.nearest(b, i, w[i]));
                e += f64::from(h[i]) * f64::from(d) * f64::from(d);
            }
            e
        };
        for g in 0..self.groups() {
            let mut best_err = group_error(b, g);
            let (s0, m0) = (b.scales[g], b.mins[g]);
            let mut best = (s0, m0);
            let dms: &[i16] = if spec.levels == Levels::Min {
                &[-4, -3, -2, -1, 0, 1, 2, 3, 4]
            } else {
                &[0]
            };
            for ds in -2i16..=2 {
                for &dm in dms {
                    let (s, m) = (s0 + ds, i16::from(m0) + dm);
                    if (ds == 0 && dm == 0) || s < lo || s > hi || m < 0 || m > i16::from(mhi) {
                        continue;
                    }
                    let mut scales = b.scales;
                    let mut mins = b.mins;
                    scales[g] = s;
                    mins[g] = m as u8;
                    let cand = GgmlBlock::new(spec, b.d, b.dmin, scales, mins);
                    let e = group_error(&cand, g);
                    if e < best_err {
                        (best, best_err) = ((s, m as u8), e);
                    }
                }
            }
            if best != (s0, m0) {
                b.scales[g] = best.0;
                b.mins[g] = best.1;
                *b = GgmlBlock::new(spec, b.d, b.dmin, b.scales, b.mins);
            }
        }
    }

    /// The bytes of one row: its blocks (one per `block_len` weights) and codes (one per
    /// weight), in ggml's block layout.
    pub fn encode_row(&self, blocks: &[GgmlBlock], codes: &[u8]) -> Result<Vec<u8>> {
        let n = self.block_len();
        if codes.len() != blocks.len() * n {
            return Err(Error::InvalidOption(format!(
                "{} row: {} codes for {} blocks of {n}",
                self.name(),
                codes.len(),
                blocks.len()
            )));
        }
        if let Some(c) = codes.iter().find(|&&c| usize::from(c) >= self.codes()) {
            return Err(Error::InvalidOption(format!(
                "{} row: code {c} is out of range 0..{}",
                self.name(),
                self.codes()
            )));
        }
        let mut out = Vec::with_capacity(blocks.len() * self.block_bytes());
        for (b, q) in blocks.iter().zip(codes.chunks_exact(n)) {
            let start = out.len();
            self.encode_block(b, q, &mut out)?;
            debug_assert_eq!(out.len() - start, self.block_bytes());
        }
        Ok(out)
    }

    fn encode_block(&self, b: &GgmlBlock, q: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let d = b.d.to_le_bytes();
        let dmin = b.dmin.to_le_bytes();
        let nibbles = |q: &[u8], out: &mut Vec<u8>| {
            out.extend((0..16).map(|j| (q[j] & 0xF) | (q[j + 16] << 4)));
        };
        let scale_range = |lo: i16, hi: i16| -> Result<()> {
            match b.scales[..self.groups()]
                .iter()
                .find(|&&s| s < lo || s > hi)
            {
                Some(s) => Err(Error::InvalidOption(format!(
                    "{} block: sub-scale {s} is out of range {lo}..={hi}",
                    self.name()
                ))),
                None => Ok(()),
            }
        };
        let mins_range = |hi: u8| -> Result<()> {
            match b.mins[..self.groups()].iter().find(|&&m| m > hi) {
                Some(m) => Err(Error::InvalidOption(format!(
                    "{} block: sub-min {m} is out of range 0..={hi}",
                    self.name()
                ))),
                None => Ok(()),
            }
        };
        match self {
            GgmlTarget::Q4_0 | GgmlTarget::IQ4_NL => {
                out.extend(d);
                nibbles(q, out);
            }
            GgmlTarget::Q5_0 => {
                out.extend(d);
                let qh = (0..32).fold(0u32, |h, j| h | (u32::from(q[j] >> 4) << j));
                out.extend(qh.to_le_bytes());
                nibbles(q, out);
            }
            GgmlTarget::Q8_0 => {
                out.extend(d);
                out.extend(q.iter().map(|&c| c.wrapping_sub(127)));
            }
            GgmlTarget::Q2_K => {
                scale_range(0, 15)?;
                mins_range(15)?;
                out.extend((0..16).map(|g| (b.scales[g] as u8) | (b.mins[g] << 4)));
                let mut qs = [0u8; 64];
                for (e, &c) in q.iter().enumerate() {
                    let (g, l) = (e / 16, e % 16);
                    let (half, r) = (g / 8, g % 8);
                    qs[32 * half + 16 * (r % 2) + l] |= (c & 3) << (2 * (r / 2));
                }
                out.extend(qs);
                out.extend(d);
                out.extend(dmin);
            }
            GgmlTarget::Q3_K => {
                scale_range(-32, 31)?;
                let mut hmask = [0u8; 32];
                let mut qs = [0u8; 64];
                for (e, &c) in q.iter().enumerate() {
                    let (g, l) = (e / 16, e % 16);
                    let (half, r) = (g / 8, g % 8);
                    let (shift, k) = (r / 2, r % 2);
                    qs[32 * half + 16 * k + l] |= (c & 3) << (2 * shift);
                    if c & 4 != 0 {
                        hmask[16 * k + l] |= 1 << (4 * half + shift);
                    }
                }
                let mut sc = [0u8; 12];
                for j in 0..16 {
                    let v = (b.scales[j] + 32) as u8;
                    if j < 8 {
                        sc[j] |= v & 0xF;
                    } else {
                        sc[j - 8] |= (v & 0xF) << 4;
                    }
                    sc[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
                }
                out.extend(hmask);
                out.extend(qs);
                out.extend(sc);
                out.extend(d);
            }
            GgmlTarget::Q4_K | GgmlTarget::Q5_K => {
                scale_range(0, 63)?;
                mins_range(63)?;
                out.extend(d);
                out.extend(dmin);
                let (s, m) = (b.scales.map(|v| v as u8), b.mins);
                let mut sc = [0u8; 12];
                for j in 0..4 {
                    sc[j] = s[j] | ((s[j + 4] >> 4) << 6);
                    sc[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
                    sc[j + 8] = (s[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
                }
                out.extend(sc);
                let mut qh = [0u8; 32];
                let mut qs = [0u8; 128];
                for (e, &c) in q.iter().enumerate() {
                    let (g, l) = (e / 32, e % 32);
                    qs[32 * (g / 2) + l] |= (c & 0xF) << (4 * (g % 2));
                    qh[l] |= ((c >> 4) & 1) << g;
                }
                if self == &GgmlTarget::Q5_K {
                    out.extend(qh);
                }
                out.extend(qs);
            }
            GgmlTarget::Q6_K => {
                scale_range(-128, 127)?;
                let mut ql = [0u8; 128];
                let mut qh = [0u8; 64];
                for (e, &c) in q.iter().enumerate() {
                    let (half, r) = (e / 128, e % 128);
                    let (k, l) = (r / 32, r % 32);
                    ql[64 * half + l + 32 * (k % 2)] |= (c & 0xF) << (4 * (k / 2));
                    qh[32 * half + l] |= (c >> 4) << (2 * k);
                }
                out.extend(ql);
                out.extend(qh);
                out.extend(b.scales.map(|v| v as i8 as u8));
                out.extend(d);
            }
        }
        Ok(())
    }
}

impl Grid for GgmlTarget {
    type Block = GgmlBlock;

    fn block_len(&self) -> usize {
        self.spec().block_len
    }

    fn codes(&self) -> usize {
        self.spec().codes
    }

    fn fit(&self, weights: &[f32], importance: &[f32]) -> GgmlBlock {
        match self.spec().sub {
            SubScales::None => self.fit_single(weights, importance),
            _ => self.fit_k(weights, importance),
        }
    }

    fn level(&self, b: &GgmlBlock, index: usize, code: u8) -> f32 {
        let s = self.spec();
        let g = index / s.group_len;
        match s.levels {
            Levels::Offset { .. } => b.step[0] * f32::from(code) + b.offset[0],
            Levels::Signed { zero } => b.step[g] * f32::from(i16::from(code) - zero),
            Levels::Min => b.step[g] * f32::from(code) - b.offset[g],
            Levels::Table => b.step[0] * f32::from(KVALUES_IQ4NL[usize::from(code & 0xF)]),
        }
    }

    /// The rounded position on the uniform grid, then its neighbours compared by level; a scan
    /// of the codebook for IQ4_NL.
    fn nearest(&self, b: &GgmlBlock, index: usize, w: f32) -> u8 {
        let s = self.spec();
        let g = index / s.group_len;
        let top = (s.codes - 1) as f32;
        let step = b.step[g];
        let guess = match s.levels {
            Levels::Table => {
                let mut best = (0u8, f32::INFINITY);
                for c in 0..16u8 {
                    let d = (self.level(b, index, c) - w).abs();
                    if d < best.1 {
                        best = (c, d);
                    }
                }
                return best.0;
            }
            _ if step == 0.0 || !step.is_finite() => {
                return match s.levels {
                    Levels::Offset { zero } | Levels::Signed { zero } => zero as u8,
                    _ => 0,
                };
            }
            Levels::Offset { .. } => (w - b.offset[0]) / step,
            Levels::Signed { zero } => w / step + f32::from(zero),
            Levels::Min => (w + b.offset[g]) / step,
        };
        let c = guess.round().clamp(0.0, top) as u8;
        let mut best = (c, (self.level(b, index, c) - w).abs());
        for n in [c.checked_sub(1), c.checked_add(1)].into_iter().flatten() {
            if usize::from(n) < s.codes {
                let d = (self.level(b, index, n) - w).abs();
                if d < best.1 {
                    best = (n, d);
                }
            }
        }
        best.0
    }

    /// Weighted least squares of the stored scale(s) for the fixed codes and sub-scales: `d` for
    /// the types without mins, `(d, dmin)` jointly for Q2_K/Q4_K/Q5_K. Kept (rounded to f16) only
    /// when it lowers the error of `codes`.
    fn refit(&self, block: &mut GgmlBlock, weights: &[f32], importance: &[f32], codes: &[u8]) {
        let spec = self.spec();
        let before = self.error_with(block, weights, importance, codes);
        let gl = spec.group_len;
        // level_i = d·a_i − dmin·b_i
        let (mut saa, mut sab, mut sbb, mut sxa, mut sxb) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
        for (i, ((&x, &h), &c)) in weights.iter().zip(importance).zip(codes).enumerate() {
            let g = i / gl;
            let sc = match spec.sub {
                SubScales::None => 1.0,
                _ => f64::from(block.scales[g]),
            };
            let a = sc * f64::from(self.multiplier(c));
            let bm = match spec.levels {
                Levels::Min => f64::from(block.mins[g]),
                _ => 0.0,
            };
            let (x, h) = (f64::from(x), f64::from(h));
            saa += h * a * a;
            sab += h * a * bm;
            sbb += h * bm * bm;
            sxa += h * x * a;
            sxb += h * x * bm;
        }
        let (d, dmin) = if spec.levels == Levels::Min {
            // minimize Σh(x − d·a + dm·b)²: [saa −sab; −sab sbb]·[d; dm] = [sxa; −sxb]
            let det = saa * sbb - sab * sab;
            if det <= 0.0 {
                return;
            }
            let d = (sxa * sbb - sab * sxb) / det;
            let dm = (sab * sxa - saa * sxb) / det;
            (d, dm.max(0.0))
        } else {
            if saa <= 0.0 {
                return;
            }
            (sxa / saa, 0.0)
        };
        let cand = GgmlBlock::new(
            spec,
            to_f16(d as f32),
            to_f16(dmin as f32),
            block.scales,
            block.mins,
        );
        if self.error_with(&cand, weights, importance, codes) < before {
            *block = cand;
        }
    }
}

/// Quantizes one row to `target` by round-to-nearest on fitted blocks and returns its ggml bytes;
/// `importance` weighs each weight's squared error (len = `weights.len()`).
pub fn quantize_row_rtn(
    target: GgmlTarget,
    weights: &[f32],
    importance: &[f32],
) -> Result<Vec<u8>> {
    target.row_bytes(weights.len())?;
    if importance.len() != weights.len() {
        return Err(Error::InvalidOption(format!(
            "{} importance values for a row of {} weights",
            importance.len(),
            weights.len()
        )));
    }
    let n = target.block_len();
    let mut blocks = Vec::with_capacity(weights.len() / n);
    let mut codes = Vec::with_capacity(weights.len());
    for (w, h) in weights.chunks_exact(n).zip(importance.chunks_exact(n)) {
        let b = target.fit(w, h);
        codes.extend(w.iter().enumerate().map(|(i, &x)| target.nearest(&b, i, x)));
        blocks.push(b);
    }
    target.encode_row(&blocks, &codes)
}

#[cfg(test)]
mod tests;
