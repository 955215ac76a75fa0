//! Codes split into bit planes in the tile layout of `lut::layout`: `[tile][K/32][plane][256]`,
//! where byte `32·j + b` of a plane holds bit `p` of codes `4j..4j+4` of the tile's row
//! `LO_ROW[b]` (low nibble) and of the row 32 below it (high nibble).
//!
//! The scalar form gathers one bit of eight codes of a row with a multiply and writes a byte at a
//! time; the AVX2 form transposes a tile's codes to table-major order in registers, then builds
//! 32 bytes of a plane at once. Both write the same bytes.

use crate::error::{KernelError, Result};
use crate::isa::Isa;

use crate::lut::layout::{ACT, PLANE_BYTES, ROW_BYTE, TILE};

/// Bit `p` of each of the eight codes in the bytes of `codes`, as a byte (bit `i` = code `i`):
/// the low nibble is one table's index for codes 0..4, the high nibble the next table's.
///
/// The mask leaves one bit per byte, at bit `8i`; the multiplier moves byte `i`'s bit to bit
/// `56 + i` (shift `56 − 7i`), and no two of the 64 partial products share a bit, so nothing
/// carries.
#[inline]
fn plane_byte(codes: u64, p: usize) -> u8 {
    let bits = (codes >> p) & 0x0101_0101_0101_0101;
    (bits.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8
}

/// Writes byte `byte` of every table of every plane of one tile from two of its rows: `low`
/// (low nibbles) and the row 32 below it, `high` (high nibbles). `BITS` is a constant so that the
/// plane loop unrolls.
#[inline(always)]
fn pack_row_pair<const BITS: usize>(low: &[u8], high: &[u8], tile: &mut [u8], byte: usize) {
    // `byte` is below 32 (a row's place in a 32-byte block); the mask lets the compiler see it.
    let byte = byte & 31;
    let acts = low.chunks_exact(ACT).zip(high.chunks_exact(ACT));
    for ((ql, qh), planes) in acts.zip(tile.chunks_exact_mut(BITS * PLANE_BYTES)) {
        // Eight codes (tables 2k and 2k + 1) of each row at a time.
        let pairs = ql.chunks_exact(8).zip(qh.chunks_exact(8));
        for (k, (cl, ch)) in pairs.enumerate() {
            let cl = u64::from_le_bytes([cl[0], cl[1], cl[2], cl[3], cl[4], cl[5], cl[6], cl[7]]);
            let ch = u64::from_le_bytes([ch[0], ch[1], ch[2], ch[3], ch[4], ch[5], ch[6], ch[7]]);
            for p in 0..BITS {
                let (l, h) = (plane_byte(cl, p), plane_byte(ch, p));
                let plane = &mut planes[p * PLANE_BYTES..(p + 1) * PLANE_BYTES];
                plane[(2 * k) * 32 + byte] = (l & 0x0F) | (h << 4);
                plane[(2 * k + 1) * 32 + byte] = (l >> 4) | (h & 0xF0);
            }
        }
    }
}

/// The planes of one tile on AVX2. `slots[b]` is the tile's row in byte `b` of a plane's 32-byte
/// table: `LO_ROW[b]` for `b < 32` (low nibbles), the row 32 below `LO_ROW[b − 32]` after (high
/// nibbles); rows past the matrix are zeros. Activation group by activation group, the 64 rows'
/// 32 codes are transposed (8×8 words of four codes) to `[table][slot]`, then each table and
/// plane gives 32 bytes at once: each word's bit `p` of its four codes (`(w >> p) & 0x01010101`,
/// the high row's moved up a nibble) is gathered into its top byte by one multiply (by
/// `0x01020408`: the wanted bits land at bits 24..32; every other partial product lands below
/// bit 24 or past bit 31, none sharing a bit, so nothing carries), and the 32 slots' bytes are
/// packed in order.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_tile_avx2(slots: &[&[u8]; TILE], tile: &mut [u8], bits: usize) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi32(0x0101_0101);
    let gather = _mm256_set1_epi32(0x0102_0408);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // `[table][slot]`: word j (codes 4j..4j+4) of the group's 64 slot rows, 8 slots a vector.
    let mut words = [_mm256_setzero_si256(); (ACT / 4) * (TILE / 8)];
    for (act, planes) in tile.chunks_exact_mut(bits * PLANE_BYTES).enumerate() {
        for (g, rows) in slots.chunks_exact(8).enumerate() {
            // SAFETY: each row slice is checked to hold the group's 32 codes; the caller
            // guarantees AVX2.
            let r: [__m256i; 8] = std::array::from_fn(|i| {
                let codes = &rows[i][act * ACT..][..ACT];
                unsafe { _mm256_loadu_si256(codes.as_ptr().cast()) }
            });
            // 8×8 transpose of 32-bit words: t = words (0,1 | 4,5) and (2,3 | 6,7) of row
            // pairs, u = words (j | j + 4) of four rows, then the halves joined.
            let t = |a: usize, hi: bool| match hi {
                false => _mm256_unpacklo_epi32(r[a], r[a + 1]),
                true => _mm256_unpackhi_epi32(r[a], r[a + 1]),
            };
            let (t0, t1, t2, t3) = (t(0, false), t(0, true), t(2, false), t(2, true));
            let (t4, t5, t6, t7) = (t(4, false), t(4, true), t(6, false), t(6, true));
            let u = [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
                _mm256_unpacklo_epi64(t4, t6),
                _mm256_unpackhi_epi64(t4, t6),
                _mm256_unpacklo_epi64(t5, t7),
                _mm256_unpackhi_epi64(t5, t7),
            ];
            for j in 0..4 {
                words[j * 8 + g] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20);
                words[(j + 4) * 8 + g] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31);
            }
        }
        for (j, v) in words.chunks_exact(TILE / 8).enumerate() {
            for (p, plane) in planes.chunks_exact_mut(PLANE_BYTES).enumerate() {
                let shift = _mm_cvtsi32_si128(p as i32);
                // The bytes of the 8 low-row slots of vector q (with the high rows' bits).
                let byte = |q: usize| {
                    let lo = _mm256_and_si256(_mm256_srl_epi32(v[q], shift), ones);
                    let hi = _mm256_and_si256(_mm256_srl_epi32(v[q + 4], shift), ones);
                    let t = _mm256_or_si256(lo, _mm256_slli_epi32(hi, 4));
                    _mm256_srli_epi32(_mm256_mullo_epi32(t, gather), 24)
                };
                // Per 128-bit half: slots 0..4 of each of byte(0..4), then slots 4..8; the
                // permute puts the 32 bytes in slot order.
                let packed = _mm256_packus_epi16(
                    _mm256_packus_epi32(byte(0), byte(1)),
                    _mm256_packus_epi32(byte(2), byte(3)),
                );
                let packed = _mm256_permutevar8x32_epi32(packed, order);
                let out = &mut plane[j * 32..][..32];
                // SAFETY: `out` is exactly 32 bytes, the width of an unaligned 256-bit store.
                unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), packed) };
            }
        }
    }
}

