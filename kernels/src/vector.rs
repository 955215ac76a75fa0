//! Small f32 vector operations for the parts of a forward pass that are not matrix products
//! (attention scores and value sums): `dot` and `axpy`, and their many-row forms `dot_rows` and
//! `weighted_row_sum`, on the [`Cpu`]'s ISA; and `widen_f16` for caches stored as f16.
//!
//! The scalar path keeps eight interleaved partial sums (lane `i mod 8`, mul then add), sums the lanes
//! in order and adds the tail last; the SIMD paths perform exactly these operations, so every ISA
//! gives the same bits. That matters more than the few cycles FMA would save: the activation tables
//! that follow attention round to int8, so a last-bit difference here becomes a different
//! quantization noise downstream, and greedy outputs would depend on the ISA.

#[cfg(target_arch = "x86_64")]
mod avx2;
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

/// `out[p] = dot(a, rows[p])` for the rows of `rows` (`[out.len()][a.len()]`), with the bits of
/// [`dot`] for each row. Panics if the lengths disagree (a caller bug, not bad input).
pub fn dot_rows(cpu: &Cpu, a: &[f32], rows: &[f32], out: &mut [f32]) {
    assert_eq!(
        rows.len(),
        out.len() * a.len(),
        "dot_rows: rows of different lengths"
    );
    if a.is_empty() {
        out.fill(0.0);
        return;
    }
    match cpu.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`; `rows` holds `out.len()` rows of `a.len()` values.
        Isa::Avx2 => unsafe { avx2::dot_rows(a, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon::dot_rows(a, rows, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(a.len())) {
                *o = scalar_dot(a, row);
            }
        }
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
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The reference `axpy`.
pub(crate) fn scalar_axpy(y: &mut [f32], w: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += w * x;
    }
}
