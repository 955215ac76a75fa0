//! Small f32 vector operations for the parts of a forward pass that are not matrix products
//! (attention scores and value sums): `dot` and `axpy`, the many-row form of `axpy`
//! `weighted_row_sum`, and the many-query forms `dot_matrix` and `weighted_row_sums` (a batch of
//! queries against one block of keys and values, register-blocked); `segment_dots`, the dots of
//! consecutive segments of two vectors; the softmax steps
//! `scale_max` and `exp_sum`; the gated activations `silu_mul` and `gelu_tanh_mul`; and `widen_f16` for caches stored as f16, all on the [`Cpu`]'s ISA.
//!
//! The scalar path keeps eight interleaved partial sums (lane `i mod 8`, each product fused into
//! its lane with `mul_add`), sums the lanes in order and adds the tail's plain products last; the
//! SIMD paths perform exactly these operations (FMA instructions), so every ISA gives the same
//! bits. That matters: the activation tables that follow attention round to int8, so a last-bit
//! difference here becomes a different quantization noise downstream, and greedy outputs would
//! depend on the ISA. (`f32::mul_add` is a libm call where the compiler may not assume FMA, which
//! only the scalar path on x86 pays.) On x86-64 CPUs with AVX-512 F, `dot_matrix`,
//! `weighted_row_sums` and `exp_sum` run the AVX2 forms' operations on 512-bit registers (two of
//! their eight-lane vectors in one), so the bits stay the same.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

use half::f16;

use crate::cpu::Cpu;
use crate::isa::Isa;

/// `Σ a[i]·b[i]`. Panics if the lengths differ (a caller bug, not bad input).
pub fn dot(cpu: &Cpu, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of vectors of different lengths");
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a Cpu holds Isa::Avx2 only when avx2+fma were detected; the lengths are equal.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a Cpu holds Isa::Neon only when NEON was detected; the lengths are equal.
        Isa::Neon => unsafe { neon::dot(a, b) },
        _ => scalar_dot(a, b),
    }
}

/// `y[i] += w·x[i]`. Panics if the lengths differ (a caller bug, not bad input).
pub fn axpy(cpu: &Cpu, y: &mut [f32], w: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len(), "axpy of vectors of different lengths");
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`.
        Isa::Avx2 => unsafe { avx2::axpy(y, w, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as in `dot`.
        Isa::Neon => unsafe { neon::axpy(y, w, x) },
        _ => scalar_axpy(y, w, x),
    }
}

/// `out = Σ_p weights[p]·rows[p]` (`rows` is `[weights.len()][out.len()]`), summed in row order
/// from zero: the bits of `out.fill(0.0)` followed by one [`axpy`] per row. Panics if the lengths
/// disagree (a caller bug, not bad input).
pub fn weighted_row_sum(cpu: &Cpu, out: &mut [f32], weights: &[f32], rows: &[f32]) {
    assert_eq!(
        rows.len(),
        weights.len() * out.len(),
        "weighted_row_sum: rows of different lengths"
    );
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`; `rows` holds `weights.len()` rows of `out.len()` values.
        Isa::Avx2 => unsafe { avx2::weighted_row_sum(out, weights, rows) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon::weighted_row_sum(out, weights, rows) },
        _ => {
            out.fill(0.0);
            if !out.is_empty() {
                for (&w, row) in weights.iter().zip(rows.chunks_exact(out.len())) {
                    scalar_axpy(out, w, row);
                }
            }
        }
    }
}

