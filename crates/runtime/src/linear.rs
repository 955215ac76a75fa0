//! A linear layer's weight matrix in the kernel form that suits its source type, and the
//! activations it consumes.
//!
//! - low-bit codes (Q4_0, Q4_1, Q5_0, Q5_1, requantized weights) and K-quant super-blocks
//!   (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, with their integer sub-scales) → [`PackedMatrix`] (LUT kernels);
//! - ternary codes with one scale per row (BitNet b1.58: TQ1_0/TQ2_0, HF BitLinear) →
//!   [`TernaryMatrix`] (1.67 bits per weight);
//! - int8 codes (Q8_0, Q8_K, IQ2/IQ3 grids) → [`Int8Matrix`]; IQ4_NL and IQ4_XS → [`Int8Matrix`]
//!   holding their 4-bit codebook indices (4.5 and 5 bits per weight);
//! - dense values (F32/F16/BF16), and every matrix in reference mode → [`DenseMatrix`];
//! - any of these with its columns stored in another order (GPTQ act-order, sorted so that each
//!   group's columns are contiguous) → [`Linear::Permuted`], which reads the input gathered into
//!   that order: `W·x = W[:, perm]·x[perm]`.
//!
//! An [`Input`] holds one activation vector (or a batch) in every form its consumers need: the f32
//! values, LUT tables, int8 activations. It is prepared once and shared by all the matrices that
//! read the same vector (q/k/v; gate/up), so tables are built once per token, not once per matrix;
//! permuted consumers share one gathered copy per distinct column order.

use std::ops::Range;
use std::sync::Arc;

use lutra_kernels::{
    ActivationTables, Cpu, DenseMatrix, Grouping, Int8Activations, Int8Matrix, PackedMatrix,
    PackedMatrixBuilder, PlaneScales, QuantSpec, QuantizedWeights, SuperBlockMatrixBuilder,
    SuperBlockWeights, TernaryMatrix, TernaryTables, TernaryWeights,
};

use crate::error::{Error, Result};
use crate::weights::DecodedTensor;

/// Rows decoded at a time by [`Linear::lut_by_row_blocks`]: four tiles, whose codes (a few
/// hundred KiB for 7B shapes) stay in cache between decoding and packing.
pub const ROW_BLOCK: usize = 4 * PackedMatrixBuilder::ROWS_PER_TILE;

/// A weight matrix `[rows][cols]` (rows = output features) ready for the kernels.
pub enum Linear {
    /// Low-bit codes packed for the table-lookup kernels.
    Lut(PackedMatrix),
    /// Ternary weights `{−s, 0, +s}` (one `s` per row) packed 3 weights to 5 bits.
    Ternary(TernaryMatrix),
    /// Int8 codes with a scale per 32 (Q8_0, IQ4_NL, IQ4_XS as 4-bit codebook indices, ...) or per
    /// 16 (IQ2_XS, IQ2_S).
    Int8(Int8Matrix),
    /// f32 values.
    Dense(DenseMatrix),
    /// A matrix whose column `i` is input feature `perm[i]`.
    Permuted(Box<Permuted>),
}

/// A matrix stored with its columns in the order `perm` (never itself permuted).
pub struct Permuted {
    /// Column `i` of `inner` multiplies input feature `perm[i]`; shared by the matrices of one
    /// layer that have the same order, so that they share one gathered input.
    perm: Arc<[u32]>,
    inner: Linear,
}

