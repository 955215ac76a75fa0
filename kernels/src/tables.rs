//! Per-token activation tables: int8 ±sums of every 4 activations, with per-group scales and Σx.
//!
//! For activations `x[4j..4j+4]`, `T_j[idx] = Σ_i (bit_i(idx) ? +x[4j+i] : −x[4j+i])`. Tables are
//! quantized to int8 with one scale per activation group of 32 (so one build serves every matrix with
//! the same K, whatever its weight group size): `scale = max_j Σ_i |x[4j+i]| / 127`, the largest
//! |entry| of the group, rounded to nearest and saturated at ±127.

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::lut::layout::{ACT, TABLES_PER_ACT, TABLE_BYTES};
use crate::lut::{TabView, HALF_UNIT_BITS, MAX_HALF_UNITS};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

/// Below this many table bytes per build, threads cost more than they save.
const PARALLEL_MIN_BYTES: usize = 32 * 1024;

/// How many of `bytes` table bytes one task of a table build fills: all of them when the build
/// is too small to share, else a few chunks per thread (for balance) of whole 16-byte tables.
pub(crate) fn table_build_chunk(bytes: usize, threads: usize) -> usize {
    if bytes >= PARALLEL_MIN_BYTES {
        bytes.div_ceil(threads * 4).next_multiple_of(TABLE_BYTES)
    } else {
        bytes
    }
}

/// Tables for a batch of input vectors of length K; reused across calls (no allocation once sized).
pub struct ActivationTables {
    cols: usize,
    tokens: usize,
    /// `[token][cols/4][16]` int8 entries.
    tables: Vec<i8>,
    /// `[token][cols/32]` table scales.
    scales: Vec<f32>,
    /// `[token][cols/32]` Σx per activation group.
    sums: Vec<f32>,
    /// `[token][cols/16]` Σx per half activation group (for weight groups of 16).
    half_sums: Vec<f32>,
    /// `[token][cols/16]` Σx per half activation group in units of 1/8 of the group's table
    /// scale ([`HALF_UNIT_BITS`]), rounded to nearest (for the integer combine of two-level groups
    /// of 16).
    half_units: Vec<i16>,
}

impl ActivationTables {
    /// Empty tables for inputs of `cols` elements (a multiple of 32).
    pub fn new(cols: usize) -> ActivationTables {
        ActivationTables {
            cols,
            tokens: 0,
            tables: Vec::new(),
            scales: Vec::new(),
            sums: Vec::new(),
            half_sums: Vec::new(),
            half_units: Vec::new(),
        }
    }

    /// Builds the tables of `tokens` input vectors stored back to back in `x` (`[tokens][cols]`).
    pub fn build(&mut self, cpu: &Cpu, x: &[f32], tokens: usize) -> Result<()> {
        if !self.cols.is_multiple_of(ACT) {
            return Err(KernelError::KNotMultipleOf32(self.cols));
        }
        let expected = tokens
            .checked_mul(self.cols)
            .ok_or(KernelError::LengthMismatch {
                what: "activations",
                expected: usize::MAX,
                got: x.len(),
            })?;
        if x.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "activations",
                expected,
                got: x.len(),
            });
        }
        let groups = x.len() / ACT;
        // `resize` keeps the capacity, so rebuilding for as many tokens or fewer does not allocate.
        self.tables.resize(groups * TABLES_PER_ACT * TABLE_BYTES, 0);
        self.scales.resize(groups, 0.0);
        self.sums.resize(groups, 0.0);
        self.half_sums.resize(2 * groups, 0.0);
        self.half_units.resize(2 * groups, 0);
        self.tokens = tokens;

        for ((xs, scale), sum) in x
            .chunks_exact(ACT)
            .zip(&mut self.scales)
            .zip(&mut self.sums)
        {
            let mut s = 0.0f32;
            let mut max = 0.0f32;
            for quad in xs.chunks_exact(4) {
                s += quad[0] + quad[1] + quad[2] + quad[3];
                max = max.max(quad[0].abs() + quad[1].abs() + quad[2].abs() + quad[3].abs());
            }
            *sum = s;
            *scale = max / 127.0;
        }
        // Summed apart from `sums` (not derived from it), so that the whole-group sums keep their value.
        for (xs, half) in x.chunks_exact(ACT / 2).zip(&mut self.half_sums) {
            let mut s = 0.0f32;
            for quad in xs.chunks_exact(4) {
                s += quad[0] + quad[1] + quad[2] + quad[3];
            }
            *half = s;
        }
        for ((halves, units), scale) in self
            .half_sums
            .chunks_exact(2)
            .zip(self.half_units.chunks_exact_mut(2))
            .zip(&mut self.scales)
        {
            // A group whose Σx is not finite gets a NaN scale (its tables are then zeros), so
            // every product with it is NaN, as the `c·Σx` term made it when Σx was used in f32.
            if !(halves[0].is_finite() && halves[1].is_finite()) {
                *scale = f32::NAN;
            }
            for (u, &h) in units.iter_mut().zip(halves) {
                *u = half_units(h, *scale);
            }
        }

        let chunk = table_build_chunk(self.tables.len(), cpu.threads());
        let (scales, isa) = (&self.scales, cpu.isa());
        cpu.for_each_chunk(&mut self.tables, chunk, |start, part| {
            let first = start / TABLE_BYTES;
            let quads = &x[4 * first..][..part.len() / 4];
            fill_tables(isa, quads, first, scales, part);
        });
        Ok(())
    }

    /// Input length K.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of tokens the tables were last built for.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The built tables, for the kernels.
    pub(crate) fn view(&self) -> TabView<'_> {
        TabView {
            tokens: self.tokens,
            act_groups: self.cols / ACT,
            tables: &self.tables,
            scales: &self.scales,
            sums: &self.sums,
            half_sums: &self.half_sums,
            half_units: &self.half_units,
        }
    }
}

