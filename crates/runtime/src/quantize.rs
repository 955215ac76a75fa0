//! Round-to-nearest requantization of decoded tensors to low-bit codes.
//!
//! Requantization (`--bits`, `--group-size`) is asymmetric per group of `group_size` elements along
//! a row: `scale = (max − min) / (2^b − 1)`, `offset = min`. Scale and offset are rounded to f16
//! *before* the codes are computed, because the kernels store them as f16: the codes are then the
//! best ones for the scales actually used.

pub mod calibration;
pub mod ggml_types;
pub mod model;

use half::f16;

use crate::error::{Error, Result};
use crate::weights::DecodedTensor;

/// Round-to-nearest requantization applied to every linear layer at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requantize {
    /// Bits per weight, 1..=4.
    pub bits: u8,
    /// Elements per scale group along K (32, 64, 128 or 256; must divide every K).
    pub group_size: usize,
}

/// Quantizes `values` (`[rows][cols]`) to `bits`-bit codes with one f16-exact scale and offset
/// per group of `group_size` elements.
pub fn quantize_rtn(
    rows: usize,
    cols: usize,
    values: &[f32],
    bits: u8,
    group_size: usize,
) -> Result<DecodedTensor> {
    if !(1..=4).contains(&bits) {
        return Err(Error::InvalidOption(format!(
            "requantization to {bits} bits: use 1, 2, 3 or 4"
        )));
    }
    if group_size == 0 || !cols.is_multiple_of(group_size) {
        return Err(Error::InvalidOption(format!(
            "group size {group_size} does not divide the row length {cols}"
        )));
    }
    if values.len() != rows * cols {
        return Err(Error::InvalidOption(format!(
            "quantize: {} values for a {rows}x{cols} matrix",
            values.len()
        )));
    }
    let max_code = ((1u32 << bits) - 1) as f32;
    let groups = rows * cols / group_size;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = Vec::with_capacity(groups);
    let mut offsets = Vec::with_capacity(groups);
    for (w, q) in values
        .chunks_exact(group_size)
        .zip(codes.chunks_exact_mut(group_size))
    {
        let (min, max) = w
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let scale = f16::from_f32((max - min) / max_code).to_f32();
        let offset = f16::from_f32(min).to_f32();
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(w) {
            *q = ((v - offset) * inv).round().clamp(0.0, max_code) as u8;
        }
        scales.push(scale);
        offsets.push(offset);
    }
    Ok(DecodedTensor::LowBit {
        rows,
        cols,
        bits,
        group_size,
        codes,
        scales,
        offsets,
    })
}

/// Dequantizes `tensor` and requantizes it as `spec` says.
pub fn requantize(tensor: &DecodedTensor, spec: Requantize) -> Result<DecodedTensor> {
    quantize_rtn(
        tensor.rows(),
        tensor.cols(),
        &tensor.dequantize(),
        spec.bits,
        spec.group_size,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let (rows, cols) = (3, 64);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * (1 + i / cols) as f32)
            .collect();
        for bits in 1..=4u8 {
            let q = quantize_rtn(rows, cols, &values, bits, 32).unwrap();
            let back = q.dequantize();
            let DecodedTensor::LowBit { scales, codes, .. } = &q else {
                panic!("not low-bit")
            };
            assert!(codes.iter().all(|&c| (c as u32) < (1 << bits)));
            for (i, (a, b)) in values.iter().zip(&back).enumerate() {
                let step = scales[i / 32];
                // Half a step, plus the f16 rounding of the offset.
                assert!(
                    (a - b).abs() <= 0.5 * step + 2e-3 * a.abs().max(1.0),
                    "{bits}b {a} {b}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_bits_and_group_sizes() {
        let v = vec![0.0; 64];
        assert!(quantize_rtn(1, 64, &v, 5, 32).is_err());
        assert!(quantize_rtn(1, 64, &v, 0, 32).is_err());
        assert!(quantize_rtn(1, 64, &v, 4, 48).is_err());
        // A constant group quantizes exactly.
        let c = quantize_rtn(1, 64, &[0.25; 64], 2, 32).unwrap();
        assert!(c.dequantize().iter().all(|&x| x == 0.25));
    }

    #[test]
    fn dequantizes_int8_and_low_bit() {
        let t = DecodedTensor::Int8 {
            rows: 1,
            cols: 64,
            block: 32,
            codes: (0..64).map(|i| i as i8 - 32).collect(),
            scales: vec![0.5, 2.0],
        };
        let d = t.dequantize();
        assert_eq!(d[0], -16.0);
        assert_eq!(d[63], 62.0);
        let t = DecodedTensor::LowBit {
            rows: 2,
            cols: 32,
            bits: 4,
            group_size: 32,
            codes: vec![3; 64],
            scales: vec![1.0, 2.0],
            offsets: vec![-1.0, 0.5],
        };
        let d = t.dequantize();
        assert_eq!((d[0], d[63]), (2.0, 6.5));
    }
}