/// Fills `slots` with the kernel matrix of each of `mats` when `kind` finds one in every one of
/// them; false (and `slots` partly filled) otherwise.
fn fill_same_kind<'a, T, const N: usize>(
    slots: &mut [&'a T; N],
    mats: &[&'a Linear; N],
    kind: impl Fn(&'a Linear) -> Option<&'a T>,
) -> bool {
    for (slot, &m) in slots.iter_mut().zip(mats) {
        match kind(m) {
            Some(p) => *slot = p,
            None => return false,
        }
    }
    true
}

/// Whether two column orders are the same (the same allocation, or equal values).
fn same_order(a: &Arc<[u32]>, b: &Arc<[u32]>) -> bool {
    Arc::ptr_eq(a, b) || a[..] == b[..]
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Linear({} {}x{})", self.kind(), self.rows(), self.cols())
    }
}

impl Linear {
    /// Converts a decoded tensor: exactly (no requantization) into the matching kernel matrix, or,
    /// when `reference` is set, dequantized into a dense f32 matrix.
    pub fn from_decoded(tensor: &DecodedTensor, reference: bool) -> Result<Linear> {
        if reference {
            let (rows, cols) = (tensor.rows(), tensor.cols());
            return Ok(Linear::Dense(DenseMatrix::new(
                rows,
                cols,
                tensor.dequantize(),
            )?));
        }
        if let Some(ternary) = ternary_weights(tensor) {
            return Ok(Linear::Ternary(TernaryMatrix::pack(&ternary)?));
        }
        Ok(match tensor {
            DecodedTensor::LowBit {
                rows,
                cols,
                bits,
                group_size,
                codes,
                scales,
                offsets,
            }
            | DecodedTensor::PlaneLowBit {
                rows,
                cols,
                bits,
                group_size,
                codes,
                scales,
                offsets,
            } => {
                let plane_scales = match tensor {
                    DecodedTensor::PlaneLowBit { .. } => PlaneScales::PerPlane,
                    _ => PlaneScales::Uniform,
                };
                let spec = QuantSpec {
                    rows: *rows,
                    cols: *cols,
                    bits: *bits,
                    grouping: grouping_of(*group_size, *cols),
                    plane_scales,
                };
                Linear::Lut(PackedMatrix::pack(&QuantizedWeights {
                    spec,
                    codes,
                    scales,
                    offsets: Some(offsets),
                })?)
            }
            DecodedTensor::SuperBlock { .. } => Linear::Lut(PackedMatrix::pack_super_blocks(
                &super_block_weights(tensor).expect("a two-level tensor"),
            )?),
            DecodedTensor::Int8 {
                rows,
                cols,
                block: 16,
                codes,
                scales,
            } => Linear::Int8(Int8Matrix::with_half_block_scales(
                *rows, *cols, codes, scales,
            )?),
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
                ..
            } => Linear::Int8(Int8Matrix::new(*rows, *cols, codes, scales)?),
            DecodedTensor::Iq4 {
                rows,
                cols,
                nibbles,
                scales,
            } => Linear::Int8(Int8Matrix::from_iq4_nibbles(*rows, *cols, nibbles, scales)?),
            DecodedTensor::Dense { rows, cols, values } => {
                Linear::Dense(DenseMatrix::new(*rows, *cols, values.clone())?)
            }
        })
    }

    /// Like [`Linear::from_decoded`], taking the tensor: dense values move into the matrix
    /// instead of being copied (no second full-size copy while a model loads).
    pub fn from_decoded_owned(tensor: DecodedTensor, reference: bool) -> Result<Linear> {
        match tensor {
            DecodedTensor::Dense { rows, cols, values } => {
                Ok(Linear::Dense(DenseMatrix::new(rows, cols, values)?))
            }
            tensor => Linear::from_decoded(&tensor, reference),
        }
    }

    /// The LUT form of a `[rows][cols]` tensor decoded [`ROW_BLOCK`] rows at a time by
    /// `decode_rows`, so that only one block of codes exists at once and it is packed while it is
    /// still in cache. `None` (nothing built) when the first block is neither low-bit codes with
    /// groups of 32, 64, 128 or 256 shorter than a row nor two-level (K-quant) codes, or when
    /// `accept_first` refuses it: such tensors take [`Linear::from_decoded`]. Exact, like
    /// [`Linear::from_decoded`]. With `zero_point` `Some(z)` (the file type's codes are centred on
    /// `z`, [`crate::gguf::GgmlType::zero_point`]) one-level codes are packed without offsets, and
    /// a block whose offsets are not exactly `−z·scale` is an error.
    pub fn lut_by_row_blocks(
        rows: usize,
        cols: usize,
        zero_point: Option<u8>,
        mut decode_rows: impl FnMut(Range<usize>) -> Result<DecodedTensor>,
        accept_first: impl FnOnce(&DecodedTensor) -> bool,
    ) -> Result<Option<Linear>> {
        let block = |start: usize| start..(start + ROW_BLOCK).min(rows);
        let first = decode_rows(block(0))?;
        let mut builder = match &first {
            DecodedTensor::LowBit {
                bits, group_size, ..
            } if matches!(group_size, 32 | 64 | 128 | 256) && *group_size < cols => {
                let spec = QuantSpec {
                    rows,
                    cols,
                    bits: *bits,
                    grouping: Grouping::Size(*group_size),
                    plane_scales: PlaneScales::Uniform,
                };
                let builder = match zero_point {
                    Some(z) => PackedMatrixBuilder::with_zero_point(spec, z)?,
                    None => PackedMatrixBuilder::new(spec, true)?,
                };
                RowBlockBuilder::Groups(builder, spec, zero_point)
            }
            DecodedTensor::SuperBlock {
                bits,
                group,
                zero_point,
                sub_mins,
                ..
            } => RowBlockBuilder::SuperBlocks(SuperBlockMatrixBuilder::new(
                rows,
                cols,
                *bits,
                *group,
                *zero_point,
                sub_mins.is_some(),
            )?),
            _ => return Ok(None),
        };
        if !accept_first(&first) {
            return Ok(None);
        }
        let (mut next, mut start) = (Some(first), 0);
        while start < rows {
            let tensor = match next.take() {
                Some(t) => t,
                None => decode_rows(block(start))?,
            };
            let n = builder.push(&tensor).map_err(|e| match e {
                Error::InvalidOption(why) => {
                    Error::InvalidOption(format!("rows {start}.. of a tensor {why}"))
                }
                e => e,
            })?;
            start += n;
        }
        Ok(Some(Linear::Lut(builder.finish()?)))
    }

    /// Like [`Linear::from_decoded`] for a tensor whose column `i` is input feature `perm[i]`
    /// (e.g. a GPTQ act-order layer sorted by group). Reference mode puts the columns back in
    /// input order in a dense matrix; otherwise the matrix keeps the tensor's order and reads the
    /// input gathered into it.
    pub fn from_decoded_permuted(
        tensor: &DecodedTensor,
        perm: Arc<[u32]>,
        reference: bool,
    ) -> Result<Linear> {
        let (rows, cols) = (tensor.rows(), tensor.cols());
        let mut seen = vec![false; cols];
        let valid = perm.len() == cols
            && perm.iter().all(|&c| {
                let fresh = seen.get(c as usize).is_some_and(|s| !s);
                if fresh {
                    seen[c as usize] = true;
                }
                fresh
            });
        if !valid {
            return Err(Error::InvalidOption(format!(
                "a column order of {} entries is not a permutation of the {cols} columns of a \
                 {rows}x{cols} matrix",
                perm.len()
            )));
        }
        if reference {
            let stored = tensor.dequantize();
            let mut values = vec![0.0; rows * cols];
            for (out, row) in values.chunks_exact_mut(cols).zip(stored.chunks_exact(cols)) {
                for (&c, &v) in perm.iter().zip(row) {
                    out[c as usize] = v;
                }
            }
            return Ok(Linear::Dense(DenseMatrix::new(rows, cols, values)?));
        }
        let inner = Linear::from_decoded(tensor, false)?;
        Ok(Linear::Permuted(Box::new(Permuted { perm, inner })))
    }

    /// The column order of a [`Linear::Permuted`] matrix: column `i` reads input feature
    /// `order[i]`.
    pub fn column_order(&self) -> Option<&Arc<[u32]>> {
        match self {
            Linear::Permuted(p) => Some(&p.perm),
            _ => None,
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Linear::Lut(m) => m.rows(),
            Linear::Ternary(m) => m.rows(),
            Linear::Int8(m) => m.rows(),
            Linear::Dense(m) => m.rows(),
            Linear::Permuted(p) => p.inner.rows(),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Linear::Lut(m) => m.cols(),
            Linear::Ternary(m) => m.cols(),
            Linear::Int8(m) => m.cols(),
            Linear::Dense(m) => m.cols(),
            Linear::Permuted(p) => p.inner.cols(),
        }
    }

    /// Bytes of weights (and scales, and column order) in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Lut(m) => m.bytes(),
            Linear::Ternary(m) => m.bytes(),
            Linear::Int8(m) => m.bytes(),
            Linear::Dense(m) => m.rows() * m.cols() * 4,
            Linear::Permuted(p) => p.inner.bytes() + 4 * p.perm.len(),
        }
    }

    /// Short name of the in-memory form, e.g. `lut4 g32`, `lut6 g16 two-level` (K-quant
    /// sub-scales), `ternary 1.67b`, `int8`, `int8 iq4` (IQ4 codebook indices), `f32`, `lut4 g128 permuted`.
    pub fn kind(&self) -> String {
        match self {
            Linear::Lut(m) => {
                let spec = m.spec();
                let group = match spec.grouping {
                    Grouping::Size(g) => format!("g{g}"),
                    Grouping::PerRow => "per-row".to_string(),
                    Grouping::PerTensor => "per-tensor".to_string(),
                };
                let two_level = if m.has_super_block_scales() {
                    " two-level"
                } else {
                    ""
                };
                let per_plane = match spec.plane_scales {
                    PlaneScales::PerPlane => " per-plane",
                    PlaneScales::Uniform => "",
                };
                let mapped = if m.is_mapped() { " mapped" } else { "" };
                format!("lut{} {group}{per_plane}{two_level}{mapped}", spec.bits)
            }
            Linear::Ternary(_) => "ternary 1.67b".to_string(),
            Linear::Int8(m) if m.has_nibble_codes() => "int8 iq4".to_string(),
            Linear::Int8(_) => "int8".to_string(),
            Linear::Dense(_) => "f32".to_string(),
            Linear::Permuted(p) => format!("{} permuted", p.inner.kind()),
        }
    }

    /// `out[n][r] = Σ_k w[r][k]·x[n][k]` for the `input.tokens()` vectors of a prepared `input`;
    /// `out` holds `tokens · rows` values.
    pub fn matmul(&self, cpu: &Cpu, input: &Input, out: &mut [f32]) -> Result<()> {
        let n = input.tokens;
        if !input.ready || input.cols != self.cols() || out.len() != n * self.rows() {
            return Err(Error::InvalidOption(format!(
                "matmul of a {}x{} matrix with {} inputs of {} (prepared: {}) into {} outputs",
                self.rows(),
                self.cols(),
                n,
                input.cols,
                input.ready,
                out.len()
            )));
        }
        let missing = |what: &str| {
            Error::InvalidOption(format!(
                "input was not prepared with {what} for a {} matrix",
                self.kind()
            ))
        };
        // A form counts only if the last `prepare` built it from the current vectors.
        match self {
            Linear::Lut(m) if input.dot > 0 && m.has_dot_form() => {
                let (head, tail) = out.split_at_mut(input.dot * self.rows());
                let acts = input
                    .dot_acts()
                    .ok_or_else(|| missing("int8 activations"))?;
                m.matmul_dot(cpu, acts, head)?;
                if !tail.is_empty() {
                    let tables = input.dot_tail.as_ref().filter(|_| input.built.dot);
                    m.matmul(cpu, tables.ok_or_else(|| missing("tables"))?, tail)?;
                }
            }
            Linear::Lut(m) => match (&input.tables, input.built.tables) {
                (Some(tables), true) => m.matmul(cpu, tables, out)?,
                _ => return Err(missing("tables")),
            },
            Linear::Ternary(m) => match (&input.ternary, input.built.ternary) {
                (Some(tables), true) => m.matmul(cpu, tables, out)?,
                _ => return Err(missing("ternary tables")),
            },
            Linear::Int8(m) => match (&input.int8, input.built.int8) {
                (Some(acts), true) => m.matmul_prompt(cpu, acts, input.prompt, out)?,
                _ => return Err(missing("int8 activations")),
            },
            Linear::Dense(m) => m.matmul(cpu, input.values(), n, out)?,
            Linear::Permuted(p) => {
                let gathered = input.orders[..input.orders_used]
                    .iter()
                    .find(|o| o.perm.as_ref().is_some_and(|q| same_order(q, &p.perm)))
                    .ok_or_else(|| missing("this matrix's column order"))?;
                p.inner.matmul(cpu, &gathered.input, out)?;
            }
        }
        Ok(())
    }

    /// [`Linear::matmul`] of each matrix `mats[i]` into `outs[i]`, all reading one prepared
    /// `input` (a layer's q/k/v, gate/up): one hand-over to the threads for all of them when they
    /// are all LUT or all ternary matrices, else one matmul each. Results are the same either way.
    pub fn matmul_many<const N: usize>(
        cpu: &Cpu,
        input: &Input,
        mats: [&Linear; N],
        mut outs: [&mut [f32]; N],
    ) -> Result<()> {
        let ready = input.ready && mats.iter().all(|m| m.cols() == input.cols);
        let lengths = mats
            .iter()
            .zip(&outs)
            .all(|(m, o)| o.len() == input.tokens * m.rows());
        if ready && lengths && input.dot > 0 {
            if let (Some(Linear::Lut(first)), Some(acts)) = (mats.first(), input.dot_acts()) {
                let mut packed = [first; N];
                if fill_same_kind(&mut packed, &mats, |m| match m {
                    Linear::Lut(p) if p.has_dot_form() => Some(p),
                    _ => None,
                }) {
                    let mut heads = outs.each_mut().map(|o| &mut o[..]);
                    let mut tails: [&mut [f32]; N] = std::array::from_fn(|_| &mut [][..]);
                    for (i, o) in heads.iter_mut().enumerate() {
                        let (h, t) = std::mem::take(o).split_at_mut(input.dot * packed[i].rows());
                        *o = h;
                        tails[i] = t;
                    }
                    PackedMatrix::matmul_many_dot(cpu, acts, &packed, &mut heads)?;
                    if input.dot < input.tokens {
                        match &input.dot_tail {
                            Some(tables) => {
                                PackedMatrix::matmul_many(cpu, tables, &packed, &mut tails)?
                            }
                            None => {
                                return Err(Error::InvalidOption(
                                    "input was not prepared with tables for its last rows".into(),
                                ))
                            }
                        }
                    }
                    return Ok(());
                }
            }
        }
        if ready && lengths && input.dot == 0 {
            match (mats.first(), &input.tables, &input.ternary) {
                (Some(Linear::Lut(first)), Some(tables), _) if input.built.tables => {
                    let mut packed = [first; N];
                    if fill_same_kind(&mut packed, &mats, |m| match m {
                        Linear::Lut(p) => Some(p),
                        _ => None,
                    }) {
                        return Ok(PackedMatrix::matmul_many(cpu, tables, &packed, &mut outs)?);
                    }
                }
                (Some(Linear::Ternary(first)), _, Some(tables)) if input.built.ternary => {
                    let mut packed = [first; N];
                    if fill_same_kind(&mut packed, &mats, |m| match m {
                        Linear::Ternary(p) => Some(p),
                        _ => None,
                    }) {
                        return Ok(TernaryMatrix::matmul_many(cpu, tables, &packed, &mut outs)?);
                    }
                }
                _ => {}
            }
        }
        // Mixed kinds, other kinds, or bad arguments (which `matmul` reports).
        for (m, out) in mats.into_iter().zip(outs) {
            m.matmul(cpu, input, out)?;
        }
        Ok(())
    }

    /// Row `r` as f32 (embedding lookup); `out` holds `cols` values.
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Linear::Lut(m) => m.dequantize_row(r, out)?,
            Linear::Ternary(m) => m.dequantize_row(r, out)?,
            Linear::Int8(m) => m.dequantize_row(r, out)?,
            Linear::Dense(m) => out.copy_from_slice(m.row(r)),
            Linear::Permuted(p) => {
                // Rows are read for embeddings, which the loaders never permute: a scratch row
                // here costs nothing on the token path.
                let mut stored = vec![0.0; out.len()];
                p.inner.row(r, &mut stored)?;
                for (&c, &v) in p.perm.iter().zip(&stored) {
                    out[c as usize] = v;
                }
            }
        }
        Ok(())
    }
}

