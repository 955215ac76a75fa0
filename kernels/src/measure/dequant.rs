//! The dequantize-then-dot baseline: what llama.cpp-style engines do with low-bit weights.
//!
//! Blocks of 32 weights hold an f16 scale `d`, an f16 minimum `m` and packed `b`-bit codes
//! (Q4_1 layout for b = 4); `w = d·q + m`. Each block is unpacked to 32 bytes and dotted with Q8_0
//! activations (`maddubs` on AVX2): `Σ w·x = d·d_x·Σ q·q_x + m·d_x·Σ q_x`. It exists so the LUT
//! kernels can be compared against it in one run, not for inference.

use half::f16;

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::int8::{ActBlock, Int8Activations, BLOCK};
use crate::tiling::{run_row_tasks, RowRange, Split};
// Only x86 has a SIMD path for the baseline; elsewhere it runs the scalar code.
#[cfg(target_arch = "x86_64")]
use crate::isa::Isa;

/// A low-bit matrix stored for the dequantize-then-dot baseline.
pub struct DequantMatrix {
    rows: usize,
    cols: usize,
    bits: u8,
    /// Bytes per block: 2 (d) + 2 (m) + 4·bits (codes).
    stride: usize,
    data: Vec<u8>,
}

impl DequantMatrix {
    /// Packs row-major codes `[rows][cols]` (each `< 2^bits`, bits ∈ {1, 2, 4}) with one scale
    /// and one minimum per block of 32 (`[rows][cols/32]` each).
    pub fn new(
        rows: usize,
        cols: usize,
        bits: u8,
        codes: &[u8],
        scales: &[f32],
        mins: &[f32],
    ) -> Result<DequantMatrix> {
        if !matches!(bits, 1 | 2 | 4) {
            return Err(KernelError::UnsupportedBits(bits));
        }
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::KNotMultipleOf32(cols));
        }
        let blocks = rows * cols / BLOCK;
        for (what, expected, got) in [
            ("baseline codes", rows * cols, codes.len()),
            ("baseline scales", blocks, scales.len()),
            ("baseline minimums", blocks, mins.len()),
        ] {
            if expected != got {
                return Err(KernelError::LengthMismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        if let Some(index) = codes.iter().position(|&c| c >> bits != 0) {
            return Err(KernelError::CodeOutOfRange {
                code: codes[index],
                index,
                bits,
            });
        }
        let stride = 4 + 4 * usize::from(bits);
        let mut data = vec![0u8; blocks * stride];
        for (i, block) in data.chunks_exact_mut(stride).enumerate() {
            block[..2].copy_from_slice(&f16::from_f32(scales[i]).to_le_bytes());
            block[2..4].copy_from_slice(&f16::from_f32(mins[i]).to_le_bytes());
            pack_codes(bits, &codes[i * BLOCK..(i + 1) * BLOCK], &mut block[4..]);
        }
        Ok(DequantMatrix {
            rows,
            cols,
            bits,
            stride,
            data,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bits per code.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Bytes of packed codes, scales and minimums.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]`; `out` is `[n][rows]`.
    pub fn matmul(&self, cpu: &Cpu, acts: &Int8Activations, out: &mut [f32]) -> Result<()> {
        if acts.cols() != self.cols {
            return Err(KernelError::ShapeMismatch {
                matrix: self.cols,
                activations: acts.cols(),
            });
        }
        let expected = acts.tokens() * self.rows;
        if out.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "baseline output",
                expected,
                got: out.len(),
            });
        }
        let per_row = self.cols / BLOCK;
        if per_row == 0 {
            out.fill(0.0);
            return Ok(());
        }
        let x = acts.blocks();
        let row_bytes = per_row * self.stride;
        let isa = cpu.isa();
        let split = Split {
            tile_rows: 1,
            token_block: usize::MAX,
            tasks_per_thread: 4,
        };
        let rows = self.rows;
        run_row_tasks(
            cpu,
            &mut [out],
            |_| rows,
            acts.tokens(),
            split,
            |_, range| {
                let w = &self.data[range.start() * row_bytes..range.end() * row_bytes];
                let x = &x[range.tokens().start * per_row..range.tokens().end * per_row];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => avx2::matmul_rows(self.bits, self.stride, w, x, per_row, range),
                    _ => matmul_rows_scalar(self.bits, self.stride, w, x, per_row, range),
                }
            },
        );
        Ok(())
    }
}

/// Code layouts chosen so AVX2 unpacks a block with a few shifts and masks:
/// 4-bit: byte j holds elements j (low nibble) and j+16; 2-bit: byte j holds j+8s at bits 2s;
/// 1-bit: bit i of the little-endian u32 is element i.
fn pack_codes(bits: u8, codes: &[u8], out: &mut [u8]) {
    match bits {
        4 => (0..16).for_each(|j| out[j] = codes[j] | codes[j + 16] << 4),
        2 => (0..8).for_each(|j| out[j] = (0..4).fold(0, |b, s| b | codes[j + 8 * s] << (2 * s))),
        _ => (0..32).for_each(|i| out[i / 8] |= codes[i] << (i % 8)),
    }
}

fn unpack_codes(bits: u8, packed: &[u8]) -> [u8; BLOCK] {
    std::array::from_fn(|i| match bits {
        4 => (packed[i % 16] >> (4 * (i / 16))) & 15,
        2 => (packed[i % 8] >> (2 * (i / 8))) & 3,
        _ => (packed[i / 8] >> (i % 8)) & 1,
    })
}

fn block_scales(block: &[u8]) -> (f32, f32) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
    (d, m)
}

fn matmul_rows_scalar(
    bits: u8,
    stride: usize,
    w: &[u8],
    x: &[ActBlock],
    per_row: usize,
    out: &mut RowRange<'_>,
) {
    let first = out.start();
    for (i, row) in w.chunks_exact(per_row * stride).enumerate() {
        for (n, xs) in out.tokens().zip(x.chunks_exact(per_row)) {
            let mut acc = 0.0f32;
            for (block, xb) in row.chunks_exact(stride).zip(xs) {
                let (d, m) = block_scales(block);
                let q = unpack_codes(bits, &block[4..]);
                let dot: i32 = q
                    .iter()
                    .zip(&xb.q)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
                acc += d * xb.d * dot as f32 + m * xb.d * xb.sum as f32;
            }
            out.set(n, first + i, acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::int8::ActBlock;
    use crate::isa::Isa;
    use crate::tiling::RowRange;

    pub(super) fn matmul_rows(
        bits: u8,
        stride: usize,
        w: &[u8],
        x: &[ActBlock],
        per_row: usize,
        out: &mut RowRange<'_>,
    ) {
        assert!(
            Isa::Avx2.is_supported(),
            "AVX2 kernel called on a CPU without AVX2"
        );
        // SAFETY: the CPU supports AVX2, FMA and F16C (asserted above).
        unsafe { matmul_rows_avx2(bits, stride, w, x, per_row, out) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn matmul_rows_avx2(
        bits: u8,
        stride: usize,
        w: &[u8],
        x: &[ActBlock],
        per_row: usize,
        out: &mut RowRange<'_>,
    ) {
        let first = out.start();
        for (i, row) in w.chunks_exact(per_row * stride).enumerate() {
            for (n, xs) in out.tokens().zip(x.chunks_exact(per_row)) {
                let value = match bits {
                    4 => dot::<4>(row, xs, stride),
                    2 => dot::<2>(row, xs, stride),
                    _ => dot::<1>(row, xs, stride),
                };
                out.set(n, first + i, value);
            }
        }
    }

    /// Unpacks one block's codes to 32 bytes in element order (see `pack_codes`).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack<const BITS: u8>(codes: &[u8]) -> __m256i {
        match BITS {
            4 => {
                // SAFETY: a 4-bit block has 16 code bytes.
                let v = unsafe { _mm_loadu_si128(codes.as_ptr().cast()) };
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
                _mm256_and_si256(both, _mm256_set1_epi8(15))
            }
            2 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&codes[..8]);
                let v = _mm256_set1_epi64x(i64::from_le_bytes(b));
                let shifted = _mm256_srlv_epi64(v, _mm256_set_epi64x(6, 4, 2, 0));
                _mm256_and_si256(shifted, _mm256_set1_epi8(3))
            }
            _ => {
                let mut b = [0u8; 4];
                b.copy_from_slice(&codes[..4]);
                let v = _mm256_set1_epi32(i32::from_le_bytes(b));
                let idx = _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                );
                let spread = _mm256_shuffle_epi8(v, idx);
                let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                _mm256_min_epu8(_mm256_and_si256(spread, mask), _mm256_set1_epi8(1))
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot<const BITS: u8>(row: &[u8], xs: &[ActBlock], stride: usize) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        // Lane 1 accumulates m·d_x·Σq_x (lane 0 collects a by-product and is ignored).
        let mut offset = _mm_setzero_ps();
        for (block, xb) in row.chunks_exact(stride).zip(xs) {
            // d and m are the first two f16 of the block: one conversion gives [d, m, 0, 0].
            let dm_bits = i32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            let dm = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits)), _mm_set1_ps(xb.d));
            let q = unpack::<BITS>(&block[4..]);
            // SAFETY: `q` of an activation block is 32 readable bytes.
            let xq = unsafe { _mm256_loadu_si256(xb.q.as_ptr().cast()) };
            let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), ones);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_broadcastss_ps(dm), acc);
            offset = _mm_fmadd_ps(dm, _mm_set1_ps(xb.sum as f32), offset);
        }
        let offset = _mm_cvtss_f32(_mm_shuffle_ps::<1>(offset, offset));
        crate::int8::avx2_hsum(acc) + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::tests::TestRng;
    use crate::isa::Isa;

    #[test]
    fn baseline_matches_dequantized_f64_on_every_isa() {
        let mut rng = TestRng::new(21);
        for bits in [1u8, 2, 4] {
            let (rows, cols, tokens) = (9, 576, 3);
            let codes: Vec<u8> = (0..rows * cols)
                .map(|_| (rng.next_u64() % (1 << bits)) as u8)
                .collect();
            let scales: Vec<f32> = (0..rows * cols / 32)
                .map(|_| 0.01 + rng.uniform() * 0.02)
                .collect();
            let mins: Vec<f32> = (0..rows * cols / 32)
                .map(|_| -0.05 * rng.uniform())
                .collect();
            let m = DequantMatrix::new(rows, cols, bits, &codes, &scales, &mins).unwrap();
            let x = rng.gaussians(cols * tokens);
            for isa in Isa::supported() {
                let cpu = Cpu::with_isa(isa, 2).unwrap();
                let mut acts = Int8Activations::new(cols);
                acts.build(&cpu, &x, tokens).unwrap();
                let mut out = vec![0.0; rows * tokens];
                m.matmul(&cpu, &acts, &mut out).unwrap();
                for n in 0..tokens {
                    for r in 0..rows {
                        let (mut exact, mut power) = (0.0f64, 0.0f64);
                        for k in 0..cols {
                            let b = (r * cols + k) / 32;
                            let d = f64::from(f16::from_f32(scales[b]).to_f32());
                            let mn = f64::from(f16::from_f32(mins[b]).to_f32());
                            let w = d * f64::from(codes[r * cols + k]) + mn;
                            exact += w * f64::from(x[n * cols + k]);
                            power += (w * f64::from(x[n * cols + k])).abs();
                        }
                        let got = f64::from(out[n * rows + r]);
                        // Only activation quantization error remains: about 3e-4 of Σ|w·x| here.
                        assert!(
                            (got - exact).abs() < 2e-3 * power,
                            "{isa} b{bits}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn baseline_rejects_bad_inputs() {
        assert!(matches!(
            DequantMatrix::new(1, 32, 3, &[0; 32], &[1.0], &[0.0]),
            Err(KernelError::UnsupportedBits(3))
        ));
        assert!(matches!(
            DequantMatrix::new(1, 32, 2, &[4; 32], &[1.0], &[0.0]),
            Err(KernelError::CodeOutOfRange { .. })
        ));
        assert!(matches!(
            DequantMatrix::new(1, 40, 2, &[0; 40], &[1.0], &[0.0]),
            Err(KernelError::KNotMultipleOf32(40))
        ));
        assert!(matches!(
            DequantMatrix::new(1, 32, 2, &[0; 32], &[1.0; 2], &[0.0]),
            Err(KernelError::LengthMismatch { .. })
        ));
    }
}
