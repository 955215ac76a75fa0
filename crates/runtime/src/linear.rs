//! A linear layer's weight matrix in the kernel form that suits its source type, and the
//! activations it consumes.
//!
//! - low-bit codes (Q4_0, Q4_1, K-quants, requantized weights) → [`PackedMatrix`] (LUT kernels);
//! - ternary codes with one scale per row (BitNet b1.58: TQ1_0/TQ2_0, HF BitLinear) →
//!   [`TernaryMatrix`] (1.67 bits per weight);
//! - int8 codes (Q8_0) → [`Int8Matrix`];
//! - dense values (F32/F16/BF16), and every matrix in reference mode → [`DenseMatrix`].
//!
//! An [`Input`] holds one activation vector (or a batch) in every form its consumers need: the f32
//! values, LUT tables, int8 activations. It is prepared once and shared by all the matrices that
//! read the same vector (q/k/v; gate/up), so tables are built once per token, not once per matrix.

use lutra_kernels::{
    ActivationTables, Cpu, DenseMatrix, Grouping, Int8Activations, Int8Matrix, PackedMatrix,
    PlaneScales, QuantSpec, QuantizedWeights, TernaryMatrix, TernaryTables, TernaryWeights,
};

use crate::error::{Error, Result};
use crate::quantize::dequantize;
use crate::weights::DecodedTensor;

/// A weight matrix `[rows][cols]` (rows = output features) ready for the kernels.
pub enum Linear {
    /// Low-bit codes packed for the table-lookup kernels.
    Lut(PackedMatrix),
    /// Ternary weights `{−s, 0, +s}` (one `s` per row) packed 3 weights to 5 bits.
    Ternary(TernaryMatrix),
    /// Int8 codes with a scale per 32 (Q8_0).
    Int8(Int8Matrix),
    /// f32 values.
    Dense(DenseMatrix),
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
            let (rows, cols) = crate::quantize::shape(tensor);
            return Ok(Linear::Dense(DenseMatrix::new(
                rows,
                cols,
                dequantize(tensor),
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
            } => {
                let grouping = match *group_size {
                    32 | 64 | 128 | 256 => Grouping::Size(*group_size),
                    g if g == *cols => Grouping::PerRow,
                    g => Grouping::Size(g),
                };
                let spec = QuantSpec {
                    rows: *rows,
                    cols: *cols,
                    bits: *bits,
                    grouping,
                    plane_scales: PlaneScales::Uniform,
                };
                Linear::Lut(PackedMatrix::pack(&QuantizedWeights {
                    spec,
                    codes,
                    scales,
                    offsets: Some(offsets),
                })?)
            }
            DecodedTensor::Int8 {
                rows,
                cols,
                codes,
                scales,
            } => Linear::Int8(Int8Matrix::new(*rows, *cols, codes, scales)?),
            DecodedTensor::Dense { rows, cols, values } => {
                Linear::Dense(DenseMatrix::new(*rows, *cols, values.clone())?)
            }
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Linear::Lut(m) => m.rows(),
            Linear::Ternary(m) => m.rows(),
            Linear::Int8(m) => m.rows(),
            Linear::Dense(m) => m.rows(),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Linear::Lut(m) => m.cols(),
            Linear::Ternary(m) => m.cols(),
            Linear::Int8(m) => m.cols(),
            Linear::Dense(m) => m.cols(),
        }
    }

