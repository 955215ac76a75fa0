//! NEON `dot` and `axpy`, 8 elements per step.

use std::arch::aarch64::*;

/// # Safety
/// The CPU supports NEON, and `a.len() == b.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n = len of both slices.
        unsafe {
            s0 = vfmaq_f32(s0, vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            s1 = vfmaq_f32(s1, vld1q_f32(pa.add(i + 4)), vld1q_f32(pb.add(i + 4)));
        }
        i += 8;
    }
    let mut sum = vaddvq_f32(vaddq_f32(s0, s1));
    for j in i..n {
        sum += a[j] * b[j];
    }
    sum
}

/// # Safety
/// The CPU supports NEON, and `y.len() == x.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn axpy(y: &mut [f32], w: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    let n = y.len();
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n = len of both slices; `y` and `x` do not overlap (`&mut` vs `&`).
        unsafe {
            vst1q_f32(
                py.add(i),
                vfmaq_n_f32(vld1q_f32(py.add(i)), vld1q_f32(px.add(i)), w),
            )
        };
        i += 4;
    }
    for j in i..n {
        y[j] += w * x[j];
    }
}
