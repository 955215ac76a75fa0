//! AVX-512 forms of the many-query products [`super::dot_matrix`] and
//! [`super::weighted_row_sums`] (attention scores and value sums of a batch of tokens) and of the
//! softmax's [`super::exp_sum`], for CPUs with AVX-512 F, whose cores may run two 512-bit
//! multiply-adds a cycle where AVX2 runs two of 256 bits. They perform the AVX2 forms' operations, so the bits stay those of the scalar form:
//! a 512-bit register holds two of the AVX2 form's eight-lane partial sums (two queries against
//! one key), the value sums keep one column per lane, each summed in row order, and the exps
//! are the AVX2 polynomial's operations on sixteen lanes, summed eight lanes at a time in order.

use std::arch::x86_64::*;

use super::avx2;

/// Query rows per pass of [`dot_matrix`]: four pairs, each pair in one register.
const QUERY_ROWS: usize = 8;
/// Key rows per pass of [`dot_matrix`].
const KEY_ROWS: usize = 4;
/// Longest row [`dot_matrix`] takes on this path: its pass copies `QUERY_ROWS` rows to the stack.
const MAX_LEN: usize = 256;
/// Output rows per pass of [`weighted_row_sums`].
const SUM_ROWS: usize = 4;

/// Whether this x86-64 CPU has AVX-512 F (the 512-bit multiply-adds, loads and broadcasts used
/// here); the caller has checked AVX2 and FMA.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// [`avx2::dot_matrix`] with eight rows of `a` against four of `b` per pass: rows `2k` and `2k + 1`
/// of the eight share a register (copied once per pass into a stack buffer as
/// `[len / 8][pair][row of the pair][8]`), each of the four rows of `b` is broadcast to both
/// halves, so every half accumulates one pair's eight lanes exactly as the AVX2 form does; the
/// lanes are then summed as [`avx2::lane_sums`] sums them. Rows of `a` left over, rows of `b` left
/// over, rows longer than [`MAX_LEN`] and lengths that are not a multiple of 8 go to the AVX2 form.
///
/// # Safety
/// The CPU supports avx2, fma and avx512f, `len > 0`, `a.len()` and `b.len()` are multiples of
/// `len`, and `out.len() == a.len() / len * (b.len() / len)`.
#[target_feature(enable = "avx2,fma,avx512f")]
pub(super) unsafe fn dot_matrix(a: &[f32], b: &[f32], len: usize, out: &mut [f32]) {
    let (a_rows, m) = (a.len() / len, b.len() / len);
    debug_assert!(len > 0 && out.len() == a_rows * m);
    let full = a_rows / QUERY_ROWS * QUERY_ROWS;
    if !len.is_multiple_of(8) || len > MAX_LEN || full == 0 || m < KEY_ROWS {
        // SAFETY: the caller's contract is the AVX2 form's.
        return unsafe { avx2::dot_matrix(a, b, len, out) };
    }
    let chunks = len / 8;
    let keys = m / KEY_ROWS * KEY_ROWS;
    let mut pairs = [0.0f32; QUERY_ROWS * MAX_LEN];
    let pb = b.as_ptr();
    for i in (0..full).step_by(QUERY_ROWS) {
        // `pairs[(c·8 + r)·8 + l]` = a[i + r][8c + l]: pair p is rows 2p and 2p + 1.
        for (c, chunk) in pairs[..QUERY_ROWS * len].chunks_exact_mut(64).enumerate() {
            for (r, dst) in chunk.chunks_exact_mut(8).enumerate() {
                dst.copy_from_slice(&a[(i + r) * len + 8 * c..][..8]);
            }
        }
        let pp = pairs.as_ptr();
        for j in (0..keys).step_by(KEY_ROWS) {
            let mut acc = [[_mm512_setzero_ps(); KEY_ROWS]; QUERY_ROWS / 2];
            for c in 0..chunks {
                // SAFETY: c < len / 8, so the four pair registers lie in the first
                // QUERY_ROWS·len values of `pairs`; rows j..j+4 of `b` exist (j + 4 <= m) and
                // hold values 8c..8c+8 (8c + 8 <= len).
                unsafe {
                    let q = [0, 1, 2, 3].map(|p| _mm512_loadu_ps(pp.add((c * 4 + p) * 16)));
                    for k in 0..KEY_ROWS {
                        let kv = broadcast_8(_mm256_loadu_ps(pb.add((j + k) * len + 8 * c)));
                        for (acc, &q) in acc.iter_mut().zip(&q) {
                            acc[k] = _mm512_fmadd_ps(q, kv, acc[k]);
                        }
                    }
                }
            }
            for (p, &acc) in acc.iter().enumerate() {
                // Rows i + 2p (low halves) and i + 2p + 1 (high halves) against keys j..j+4.
                let sums = lane_sums(acc);
                let row = i + 2 * p;
                // SAFETY: rows `row` and `row + 1` of `out` hold columns j..j+4 (j + 4 <= m).
                unsafe {
                    let po = out.as_mut_ptr();
                    _mm_storeu_ps(po.add(row * m + j), _mm256_castps256_ps128(sums));
                    _mm_storeu_ps(po.add((row + 1) * m + j), _mm256_extractf128_ps::<1>(sums));
                }
            }
        }
        for r in i..i + QUERY_ROWS {
            for jj in keys..m {
                out[r * m + jj] = avx2::pair_dot(&a[r * len..][..len], &b[jj * len..][..len]);
            }
        }
    }
    if full < a_rows {
        // SAFETY: the rows left over are whole rows, with their outputs; the contract holds.
        unsafe { avx2::dot_matrix(&a[full * len..], b, len, &mut out[full * m..]) };
    }
}