    /// Bytes of weights (and scales) in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Lut(m) => m.bytes(),
            Linear::Ternary(m) => m.bytes(),
            Linear::Int8(m) => m.bytes(),
            Linear::Dense(m) => m.rows() * m.cols() * 4,
        }
    }

    /// Short name of the in-memory form, e.g. `lut4 g32`, `ternary 1.67b`, `int8`, `f32`.
    pub fn kind(&self) -> String {
        match self {
            Linear::Lut(m) => {
                let spec = m.spec();
                let group = match spec.grouping {
                    Grouping::Size(g) => format!("g{g}"),
                    Grouping::PerRow => "per-row".to_string(),
                    Grouping::PerTensor => "per-tensor".to_string(),
                };
                format!("lut{} {group}", spec.bits)
            }
            Linear::Ternary(_) => "ternary 1.67b".to_string(),
            Linear::Int8(_) => "int8".to_string(),
            Linear::Dense(_) => "f32".to_string(),
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
                "input was built without {what} for a {} matrix",
                self.kind()
            ))
        };
        match self {
            Linear::Lut(m) => {
                let tables = input.tables.as_ref().ok_or_else(|| missing("tables"))?;
                m.matmul(cpu, tables, out)?;
            }
            Linear::Ternary(m) => {
                let tables = input
                    .ternary
                    .as_ref()
                    .ok_or_else(|| missing("ternary tables"))?;
                m.matmul(cpu, tables, out)?;
            }
            Linear::Int8(m) => {
                let acts = input.int8.as_ref().ok_or_else(|| missing("int8"))?;
                m.matmul(cpu, acts, out)?;
            }
            Linear::Dense(m) => m.matmul(cpu, input.values(), n, out)?,
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
        }
        Ok(())
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

/// Activation vectors of length `cols` (up to `max_batch` of them) in every form their consumer
/// matrices read; all buffers are allocated once, by [`Input::for_consumers`].
pub struct Input {
    cols: usize,
    max_batch: usize,
    tokens: usize,
    ready: bool,
    values: Vec<f32>,
    tables: Option<ActivationTables>,
    ternary: Option<TernaryTables>,
    int8: Option<Int8Activations>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("cols", &self.cols)
            .field("tokens", &self.tokens)
            .field("tables", &self.tables.is_some())
            .field("ternary", &self.ternary.is_some())
            .field("int8", &self.int8.is_some())
            .finish()
    }
}

impl Input {
    /// Buffers for up to `max_batch` vectors of `cols` values, with the forms `consumers` need.
    pub fn for_consumers<'a>(
        cols: usize,
        max_batch: usize,
        consumers: impl IntoIterator<Item = &'a Linear>,
    ) -> Input {
        let (mut tables, mut ternary, mut int8) = (false, false, false);
        for m in consumers {
            match m {
                Linear::Lut(_) => tables = true,
                Linear::Ternary(_) => ternary = true,
                Linear::Int8(_) => int8 = true,
                Linear::Dense(_) => {}
            }
        }
        Input {
            cols,
            max_batch,
            tokens: 0,
            ready: false,
            values: vec![0.0; cols * max_batch],
            tables: tables.then(|| ActivationTables::new(cols)),
            ternary: ternary.then(|| TernaryTables::new(cols)),
            int8: int8.then(|| Int8Activations::new(cols)),
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
        &mut self.values[..self.tokens * self.cols]
    }

    /// The current vectors.
    pub fn values(&self) -> &[f32] {
        &self.values[..self.tokens * self.cols]
    }

    /// Builds the tables and int8 activations of the current vectors.
    pub fn prepare(&mut self, cpu: &Cpu) -> Result<()> {
        let x = &self.values[..self.tokens * self.cols];
        if let Some(tables) = &mut self.tables {
            tables.build(cpu, x, self.tokens)?;
        }
        if let Some(tables) = &mut self.ternary {
            tables.build(cpu, x, self.tokens)?;
        }
        if let Some(int8) = &mut self.int8 {
            int8.build(cpu, x, self.tokens)?;
        }
        self.ready = true;
        Ok(())
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
        let mut input = Input::for_consumers(32, 2, [&m]);
        let mut out = vec![0.0; 2];
        // Not prepared yet: a typed error, not garbage.
        assert!(m.matmul(&cpu, &input, &mut out).is_err());
        input.values_mut(1).fill(1.0);
        input.prepare(&cpu).unwrap();
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
        let mut input = Input::for_consumers(96, tokens, [&m, &dense]);
        for (i, v) in input.values_mut(tokens).iter_mut().enumerate() {
            *v = ((i * 37) % 11) as f32 - 5.0;
        }
        input.prepare(&cpu).unwrap();
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
        let mut plain = Input::for_consumers(96, 1, [&dense]);
        plain.values_mut(1).fill(1.0);
        plain.prepare(&cpu).unwrap();
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
}