/// `2^HALF_UNIT_BITS·sum / scale` rounded to nearest (ties to even) and clamped to
/// ±[`MAX_HALF_UNITS`]; 0 for a zero scale or a NaN.
fn half_units(sum: f32, scale: f32) -> i16 {
    if scale <= 0.0 {
        return 0;
    }
    const ROUND: f32 = 12_582_912.0;
    let max = f32::from(MAX_HALF_UNITS);
    let units = (sum / scale) * (1u32 << HALF_UNIT_BITS) as f32;
    // `as` maps NaN to 0; the clamp keeps |v| small enough for the rounding trick to be exact.
    ((units.clamp(-max, max) + ROUND) - ROUND) as i16
}

/// Fills the tables `out` (16 bytes each) of table groups `first..` from their activations `x` (4 per
/// table), on `isa`; every ISA writes the same bytes.
fn fill_tables(isa: Isa, x: &[f32], first: usize, scales: &[f32], out: &mut [i8]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a Cpu holds Isa::Avx2 only after checking the CPU supports avx2, fma and f16c.
        Isa::Avx2 => unsafe { avx2::fill_tables(x, first, scales, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a Cpu holds Isa::Neon only after checking the CPU supports NEON.
        Isa::Neon => unsafe { neon::fill_tables(x, first, scales, out) },
        _ => {
            for (k, (quad, table)) in x
                .chunks_exact(4)
                .zip(out.chunks_exact_mut(TABLE_BYTES))
                .enumerate()
            {
                fill_table(quad, scales[(first + k) / TABLES_PER_ACT], table);
            }
        }
    }
}

/// The 16 int8 entries of one table group. Entries `idx` and `15 − idx` are exact negatives (the float
/// sums are, and rounding to nearest is symmetric), so only half are computed.
fn fill_table(quad: &[f32], scale: f32, table: &mut [i8]) {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for idx in 0..8 {
        let mut t = 0.0f32;
        for (i, &x) in quad.iter().enumerate() {
            t += if idx & (1 << i) != 0 { x } else { -x };
        }
        // Adding and removing 1.5·2^23 rounds to nearest (ties to even) without a libm call, which
        // made the build of large batches slow; it is exact for |v| ≤ 127. `as` maps NaN to 0.
        const ROUND: f32 = 12_582_912.0;
        let q = (((t * inv).clamp(-127.0, 127.0) + ROUND) - ROUND) as i8;
        table[idx] = q;
        table[15 - idx] = -q;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_signed_sums_scaled_to_127() {
        let cpu = Cpu::with_isa(crate::Isa::Scalar, 1).unwrap();
        let mut x = vec![0.0f32; 32];
        x[..4].copy_from_slice(&[1.0, -2.0, 0.5, 3.0]);
        x[4..8].copy_from_slice(&[0.25, 0.25, 0.25, 0.25]);
        let mut t = ActivationTables::new(32);
        t.build(&cpu, &x, 1).unwrap();
        let v = t.view();
        // The largest |entry| is 6.5 (all signs matching the first quad).
        assert!((v.scales[0] - 6.5 / 127.0).abs() < 1e-7);
        assert!((v.sums[0] - 3.5).abs() < 1e-6);
        // Halves: columns 0..16 hold 2.5 + 1.0, columns 16..32 are zero.
        assert_eq!(v.half_sums, &[3.5, 0.0]);
        // In units of 1/8 of the scale 6.5/127: 8·3.5·127/6.5 = 547.08 → 547.
        assert_eq!(v.half_units, &[547, 0]);
        // idx 0b1101: +x0 −x1 +x2 +x3 = 6.5 → 127; idx 0: −2.5 → round(−2.5·127/6.5) = −49.
        assert_eq!(v.tables[0b1101], 127);
        assert_eq!(v.tables[0], -49);
        for idx in 0..16 {
            assert_eq!(v.tables[idx], -v.tables[15 - idx]);
        }
        // Second quad: entry idx = 0.25·(2·popcount(idx) − 4) / scale.
        for idx in 0..16usize {
            let exact = 0.25 * (2.0 * idx.count_ones() as f32 - 4.0) / v.scales[0];
            assert_eq!(v.tables[16 + idx], exact.round() as i8);
        }
    }

    #[test]
    fn rejects_bad_shapes_and_reuses_buffers() {
        let cpu = Cpu::with_isa(crate::Isa::Scalar, 1).unwrap();
        let mut t = ActivationTables::new(48);
        assert!(matches!(
            t.build(&cpu, &[0.0; 48], 1),
            Err(KernelError::KNotMultipleOf32(48))
        ));
        let mut t = ActivationTables::new(64);
        assert!(matches!(
            t.build(&cpu, &[0.0; 100], 2),
            Err(KernelError::LengthMismatch {
                expected: 128,
                got: 100,
                ..
            })
        ));
        t.build(&cpu, &[1.0; 192], 3).unwrap();
        let ptr = t.tables.as_ptr();
        t.build(&cpu, &[1.0; 64], 1).unwrap();
        assert_eq!(t.tokens(), 1);
        assert_eq!(t.tables.len(), 64 / 4 * 16);
        assert_eq!(t.tables.as_ptr(), ptr);
        // All-zero input: zero scale, zero tables, no NaN.
        t.build(&cpu, &[0.0; 64], 1).unwrap();
        assert!(t.tables.iter().all(|&q| q == 0));
        assert_eq!(t.scales[0], 0.0);
    }

    #[test]
    fn every_isa_builds_the_scalar_tables() {
        // Pseudo-random activations with a spread of magnitudes, exact ties at ±0.5 steps,
        // zeros, and (in the last token) an infinity and a NaN.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for (cols, tokens) in [(32, 1), (576, 3), (1536, 2), (11008, 2)] {
            let mut x: Vec<f32> = (0..cols * tokens)
                .map(|_| {
                    let r = next();
                    match r % 8 {
                        0 => 0.0,
                        1 => (r % 64) as f32 * 0.5 - 16.0,
                        2 => (r % 1000) as f32 * 50.0,
                        _ => (r % 20001) as f32 / 1000.0 - 10.0,
                    }
                })
                .collect();
            let n = x.len();
            x[n - 5] = f32::INFINITY;
            x[n - 31] = f32::NAN;
            let scalar = Cpu::with_isa(crate::Isa::Scalar, 1).unwrap();
            let mut want = ActivationTables::new(cols);
            want.build(&scalar, &x, tokens).unwrap();
            // The last group holds the infinity: a NaN scale and zero tables.
            assert!(want.scales.last().unwrap().is_nan());
            assert!(want.tables[want.tables.len() - 128..]
                .iter()
                .all(|&q| q == 0));
            for isa in crate::Isa::supported() {
                // Two threads split the tables at 16-byte boundaries inside activation groups.
                for threads in [1, 2] {
                    let cpu = Cpu::with_isa(isa, threads).unwrap();
                    let mut got = ActivationTables::new(cols);
                    got.build(&cpu, &x, tokens).unwrap();
                    assert_eq!(
                        got.tables, want.tables,
                        "{isa:?}, {threads} threads, K={cols}"
                    );
                    // Groups with an infinity or a NaN have NaN scales: compared as bits.
                    let bits = |t: &ActivationTables| -> Vec<u32> {
                        t.scales.iter().map(|v| v.to_bits()).collect()
                    };
                    assert_eq!(bits(&got), bits(&want));
                    assert_eq!(got.half_units, want.half_units);
                }
            }
        }
    }

    #[test]
    fn threads_build_the_same_tables() {
        let x: Vec<f32> = (0..4 * 4096)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let one = Cpu::with_isa(crate::Isa::Scalar, 1).unwrap();
        let two = Cpu::with_isa(crate::Isa::Scalar, 2).unwrap();
        let mut a = ActivationTables::new(4096);
        let mut b = ActivationTables::new(4096);
        a.build(&one, &x, 4).unwrap();
        b.build(&two, &x, 4).unwrap();
        assert_eq!(a.tables, b.tables);
        assert_eq!(a.scales, b.scales);
        assert_eq!(a.sums, b.sums);
        assert_eq!(a.half_sums, b.half_sums);
        assert_eq!(a.half_sums.len(), 2 * a.sums.len());
        assert_eq!(a.half_units, b.half_units);
    }
}
