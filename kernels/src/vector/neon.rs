//! NEON `dot` and `axpy`: the scalar reference's operations (eight lanes as two vectors, mul then
//! add, lanes summed in order, then the tail), so results are bit-identical to it.

use std::arch::aarch64::*;

/// # Safety
/// The CPU supports NEON, and `a.len() == b.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len() / 8 * 8;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= len of both slices.
        unsafe {
            lo = vaddq_f32(lo, vmulq_f32(vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i))));
            hi = vaddq_f32(
                hi,
                vmulq_f32(vld1q_f32(pa.add(i + 4)), vld1q_f32(pb.add(i + 4))),
            );
        }
        i += 8;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 f32s.
    unsafe {
        vst1q_f32(lanes.as_mut_ptr(), lo);
        vst1q_f32(lanes.as_mut_ptr().add(4), hi);
    }
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
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
                vaddq_f32(vld1q_f32(py.add(i)), vmulq_f32(wv, vld1q_f32(px.add(i)))),
            )
        };
        i += 4;
    }
    for j in i..n {
        y[j] += w * x[j];
    }
}
