//! NEON `dot` and `axpy` (and their many-row forms): the scalar reference's operations (eight lanes as two vectors, fused
//! multiply-adds, lanes summed in order, then the tail), so results are bit-identical to it.

use std::arch::aarch64::*;

/// # Safety
/// The CPU supports NEON, and `a.len() == b.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: the caller's contract.
    let (lo, hi, n) = unsafe { lanes(a, b) };
    finish(lo, hi, &a[n..], &b[n..])
}

/// The eight interleaved partial sums of `a·b` over its first `n` (a multiple of 8) values, as
/// two vectors, and `n`.
///
/// # Safety
/// The CPU supports NEON, and `a.len() == b.len()`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn lanes(a: &[f32], b: &[f32]) -> (float32x4_t, float32x4_t, usize) {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len() / 8 * 8;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= len of both slices.
        unsafe {
            lo = vfmaq_f32(lo, vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            hi = vfmaq_f32(hi, vld1q_f32(pa.add(i + 4)), vld1q_f32(pb.add(i + 4)));
        }
        i += 8;
    }
    (lo, hi, n)
}

/// The lanes of `lo`, `hi` summed in order, plus the products of the tails.
#[inline]
#[target_feature(enable = "neon")]
fn finish(lo: float32x4_t, hi: float32x4_t, a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 f32s.
    unsafe {
        vst1q_f32(lanes.as_mut_ptr(), lo);
        vst1q_f32(lanes.as_mut_ptr().add(4), hi);
    }
    let tail: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `out = Σ_p w[p]·rows[p]` from zero, in row order, with 64 columns of `out` held in registers
/// while the rows go past.
///
/// # Safety
/// The CPU supports NEON, and `rows.len() == w.len() * out.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn weighted_row_sum(out: &mut [f32], w: &[f32], rows: &[f32]) {
    let len = out.len();
    debug_assert_eq!(rows.len(), w.len() * len);
    let pr = rows.as_ptr();
    let mut c0 = 0;
    while c0 + 64 <= len {
        let mut acc = [vdupq_n_f32(0.0); 16];
        for (p, &wp) in w.iter().enumerate() {
            let wv = vdupq_n_f32(wp);
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: p < w.len() and c0 + 4k + 4 <= len, so the 4 values lie in row p.
                let v = unsafe { vld1q_f32(pr.add(p * len + c0 + 4 * k)) };
                *acc = vfmaq_f32(*acc, wv, v);
            }
        }
        for (k, &acc) in acc.iter().enumerate() {
            // SAFETY: c0 + 4k + 4 <= len.
            unsafe { vst1q_f32(out.as_mut_ptr().add(c0 + 4 * k), acc) };
        }
        c0 += 64;
    }
    while c0 + 4 <= len {
        let mut acc = vdupq_n_f32(0.0);
        for (p, &wp) in w.iter().enumerate() {
            // SAFETY: as above, for one vector.
            let v = unsafe { vld1q_f32(pr.add(p * len + c0)) };
            acc = vfmaq_f32(acc, vdupq_n_f32(wp), v);
        }
        // SAFETY: c0 + 4 <= len.
        unsafe { vst1q_f32(out.as_mut_ptr().add(c0), acc) };
        c0 += 4;
    }
    for j in c0..len {
        let mut o = 0.0f32;
        for (p, &wp) in w.iter().enumerate() {
            o = wp.mul_add(rows[p * len + j], o);
        }
        out[j] = o;
    }
}

/// # Safety
/// The CPU supports NEON, and `y.len() == x.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn axpy(y: &mut [f32], w: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    let n = y.len();
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let wv = vdupq_n_f32(w);
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n = len of both slices; `y` and `x` do not overlap (`&mut` vs `&`).
        unsafe {
            vst1q_f32(
                py.add(i),
                vfmaq_f32(vld1q_f32(py.add(i)), wv, vld1q_f32(px.add(i))),
            )
        };
        i += 4;
    }
    for j in i..n {
        y[j] = w.mul_add(x[j], y[j]);
    }
}

/// One pair of `dot_matrix`: the lanes of [`dot`], added pairwise as
/// [`super::pair_lanes_sum`] (`vpaddq` adds neighbouring lanes), then the tail.
///
/// # Safety
/// The CPU supports NEON, and `a.len() == b.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn pair_dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: the caller's contract.
    let (lo, hi, n) = unsafe { lanes(a, b) };
    // [l0+l1, l2+l3, l4+l5, l6+l7], then [(l0+l1)+(l2+l3), (l4+l5)+(l6+l7), ..].
    let pairs = vpaddq_f32(lo, hi);
    let quads = vpaddq_f32(pairs, pairs);
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    (vgetq_lane_f32::<0>(quads) + vgetq_lane_f32::<1>(quads)) + tail
}
