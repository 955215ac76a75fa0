//! The packed weight layout shared by every ISA, so that all paths can be tested on one `PackedMatrix`.
//!
//! Rows are tiled by [`TILE`] (64). For every (tile, activation group of [`ACT`] = 32 columns, plane) the
//! weights take [`PLANE_BYTES`] = 256 bytes: 8 blocks of 32 bytes, one per table group `j` (4 columns).
//! Byte `b` of block `j` holds, in its low nibble, the plane bits of columns `4j..4j+4` of row
//! [`lo_row`]`(b)` and, in its high nibble, those of row `lo_row(b) + 32` (nibble bit `i` = column `4j+i`).
//!
//! The row order inside a block is chosen for AVX2: a 128-bit table broadcast to both lanes is indexed by
//! the 32 low nibbles, two consecutive table groups are interleaved byte-wise (`unpacklo/hi_epi8`) and
//! summed pairwise (`maddubs`), which leaves rows 0..16, 16..32, 32..48, 48..64 in order in four int16
//! vectors. NEON and the scalar path use the same mapping.

/// Rows per tile. Padded rows have zero scales and are never written.
pub(crate) const TILE: usize = 64;
/// Activations per activation group: one table scale and one Σx each.
pub(crate) const ACT: usize = 32;
/// Table groups (of 4 activations) per activation group.
pub(crate) const TABLES_PER_ACT: usize = ACT / 4;
/// Bytes of one table group (16 int8 entries).
pub(crate) const TABLE_BYTES: usize = 16;
/// Bytes of packed weights per (tile, table group, plane).
pub(crate) const BLOCK: usize = 32;
/// Bytes of packed weights per (tile, activation group, plane).
pub(crate) const PLANE_BYTES: usize = BLOCK * TABLES_PER_ACT;

/// The row (0..32) whose nibble sits in the low half of byte `byte` (0..32) of a block.
pub(crate) const fn lo_row(byte: usize) -> usize {
    let lane = byte / 16;
    let i = byte % 16;
    (i / 8) * 16 + lane * 8 + i % 8
}

/// `LO_ROW[b] = lo_row(b)`.
pub(crate) const LO_ROW: [usize; BLOCK] = {
    let mut t = [0; BLOCK];
    let mut b = 0;
    while b < BLOCK {
        t[b] = lo_row(b);
        b += 1;
    }
    t
};

/// Inverse of [`LO_ROW`]: the byte holding row `r % 32` (low nibble for `r < 32`, high otherwise).
pub(crate) const ROW_BYTE: [usize; 32] = {
    let mut t = [0; 32];
    let mut b = 0;
    while b < BLOCK {
        t[lo_row(b)] = b;
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_mapping_is_a_permutation() {
        let mut seen = [false; 32];
        for b in 0..BLOCK {
            assert!(!seen[LO_ROW[b]]);
            seen[LO_ROW[b]] = true;
            assert_eq!(ROW_BYTE[LO_ROW[b]], b);
        }
        // Rows 0..8 are the first 8 bytes of lane 0, rows 8..16 the first 8 of lane 1.
        assert_eq!(&LO_ROW[..8], &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(&LO_ROW[16..24], &[8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(LO_ROW[8], 16);
        assert_eq!(LO_ROW[31], 31);
    }
}