/// [`avx2::weighted_row_sums`] with four output rows by 64 columns per pass (then by 16): each
/// row of `rows` is loaded once for the four, every lane is one column summed in row order from
/// zero, as in the AVX2 form. Output rows left over and lengths that are not a multiple of 16 go to
/// the AVX2 form.
///
/// # Safety
/// The CPU supports avx2, fma and avx512f, `len > 0`, `out.len()` and `rows.len()` are multiples
/// of `len`, and `w.len() == out.len() / len * (rows.len() / len)`.
#[target_feature(enable = "avx2,fma,avx512f")]
pub(super) unsafe fn weighted_row_sums(out: &mut [f32], w: &[f32], rows: &[f32], len: usize) {
    let (out_rows, p_len) = (out.len() / len, rows.len() / len);
    debug_assert!(len > 0 && w.len() == out_rows * p_len);
    let full = out_rows / SUM_ROWS * SUM_ROWS;
    if !len.is_multiple_of(16) || full == 0 {
        // SAFETY: the caller's contract is the AVX2 form's.
        return unsafe { avx2::weighted_row_sums(out, w, rows, len) };
    }
    for i in (0..full).step_by(SUM_ROWS) {
        let mut c0 = 0;
        while c0 + 64 <= len {
            // SAFETY: rows i..i+4 of `out` exist (i + 4 <= full) and c0 + 64 <= len.
            unsafe { row_block::<4>(out, w, rows, len, i, c0) };
            c0 += 64;
        }
        while c0 < len {
            // SAFETY: as above, for c0 + 16 <= len (len a multiple of 16).
            unsafe { row_block::<1>(out, w, rows, len, i, c0) };
            c0 += 16;
        }
    }
    if full < out_rows {
        // SAFETY: the rows left over are whole output rows with their weights; the contract holds.
        unsafe { avx2::weighted_row_sums(&mut out[full * len..], &w[full * p_len..], rows, len) };
    }
}

/// Columns `c0..c0 + 16K` of output rows `i..i + SUM_ROWS` of [`weighted_row_sums`]: each row of
/// `rows` loaded once (`K` registers) for the four, each lane one column summed in row order from
/// zero.
///
/// # Safety
/// The CPU supports avx512f, the contract of [`weighted_row_sums`] holds, `i + SUM_ROWS` output
/// rows exist and `c0 + 16K <= len`.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn row_block<const K: usize>(
    out: &mut [f32],
    w: &[f32],
    rows: &[f32],
    len: usize,
    i: usize,
    c0: usize,
) {
    let p_len = rows.len() / len;
    let (pr, pw, po) = (rows.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); K]; SUM_ROWS];
    for p in 0..p_len {
        // SAFETY: p < p_len and c0 + 16K <= len, so the values lie in row p; the weights
        // (i + r)·p_len + p (i + r < out rows) are within `w`.
        unsafe {
            let v: [__m512; K] =
                std::array::from_fn(|k| _mm512_loadu_ps(pr.add(p * len + c0 + 16 * k)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*pw.add((i + r) * p_len + p));
                for (acc, &v) in acc.iter_mut().zip(&v) {
                    *acc = _mm512_fmadd_ps(wv, v, *acc);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (k, &acc) in acc.iter().enumerate() {
            // SAFETY: row i + r of `out` exists and c0 + 16k + 16 <= len.
            unsafe { _mm512_storeu_ps(po.add((i + r) * len + c0 + 16 * k), acc) };
        }
    }
}

/// `x` in both 256-bit halves (`vbroadcastf64x4`, AVX-512 F).
#[inline]
#[target_feature(enable = "avx512f")]
fn broadcast_8(x: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(x)))
}