/// `out[i·m + j] = a_i · b_j` for every row `a_i` of `a` and `b_j` of `b` (rows of `len` values;
/// `m = b.len() / len`). Each pair is summed as [`dot`] sums, in eight interleaved lanes, but the
/// lanes are added pairwise, `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`, then the tail:
/// on AVX2 two rows of `a` meet four of `b` at a time and the eight pairs' lanes are added by a few
/// horizontal adds instead of a store and eight scalar adds per pair. Every ISA gives the bits of
/// the scalar form.
/// Panics if the lengths disagree (a caller bug, not bad input).
pub fn dot_matrix(cpu: &Cpu, a: &[f32], b: &[f32], len: usize, out: &mut [f32]) {
    if len == 0 {
        assert!(a.is_empty() && b.is_empty(), "dot_matrix: rows of length 0");
        out.fill(0.0);
        return;
    }
    assert!(
        a.len().is_multiple_of(len)
            && b.len().is_multiple_of(len)
            && out.len() == a.len() / len * (b.len() / len),
        "dot_matrix: rows of different lengths"
    );
    let m = b.len() / len;
    if m == 0 {
        return;
    }
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as below, and `available` detected AVX-512 F.
        Isa::Avx2 if avx512::available() => unsafe { avx512::dot_matrix(a, b, len, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`; `a`, `b` hold whole rows of `len > 0` values and `out` one value
        // per pair.
        Isa::Avx2 => unsafe { avx2::dot_matrix(a, b, len, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => {
            for (row, o) in a.chunks_exact(len).zip(out.chunks_exact_mut(m)) {
                for (o, b_row) in o.iter_mut().zip(b.chunks_exact(len)) {
                    // SAFETY: as in `dot`; both rows have `len` values.
                    *o = unsafe { neon::pair_dot(row, b_row) };
                }
            }
        }
        _ => {
            for (row, o) in a.chunks_exact(len).zip(out.chunks_exact_mut(m)) {
                for (o, b_row) in o.iter_mut().zip(b.chunks_exact(len)) {
                    *o = scalar_pair_dot(row, b_row);
                }
            }
        }
    }
}

/// `out[s] = a_s · b_s` for the consecutive segments `a_s`, `b_s` of `len` values of `a` and
/// `b` (`out.len()` segments each), every segment summed as [`dot_matrix`] sums a pair. Panics if
/// the lengths disagree (a caller bug, not bad input).
pub fn segment_dots(cpu: &Cpu, a: &[f32], b: &[f32], len: usize, out: &mut [f32]) {
    assert!(
        a.len() == out.len() * len && b.len() == a.len(),
        "segment_dots: {} and {} values for {} segments of {len}",
        a.len(),
        b.len(),
        out.len()
    );
    if len == 0 {
        out.fill(0.0);
        return;
    }
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`; `a` and `b` hold `out.len()` segments of `len > 0` values.
        Isa::Avx2 => unsafe { avx2::segment_dots(a, b, len, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => {
            for ((o, a), b) in out
                .iter_mut()
                .zip(a.chunks_exact(len))
                .zip(b.chunks_exact(len))
            {
                // SAFETY: as in `dot`; both segments have `len` values.
                *o = unsafe { neon::pair_dot(a, b) };
            }
        }
        _ => {
            for ((o, a), b) in out
                .iter_mut()
                .zip(a.chunks_exact(len))
                .zip(b.chunks_exact(len))
            {
                *o = scalar_pair_dot(a, b);
            }
        }
    }
}

/// `out_i = Σ_p weights[i·p_len + p]·rows[p]` for each row `out_i` of `out` (`rows` is
/// `[p_len][len]`, `len = rows.len() / p_len`), each with the bits of [`weighted_row_sum`].
/// On AVX2 two output rows share each load of a row. Panics if the lengths disagree (a caller
/// bug, not bad input).
pub fn weighted_row_sums(cpu: &Cpu, out: &mut [f32], weights: &[f32], rows: &[f32], len: usize) {
    if len == 0 {
        assert!(
            out.is_empty() && rows.is_empty(),
            "weighted_row_sums: rows of length 0"
        );
        return;
    }
    assert!(
        out.len().is_multiple_of(len) && rows.len().is_multiple_of(len),
        "weighted_row_sums: rows of different lengths"
    );
    let p_len = rows.len() / len;
    assert_eq!(
        weights.len(),
        out.len() / len * p_len,
        "weighted_row_sums: weights of different lengths"
    );
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as below, and `available` detected AVX-512 F.
        Isa::Avx2 if avx512::available() => unsafe {
            avx512::weighted_row_sums(out, weights, rows, len)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`; `out` is whole rows of `len > 0` values, `rows` `p_len` of them and
        // `weights` `p_len` per output row.
        Isa::Avx2 => unsafe { avx2::weighted_row_sums(out, weights, rows, len) },
        _ => {
            if p_len == 0 {
                out.fill(0.0);
                return;
            }
            for (o, w) in out.chunks_exact_mut(len).zip(weights.chunks_exact(p_len)) {
                weighted_row_sum(cpu, o, w, rows);
            }
        }
    }
}

/// `x[i] *= scale` in place; returns the largest result (`-inf` for no values). Every ISA gives
/// the bits of the scalar form (eight interleaved maxima).
pub fn scale_max(cpu: &Cpu, x: &mut [f32], scale: f32) -> f32 {
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a Cpu holds Isa::Avx2 only when avx2+fma were detected.
        Isa::Avx2 => unsafe { avx2::scale_max(x, scale) },
        _ => scalar_scale_max(x, scale),
    }
}

/// `x[i] = exp(x[i] − shift)` in place (the polynomial [`exp`]); returns their sum, taken in eight
/// interleaved partial sums. Every ISA gives the bits of the scalar form.
pub fn exp_sum(cpu: &Cpu, x: &mut [f32], shift: f32) -> f32 {
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as below, and `available` detected AVX-512 F.
        Isa::Avx2 if avx512::available() => unsafe { avx512::exp_sum(x, shift) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a Cpu holds Isa::Avx2 only when avx2+fma were detected.
        Isa::Avx2 => unsafe { avx2::exp_sum(x, shift) },
        _ => scalar_exp_sum(x, shift),
    }
}

/// `out[i] = gate[i] / (1 + e^(−gate[i])) · up[i]`: SiLU of the gate times the up projection
/// (SwiGLU), with the polynomial [`exp`] (accurate on the whole f32 range it is clamped to, either
/// sign). Every ISA gives the bits of the scalar form. Panics if the lengths differ (a caller bug).
pub fn silu_mul(cpu: &Cpu, out: &mut [f32], gate: &[f32], up: &[f32]) {
    gated_mul::<false>(cpu, out, gate, up);
}

/// `out[i] = GELU(gate[i]) · up[i]` with GELU's tanh approximation (Gemma's GeGLU),
/// `0.5·g·(1 + tanh(u))` with `u = √(2/π)·(g + 0.044715·g³)`, computed as `g / (1 + e^(−2u))`
/// (the same value: `1 + tanh(u) = 2 / (1 + e^(−2u))`) with the polynomial [`exp`], so no
/// cancellation near 0. Every ISA gives the bits of the scalar form. Panics if the lengths differ.
pub fn gelu_tanh_mul(cpu: &Cpu, out: &mut [f32], gate: &[f32], up: &[f32]) {
    gated_mul::<true>(cpu, out, gate, up);
}

/// `2·√(2/π)` and the cubic coefficient of GELU's tanh approximation.
const GELU_2K: f32 = 1.595_769_2;
const GELU_C: f32 = 0.044_715;

fn gated_mul<const GELU: bool>(cpu: &Cpu, out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "gated activation of slices of different lengths"
    );
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a Cpu holds Isa::Avx2 only when avx2+fma were detected; the lengths are equal.
        Isa::Avx2 => unsafe { avx2::gated_mul::<GELU>(out, gate, up) },
        _ => scalar_gated_mul::<GELU>(out, gate, up),
    }
}

/// The reference of [`silu_mul`] (`GELU` false) and [`gelu_tanh_mul`] (true):
/// `g / (1 + e^(−z)) · u` with `z = g`, or `z = 2√(2/π)·(g·(1 + (0.044715·g)·g))`.
pub(crate) fn scalar_gated_mul<const GELU: bool>(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let z = if GELU {
            GELU_2K * (g * (1.0 + GELU_C * g * g))
        } else {
            g
        };
        *o = g / (1.0 + exp(-z)) * u;
    }
}

/// The reference `scale_max`: eight interleaved maxima, then the tail.
pub(crate) fn scalar_scale_max(x: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut blocks = x.chunks_exact_mut(8);
    for block in &mut blocks {
        for (lane, v) in lanes.iter_mut().zip(block) {
            *v *= scale;
            *lane = lane.max(*v);
        }
    }
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in blocks.into_remainder() {
        *v *= scale;
        max = max.max(*v);
    }
    max
}

/// The reference `exp_sum`.
pub(crate) fn scalar_exp_sum(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    let mut lanes = [0.0f32; 8];
    let mut blocks = x.chunks_exact(8);
    for block in &mut blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
}

/// Constants of [`exp`], shared with its SIMD forms.
mod exp_consts {
    pub const LOG2_E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Adding and subtracting 1.5·2^23 rounds to the nearest integer in f32 arithmetic.
    pub const ROUND: f32 = 12_582_912.0;
    /// Cephes' `expf` polynomial, highest degree first.
    pub const P: [f32; 6] = [
        1.987_569_2e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
    pub const LO: f32 = -87.0;
    pub const HI: f32 = 88.0;
}

/// `e^x` within 2 units in the last place of f32 for `−87 ≤ x ≤ 88` (softmax weights, SiLU);
/// below that it returns about `1.6e-38` instead of a smaller number or 0, which
/// is nothing next to the weight 1 of the maximum.
///
/// `e^x = 2^n · e^r` with `n` the integer nearest `x / ln 2` and `|r| ≤ ln 2 / 2` (ln 2 split in two
/// parts, so `r` is exact), `e^r` by Cephes' `expf` polynomial. Plain multiplications and
/// additions (no fused ones, no branch, no float-to-int conversion), so its SIMD forms give the
/// same bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    use exp_consts::*;
    let x = x.clamp(LO, HI);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let e_r = p * r * r + r + 1.0;
    // 2^n as an f32: n is in −126..=127 after the clamp, a normal exponent. The integer n + 127
    // is read from the low bits of (n + 127) + 1.5·2^23.
    let biased = (n + 127.0 + ROUND).to_bits() - ROUND.to_bits();
    e_r * f32::from_bits(biased << 23)
}

/// `dst[i] = src[i]` widened from f16 to f32 (exact: every f16 value is an f32 value), eight per
/// instruction with F16C on AVX2 machines. Panics if the lengths differ (a caller bug).
pub fn widen_f16(cpu: &Cpu, src: &[f16], dst: &mut [f32]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "widen_f16 of slices of different lengths"
    );
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a Cpu holds Isa::Avx2 only when avx2, fma and f16c were detected; the lengths
        // are equal.
        Isa::Avx2 => unsafe { avx2::widen_f16(src, dst) },
        // `half` converts with the CPU's own instructions where it detects them (aarch64 fp16).
        Isa::Neon => half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst),
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
    }
}

/// The reference `dot`: eight interleaved partial sums, then the tail.
pub(crate) fn scalar_dot(a: &[f32], b: &[f32]) -> f32 {
    let (lanes, tail) = scalar_lanes(a, b);
    lanes.iter().sum::<f32>() + tail
}

/// The eight interleaved partial sums of `a·b` (lane `i mod 8`, fused multiply-add) and the sum of the
/// tail's products.
fn scalar_lanes(a: &[f32], b: &[f32]) -> ([f32; 8], f32) {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    (acc, tail)
}

/// The reference pair of [`dot_matrix`]: the lanes of [`scalar_dot`], added pairwise.
pub(crate) fn scalar_pair_dot(a: &[f32], b: &[f32]) -> f32 {
    let (lanes, tail) = scalar_lanes(a, b);
    pair_lanes_sum(lanes) + tail
}

/// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`: the lane order of [`dot_matrix`].
#[inline]
pub(crate) fn pair_lanes_sum(l: [f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// The reference `axpy`.
pub(crate) fn scalar_axpy(y: &mut [f32], w: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = w.mul_add(x, *y);
    }
}
