//! AVX2 `dot` and `axpy`: the scalar reference's operations (eight lanes, mul then add, lanes summed
//! in order, then the tail), eight elements per instruction, so results are bit-identical to it.

use std::arch::x86_64::*;

/// # Safety
/// The CPU supports avx2, and `a.len() == b.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len() / 8 * 8;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= len of both slices.
        unsafe {
            let prod = _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
            acc = _mm256_add_ps(acc, prod);
        }
        i += 8;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// # Safety
/// The CPU supports avx2, and `y.len() == x.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn axpy(y: &mut [f32], w: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    let n = y.len();
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n = len of both slices; `y` and `x` do not overlap (`&mut` vs `&`).
        unsafe {
            let v = _mm256_add_ps(
                _mm256_loadu_ps(py.add(i)),
                _mm256_mul_ps(wv, _mm256_loadu_ps(px.add(i))),
            );
            _mm256_storeu_ps(py.add(i), v);
        }
        i += 8;
    }
    for j in i..n {
        y[j] += w * x[j];
    }
}
