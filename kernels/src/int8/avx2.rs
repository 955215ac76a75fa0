//! AVX2 int8 kernel: `maddubs(|w|, sign(x, w))` then `madd` with ones gives the eight exact int32
//! lane sums of a block; taking |w| (not |x|) keeps a code of −128 exact.

use std::arch::x86_64::*;

use super::{ActBlock, WeightBlock, ROW_TILE};
use crate::dense::RowRange;
use crate::isa::Isa;

/// Tokens computed together in prefill: each loaded weight block serves this many tokens.
const TOKEN_TILE: usize = 2;

/// AVX2 version of `scalar::matmul_rows`.
pub(super) fn matmul_rows(
    w: &[WeightBlock],
    x: &[ActBlock],
    per_row: usize,
    out: &mut RowRange<'_>,
) {
    assert!(
        Isa::Avx2.is_supported(),
        "AVX2 kernel called on a CPU without AVX2"
    );
    // SAFETY: the CPU supports AVX2, FMA and F16C (asserted above).
    unsafe { matmul_rows_avx2(w, x, per_row, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn matmul_rows_avx2(w: &[WeightBlock], x: &[ActBlock], per_row: usize, out: &mut RowRange<'_>) {
    let rows = w.len() / per_row;
    let tokens = x.len() / per_row;
    let mut r = 0;
    while r < rows {
        let rt = if rows - r >= ROW_TILE { ROW_TILE } else { 1 };
        let wt = &w[r * per_row..(r + rt) * per_row];
        let mut n = 0;
        while n < tokens {
            let nt = if tokens - n >= TOKEN_TILE {
                TOKEN_TILE
            } else {
                1
            };
            let xt = &x[n * per_row..(n + nt) * per_row];
            let row = out.start() + r;
            match (rt, nt) {
                (ROW_TILE, TOKEN_TILE) => {
                    store(out, row, n, tile::<ROW_TILE, TOKEN_TILE>(wt, xt, per_row))
                }
                (ROW_TILE, _) => store(out, row, n, tile::<ROW_TILE, 1>(wt, xt, per_row)),
                (_, TOKEN_TILE) => store(out, row, n, tile::<1, TOKEN_TILE>(wt, xt, per_row)),
                _ => store(out, row, n, tile::<1, 1>(wt, xt, per_row)),
            }
            n += nt;
        }
        r += rt;
    }
}

fn store<const R: usize, const T: usize>(
    out: &mut RowRange<'_>,
    row: usize,
    token: usize,
    v: [[f32; T]; R],
) {
    for (i, per_token) in v.iter().enumerate() {
        for (t, &value) in per_token.iter().enumerate() {
            out.set(token + t, row + i, value);
        }
    }
}

/// `R` consecutive rows (`w` = `[per_row][R]`, interleaved) times `T` consecutive tokens (`x` = `[T][per_row]`).
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const R: usize, const T: usize>(
    w: &[WeightBlock],
    x: &[ActBlock],
    per_row: usize,
) -> [[f32; T]; R] {
    // Interleaved tile: block b of row r is w[b * R + r].
    let w = &w[..R * per_row];
    let x: [&[ActBlock]; T] = std::array::from_fn(|t| &x[t * per_row..(t + 1) * per_row]);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..per_row {
        let mut xq = [_mm256_setzero_si256(); T];
        let mut xd = [_mm256_setzero_ps(); T];
        for t in 0..T {
            let block = &x[t][b];
            // SAFETY: `q` is 32 readable bytes; loadu has no alignment requirement.
            xq[t] = unsafe { _mm256_loadu_si256(block.q.as_ptr().cast()) };
            xd[t] = _mm256_set1_ps(block.d);
        }
        for r in 0..R {
            let block = &w[b * R + r];
            // SAFETY: as above.
            let wq = unsafe { _mm256_loadu_si256(block.q.as_ptr().cast()) };
            let wabs = _mm256_sign_epi8(wq, wq);
            let wd = _mm256_cvtph_ps(_mm_set1_epi16(block.d.to_bits() as i16));
            for t in 0..T {
                let xs = _mm256_sign_epi8(xq[t], wq);
                let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones);
                acc[r][t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(lanes),
                    _mm256_mul_ps(wd, xd[t]),
                    acc[r][t],
                );
            }
        }
    }
    acc.map(|per_token| per_token.map(|v| hsum(v)))
}

/// Lane sum in the order of `int8::hsum8`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}