/// [`avx2::lane_sums`] of the eight 256-bit halves `acc[0].low, .., acc[3].low, acc[0].high, ..,
/// acc[3].high`, with the same additions done on whole 512-bit registers: lanes 0..4 of the result
/// are the sums of the low halves, lanes 4..8 those of the high halves.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f")]
fn lane_sums(acc: [__m512; 4]) -> __m256 {
    // `_mm256_hadd_ps` on each 128-bit lane: [a0 + a1, a2 + a3, b0 + b1, b2 + b3].
    let hadd = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(a, b),
            _mm512_shuffle_ps::<0b11_01_11_01>(a, b),
        )
    };
    // 128-bit lane k of `h`: (l0 + l1) + (l2 + l3) (k even) or (l4 + l5) + (l6 + l7) (k odd) of
    // the low (k < 2) or high (k >= 2) halves of acc[0..4].
    let h = hadd(hadd(acc[0], acc[1]), hadd(acc[2], acc[3]));
    // Lanes 0, 2 then 1, 3: the two sums of each half meet, as `avx2::lane_sums` adds its halves.
    let even = _mm512_shuffle_f32x4::<0b10_00_10_00>(h, h);
    let odd = _mm512_shuffle_f32x4::<0b11_01_11_01>(h, h);
    _mm512_castps512_ps256(_mm512_add_ps(even, odd))
}

/// [`avx2::exp_sum`] sixteen values at a time: the exps are lane by lane those of the AVX2 form,
/// and each sixteen are added to its eight partial sums as two vectors in order, so the partial
/// sums, and the total, are its bits; the values past the last sixteen go to
/// [`avx2::exp_sum_from`] with those partial sums.
///
/// # Safety
/// The CPU supports avx2, fma and avx512f.
#[target_feature(enable = "avx2,fma,avx512f")]
pub(super) unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
    let n16 = x.len() / 16 * 16;
    let p = x.as_mut_ptr();
    let shift_v = _mm512_set1_ps(shift);
    let mut sum = _mm256_setzero_ps();
    let mut i = 0;
    while i < n16 {
        // SAFETY: i + 16 <= n16 <= x.len().
        unsafe {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), shift_v));
            _mm512_storeu_ps(p.add(i), e);
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
            sum = _mm256_add_ps(_mm256_add_ps(sum, _mm512_castps512_ps256(e)), high);
        }
        i += 16;
    }
    avx2::exp_sum_from(x, n16, sum, shift)
}

/// [`avx2::exp8`]'s operations on sixteen lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    use super::exp_consts::*;
    let set = _mm512_set1_ps;
    let x = _mm512_min_ps(set(HI), _mm512_max_ps(set(LO), x));
    let round = set(ROUND);
    let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, set(LOG2_E)), round), round);
    let r = _mm512_sub_ps(
        _mm512_sub_ps(x, _mm512_mul_ps(n, set(LN2_HI))),
        _mm512_mul_ps(n, set(LN2_LO)),
    );
    let p = P[1..].iter().fold(set(P[0]), |p, &c| {
        _mm512_add_ps(_mm512_mul_ps(p, r), set(c))
    });
    let e_r = _mm512_add_ps(
        _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r),
        set(1.0),
    );
    let biased = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(_mm512_add_ps(n, set(127.0)), round)),
        _mm512_castps_si512(round),
    );
    _mm512_mul_ps(e_r, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased)))
}
