//! AVX2 int8 kernel: `maddubs(|w|, sign(x, w))` then `madd` with ones gives the eight exact int32
//! lane sums of a block; taking |w| (not |x|) keeps a code of −128 exact. IQ4 nibble blocks are
//! split into their 32 indices and looked up with `shuffle_epi8` as they are loaded.
//!
//! The activation quantizer rounds half away from zero exactly (AVX has no such rounding mode):
//! `t = trunc(s)`, `f = s − t` (exact), `t ± 1` when `|f| ≥ 0.5`.

use std::arch::x86_64::*;

use std::marker::PhantomData;

use super::{block_scale, ActBlock, BlockScale, Codes, WeightBlock, BLOCK, KVALUES_IQ4NL};
use crate::isa::Isa;
use crate::tiling::{for_each_tile, RowRange, TileKernel};

/// AVX2 version of the scalar kernel.
pub(super) fn matmul_rows<S: BlockScale, C: Codes>(
    w: &[WeightBlock<S, C>],
    x: &[ActBlock],
    per_row: usize,
    out: &mut RowRange<'_>,
) {
    assert!(
        Isa::Avx2.is_supported(),
        "AVX2 kernel called on a CPU without AVX2"
    );
    for_each_tile(&Avx2Int8::<S, C>(PhantomData), w, x, per_row, out);
}

/// The AVX2 tile kernel; only built by `matmul_rows` after the CPU check.
struct Avx2Int8<S, C>(PhantomData<(S, C)>);

impl<S: BlockScale, C: Codes> TileKernel for Avx2Int8<S, C> {
    type W = WeightBlock<S, C>;
    type X = ActBlock;

    fn tile<const R: usize, const T: usize>(
        &self,
        w: &[WeightBlock<S, C>],
        x: &[ActBlock],
        per_row: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: an `Avx2Int8` exists only inside `matmul_rows`, after it asserted that the CPU
        // supports AVX2, FMA and F16C.
        unsafe { tile::<S, C, R, T>(w, x, per_row) }
    }
}

/// `R` consecutive rows (`w` = `[per_row][R]`, interleaved) times `T` consecutive tokens (`x` = `[T][per_row]`).
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<S: BlockScale, C: Codes, const R: usize, const T: usize>(
    w: &[WeightBlock<S, C>],
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
            let wq = load_codes(&block.q);
            let wabs = _mm256_sign_epi8(wq, wq);
            let wd = match block.d.as_f16() {
                Some(d) => _mm256_cvtph_ps(_mm_set1_epi16(d.to_bits() as i16)),
                None if S::PER_HALF => {
                    // Lanes 0..4 sum elements 0..16, lanes 4..8 elements 16..32.
                    let [lo, hi] = block.d.halves();
                    _mm256_setr_ps(lo, lo, lo, lo, hi, hi, hi, hi)
                }
                None => _mm256_set1_ps(block.d.halves()[0]),
            };
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

/// The 32 int8 codes of a block's code storage, element order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_codes<C: Codes>(q: &C) -> __m256i {
    let bytes: *const u8 = (q as *const C).cast();
    if C::NIBBLES {
        // SAFETY: a nibble block is 16 readable bytes (`Nibbles` is `[u8; 16]`), as is the table;
        // loadu has no alignment requirement.
        let (packed, table) = unsafe {
            (
                _mm_loadu_si128(bytes.cast()),
                _mm_loadu_si128(KVALUES_IQ4NL.as_ptr().cast()),
            )
        };
        // Both 128-bit lanes hold the 16 bytes; shifting the high lane's by 4 and masking gives
        // the indices of elements 0..16 (low nibbles) then 16..32 (high nibbles). The shuffle
        // looks each lane up in its own copy of the table.
        let shifted = _mm256_srlv_epi64(
            _mm256_broadcastsi128_si256(packed),
            _mm256_setr_epi64x(0, 0, 4, 4),
        );
        let indices = _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
        _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), indices)
    } else {
        // SAFETY: int8 storage is `[i8; 32]`, 32 readable bytes; loadu has no alignment
        // requirement.
        unsafe { _mm256_loadu_si256(bytes.cast()) }
    }
}