/// Splits the codes of `rows` rows (`[rows][cols]`, each `< 2^bits`, checked; the first is row
/// `first` of the matrix, for error messages) into bit planes, into `packed`: the tiles holding
/// them, `[tile][K/32][plane][256]`. Rows past `rows` in the last tile are packed as zeros.
pub(super) fn pack_code_rows(
    codes: &[u8],
    rows: usize,
    cols: usize,
    bits: u8,
    first: usize,
    packed: &mut [u8],
) -> Result<()> {
    pack_code_rows_on(Isa::best(), codes, rows, cols, bits, first, packed)
}

/// [`pack_code_rows`] on `isa` (one without a packing form of its own runs the scalar form).
fn pack_code_rows_on(
    isa: Isa,
    codes: &[u8],
    rows: usize,
    cols: usize,
    bits: u8,
    first: usize,
    packed: &mut [u8],
) -> Result<()> {
    let max_code = (1u8 << bits) - 1;
    for (r, row) in codes.chunks_exact(cols).enumerate() {
        // One pass to validate (vectorizes), so the packing loop below has no branch per code.
        if row.iter().fold(0u8, |m, &c| m.max(c)) > max_code {
            let i = row.iter().position(|&c| c > max_code).unwrap_or(0);
            return Err(KernelError::CodeOutOfRange {
                code: row[i],
                index: (first + r) * cols + i,
                bits,
            });
        }
    }
    let tile_bytes = (cols / ACT) * usize::from(bits) * PLANE_BYTES;
    // Rows r and r + 32 of a tile share bytes (low and high nibble): build each byte once.
    let zeros = vec![0u8; cols];
    let row_codes = |r: usize| codes.get(r * cols..(r + 1) * cols).unwrap_or(&zeros);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && Isa::Avx2.is_supported() {
        for (tile, packed_tile) in packed.chunks_exact_mut(tile_bytes).enumerate() {
            let slots: [&[u8]; TILE] = std::array::from_fn(|b| {
                row_codes(tile * TILE + 32 * (b / 32) + crate::lut::layout::LO_ROW[b % 32])
            });
            // SAFETY: AVX2 was checked just above; the function reads and writes only through
            // the slices it is given, with bounds checks.
            unsafe { pack_tile_avx2(&slots, packed_tile, usize::from(bits)) };
        }
        return Ok(());
    }
    let _ = isa;
    for (tile, packed_tile) in packed.chunks_exact_mut(tile_bytes).enumerate() {
        // The tile's rows whose byte is written (the row 32 below each rides along).
        let live = rows.saturating_sub(tile * TILE).min(32);
        for (lo, &byte) in ROW_BYTE.iter().enumerate().take(live) {
            let r = tile * TILE + lo;
            let (low, high) = (row_codes(r), row_codes(r + 32));
            match bits {
                1 => pack_row_pair::<1>(low, high, packed_tile, byte),
                2 => pack_row_pair::<2>(low, high, packed_tile, byte),
                3 => pack_row_pair::<3>(low, high, packed_tile, byte),
                4 => pack_row_pair::<4>(low, high, packed_tile, byte),
                5 => pack_row_pair::<5>(low, high, packed_tile, byte),
                _ => pack_row_pair::<6>(low, high, packed_tile, byte),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lut::layout::LO_ROW;

    #[test]
    fn plane_byte_gathers_one_bit_of_each_code() {
        // Every 4-bit code in every position, with pseudo-random neighbours.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..20_000u64 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let mut codes: [u8; 8] = std::array::from_fn(|i| ((state >> (8 * i + 3)) & 0xF) as u8);
            codes[(round % 8) as usize] = (round / 8 % 16) as u8;
            for p in 0..4 {
                let expected = (0..8).fold(0u8, |n, i| n | (((codes[i] >> p) & 1) << i));
                assert_eq!(
                    plane_byte(u64::from_le_bytes(codes), p),
                    expected,
                    "{codes:?} plane {p}"
                );
            }
        }
    }

    /// Pseudo-random codes below `2^bits`.
    fn codes(n: usize, bits: u8, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 29) as u8 & ((1u8 << bits) - 1)
            })
            .collect()
    }

    #[test]
    fn every_isa_writes_the_layouts_bits() {
        // Awkward shapes: partial tiles, a lone row, rows ending just past a half tile.
        for (rows, cols) in [(1, 32), (33, 64), (70, 96), (130, 32), (64, 256)] {
            for bits in 1..=6u8 {
                let codes = codes(
                    rows * cols,
                    bits,
                    (rows * 31 + cols + usize::from(bits)) as u64,
                );
                let tile_bytes = (cols / ACT) * usize::from(bits) * PLANE_BYTES;
                let mut expected = vec![0u8; rows.div_ceil(TILE) * tile_bytes];
                // Bit p of code c of row r, straight from the layout's definition.
                for (r, row) in codes.chunks_exact(cols).enumerate() {
                    let (tile, rr) = (r / TILE, r % TILE);
                    let (byte, nibble) = (ROW_BYTE[rr % 32], 4 * (rr / 32));
                    assert_eq!(LO_ROW[byte], rr % 32);
                    for (c, &code) in row.iter().enumerate() {
                        for p in 0..usize::from(bits) {
                            let at = tile * tile_bytes
                                + ((c / ACT) * usize::from(bits) + p) * PLANE_BYTES
                                + (c % ACT / 4) * 32
                                + byte;
                            expected[at] |= ((code >> p) & 1) << (nibble + c % 4);
                        }
                    }
                }
                for isa in Isa::supported() {
                    let mut packed = vec![0u8; expected.len()];
                    pack_code_rows_on(isa, &codes, rows, cols, bits, 0, &mut packed).unwrap();
                    assert_eq!(packed, expected, "{isa:?} {rows}x{cols} {bits} bits");
                }
            }
        }
    }

    #[test]
    fn a_code_too_wide_is_named_by_its_index() {
        let mut codes = vec![1u8; 2 * 32];
        codes[37] = 4;
        for isa in Isa::supported() {
            let mut packed = vec![0u8; 2 * PLANE_BYTES];
            let err = pack_code_rows_on(isa, &codes, 2, 32, 2, 10, &mut packed).unwrap_err();
            assert!(
                matches!(
                    err,
                    KernelError::CodeOutOfRange {
                        code: 4,
                        index: 357,
                        bits: 2
                    }
                ),
                "{err:?}"
            );
        }
    }
}
