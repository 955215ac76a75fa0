//! AVX2 `dot` and `axpy` (and their many-row forms): the scalar reference's operations (eight lanes,
//! fused multiply-adds, lanes summed in order, then the tail), eight elements per instruction, so results
//! are bit-identical to it.

use std::arch::x86_64::*;

/// # Safety
/// The CPU supports avx2, and `a.len() == b.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (acc, n) = lanes(a, b);
    finish(acc, &a[n..], &b[n..])
}

/// The eight interleaved partial sums of `a·b` over its first `n` (a multiple of 8) values, and
/// `n`. Needs `a.len() == b.len()`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lanes(a: &[f32], b: &[f32]) -> (__m256, usize) {
    assert_eq!(a.len(), b.len());
    let n = a.len() / 8 * 8;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= len of both slices.
        unsafe {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc);
        }
        i += 8;
    }
    (acc, n)
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
                *acc = _mm256_fmadd_ps(wv, v, *acc);
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
            acc = _mm256_fmadd_ps(_mm256_set1_ps(wp), v, acc);
        }
        // SAFETY: c0 + 8 <= len.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c0), acc) };
        c0 += 8;
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
            let v = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
        }
        i += 8;
    }
    for j in i..n {
        y[j] = w.mul_add(x[j], y[j]);
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

/// The lane sums of each of `acc[0..8]` in the order of [`super::pair_lanes_sum`],
/// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`, as the eight lanes of one vector:
/// horizontal adds within each 128-bit half, then the halves added.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn lane_sums(acc: [__m256; 8]) -> __m256 {
    // Per 128-bit half h of acc k: hadd(acc[k], acc[k+1]) holds l0+l1, l2+l3 (of the low or high
    // four lanes) of acc k, then of acc k+1; a second hadd adds those pairs.
    let h01 = _mm256_hadd_ps(acc[0], acc[1]);
    let h23 = _mm256_hadd_ps(acc[2], acc[3]);
    let h45 = _mm256_hadd_ps(acc[4], acc[5]);
    let h67 = _mm256_hadd_ps(acc[6], acc[7]);
    // Lane k (k < 4) of the low half: (l0+l1)+(l2+l3) of acc k; of the high half: (l4+l5)+(l6+l7).
    let h0123 = _mm256_hadd_ps(h01, h23);
    let h4567 = _mm256_hadd_ps(h45, h67);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(h0123, h4567),
        _mm256_permute2f128_ps::<0x31>(h0123, h4567),
    )
}

