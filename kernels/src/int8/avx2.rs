//! AVX2 int8 kernel: `maddubs(|w|, sign(x, w))` then `madd` with ones gives the eight exact int32
//! lane sums of a block; taking |w| (not |x|) keeps a code of −128 exact. Where the CPU has
//! AVX-512 VNNI, one `vpdpbusd` of the codes offset to unsigned bytes, `w + 128`, gives the same
//! sums from a start of `−128·Σ4 x` per lane (formed once per token and block). IQ4 nibble blocks
//! are split into their 32 indices and looked up with `shuffle_epi8` as they are loaded.
//!
//! The activation quantizer rounds half away from zero exactly (AVX has no such rounding mode):
//! `t = trunc(s)`, `f = s − t` (exact), `t ± 1` when `|f| ≥ 0.5`.

use std::arch::x86_64::*;

use std::marker::PhantomData;

use super::{block_scale, ActBlock, BlockScale, Codes, WeightBlock, BLOCK, KVALUES_IQ4NL};
use crate::isa::{has_avx512_vnni, Isa};
use crate::tiling::{for_each_tile, RowRange, TileKernel};

/// AVX2 version of the scalar kernel, with `vpdpbusd` lane sums where the CPU has AVX-512 VNNI
/// and `maddubs` is not asked for (`madd_only`, for tests).
pub(super) fn matmul_rows<S: BlockScale, C: Codes>(
    w: &[WeightBlock<S, C>],
    x: &[ActBlock],
    per_row: usize,
    out: &mut RowRange<'_>,
    madd_only: bool,
) {
    assert!(
        Isa::Avx2.is_supported(),
        "AVX2 kernel called on a CPU without AVX2"
    );
    if !madd_only && has_avx512_vnni() {
        for_each_tile(&Avx2Int8::<S, C, Vnni>(PhantomData), w, x, per_row, out);
    } else {
        for_each_tile(&Avx2Int8::<S, C, Madd>(PhantomData), w, x, per_row, out);
    }
}

/// The AVX2 tile kernel with lane sums `L`; only built by `matmul_rows` after the CPU checks.
struct Avx2Int8<S, C, L>(PhantomData<(S, C, L)>);

impl<S: BlockScale, C: Codes, L: LaneSums> TileKernel for Avx2Int8<S, C, L> {
    type W = WeightBlock<S, C>;
    type X = ActBlock;

    fn tile<const R: usize, const T: usize>(
        &self,
        w: &[WeightBlock<S, C>],
        x: &[ActBlock],
        per_row: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: an `Avx2Int8` exists only inside `matmul_rows`, after it asserted that the CPU
        // supports AVX2, FMA and F16C, and (for `Vnni`) checked AVX-512 F, BW, VL and VNNI.
        unsafe { L::tile::<S, C, R, T>(w, x, per_row) }
    }
}

/// How a row's eight exact lane sums `Σ_{e ∈ 4j..4j+4} w_e·x_e` of a block are formed.
trait LaneSums {
    /// The weight codes in the form the multiply takes.
    type Codes: Copy;

    /// [`tile_with`] compiled for the instructions of these sums.
    ///
    /// # Safety
    /// The CPU supports them (AVX2, FMA and F16C; AVX-512 F, BW, VL and VNNI for [`Vnni`]).
    unsafe fn tile<S: BlockScale, C: Codes, const R: usize, const T: usize>(
        w: &[WeightBlock<S, C>],
        x: &[ActBlock],
        per_row: usize,
    ) -> [[f32; T]; R];

    /// What the sums need of a token's activation codes `xq`, per block.
    ///
    /// # Safety
    /// As [`LaneSums::tile`].
    unsafe fn token(xq: __m256i) -> __m256i;

    /// A row's block codes `q` as the multiply takes them.
    ///
    /// # Safety
    /// As [`LaneSums::tile`].
    unsafe fn codes<C: Codes>(q: &C) -> Self::Codes;

    /// The lane sums of codes `w` and activation codes `xq`, with `start` from [`LaneSums::token`].
    ///
    /// # Safety
    /// As [`LaneSums::tile`].
    unsafe fn lanes(w: Self::Codes, xq: __m256i, start: __m256i) -> __m256i;
}

/// `madd(maddubs(|w|, sign(x, w)), 1)`.
struct Madd;