/// The kernels' grouping for groups of `group_size` along rows of `cols` (sizes the kernels do not
/// take are passed on for [`PackedMatrix::pack`] to refuse by name).
fn grouping_of(group_size: usize, cols: usize) -> Grouping {
    match group_size {
        32 | 64 | 128 | 256 => Grouping::Size(group_size),
        g if g == cols => Grouping::PerRow,
        g => Grouping::Size(g),
    }
}

/// The tensor as ternary weights for [`TernaryMatrix`], when it is one: 2-bit codes in {0, 1, 2}
/// with one group per row and offset = −scale in every row, i.e. `w ∈ {−s, 0, +s}`. Ternary
/// tensors with smaller groups keep the 2-bit LUT form (the loader merges uniform groups per row).
fn ternary_weights(tensor: &DecodedTensor) -> Option<TernaryWeights<'_>> {
    let DecodedTensor::LowBit {
        rows,
        cols,
        bits: 2,
        group_size,
        codes,
        scales,
        offsets,
    } = tensor
    else {
        return None;
    };
    let ternary = group_size == cols
        && scales.len() == *rows
        && offsets.len() == *rows
        && offsets.iter().zip(scales).all(|(&m, &s)| m == -s)
        && codes.iter().all(|&q| q <= 2);
    ternary.then_some(TernaryWeights {
        rows: *rows,
        cols: *cols,
        grouping: Grouping::PerRow,
        codes,
        scales,
    })
}

/// Which forms of an activation vector a matrix reads (besides the f32 values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Forms {
    tables: bool,
    ternary: bool,
    int8: bool,
    /// The dot path's split: int8 activations of the leading (prompt) vectors and tables of the
    /// rest, for the LUT matrices that have a dot form.
    dot: bool,
}

impl Forms {
    /// The forms `m` reads from an input outside the dot path; a permuted matrix reads none of
    /// them (it reads a gathered copy).
    fn of(m: &Linear) -> Forms {
        Forms {
            tables: matches!(m, Linear::Lut(_)),
            ternary: matches!(m, Linear::Ternary(_)),
            int8: matches!(m, Linear::Int8(_)),
            dot: false,
        }
    }

    /// The buffers an input needs for `m`: its forms, and the dot path's split for a LUT matrix
    /// that has a dot form ([`Input::prepare_rows`]).
    fn buffers(m: &Linear) -> Forms {
        Forms {
            dot: has_dot_form(m),
            ..Forms::of(m)
        }
    }

    /// The forms the input gathered for a permuted matrix must hold.
    fn of_permuted(m: &Linear) -> Forms {
        match m {
            Linear::Permuted(p) => Forms::of(&p.inner),
            _ => Forms::default(),
        }
    }

    fn union(self, o: Forms) -> Forms {
        Forms {
            tables: self.tables || o.tables,
            ternary: self.ternary || o.ternary,
            int8: self.int8 || o.int8,
            dot: self.dot || o.dot,
        }
    }
}

/// Whether `m` is a LUT matrix the int8 dot path can multiply.
fn has_dot_form(m: &Linear) -> bool {
    matches!(m, Linear::Lut(p) if p.has_dot_form())
}

/// The current vectors gathered into one column order.
struct Gathered {
    /// The order of the last [`Input::prepare`] that used this slot.
    perm: Option<Arc<[u32]>>,
    input: Input,
}

/// Activation vectors of length `cols` (up to `max_batch` of them) in every form their consumer
/// matrices read; all buffers are allocated by [`Input::for_consumers`] (tables reach their full
/// size on the first batch as large as `max_batch`).
pub struct Input {
    cols: usize,
    max_batch: usize,
    tokens: usize,
    ready: bool,
    /// Forms built from the current vectors by the last [`Input::prepare`].
    built: Forms,
    /// Leading vectors that the last prepare quantized to int8 for the dot path of its LUT
    /// consumers with a dot form (`dot_head` holds these, `dot_tail` the tables of the rest);
    /// 0 when there is no split. The other forms always hold every vector.
    dot: usize,
    /// Leading vectors that the last prepare was told are prompt rows: int8 matrices multiply
    /// these on their dot GEMM where the CPU has one.
    prompt: usize,
    values: Vec<f32>,
    tables: Option<ActivationTables>,
    ternary: Option<TernaryTables>,
    int8: Option<Int8Activations>,
    dot_head: Option<Int8Activations>,
    dot_tail: Option<ActivationTables>,
    /// One slot per column order that one `prepare` may have to serve at once.
    orders: Vec<Gathered>,
    /// Slots filled by the last `prepare`.
    orders_used: usize,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("cols", &self.cols)
            .field("tokens", &self.tokens)
            .field("tables", &self.tables.is_some())
            .field("ternary", &self.ternary.is_some())
            .field("int8", &self.int8.is_some())
            .field("orders", &self.orders.len())
            .finish()
    }
}