/// [`super::scalar_pair_dot`] of every row of `a` with every row of `b`: two rows of `a` against
/// four of `b` per pass over the `len` values, the eight pairs' lane sums taken by [`lane_sums`];
/// rows left over go through [`pair_dot`].
///
/// # Safety
/// The CPU supports avx2, `len > 0`, `a.len()` and `b.len()` are multiples of `len`, and
/// `out.len() == a.len() / len * (b.len() / len)`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_matrix(a: &[f32], b: &[f32], len: usize, out: &mut [f32]) {
    let (a_rows, m) = (a.len() / len, b.len() / len);
    debug_assert!(len > 0 && out.len() == a_rows * m);
    let n = len / 8 * 8;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    while i + 2 <= a_rows {
        let mut j = 0;
        while j + 4 <= m {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut d = 0;
            while d < n {
                // SAFETY: rows i, i+1 of `a` and j..j+4 of `b` exist and d + 8 <= n <= len.
                unsafe {
                    let a0 = _mm256_loadu_ps(pa.add(i * len + d));
                    let a1 = _mm256_loadu_ps(pa.add((i + 1) * len + d));
                    for k in 0..4 {
                        let bk = _mm256_loadu_ps(pb.add((j + k) * len + d));
                        acc[k] = _mm256_fmadd_ps(a0, bk, acc[k]);
                        acc[4 + k] = _mm256_fmadd_ps(a1, bk, acc[4 + k]);
                    }
                }
                d += 8;
            }
            let sums = lane_sums(acc);
            if n == len {
                // No tails: the pairs of row i are the low half, those of row i + 1 the high.
                // SAFETY: row i and i + 1 of `out` hold columns j..j+4 (j + 4 <= m).
                unsafe {
                    let po = out.as_mut_ptr();
                    _mm_storeu_ps(po.add(i * m + j), _mm256_castps256_ps128(sums));
                    _mm_storeu_ps(po.add((i + 1) * m + j), _mm256_extractf128_ps::<1>(sums));
                }
                j += 4;
                continue;
            }
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` is 8 f32s.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sums) };
            let sums = lanes;
            for r in 0..2 {
                let a_tail = &a[(i + r) * len + n..(i + r + 1) * len];
                for k in 0..4 {
                    let b_tail = &b[(j + k) * len + n..(j + k + 1) * len];
                    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
                    out[(i + r) * m + j + k] = sums[4 * r + k] + tail;
                }
            }
            j += 4;
        }
        for r in i..i + 2 {
            for jj in j..m {
                out[r * m + jj] =
                    pair_dot(&a[r * len..(r + 1) * len], &b[jj * len..(jj + 1) * len]);
            }
        }
        i += 2;
    }
    for r in i..a_rows {
        for jj in 0..m {
            out[r * m + jj] = pair_dot(&a[r * len..(r + 1) * len], &b[jj * len..(jj + 1) * len]);
        }
    }
}

/// [`super::scalar_pair_dot`] of each segment of `len` values of `a` with the same segment of
/// `b`: eight segments per pass, their lane sums taken by [`lane_sums`]; segments left over go
/// through [`pair_dot`].
///
/// # Safety
/// The CPU supports avx2, `len > 0`, and `a.len() == b.len() == out.len() * len`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn segment_dots(a: &[f32], b: &[f32], len: usize, out: &mut [f32]) {
    let segments = out.len();
    debug_assert!(len > 0 && a.len() == segments * len && b.len() == a.len());
    let n = len / 8 * 8;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut s = 0;
    while s + 8 <= segments {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut d = 0;
        while d < n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = (s + k) * len + d;
                // SAFETY: segment s + k (s + k < segments) holds values d..d+8 (d + 8 <= n <= len).
                unsafe {
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(at)),
                        _mm256_loadu_ps(pb.add(at)),
                        *acc,
                    );
                }
            }
            d += 8;
        }
        let sums = lane_sums(acc);
        let o = &mut out[s..s + 8];
        // SAFETY: `o` is 8 f32s.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), sums) };
        if n < len {
            for (k, o) in o.iter_mut().enumerate() {
                let span = (s + k) * len + n..(s + k + 1) * len;
                *o += a[span.clone()]
                    .iter()
                    .zip(&b[span])
                    .map(|(x, y)| x * y)
                    .sum::<f32>();
            }
        }
        s += 8;
    }
    for (k, o) in out.iter_mut().enumerate().skip(s) {
        *o = pair_dot(&a[k * len..(k + 1) * len], &b[k * len..(k + 1) * len]);
    }
}

/// One pair of [`dot_matrix`]: eight lanes, summed as [`super::pair_lanes_sum`], then the tail.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn pair_dot(a: &[f32], b: &[f32]) -> f32 {
    let (acc, n) = lanes(a, b);
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    super::pair_lanes_sum(lanes) + tail
}

/// [`weighted_row_sum`] for each row of `out` with its own weights: two output rows by 32
/// columns per pass over the rows, each loaded row shared by both; what is left over goes through
/// [`weighted_row_sum`]. Same bits as it per output row.
///
/// # Safety
/// The CPU supports avx2, `len > 0`, `out.len()` and `rows.len()` are multiples of `len`, and
/// `w.len() == out.len() / len * (rows.len() / len)`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weighted_row_sums(out: &mut [f32], w: &[f32], rows: &[f32], len: usize) {
    let (out_rows, p_len) = (out.len() / len, rows.len() / len);
    debug_assert!(len > 0 && w.len() == out_rows * p_len);
    let (pr, pw) = (rows.as_ptr(), w.as_ptr());
    let cols = len / 32 * 32;
    let mut i = 0;
    while i + 2 <= out_rows {
        let mut c0 = 0;
        while c0 < cols {
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            for p in 0..p_len {
                // SAFETY: p < p_len and c0 + 32 <= len, so the 32 values lie in row p; the
                // weights (i + r)·p_len + p are within `w`.
                unsafe {
                    let v = [0, 1, 2, 3].map(|k| _mm256_loadu_ps(pr.add(p * len + c0 + 8 * k)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let wv = _mm256_set1_ps(*pw.add((i + r) * p_len + p));
                        for (acc, &v) in acc.iter_mut().zip(&v) {
                            *acc = _mm256_fmadd_ps(wv, v, *acc);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (k, &acc) in acc.iter().enumerate() {
                    // SAFETY: row i + r of `out` exists and c0 + 8k + 8 <= len.
                    unsafe {
                        _mm256_storeu_ps(out.as_mut_ptr().add((i + r) * len + c0 + 8 * k), acc)
                    };
                }
            }
            c0 += 32;
        }
        if cols < len {
            // Columns past the last 32, one at a time: each column is summed on its own, so these
            // are the bits of the vector form.
            for r in i..i + 2 {
                let weights = &w[r * p_len..(r + 1) * p_len];
                for c in cols..len {
                    let mut o = 0.0f32;
                    for (p, &wp) in weights.iter().enumerate() {
                        o = wp.mul_add(rows[p * len + c], o);
                    }
                    out[r * len + c] = o;
                }
            }
        }
        i += 2;
    }
    if i < out_rows {
        // SAFETY: the caller's contract, for the last output row.
        unsafe { weighted_row_sum(&mut out[i * len..], &w[i * p_len..], rows) };
    }
}

/// [`super::scalar_scale_max`] eight lanes at a time.
///
/// # Safety
/// The CPU supports avx2.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scale_max(x: &mut [f32], scale: f32) -> f32 {
    let n = x.len() / 8 * 8;
    let p = x.as_mut_ptr();
    let sv = _mm256_set1_ps(scale);
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= x.len().
        unsafe {
            let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sv);
            _mm256_storeu_ps(p.add(i), v);
            // `lane.max(v)` of the scalar form: max_ps gives its second operand when one is NaN.
            max = _mm256_max_ps(v, max);
        }
        i += 8;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), max) };
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in &mut x[n..] {
        *v *= scale;
        max = max.max(*v);
    }
    max
}

/// [`super::exp`] of eight values: the same multiplications and additions in the same order.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    use super::exp_consts::*;
    let set = _mm256_set1_ps;
    // `clamp`: a NaN stays NaN (max_ps and min_ps return their second operand when one is NaN).
    let x = _mm256_min_ps(set(HI), _mm256_max_ps(set(LO), x));
    let round = set(ROUND);
    let n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, set(LOG2_E)), round), round);
    let r = _mm256_sub_ps(
        _mm256_sub_ps(x, _mm256_mul_ps(n, set(LN2_HI))),
        _mm256_mul_ps(n, set(LN2_LO)),
    );
    let p = P[1..].iter().fold(set(P[0]), |p, &c| {
        _mm256_add_ps(_mm256_mul_ps(p, r), set(c))
    });
    let e_r = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
        set(1.0),
    );
    let biased = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_add_ps(n, set(127.0)), round)),
        _mm256_castps_si256(round),
    );
    _mm256_mul_ps(e_r, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
}

/// [`super::scalar_exp_sum`] eight lanes at a time.
///
/// # Safety
/// The CPU supports avx2.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
    exp_sum_from(x, 0, _mm256_setzero_ps(), shift)
}

/// [`exp_sum`] of `x[start..]`, continuing the eight partial sums `sum` of the exps of
/// `x[..start]` (`start` a multiple of 8, `x[..start]` already holding its exps): the rest eight
/// lanes at a time, the lanes summed in order, then the tail.
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_sum_from(x: &mut [f32], start: usize, mut sum: __m256, shift: f32) -> f32 {
    assert!(start.is_multiple_of(8) && start <= x.len());
    let n = x.len() / 8 * 8;
    let p = x.as_mut_ptr();
    let shift_v = _mm256_set1_ps(shift);
    let mut i = start;
    while i < n {
        // SAFETY: i + 8 <= n <= x.len().
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), shift_v));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        i += 8;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    for v in &mut x[n..] {
        *v = super::exp(*v - shift);
    }
    lanes.iter().sum::<f32>() + x[n..].iter().sum::<f32>()
}

/// [`super::scalar_gated_mul`] eight lanes at a time.
///
/// # Safety
/// The CPU supports avx2; the three slices have the same length.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gated_mul<const GELU: bool>(out: &mut [f32], gate: &[f32], up: &[f32]) {
    let n = out.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= the length of each slice (equal, per the contract).
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let z = if GELU {
                let cgg = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(super::GELU_C), g), g);
                let inner = _mm256_mul_ps(g, _mm256_add_ps(one, cgg));
                _mm256_mul_ps(_mm256_set1_ps(super::GELU_2K), inner)
            } else {
                g
            };
            let e = exp8(_mm256_xor_ps(z, sign));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            let o = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), o);
        }
        i += 8;
    }
    super::scalar_gated_mul::<GELU>(&mut out[n..], &gate[n..], &up[n..]);
}
