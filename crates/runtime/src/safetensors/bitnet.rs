//! BitNet b1.58 checkpoints (`quant_method: "bitnet"`), decoded exactly to ternary codes.
//!
//! A linear layer `W` (`[N][K]`) is stored as `weight` uint8 `[N/4, K]`: bits `2i..2i+1` of
//! packed row `r` hold the code (ternary value + 1) of row `i·N/4 + r`, and `weight_scale`, one
//! number per tensor. Hugging Face's `BitLinear` (`linear_class: "bitlinear"`, the default)
//! *divides* the product by `weight_scale`; `AutoBitLinear` (`"autobitlinear"`) *multiplies*.
//! Either way the decoded tensor is codes {0, 1, 2} with one scale `s` per row (all equal) and
//! offset `−s`, so `w = s·(code − 1)`: the ternary form the kernels store at 1.67 bits.

use crate::error::{Error, Result};
use crate::weights::DecodedTensor;

use super::TensorRef;

/// How `weight_scale` applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleMode {
    /// `BitLinear`: `w = ternary / weight_scale`.
    Divide,
    /// `AutoBitLinear`: `w = ternary · weight_scale`.
    Multiply,
}

impl ScaleMode {
    /// From `quantization_config.linear_class` (`q`) of `config.json` at `path`.
    pub fn from_json(q: &serde_json::Value, path: &std::path::Path) -> Result<ScaleMode> {
        match q.get("linear_class").and_then(|c| c.as_str()) {
            None | Some("bitlinear") => Ok(ScaleMode::Divide),
            Some("autobitlinear") => Ok(ScaleMode::Multiply),
            Some(other) => Err(Error::Metadata {
                path: path.to_path_buf(),
                key: "quantization_config.linear_class".into(),
                reason: format!("'{other}' is not supported (bitlinear, autobitlinear are)"),
            }),
        }
    }
}

/// Decodes `weight` + `weight_scale` of a `rows`×`cols` layer.
pub fn decode(
    weight: &TensorRef,
    weight_scale: &TensorRef,
    mode: ScaleMode,
    rows: usize,
    cols: usize,
) -> Result<DecodedTensor> {
    if !rows.is_multiple_of(4) {
        return Err(weight.error(&format!("{rows} rows do not pack four to a byte")));
    }
    weight.expect_shape(&[rows / 4, cols])?;
    let packed = weight.to_u8()?;
    let ws = weight_scale.to_f32()?;
    if ws.len() != 1 {
        return Err(weight_scale.error(&format!(
            "expected one scale per tensor, found {} values",
            ws.len()
        )));
    }
    let s = match mode {
        ScaleMode::Divide => 1.0 / ws[0],
        ScaleMode::Multiply => ws[0],
    };
    if !s.is_finite() || s <= 0.0 {
        return Err(weight_scale.error(&format!("scale {} is not positive and finite", ws[0])));
    }
    let quarter = rows / 4;
    let mut codes = vec![0u8; rows * cols];
    for (r, bytes) in packed.chunks_exact(cols).enumerate() {
        for (c, &b) in bytes.iter().enumerate() {
            for i in 0..4 {
                let code = (b >> (2 * i)) & 3;
                if code == 3 {
                    return Err(weight.error(&format!(
                        "code 3 (not ternary) at packed row {r}, column {c}, block {i}"
                    )));
                }
                codes[(i * quarter + r) * cols + c] = code;
            }
        }
    }
    Ok(DecodedTensor::LowBit {
        rows,
        cols,
        bits: 2,
        group_size: cols,
        codes,
        scales: vec![s; rows],
        offsets: vec![-s; rows],
    })
}

/// Packs ternary codes `[rows][cols]` (values 0..=2) into BitNet's `[rows/4][cols]` bytes: the
/// inverse of [`decode`], for tests.
#[cfg(test)]
pub(crate) fn pack(codes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let quarter = rows / 4;
    let mut out = vec![0u8; quarter * cols];
    for i in 0..4 {
        for r in 0..quarter {
            for c in 0..cols {
                out[r * cols + c] |= (codes[(i * quarter + r) * cols + c] & 3) << (2 * i);
            }
        }
    }
    out
}