impl Input {
    /// Buffers for up to `max_batch` vectors of `cols` values, with the forms the matrices of
    /// `groups` need; each group is the set of matrices that read one prepared input (e.g. one
    /// layer's q/k/v), which bounds how many column orders are gathered at once.
    pub fn for_consumers<'a, G: AsRef<[&'a Linear]>>(
        cols: usize,
        max_batch: usize,
        groups: impl IntoIterator<Item = G>,
    ) -> Input {
        let (mut plain, mut permuted, mut slots) = (Forms::default(), Forms::default(), 0);
        for group in groups {
            let group = group.as_ref();
            for m in group {
                plain = plain.union(Forms::buffers(m));
                permuted = permuted.union(Forms::of_permuted(m));
            }
            slots = slots.max(distinct_orders(group));
        }
        let mut input = Input::with_forms(cols, max_batch, plain);
        input.orders = (0..slots)
            .map(|_| Gathered {
                perm: None,
                input: Input::with_forms(cols, max_batch, permuted),
            })
            .collect();
        input
    }

    fn with_forms(cols: usize, max_batch: usize, forms: Forms) -> Input {
        Input {
            cols,
            max_batch,
            tokens: 0,
            ready: false,
            built: Forms::default(),
            dot: 0,
            prompt: 0,
            values: vec![0.0; cols * max_batch],
            tables: forms.tables.then(|| ActivationTables::new(cols)),
            ternary: forms.ternary.then(|| TernaryTables::new(cols)),
            int8: forms.int8.then(|| Int8Activations::new(cols)),
            dot_head: forms.dot.then(|| Int8Activations::new(cols)),
            dot_tail: forms.dot.then(|| ActivationTables::new(cols)),
            orders: Vec::new(),
            orders_used: 0,
        }
    }

    /// Vector length.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Vectors held since the last [`Input::values_mut`].
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Space for `tokens` vectors (`[tokens][cols]`, at most `max_batch`) to be written; the
    /// input must be [`prepare`](Input::prepare)d again before a matmul.
    pub fn values_mut(&mut self, tokens: usize) -> &mut [f32] {
        self.tokens = tokens.min(self.max_batch);
        self.ready = false;
        self.built = Forms::default();
        self.dot = 0;
        self.prompt = 0;
        self.orders_used = 0;
        &mut self.values[..self.tokens * self.cols]
    }

    /// The current vectors.
    pub fn values(&self) -> &[f32] {
        &self.values[..self.tokens * self.cols]
    }

    /// Builds what `consumers` read from the current vectors: the tables and int8 activations,
    /// once for all of them, and one gathered copy per distinct column order of the permuted ones.
    pub fn prepare(&mut self, cpu: &Cpu, consumers: &[&Linear]) -> Result<()> {
        self.prepare_rows(cpu, consumers, 0)
    }

    /// [`Input::prepare`], where the consumers that are LUT matrices with a dot form multiply
    /// the first `dot_tokens` vectors on the dot path
    /// ([`lutra_kernels::PackedMatrix::matmul_dot`], int8 activations) and the rest with tables,
    /// while every other consumer reads all vectors in its own form (int8 matrices multiply the
    /// first `dot_tokens` on their own dot GEMM, [`lutra_kernels::Int8Matrix::matmul_prompt`],
    /// where the CPU has one). The caller chooses the rows
    /// (the prompts of a batch, see [`crate::llama::SequenceBatch::prompt`]), so a sequence's
    /// results do not depend on which other sequences share its batch.
    pub fn prepare_rows(
        &mut self,
        cpu: &Cpu,
        consumers: &[&Linear],
        dot_tokens: usize,
    ) -> Result<()> {
        self.ready = false;
        let split = dot_tokens > 0 && consumers.iter().any(|m| has_dot_form(m));
        let plain = consumers
            .iter()
            .filter(|m| !(split && has_dot_form(m)))
            .fold(Forms::default(), |f, m| f.union(Forms::of(m)));
        self.build(cpu, plain)?;
        self.dot = 0;
        self.prompt = dot_tokens.min(self.tokens);
        if split {
            self.build_split(cpu, dot_tokens.min(self.tokens))?;
        }

        // Assign a slot to each distinct order, in the order the consumers come.
        self.orders_used = 0;
        for perm in consumers.iter().filter_map(|m| m.column_order()) {
            let used = &self.orders[..self.orders_used];
            if used
                .iter()
                .any(|o| o.perm.as_ref().is_some_and(|q| same_order(q, perm)))
            {
                continue;
            }
            let slot = self.orders.get_mut(self.orders_used).ok_or_else(|| {
                Error::InvalidOption(format!(
                    "the input was sized for {} column orders at once; its consumers have more",
                    self.orders_used
                ))
            })?;
            slot.perm = Some(Arc::clone(perm));
            self.orders_used += 1;
        }
        let n = self.tokens;
        for slot in &mut self.orders[..self.orders_used] {
            let Some(perm) = &slot.perm else { continue };
            let forms = consumers
                .iter()
                .filter(|m| m.column_order().is_some_and(|q| same_order(q, perm)))
                .fold(Forms::default(), |f, m| f.union(Forms::of_permuted(m)));
            let gathered = slot.input.values_mut(n);
            for (out, x) in gathered
                .chunks_exact_mut(self.cols)
                .zip(self.values.chunks_exact(self.cols))
            {
                for (o, &c) in out.iter_mut().zip(perm.iter()) {
                    *o = x[c as usize];
                }
            }
            slot.input.build(cpu, forms)?;
            slot.input.prompt = self.prompt;
            slot.input.ready = true;
        }
        self.ready = true;
        Ok(())
    }

    /// The dot path's split: int8 activations of the first `dot` vectors, tables of the rest.
    fn build_split(&mut self, cpu: &Cpu, dot: usize) -> Result<()> {
        let (n, cols) = (self.tokens, self.cols);
        let (Some(head_acts), Some(tail_tables)) = (self.dot_head.as_mut(), self.dot_tail.as_mut())
        else {
            return Err(Error::InvalidOption(format!(
                "an input of {cols} values was sized without the dot path's forms"
            )));
        };
        let (head, tail) = self.values[..n * cols].split_at(dot * cols);
        // When int8 consumers already hold every vector and all are on the dot path, those
        // activations are the head's (see `dot_acts`): quantized once.
        if !(self.built.int8 && dot == n) {
            head_acts.build(cpu, head, dot)?;
        }
        tail_tables.build(cpu, tail, n - dot)?;
        self.built.dot = true;
        self.dot = dot;
        Ok(())
    }

    /// The int8 activations of the dot path's leading vectors, when the last prepare split them:
    /// the int8 form itself when it was built for int8 consumers and every vector is a dot row.
    fn dot_acts(&self) -> Option<&Int8Activations> {
        if !self.built.dot {
            None
        } else if self.built.int8 && self.dot == self.tokens {
            self.int8.as_ref()
        } else {
            self.dot_head.as_ref()
        }
    }

    /// Builds the forms `want` of the current vectors.
    fn build(&mut self, cpu: &Cpu, want: Forms) -> Result<()> {
        let x = &self.values[..self.tokens * self.cols];
        let absent = |what: &str| {
            Error::InvalidOption(format!(
                "an input of {} values was sized without {what}",
                self.cols
            ))
        };
        if want.tables {
            let tables = self.tables.as_mut().ok_or_else(|| absent("tables"))?;
            tables.build(cpu, x, self.tokens)?;
        }
        if want.ternary {
            let tables = self
                .ternary
                .as_mut()
                .ok_or_else(|| absent("ternary tables"))?;
            tables.build(cpu, x, self.tokens)?;
        }
        if want.int8 {
            let int8 = self
                .int8
                .as_mut()
                .ok_or_else(|| absent("int8 activations"))?;
            int8.build(cpu, x, self.tokens)?;
        }
        self.built = want;
        Ok(())
    }
}

/// How many distinct column orders the matrices of `group` have.
fn distinct_orders(group: &[&Linear]) -> usize {
    let orders: Vec<&Arc<[u32]>> = group.iter().filter_map(|m| m.column_order()).collect();
    (0..orders.len())
        .filter(|&i| !orders[..i].iter().any(|q| same_order(q, orders[i])))
        .count()
}

/// The kernels' view of a two-level (K-quant) tensor; `None` for other forms.
fn super_block_weights(tensor: &DecodedTensor) -> Option<SuperBlockWeights<'_>> {
    match tensor {
        DecodedTensor::SuperBlock {
            rows,
            cols,
            bits,
            group,
            zero_point,
            codes,
            sub_scales,
            sub_mins,
            d,
            dmin,
        } => Some(SuperBlockWeights {
            rows: *rows,
            cols: *cols,
            bits: *bits,
            group: *group,
            zero_point: *zero_point,
            codes,
            sub_scales,
            sub_mins: sub_mins.as_deref(),
            d,
            dmin: dmin.as_deref(),
        }),
        _ => None,
    }
}

/// The builder of [`Linear::lut_by_row_blocks`], for the form of the tensor's first rows.
enum RowBlockBuilder {
    /// One-level groups (with the matrix's spec, which each block must share but for its rows,
    /// and the zero point its codes are centred on, if they have no offsets).
    Groups(PackedMatrixBuilder, QuantSpec, Option<u8>),
    /// Two-level (K-quant) scales.
    SuperBlocks(SuperBlockMatrixBuilder),
}

