//! Typed errors of the kernels crate.

/// What can go wrong when packing weights, building tables or multiplying.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The inner dimension must be a multiple of 32 (pad the matrix otherwise).
    #[error("K = {0} is not a multiple of 32; pad the matrix to a multiple of 32 columns")]
    KNotMultipleOf32(usize),
    /// Only 1 to 4 bit codes are supported by the LUT kernels (up to 6 with super-block scales).
    #[error(
        "{0}-bit weights are not supported by the LUT kernels (use 1 to 4 bits, or up to 6 with \
         super-block scales)"
    )]
    UnsupportedBits(u8),
    /// Weights with super-block scales need K to be a whole number of super-blocks.
    #[error(
        "K = {cols} is not a multiple of the super-block size {super_block}; K-quant tensors come \
         in whole super-blocks"
    )]
    KNotMultipleOfSuperBlock {
        /// K of the matrix.
        cols: usize,
        /// Elements per super-block.
        super_block: usize,
    },
    /// Super-block weights take sub-scale groups of 16 or 32 elements.
    #[error(
        "sub-scale groups of {0} elements are not supported with super-block scales (use 16 or 32)"
    )]
    SuperBlockGroup(usize),
    /// A sub-scale or sub-min of a two-level matrix in groups of 16 with mins (Q2_K's form, which
    /// keeps the two in one byte) does not fit 4 bits.
    #[error(
        "sub-scale {sub_scale} or sub-min {sub_min} of group {index} does not fit 4 bits (groups \
         of 16 with mins keep both in one byte)"
    )]
    SubScaleOutOfRange {
        /// The group (row-major over the rows pushed).
        index: usize,
        /// Its sub-scale.
        sub_scale: i8,
        /// Its sub-min.
        sub_min: u8,
    },
    /// Sub-mins were given without super-mins, or the other way round.
    #[error("sub-mins and super-mins (dmin) must be given together")]
    MinsWithoutSuperMins,
    /// The group size does not divide K or is not one of the supported sizes.
    #[error(
        "group size {group} does not fit K = {cols} (use 32, 64, 128, 256, per row or per tensor)"
    )]
    BadGroupSize {
        /// The requested group size.
        group: usize,
        /// K of the matrix.
        cols: usize,
    },
    /// A buffer has the wrong number of elements.
    #[error("{what}: expected {expected} values, got {got}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A weight code does not fit in the declared bit width.
    #[error("code {code} at element {index} is out of range for {bits}-bit weights")]
    CodeOutOfRange {
        /// The code.
        code: u8,
        /// Its element index (row-major).
        index: usize,
        /// The declared bit width.
        bits: u8,
    },
    /// A matrix and the activations it is multiplied with disagree on K.
    #[error("shape mismatch: matrix has K = {matrix}, activations have K = {activations}")]
    ShapeMismatch {
        /// K of the matrix.
        matrix: usize,
        /// K of the activations.
        activations: usize,
    },
    /// `LUTRA_ISA` names an instruction set this CPU lacks.
    #[error("LUTRA_ISA={0} was requested but this CPU does not support it")]
    IsaUnsupported(&'static str),
    /// `LUTRA_ISA` holds something that is not an ISA name.
    #[error("unknown LUTRA_ISA value '{0}' (expected scalar, avx2 or neon)")]
    IsaUnknown(String),
    /// A row index past the last row of a matrix.
    #[error("row {row} is out of range for a matrix of {rows} rows")]
    RowOutOfRange {
        /// The requested row.
        row: usize,
        /// Rows of the matrix.
        rows: usize,
    },
    /// A block scale that is not finite or does not fit the f16 it is stored as.
    #[error("scale {value} of block {index} is not a finite f16 value")]
    ScaleOutOfRange {
        /// Index of the block (row-major).
        index: usize,
        /// The offending scale.
        value: f32,
    },
    /// A ternary code other than 0, 1, 2 (−1, 0, +1).
    #[error("ternary code {code} at element {index} is not 0, 1 or 2 (for -1, 0, +1)")]
    TernaryCodeOutOfRange {
        /// The code.
        code: u8,
        /// Its element index (row-major).
        index: usize,
    },
    /// Ternary matrices take one scale per row or per tensor; smaller groups would split triples.
    #[error(
        "ternary weights with groups of {group} (K = {cols}) are not supported by the 1.67-bit \
         kernel: it takes one scale per row or per tensor (use the 2-bit LUT form instead)"
    )]
    TernaryGrouping {
        /// The requested group size.
        group: usize,
        /// K of the matrix.
        cols: usize,
    },
    /// A kernel-measurement filter (`measure::CaseFilter`) that does not parse.
    #[error("bad kernel case filter: {0}")]
    BadCaseFilter(String),
    /// A range of a mapped file that cannot hold a buffer of the element type asked for.
    #[error("mapped bytes {start}..{end} (file of {file_len} bytes): {reason}")]
    BadMappedRange {
        /// First byte of the range.
        start: usize,
        /// One past the last byte.
        end: usize,
        /// Bytes in the mapping.
        file_len: usize,
        /// What is wrong (out of the file, misaligned, not a whole number of elements).
        reason: &'static str,
    },
    /// A packed form [`crate::PackedMatrix`] buffers cannot be taken from or given as raw parts.
    #[error("{0}")]
    UnsupportedForm(&'static str),
    /// The thread pool could not be created.
    #[error("could not start a pool of {threads} threads: {reason}")]
    ThreadPool {
        /// Threads asked for.
        threads: usize,
        /// Why the pool failed.
        reason: String,
    },
}

/// Result type of the kernels crate.
pub type Result<T> = std::result::Result<T, KernelError>;