/// Lane sum in the order of `int8::hsum8`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// AVX2 version of `int8::quantize_block` (codes, scale, code sums and value sums) for each block
/// of `blocks`, from 32 values of `x` each.
pub(super) fn quantize(x: &[f32], blocks: &mut [ActBlock]) {
    assert!(
        Isa::Avx2.is_supported(),
        "AVX2 quantizer called on a CPU without AVX2"
    );
    // SAFETY: the CPU supports AVX2, FMA and F16C (asserted above).
    unsafe { quantize_blocks(x, blocks) }
}

/// The blocks of [`quantize`].
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_blocks(x: &[f32], blocks: &mut [ActBlock]) {
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let sign = _mm256_set1_ps(-0.0);
    let one = _mm256_set1_ps(1.0);
    let half = _mm256_set1_ps(0.5);
    let (low, high) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    // `packs` interleaves the 128-bit lanes: dwords 0..8 of the packed bytes hold elements
    // 0..4, 8..12, 16..20, 24..28, 4..8, 12..16, 20..24, 28..32.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (block, xs) in blocks.iter_mut().zip(x.chunks_exact(BLOCK)) {
        let mut v = [_mm256_setzero_ps(); 4];
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: `xs` is 32 f32, so elements 8i..8i+8 (i < 4) are readable; loadu has no
            // alignment requirement.
            *v = unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) };
        }
        // `max_ps` returns its second operand when either is NaN, so with the running maximum
        // second NaN values are skipped, as `f32::max` skips them.
        let mut m = _mm256_setzero_ps();
        for &v in &v {
            m = _mm256_max_ps(_mm256_and_ps(v, magnitude), m);
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps::<1>(h, h)));
        let (d, inv) = block_scale(amax);
        let inv = _mm256_set1_ps(inv);
        let mut codes = [_mm256_setzero_si256(); 4];
        for (c, &v) in codes.iter_mut().zip(&v) {
            let s = _mm256_mul_ps(v, inv);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
            let away =
                _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(_mm256_sub_ps(s, t), magnitude), half);
            let step = _mm256_and_ps(away, _mm256_or_ps(one, _mm256_and_ps(s, sign)));
            let r = _mm256_add_ps(t, step);
            // NaN (only where `s` is NaN) becomes 0 before the clamp, which would turn it into
            // −127; ±∞ clamp to ±127.
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(s, s));
            *c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, low), high));
        }
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(codes[0], codes[1]),
            _mm256_packs_epi32(codes[2], codes[3]),
        );
        let q = _mm256_permutevar8x32_epi32(packed, order);
        // SAFETY: `block.q` is 32 writable bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(block.q.as_mut_ptr().cast(), q) };
        let lo = _mm256_add_epi32(codes[0], codes[1]);
        block.sum_lo = hsum_epi32(lo);
        block.sum = hsum_epi32(_mm256_add_epi32(lo, _mm256_add_epi32(codes[2], codes[3])));
        block.d = d;
        // Lane i of `v[0] + v[1]` is `x[i] + x[i + 8]`: the lanes of `int8::half_sums` (and
        // `v[2] + v[3]` the second half's); adding `v[2]` then `v[3]` to it gives the lanes of
        // `int8::block_sum`.
        let lo = _mm256_add_ps(v[0], v[1]);
        block.xsum_halves = [hsum(lo), hsum(_mm256_add_ps(v[2], v[3]))];
        block.xsum = hsum(_mm256_add_ps(_mm256_add_ps(lo, v[2]), v[3]));
    }
}

/// Sum of the eight int32 lanes of `v` (exact, so any order).
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<1>(s)))
}