impl RowBlockBuilder {
    /// Packs the rows of `tensor`, the next block; returns how many. A block decoded to another
    /// form than the first is an error saying so.
    fn push(&mut self, tensor: &DecodedTensor) -> Result<usize> {
        match (self, tensor) {
            (
                RowBlockBuilder::Groups(builder, spec, zero_point),
                DecodedTensor::LowBit {
                    rows: n,
                    bits,
                    group_size,
                    codes,
                    scales,
                    offsets,
                    ..
                },
            ) if Grouping::Size(*group_size) == spec.grouping && *bits == spec.bits && *n > 0 => {
                if let Some(z) = zero_point {
                    let z = f32::from(*z);
                    if let Some(g) = offsets.iter().zip(scales).position(|(&o, &s)| o != -z * s) {
                        return Err(Error::InvalidOption(format!(
                            "has an offset {} in group {g} that is not −{z}·scale (scale {})",
                            offsets[g], scales[g]
                        )));
                    }
                }
                builder.push_rows(&QuantizedWeights {
                    spec: QuantSpec { rows: *n, ..*spec },
                    codes,
                    scales,
                    offsets: zero_point.is_none().then_some(&offsets[..]),
                })?;
                Ok(*n)
            }
            (RowBlockBuilder::SuperBlocks(builder), tensor) => match super_block_weights(tensor) {
                Some(weights) if weights.rows > 0 => {
                    builder.push_rows(&weights)?;
                    Ok(weights.rows)
                }
                _ => Err(Error::InvalidOption(
                    "decoded to another form than its first rows".to_string(),
                )),
            },
            _ => Err(Error::InvalidOption(
                "decoded to another form than its first rows".to_string(),
            )),
        }
    }