impl LaneSums for Madd {
    type Codes = (__m256i, __m256i);

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<S: BlockScale, C: Codes, const R: usize, const T: usize>(
        w: &[WeightBlock<S, C>],
        x: &[ActBlock],
        per_row: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the caller's contract, and these features are enabled here.
        unsafe { tile_with::<Madd, S, C, R, T>(w, x, per_row) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn token(_xq: __m256i) -> __m256i {
        _mm256_setzero_si256()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn codes<C: Codes>(q: &C) -> (__m256i, __m256i) {
        let wq = load_codes(q);
        (wq, _mm256_sign_epi8(wq, wq))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes((wq, wabs): (__m256i, __m256i), xq: __m256i, _start: __m256i) -> __m256i {
        let xs = _mm256_sign_epi8(xq, wq);
        _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), _mm256_set1_epi16(1))
    }
}

/// `vpdpbusd(−128·Σ4 x, w + 128, x)`: the unsigned codes' sums less what their offset adds.
struct Vnni;

impl LaneSums for Vnni {
    type Codes = __m256i;

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<S: BlockScale, C: Codes, const R: usize, const T: usize>(
        w: &[WeightBlock<S, C>],
        x: &[ActBlock],
        per_row: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the caller's contract, and these features are enabled here.
        unsafe { tile_with::<Vnni, S, C, R, T>(w, x, per_row) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn token(xq: __m256i) -> __m256i {
        // Bytes of 0x80 are 128 as the unsigned operand: each lane gets 128·Σ4 x, at most
        // 4·128·128 in magnitude.
        let z = _mm256_setzero_si256();
        _mm256_sub_epi32(z, _mm256_dpbusd_epi32(z, _mm256_set1_epi8(-128), xq))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn codes<C: Codes>(q: &C) -> __m256i {
        load_offset_codes(q)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn lanes(w: __m256i, xq: __m256i, start: __m256i) -> __m256i {
        // Σ4 (w + 128)·x − 128·Σ4 x = Σ4 w·x, exact in i32 (|Σ4 (w + 128)·x| ≤ 4·255·128).
        _mm256_dpbusd_epi32(start, w, xq)
    }
}

/// `R` consecutive rows (`w` = `[per_row][R]`, interleaved) times `T` consecutive tokens (`x` =
/// `[T][per_row]`), with lane sums `L`.
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and the instructions of `L`; inlined into `L::tile`, which
/// enables them.
#[inline(always)]
unsafe fn tile_with<L: LaneSums, S: BlockScale, C: Codes, const R: usize, const T: usize>(
    w: &[WeightBlock<S, C>],
    x: &[ActBlock],
    per_row: usize,
) -> [[f32; T]; R] {
    // Interleaved tile: block b of row r is w[b * R + r].
    let w = &w[..R * per_row];
    let x: [&[ActBlock]; T] = std::array::from_fn(|t| &x[t * per_row..(t + 1) * per_row]);
    // SAFETY (the intrinsics below): the caller's contract.
    let mut acc = [[unsafe { _mm256_setzero_ps() }; T]; R];
    let block_bytes = std::mem::size_of::<WeightBlock<S, C>>();
    for b in 0..per_row {
        // The tile's blocks are one sequential stream, continued by the next tile's: fetch the
        // bytes [`PREFETCH_BYTES`] ahead of this step's R blocks.
        let ahead = w
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(b * R * block_bytes + PREFETCH_BYTES);
        for line in 0..(R * block_bytes).div_ceil(64) {
            // SAFETY: the caller's contract (SSE is part of it); a prefetch never faults,
            // whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast()) };
        }
        let mut xq = [unsafe { _mm256_setzero_si256() }; T];
        let mut start = xq;
        let mut xd = [unsafe { _mm256_setzero_ps() }; T];
        for t in 0..T {
            let block = &x[t][b];
            // SAFETY: `q` is 32 readable bytes; loadu has no alignment requirement.
            xq[t] = unsafe { _mm256_loadu_si256(block.q.as_ptr().cast()) };
            start[t] = unsafe { L::token(xq[t]) };
            xd[t] = unsafe { _mm256_set1_ps(block.d) };
        }
        for r in 0..R {
            let block = &w[b * R + r];
            let codes = unsafe { L::codes(&block.q) };
            // SAFETY: the caller's contract.
            let wd = unsafe {
                match block.d.as_f16() {
                    Some(d) => _mm256_cvtph_ps(_mm_set1_epi16(d.to_bits() as i16)),
                    None if S::PER_HALF => {
                        // Lanes 0..4 sum elements 0..16, lanes 4..8 elements 16..32.
                        let [lo, hi] = block.d.halves();
                        _mm256_setr_ps(lo, lo, lo, lo, hi, hi, hi, hi)
                    }
                    None => _mm256_set1_ps(block.d.halves()[0]),
                }
            };
            for t in 0..T {
                // SAFETY: the caller's contract.
                unsafe {
                    let lanes = L::lanes(codes, xq[t], start[t]);
                    acc[r][t] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(lanes),
                        _mm256_mul_ps(wd, xd[t]),
                        acc[r][t],
                    );
                }
            }
        }
    }
    // SAFETY: the caller's contract.
    acc.map(|per_token| per_token.map(|v| unsafe { hsum(v) }))
}

/// Bytes of weight blocks fetched ahead into L1 by the GEMV: the hardware prefetcher alone
/// leaves one core's stream well short of the memory's bandwidth.
const PREFETCH_BYTES: usize = 2048;

/// The 32 int8 codes of a block's code storage, element order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_codes<C: Codes>(q: &C) -> __m256i {
    load_codes_from(q, &KVALUES_IQ4NL)
}

/// The 32 codes of a block offset to unsigned bytes, `q + 128`, element order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_offset_codes<C: Codes>(q: &C) -> __m256i {
    if C::NIBBLES {
        load_codes_from(q, &KVALUES_IQ4NL_OFFSET)
    } else {
        _mm256_xor_si256(load_codes(q), _mm256_set1_epi8(-128))
    }
}

/// [`KVALUES_IQ4NL`] offset by 128.
const KVALUES_IQ4NL_OFFSET: [i8; 16] = {
    let mut t = KVALUES_IQ4NL;
    let mut i = 0;
    while i < 16 {
        t[i] ^= -128;
        i += 1;
    }
    t
};

/// [`load_codes`] with nibble indices looked up in `table` (16 entries).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_codes_from<C: Codes>(q: &C, table: &[i8; 16]) -> __m256i {
    let bytes: *const u8 = (q as *const C).cast();
    if C::NIBBLES {
        // SAFETY: a nibble block is 16 readable bytes (`Nibbles` is `[u8; 16]`), as is the table;
        // loadu has no alignment requirement.
        let (packed, table) = unsafe {
            (
                _mm_loadu_si128(bytes.cast()),
                _mm_loadu_si128(table.as_ptr().cast()),
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
