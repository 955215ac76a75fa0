//! A linear layer's weight matrix in the kernel form that suits its source type, and the
//! activations it consumes.
//!
//! - low-bit codes (Q4_0, Q4_1, K-quants, requantized weights) → [`PackedMatrix`] (LUT kernels);
//! - int8 codes (Q8_0) → [`Int8Matrix`];
//! - dense values (F32/F16/BF16), and every matrix in reference mode → [`DenseMatrix`].
//!
//! An [`Input`] holds one activation vector (or a batch) in every form its consumers need: the f32
//! values, LUT tables, int8 activations. It is prepared once and shared by all the matrices that
//! read the same vector (q/k/v; gate/up), so tables are built once per token, not once per matrix.

use lutra_kernels::{
    ActivationTables, Cpu, DenseMatrix, Grouping, Int8Activations, Int8Matrix, PackedMatrix,
    PlaneScales, QuantSpec, QuantizedWeights,
};

use crate::error::{Error, Result};
use crate::quantize::dequantize;
use crate::weights::DecodedTensor;

/// A weight matrix `[rows][cols]` (rows = output features) ready for the kernels.
pub enum Linear {
    /// Low-bit codes packed for the table-lookup kernels.
    Lut(PackedMatrix),
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
            Linear::Int8(m) => m.rows(),
            Linear::Dense(m) => m.rows(),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Linear::Lut(m) => m.cols(),
            Linear::Int8(m) => m.cols(),
            Linear::Dense(m) => m.cols(),
        }
    }

    /// Bytes of weights (and scales) in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Lut(m) => m.bytes(),
            Linear::Int8(m) => m.bytes(),
            Linear::Dense(m) => m.rows() * m.cols() * 4,
        }
    }

    /// Short name of the in-memory form, e.g. `lut4 g32`, `int8`, `f32`.
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
            Linear::Int8(m) => m.dequantize_row(r, out)?,
            Linear::Dense(m) => out.copy_from_slice(m.row(r)),
        }
        Ok(())
    }
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
    int8: Option<Int8Activations>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("cols", &self.cols)
            .field("tokens", &self.tokens)
            .field("tables", &self.tables.is_some())
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
        let (mut tables, mut int8) = (false, false);
        for m in consumers {
            match m {
                Linear::Lut(_) => tables = true,
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
}