    fn finish(self) -> Result<PackedMatrix> {
        Ok(match self {
            RowBlockBuilder::Groups(builder, ..) => builder.finish()?,
            RowBlockBuilder::SuperBlocks(builder) => builder.finish()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_form_is_dense_and_multiplies_exactly() {
        let t = DecodedTensor::LowBit {
            rows: 2,
            cols: 32,
            bits: 2,
            group_size: 32,
            codes: (0..64).map(|i| (i % 4) as u8).collect(),
            scales: vec![0.5, 1.0],
            offsets: vec![0.0, -1.0],
        };
        let m = Linear::from_decoded(&t, true).unwrap();
        assert_eq!((m.rows(), m.cols(), m.kind().as_str()), (2, 32, "f32"));
        let cpu = Cpu::with_isa(lutra_kernels::Isa::Scalar, 1).unwrap();
        let mut input = Input::for_consumers(32, 2, [[&m]]);
        let mut out = vec![0.0; 2];
        // Not prepared yet: a typed error, not garbage.
        assert!(m.matmul(&cpu, &input, &mut out).is_err());
        input.values_mut(1).fill(1.0);
        input.prepare(&cpu, &[&m]).unwrap();
        m.matmul(&cpu, &input, &mut out).unwrap();
        // Row 0: 0.5 · 8·(0+1+2+3); row 1: 1.0 · 48 − 32.
        assert!(
            (out[0] - 24.0).abs() < 1e-4 && (out[1] - 16.0).abs() < 1e-4,
            "{out:?}"
        );
        let mut row = vec![0.0; 32];
        m.row(1, &mut row).unwrap();
        assert_eq!(&row[..4], &[-1.0, 0.0, 1.0, 2.0]);
    }

    /// Rows `range` of a low-bit tensor, as its own tensor.
    fn rows_of(t: &DecodedTensor, range: Range<usize>) -> DecodedTensor {
        let DecodedTensor::LowBit {
            cols,
            bits,
            group_size,
            codes,
            scales,
            offsets,
            ..
        } = t
        else {
            return t.clone();
        };
        let groups = cols / group_size;
        DecodedTensor::LowBit {
            rows: range.len(),
            cols: *cols,
            bits: *bits,
            group_size: *group_size,
            codes: codes[range.start * cols..range.end * cols].to_vec(),
            scales: scales[range.start * groups..range.end * groups].to_vec(),
            offsets: offsets[range.start * groups..range.end * groups].to_vec(),
        }
    }

    /// `blocks` has the kind and size of `whole` and the same rows (those at the edges of tiles
    /// and of row blocks, and the last).
    fn assert_same_rows(whole: &Linear, blocks: &Linear, rows: usize, cols: usize) {
        assert_eq!(
            (blocks.kind(), blocks.bytes()),
            (whole.kind(), whole.bytes())
        );
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in [0, 1, 63, 64, ROW_BLOCK - 1, ROW_BLOCK, rows - 1] {
            whole.row(r, &mut a).unwrap();
            blocks.row(r, &mut b).unwrap();
            assert_eq!(a, b, "row {r}");
        }
    }

    /// `bits`-bit codes in groups of 32 with scales `s` from 0.125 to 1.125 and offsets
    /// `offset(g, s)` for group `g`.
    fn grouped_low_bit(
        rows: usize,
        cols: usize,
        bits: u8,
        offset: fn(usize, f32) -> f32,
    ) -> DecodedTensor {
        let scales: Vec<f32> = (0..rows * cols / 32)
            .map(|g| 0.125 * (g % 9 + 1) as f32)
            .collect();
        DecodedTensor::LowBit {
            rows,
            cols,
            bits,
            group_size: 32,
            codes: (0..rows * cols)
                .map(|i| ((i * 5 + i / 7) % (1 << bits)) as u8)
                .collect(),
            offsets: scales
                .iter()
                .enumerate()
                .map(|(g, &s)| offset(g, s))
                .collect(),
            scales,
        }
    }

    #[test]
    fn row_blocks_build_the_same_lut_matrix_as_the_whole_tensor() {
        // Two blocks of rows (a whole one and a partial one), 3-bit codes in groups of 32.
        let (rows, cols) = (ROW_BLOCK + 44, 96);
        let t = grouped_low_bit(rows, cols, 3, |g, _| -0.5 * (g % 5) as f32);
        let whole = Linear::from_decoded(&t, false).unwrap();
        let mut asked = Vec::new();
        let blocks = Linear::lut_by_row_blocks(
            rows,
            cols,
            None,
            |range| {
                asked.push(range.clone());
                Ok(rows_of(&t, range))
            },
            |_| true,
        )
        .unwrap()
        .expect("low-bit codes in groups of 32 take the block path");
        assert_eq!(asked, [0..ROW_BLOCK, ROW_BLOCK..rows]);
        assert_same_rows(&whole, &blocks, rows, cols);
    }

    #[test]
    fn row_blocks_of_a_zero_point_type_hold_no_offsets() {
        // Q4_0's form: 4-bit codes, offsets −8·scale; a whole block and a partial one.
        let (rows, cols) = (ROW_BLOCK + 44, 96);
        let t = grouped_low_bit(rows, cols, 4, |_, s| -8.0 * s);
        let whole = Linear::from_decoded(&t, false).unwrap();
        let centred =
            Linear::lut_by_row_blocks(rows, cols, Some(8), |r| Ok(rows_of(&t, r)), |_| true)
                .unwrap()
                .expect("low-bit codes in groups of 32 take the block path");
        // The same weights without an f16 offset beside each f16 scale.
        assert_eq!(
            whole.bytes() - centred.bytes(),
            2 * rows.div_ceil(64) * 64 * (cols / 32)
        );
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in [0, 63, 64, ROW_BLOCK, rows - 1] {
            whole.row(r, &mut a).unwrap();
            centred.row(r, &mut b).unwrap();
            assert_eq!(a, b, "row {r}");
        }
        // Offsets that are not −z·scale (a decoder and a type table that disagree) are an error.
        let wrong =
            Linear::lut_by_row_blocks(rows, cols, Some(7), |r| Ok(rows_of(&t, r)), |_| true);
        assert!(
            matches!(&wrong, Err(Error::InvalidOption(why)) if why.contains("not −7·scale")),
            "{:?}",
            wrong.err()
        );
    }

    #[test]
    fn row_blocks_of_two_level_codes_build_the_whole_tensors_matrix() {
        // Q2_K's form (2-bit codes, groups of 16 with sub-mins), a whole and a partial block.
        let (rows, cols) = (ROW_BLOCK + 70, 512);
        let (groups, supers) = (rows * cols / 16, rows * cols / 256);
        let f16s = |n: usize, k: usize| -> Vec<u16> {
            (0..n)
                .map(|i| half::f16::from_f32(0.01 * ((i * k) % 13 + 1) as f32).to_bits())
                .collect()
        };
        let t = DecodedTensor::SuperBlock {
            rows,
            cols,
            bits: 2,
            group: 16,
            zero_point: 0,
            codes: (0..rows * cols)
                .map(|i| ((i * 7 + i / 11) % 4) as u8)
                .collect(),
            sub_scales: (0..groups).map(|g| (g % 15) as i8).collect(),
            sub_mins: Some((0..groups).map(|g| (g * 3 % 16) as u8).collect()),
            d: f16s(supers, 5),
            dmin: Some(f16s(supers, 3)),
        };
        let whole = Linear::from_decoded(&t, false).unwrap();
        let blocks = Linear::lut_by_row_blocks(
            rows,
            cols,
            None,
            |r| Ok(t.row_range(r.start, r.len())),
            |_| true,
        )
        .unwrap()
        .expect("two-level codes take the block path");
        assert_same_rows(&whole, &blocks, rows, cols);
        let mut a = vec![0.0; cols];
        whole.row(rows - 1, &mut a).unwrap();
        assert!(a.iter().any(|&w| w != 0.0));
        // A later block in another form is an error, not a silent mix.
        let mut calls = 0;
        let mixed = Linear::lut_by_row_blocks(
            rows,
            cols,
            None,
            |r| {
                calls += 1;
                Ok(if calls == 1 {
                    t.row_range(r.start, r.len())
                } else {
                    low_bit(r.len(), cols, 2, |s| -0.5 * s)
                })
            },
            |_| true,
        );
        assert!(
            matches!(mixed, Err(Error::InvalidOption(_))),
            "{:?}",
            mixed.err()
        );
    }

    #[test]
    fn row_blocks_leave_other_forms_to_the_whole_tensor() {
        let dense = DecodedTensor::Dense {
            rows: 4,
            cols: 32,
            values: vec![1.0; 128],
        };
        let per_row = low_bit(4, 96, 4, |s| -0.5 * s);
        for t in [&dense, &per_row] {
            let built = Linear::lut_by_row_blocks(4, t.cols(), None, |_| Ok(t.clone()), |_| true);
            assert!(built.unwrap().is_none(), "{t:?}");
        }
        let grouped = rows_of(
            &DecodedTensor::LowBit {
                rows: 4,
                cols: 64,
                bits: 2,
                group_size: 32,
                codes: vec![1; 256],
                scales: vec![1.0; 8],
                offsets: vec![0.0; 8],
            },
            0..4,
        );
        let refused = Linear::lut_by_row_blocks(4, 64, None, |_| Ok(grouped.clone()), |_| false);
        assert!(refused.unwrap().is_none());
        // A decoding error is the caller's error.
        let failed = Linear::lut_by_row_blocks(
            4,
            64,
            None,
            |_| Err(Error::InvalidOption("x".into())),
            |_| true,
        );
        assert!(matches!(failed, Err(Error::InvalidOption(_))));
    }

    #[test]
    fn owned_tensors_convert_like_borrowed_ones() {
        let values: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
        let dense = DecodedTensor::Dense {
            rows: 2,
            cols: 32,
            values: values.clone(),
        };
        let low_bit = DecodedTensor::LowBit {
            rows: 2,
            cols: 32,
            bits: 2,
            group_size: 32,
            codes: (0..64).map(|i| (i % 4) as u8).collect(),
            scales: vec![0.5, 1.0],
            offsets: vec![0.0, -1.0],
        };
        for reference in [false, true] {
            for t in [&dense, &low_bit] {
                let borrowed = Linear::from_decoded(t, reference).unwrap();
                let owned = Linear::from_decoded_owned(t.clone(), reference).unwrap();
                assert_eq!(borrowed.kind(), owned.kind());
                let (mut a, mut b) = (vec![0.0; 32], vec![0.0; 32]);
                for r in 0..2 {
                    borrowed.row(r, &mut a).unwrap();
                    owned.row(r, &mut b).unwrap();
                    assert_eq!(a, b);
                }
            }
        }
        let owned = Linear::from_decoded_owned(dense, false).unwrap();
        let mut row = vec![0.0; 32];
        owned.row(1, &mut row).unwrap();
        assert_eq!(row, values[32..]);
    }

    /// A 2-bit tensor of `rows × cols` with codes `(i·7 + r) mod levels`, one group per row,
    /// scale `0.25·(r + 1)` and offset `offset(scale)`.
    fn low_bit(rows: usize, cols: usize, levels: usize, offset: fn(f32) -> f32) -> DecodedTensor {
        let scales: Vec<f32> = (0..rows).map(|r| 0.25 * (r + 1) as f32).collect();
        DecodedTensor::LowBit {
            rows,
            cols,
            bits: 2,
            group_size: cols,
            codes: (0..rows * cols)
                .map(|i| ((i * 7 + i / cols) % levels) as u8)
                .collect(),
            offsets: scales.iter().map(|&s| offset(s)).collect(),
            scales,
        }
    }

    /// A `bits`-bit tensor with per-plane scales (HLQ) per group of 32, a LUT form without a dot
    /// form.
    fn plane_low_bit(rows: usize, cols: usize, bits: u8) -> DecodedTensor {
        let groups = rows * cols / 32;
        DecodedTensor::PlaneLowBit {
            rows,
            cols,
            bits,
            group_size: 32,
            codes: (0..rows * cols)
                .map(|i| ((i * 5 + i / cols) % (1 << bits)) as u8)
                .collect(),
            scales: (0..groups * bits as usize)
                .map(|g| 0.01 * (g % 7 + 1) as f32)
                .collect(),
            offsets: (0..groups).map(|g| -0.02 * (g % 5) as f32).collect(),
        }
    }

    #[test]
    fn matmul_many_equals_one_matmul_each_for_every_mix_of_kinds() {
        let lut_a = Linear::from_decoded(&low_bit(70, 96, 4, |s| -0.5 * s), false).unwrap();
        let lut_b = Linear::from_decoded(&low_bit(5, 96, 4, |s| s), false).unwrap();
        let ter_a = Linear::from_decoded(&low_bit(9, 96, 3, |s| -s), false).unwrap();
        let ter_b = Linear::from_decoded(&low_bit(66, 96, 3, |s| -s), false).unwrap();
        let dense = Linear::from_decoded(&low_bit(3, 96, 4, |s| s), true).unwrap();
        assert_eq!(
            [&lut_a, &ter_a, &dense].map(|m| m.kind()),
            ["lut2 per-row", "ternary 1.67b", "f32"].map(String::from),
            "the kinds this test mixes"
        );
        let all = [&lut_a, &lut_b, &ter_a, &ter_b, &dense];
        let cpu = Cpu::new(2).unwrap();
        for tokens in [1, 5] {
            let mut input = Input::for_consumers(96, tokens, [all]);
            for (i, v) in input.values_mut(tokens).iter_mut().enumerate() {
                *v = ((i * 37) % 11) as f32 - 5.0;
            }
            input.prepare(&cpu, &all).unwrap();
            let sets: [[&Linear; 2]; 4] = [
                [&lut_a, &lut_b],
                [&ter_a, &ter_b],
                [&lut_a, &ter_b],
                [&dense, &lut_b],
            ];
            for [m0, m1] in sets {
                let mut want = [m0, m1].map(|m| vec![0.0; tokens * m.rows()]);
                m0.matmul(&cpu, &input, &mut want[0]).unwrap();
                m1.matmul(&cpu, &input, &mut want[1]).unwrap();
                let mut got = [m0, m1].map(|m| vec![f32::NAN; tokens * m.rows()]);
                let [g0, g1] = &mut got;
                Linear::matmul_many(&cpu, &input, [m0, m1], [g0, g1]).unwrap();
                assert_eq!(got, want, "{m0:?} + {m1:?}, {tokens} tokens");
            }
            // A wrong output length is an error, not a panic or a partial write.
            let (mut a, mut b) = (vec![0.0; tokens * 70], vec![0.0; 1]);
            let r = Linear::matmul_many(&cpu, &input, [&lut_a, &lut_b], [&mut a, &mut b]);
            assert!(r.is_err());
        }
    }

    #[test]
    fn leading_rows_take_the_dot_path_and_the_rest_the_tables() {
        let lut_a = Linear::from_decoded(&low_bit(70, 96, 4, |s| -0.5 * s), false).unwrap();
        let lut_b = Linear::from_decoded(&low_bit(5, 96, 4, |s| s), false).unwrap();
        let ternary = Linear::from_decoded(&low_bit(9, 96, 3, |s| -s), false).unwrap();
        let (tokens, dot) = (7, 4);
        let cpu = Cpu::new(2).unwrap();
        let mut input = Input::for_consumers(96, tokens, [[&lut_a, &lut_b, &ternary]]);
        let fill = |input: &mut Input, n: usize| {
            for (i, v) in input.values_mut(n).iter_mut().enumerate() {
                *v = ((i * 37) % 11) as f32 - 5.0 + 0.01 * i as f32;
            }
        };
        fill(&mut input, tokens);
        let values = input.values().to_vec();
        input.prepare_rows(&cpu, &[&lut_a, &lut_b], dot).unwrap();
        let Linear::Lut(packed) = &lut_a else {
            unreachable!("a 2-bit tensor is a LUT matrix")
        };
        // The first rows equal the dot kernel on their own, the rest the table lookups.
        let mut acts = Int8Activations::new(96);
        acts.build(&cpu, &values[..dot * 96], dot).unwrap();
        let mut tables = ActivationTables::new(96);
        tables
            .build(&cpu, &values[dot * 96..], tokens - dot)
            .unwrap();
        let split = |m: &PackedMatrix| {
            let mut want = vec![0.0; tokens * m.rows()];
            let (head, tail) = want.split_at_mut(dot * m.rows());
            m.matmul_dot(&cpu, &acts, head).unwrap();
            m.matmul(&cpu, &tables, tail).unwrap();
            want
        };
        let want = split(packed);
        let mut got = vec![f32::NAN; tokens * 70];
        lut_a.matmul(&cpu, &input, &mut got).unwrap();
        assert_eq!(got, want);
        // matmul_many gives the same as one matmul each.
        let mut b = vec![0.0; tokens * 5];
        lut_b.matmul(&cpu, &input, &mut b).unwrap();
        let (mut ga, mut gb) = (vec![f32::NAN; tokens * 70], vec![f32::NAN; tokens * 5]);
        Linear::matmul_many(&cpu, &input, [&lut_a, &lut_b], [&mut ga, &mut gb]).unwrap();
        assert_eq!((ga, gb), (want.clone(), b));
        // All rows on the dot path: no tables are needed.
        input.prepare_rows(&cpu, &[&lut_a], tokens).unwrap();
        let mut all_acts = Int8Activations::new(96);
        all_acts.build(&cpu, &values, tokens).unwrap();
        let mut all = vec![0.0; tokens * 70];
        packed.matmul_dot(&cpu, &all_acts, &mut all).unwrap();
        lut_a.matmul(&cpu, &input, &mut got).unwrap();
        assert_eq!(got, all);
        // Beside a consumer without a dot form, the LUT matrix still splits (the same rows as
        // above), and the other reads every row in its own form.
        input.prepare_rows(&cpu, &[&lut_a, &ternary], dot).unwrap();
        lut_a.matmul(&cpu, &input, &mut got).unwrap();
        assert_eq!(got, want);
        let mut t_got = vec![f32::NAN; tokens * 9];
        ternary.matmul(&cpu, &input, &mut t_got).unwrap();
        let mut alone = Input::for_consumers(96, tokens, [[&ternary]]);
        alone.values_mut(tokens).copy_from_slice(&values);
        alone.prepare_rows(&cpu, &[&ternary], dot).unwrap();
        let mut t_want = vec![0.0; tokens * 9];
        ternary.matmul(&cpu, &alone, &mut t_want).unwrap();
        assert_eq!(t_got, t_want);
        // matmul_many over the mixed pair: one matmul each, the same results.
        let (mut ga, mut gt) = (vec![f32::NAN; tokens * 70], vec![f32::NAN; tokens * 9]);
        Linear::matmul_many(&cpu, &input, [&lut_a, &ternary], [&mut ga, &mut gt]).unwrap();
        assert_eq!((ga, gt), (want.clone(), t_want));
        // A LUT matrix with per-plane scales beside a uniform one splits as it does: the leading
        // rows on its dot path, the rest on tables.
        let planes = Linear::from_decoded(&plane_low_bit(6, 96, 3), false).unwrap();
        let Linear::Lut(planes_packed) = &planes else {
            unreachable!("a 3-bit tensor with plane scales is a LUT matrix")
        };
        assert!(planes_packed.has_dot_form());
        let mut mixed = Input::for_consumers(96, tokens, [[&lut_a, &planes]]);
        mixed.values_mut(tokens).copy_from_slice(&values);
        mixed.prepare_rows(&cpu, &[&lut_a, &planes], dot).unwrap();
        let p_want = split(planes_packed);
        let (mut ga, mut gp) = (vec![f32::NAN; tokens * 70], vec![f32::NAN; tokens * 6]);
        Linear::matmul_many(&cpu, &mixed, [&lut_a, &planes], [&mut ga, &mut gp]).unwrap();
        assert_eq!((ga, gp), (want.clone(), p_want));
        // Fresh values invalidate the split forms.
        fill(&mut input, tokens);
        assert!(lut_a.matmul(&cpu, &input, &mut got).is_err());
    }

    #[test]
    fn int8_matrices_multiply_the_prompt_rows_on_their_dot_gemm_beside_any_split() {
        let (rows, cols, tokens, dot) = (40, 96, 7, 4);
        let int8 = Linear::from_decoded(
            &DecodedTensor::Int8 {
                rows,
                cols,
                block: 32,
                codes: (0..rows * cols).map(|i| (i * 29 % 255) as i8).collect(),
                scales: (0..rows * cols / 32)
                    .map(|b| 0.01 + 0.001 * (b % 5) as f32)
                    .collect(),
            },
            false,
        )
        .unwrap();
        let Linear::Int8(m) = &int8 else {
            unreachable!("an int8 tensor is an int8 matrix")
        };
        let lut = Linear::from_decoded(&low_bit(70, cols, 4, |s| -0.5 * s), false).unwrap();
        let cpu = Cpu::new(2).unwrap();
        let mut input = Input::for_consumers(cols, tokens, [[&lut, &int8]]);
        for (i, v) in input.values_mut(tokens).iter_mut().enumerate() {
            *v = ((i * 37) % 11) as f32 - 5.0 + 0.01 * i as f32;
        }
        let mut acts = Int8Activations::new(cols);
        acts.build(&cpu, input.values(), tokens).unwrap();
        // Alone and beside a LUT matrix that splits its rows: the first `dot` rows are prompt
        // rows for the int8 matrix too; with none, every row takes the int8 kernel.
        for (consumers, prompt) in [
            (&[&int8][..], dot),
            (&[&lut, &int8][..], dot),
            (&[&int8][..], 0),
        ] {
            input.prepare_rows(&cpu, consumers, prompt).unwrap();
            let mut want = vec![0.0; tokens * rows];
            m.matmul_prompt(&cpu, &acts, prompt, &mut want).unwrap();
            let mut got = vec![f32::NAN; tokens * rows];
            int8.matmul(&cpu, &input, &mut got).unwrap();
            assert_eq!(
                got,
                want,
                "{} consumers, {prompt} prompt rows",
                consumers.len()
            );
        }
        // Where the CPU has the int8 dot GEMM, prompt rows differ from the int8 kernel's sums.
        if Int8Matrix::dot_instruction(&cpu).is_some()
            && PackedMatrix::dot_instruction(&cpu).is_some()
        {
            let (mut kernel, mut prompt) = (vec![0.0; tokens * rows], vec![0.0; tokens * rows]);
            m.matmul(&cpu, &acts, &mut kernel).unwrap();
            m.matmul_prompt(&cpu, &acts, tokens, &mut prompt).unwrap();
            assert_ne!(kernel, prompt, "the prompt rows took the int8 kernel");
        }
    }

    #[test]
    fn ternary_tensors_become_ternary_matrices_that_match_the_reference() {
        let t = low_bit(5, 96, 3, |s| -s);
        let m = Linear::from_decoded(&t, false).unwrap();
        assert_eq!(
            (m.rows(), m.cols(), m.kind().as_str()),
            (5, 96, "ternary 1.67b")
        );
        let dense = Linear::from_decoded(&t, true).unwrap();
        assert_eq!(dense.kind(), "f32");
        let cpu = Cpu::with_isa(lutra_kernels::Isa::Scalar, 1).unwrap();
        let tokens = 3;
        let mut input = Input::for_consumers(96, tokens, [[&m, &dense]]);
        for (i, v) in input.values_mut(tokens).iter_mut().enumerate() {
            *v = ((i * 37) % 11) as f32 - 5.0;
        }
        input.prepare(&cpu, &[&m, &dense]).unwrap();
        let (mut fast, mut exact) = (vec![0.0; 5 * tokens], vec![0.0; 5 * tokens]);
        m.matmul(&cpu, &input, &mut fast).unwrap();
        dense.matmul(&cpu, &input, &mut exact).unwrap();
        // The int8 tables round each triple's sum: allow 1% of Σ|w·x|, the scale of that error.
        let mut w = vec![0.0; 96];
        for (i, (&a, &b)) in fast.iter().zip(&exact).enumerate() {
            dense.row(i % 5, &mut w).unwrap();
            let x = &input.values()[i / 5 * 96..][..96];
            let l1: f32 = w.iter().zip(x).map(|(w, x)| (w * x).abs()).sum();
            assert!(
                (a - b).abs() <= 0.01 * l1,
                "output {i}: {a} vs {b} (Σ|w·x| = {l1})"
            );
        }
        let mut row = vec![0.0; 96];
        m.row(4, &mut row).unwrap();
        let mut expected = vec![0.0; 96];
        dense.row(4, &mut expected).unwrap();
        assert_eq!(row, expected);
        // An input prepared without ternary tables is an error, not garbage.
        let mut plain = Input::for_consumers(96, 1, [[&dense]]);
        plain.values_mut(1).fill(1.0);
        plain.prepare(&cpu, &[&dense]).unwrap();
        assert!(m.matmul(&cpu, &plain, &mut fast[..5]).is_err());
    }

    #[test]
    fn other_two_bit_tensors_keep_the_lut_form() {
        // Code 3, an offset that is not −scale, and groups smaller than a row are not ternary.
        let four_levels = low_bit(2, 64, 4, |s| -s);
        let shifted = low_bit(2, 64, 3, |s| -0.5 * s);
        let DecodedTensor::LowBit {
            codes,
            scales,
            offsets,
            ..
        } = low_bit(2, 64, 3, |s| -s)
        else {
            unreachable!()
        };
        let grouped = DecodedTensor::LowBit {
            rows: 2,
            cols: 64,
            bits: 2,
            group_size: 32,
            codes,
            scales: scales.iter().flat_map(|&s| [s, s]).collect(),
            offsets: offsets.iter().flat_map(|&m| [m, m]).collect(),
        };
        for t in [four_levels, shifted, grouped] {
            let m = Linear::from_decoded(&t, false).unwrap();
            assert!(m.kind().starts_with("lut2"), "{}", m.kind());
        }
    }

    /// A random 4-bit tensor (groups of 32) and a random column order.
    fn permuted_case(
        rng: &mut lutra_kernels::measure::SplitMix64,
        rows: usize,
        cols: usize,
    ) -> (DecodedTensor, Arc<[u32]>) {
        let groups = rows * cols / 32;
        let scales: Vec<f32> = (0..groups).map(|_| 0.01 + 0.1 * rng.uniform()).collect();
        let tensor = DecodedTensor::LowBit {
            rows,
            cols,
            bits: 4,
            group_size: 32,
            codes: (0..rows * cols)
                .map(|_| (rng.uniform() * 16.0) as u8 & 15)
                .collect(),
            offsets: scales.iter().map(|s| -7.5 * s).collect(),
            scales,
        };
        let mut perm: Vec<u32> = (0..cols as u32).collect();
        for i in (1..cols).rev() {
            perm.swap(i, (rng.uniform() * (i + 1) as f32) as usize % (i + 1));
        }
        (tensor, perm.into())
    }

    #[test]
    fn permuted_matrices_read_their_gathered_input_and_share_it_per_order() {
        let mut rng = lutra_kernels::measure::SplitMix64::new(5);
        let (rows, cols, tokens) = (8, 128, 3);
        let (ta, p) = permuted_case(&mut rng, rows, cols);
        let (tb, _) = permuted_case(&mut rng, rows, cols);
        let (tc, q) = permuted_case(&mut rng, rows, cols);
        // `a` and `b` have the same order in two allocations; `c` another; `d` none.
        let p_copy: Arc<[u32]> = p.iter().copied().collect();
        let a = Linear::from_decoded_permuted(&ta, Arc::clone(&p), false).unwrap();
        let b = Linear::from_decoded_permuted(&tb, p_copy, false).unwrap();
        let c = Linear::from_decoded_permuted(&tc, Arc::clone(&q), false).unwrap();
        let d = Linear::from_decoded(&tc, false).unwrap();
        assert_eq!(a.kind(), "lut4 g32 permuted");
        assert_eq!((a.rows(), a.cols()), (rows, cols));
        let group = [&a, &b, &c, &d];
        let mut input = Input::for_consumers(cols, tokens, [group]);
        assert_eq!(
            input.orders.len(),
            2,
            "one gathered copy per distinct order"
        );
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.uniform() - 0.5).collect();
        input.values_mut(tokens).copy_from_slice(&x);
        let cpu = Cpu::with_isa(lutra_kernels::Isa::Scalar, 1).unwrap();
        input.prepare(&cpu, &group).unwrap();
        assert_eq!(input.orders_used, 2);

        for (m, t, perm) in [(&a, &ta, &p), (&b, &tb, &p), (&c, &tc, &q)] {
            let mut fast = vec![0.0; tokens * rows];
            m.matmul(&cpu, &input, &mut fast).unwrap();
            // Exactly the stored-order matrix times the input gathered by hand.
            let stored = Linear::from_decoded(t, false).unwrap();
            let mut gathered = Input::for_consumers(cols, tokens, [[&stored]]);
            for (g, xt) in gathered
                .values_mut(tokens)
                .chunks_exact_mut(cols)
                .zip(x.chunks_exact(cols))
            {
                for (g, &i) in g.iter_mut().zip(perm.iter()) {
                    *g = xt[i as usize];
                }
            }
            gathered.prepare(&cpu, &[&stored]).unwrap();
            let mut want = vec![0.0; tokens * rows];
            stored.matmul(&cpu, &gathered, &mut want).unwrap();
            assert_eq!(fast, want);

            // And close to the exact product in input order (the reference form).
            let dense = Linear::from_decoded_permuted(t, Arc::clone(perm), true).unwrap();
            assert_eq!(dense.kind(), "f32");
            let stored_values = t.dequantize();
            let (mut row, mut fast_row, mut stored_row) =
                (vec![0.0; cols], vec![0.0; cols], vec![0.0; cols]);
            for r in 0..rows {
                dense.row(r, &mut row).unwrap();
                m.row(r, &mut fast_row).unwrap();
                stored.row(r, &mut stored_row).unwrap();
                for (i, &c) in perm.iter().enumerate() {
                    assert_eq!(row[c as usize], stored_values[r * cols + i]);
                    assert_eq!(fast_row[c as usize], stored_row[i]);
                }
            }
            let mut exact = vec![0.0; tokens * rows];
            let mut plain = Input::for_consumers(cols, tokens, [[&dense]]);
            plain.values_mut(tokens).copy_from_slice(&x);
            plain.prepare(&cpu, &[&dense]).unwrap();
            dense.matmul(&cpu, &plain, &mut exact).unwrap();
            let mut unordered = vec![0.0; tokens * rows];
            stored.matmul(&cpu, &input, &mut unordered).unwrap();
            let err = |y: &[f32]| {
                let num: f32 = y.iter().zip(&exact).map(|(a, b)| (a - b) * (a - b)).sum();
                (num / exact.iter().map(|b| b * b).sum::<f32>()).sqrt()
            };
            assert!(err(&fast) < 0.02, "relative error {}", err(&fast));
            // Ignoring the order would be far off: the check above can fail.
            assert!(err(&unordered) > 0.3, "{}", err(&unordered));
        }

        // Prepared for `a` alone: `c`'s order was not gathered, an error rather than stale data.
        input.values_mut(tokens).copy_from_slice(&x);
        input.prepare(&cpu, &[&a]).unwrap();
        let mut out = vec![0.0; tokens * rows];
        assert!(c.matmul(&cpu, &input, &mut out).is_err());
        assert!(d.matmul(&cpu, &input, &mut out).is_err());
        // An input sized for one order cannot serve two at once.
        let mut small = Input::for_consumers(cols, tokens, [[&a]]);
        small.values_mut(tokens).copy_from_slice(&x);
        assert!(small.prepare(&cpu, &[&a, &c]).is_err());
        // Not a permutation of the columns.
        let twice: Arc<[u32]> = (0..cols as u32).map(|i| i / 2).collect();
        assert!(Linear::from_decoded_permuted(&ta, twice, false).is_err());
        assert!(Linear::from_decoded_permuted(&ta, Arc::from(&p[1..]), true).is_err());
    }
}
