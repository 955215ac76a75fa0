//! AVX2 `dot` and `axpy` (and their many-row forms): the scalar reference's operations (eight lanes,
//! mul then add, lanes summed in order, then the tail), eight elements per instruction, so results
//! are bit-identical to it.

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
    finish(acc, &a[n..], &b[n..])
}

/// The lanes of `acc` summed in order, plus the products of the tails.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn finish(acc: __m256, a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let tail: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// [`dot`] of `a` with each row of `rows`, four rows per pass over `a`.
///
/// # Safety
/// The CPU supports avx2, `a` is not empty and `rows.len() == out.len() * a.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_rows(a: &[f32], rows: &[f32], out: &mut [f32]) {
    let len = a.len();
    debug_assert!(len > 0 && rows.len() == out.len() * len);
    let n = len / 8 * 8;
    let mut blocks = rows.chunks_exact(4 * len);
    let mut outs = out.chunks_exact_mut(4);
    for (block, o) in (&mut blocks).zip(&mut outs) {
        let (pa, pr) = (a.as_ptr(), block.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= len; row r of the block is `block[r·len..(r+1)·len]`.
            unsafe {
                let av = _mm256_loadu_ps(pa.add(i));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let prod = _mm256_mul_ps(av, _mm256_loadu_ps(pr.add(r * len + i)));
                    *acc = _mm256_add_ps(*acc, prod);
                }
            }
            i += 8;
        }
        for (r, (o, &acc)) in o.iter_mut().zip(&acc).enumerate() {
            *o = finish(acc, &a[n..], &block[r * len + n..(r + 1) * len]);
        }
    }
    for (o, row) in outs
        .into_remainder()
        .iter_mut()
        .zip(blocks.remainder().chunks_exact(len))
    {
        // SAFETY: the caller's contract; `row` has `len` values.
        *o = unsafe { dot(a, row) };
    }
}

/// `out = Σ_p w[p]·rows[p]` from zero, in row order, with 64 columns of `out` held in registers
/// while the rows go past.
///
/// # Safety
/// The CPU supports avx2, and `rows.len() == w.len() * out.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weighted_row_sum(out: &mut [f32], w: &[f32], rows: &[f32]) {
    let len = out.len();
    debug_assert_eq!(rows.len(), w.len() * len);
    let pr = rows.as_ptr();
    let mut c0 = 0;
    while c0 + 64 <= len {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (p, &wp) in w.iter().enumerate() {
            let wv = _mm256_set1_ps(wp);
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: p < w.len() and c0 + 8k + 8 <= len, so the 8 values lie in row p.
                let v = unsafe { _mm256_loadu_ps(pr.add(p * len + c0 + 8 * k)) };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(wv, v));
            }
        }
        for (k, &acc) in acc.iter().enumerate() {
            // SAFETY: c0 + 8k + 8 <= len.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * k), acc) };
        }
        c0 += 64;
    }
    while c0 + 8 <= len {
        let mut acc = _mm256_setzero_ps();
        for (p, &wp) in w.iter().enumerate() {
            // SAFETY: as above, for one vector.
            let v = unsafe { _mm256_loadu_ps(pr.add(p * len + c0)) };
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(wp), v));
        }
        // SAFETY: c0 + 8 <= len.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c0), acc) };
        c0 += 8;
    }
    for j in c0..len {
        let mut o = 0.0f32;
        for (p, &wp) in w.iter().enumerate() {
            o += wp * rows[p * len + j];
        }
        out[j] = o;
    }
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

/// # Safety
/// The CPU supports avx2 and f16c, and `src.len() == dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    let n = src.len() / 8 * 8;
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= len of both slices; f16 is two bytes, so 8 of them are 16 bytes.
        unsafe {
            let h = _mm_loadu_si128(ps.add(i).cast());
            _mm256_storeu_ps(pd.add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for (d, s) in dst[n..].iter_mut().zip(&src[n..]) {
        *d = s.to_f32();
    }
}
