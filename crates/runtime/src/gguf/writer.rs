//! A GGUF writer, mostly for tests: tiny models made on the fly, and corrupt files made from good ones.
//!
//! The quantizers reproduce ggml's reference ones (`quantize_row_q4_0_ref`, `_q4_1_ref`, `_q8_0_ref`)
//! so that files written here decode the way llama.cpp's would.

use std::path::Path;

use half::f16;

use super::{MetaValue, DEFAULT_ALIGNMENT};
use crate::weights::GgmlType;
use crate::{Error, Result};

/// Builds a GGUF v3 file in memory and writes it out.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<usize>,
    ty_id: u32,
    data: Vec<u8>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Sets metadata `key` (replacing an earlier value of the same key).
    pub fn add_metadata(&mut self, key: &str, value: MetaValue) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Adds an F32 tensor. `dims` are in GGUF order (`dims[0]` fastest).
    pub fn add_tensor_f32(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<()> {
        check_len(name, dims, values, 1)?;
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor_raw(name, dims, GgmlType::F32.id(), data)
    }

    /// Adds an F16 tensor (values rounded to f16).
    pub fn add_tensor_f16(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<()> {
        check_len(name, dims, values, 1)?;
        let data = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        self.add_tensor_raw(name, dims, GgmlType::F16.id(), data)
    }

    /// Adds a Q8_0 tensor, quantizing `values` as ggml does.
    pub fn add_tensor_q8_0(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<()> {
        check_len(name, dims, values, 32)?;
        let data = values.chunks_exact(32).flat_map(quantize_q8_0).collect();
        self.add_tensor_raw(name, dims, GgmlType::Q8_0.id(), data)
    }

    /// Adds a Q4_0 tensor, quantizing `values` as ggml does.
    pub fn add_tensor_q4_0(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<()> {
        check_len(name, dims, values, 32)?;
        let data = values.chunks_exact(32).flat_map(quantize_q4_0).collect();
        self.add_tensor_raw(name, dims, GgmlType::Q4_0.id(), data)
    }

    /// Adds a Q4_1 tensor, quantizing `values` as ggml does.
    pub fn add_tensor_q4_1(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<()> {
        check_len(name, dims, values, 32)?;
        let data = values.chunks_exact(32).flat_map(quantize_q4_1).collect();
        self.add_tensor_raw(name, dims, GgmlType::Q4_1.id(), data)
    }

    /// Adds a tensor of ggml type id `ty_id` with already-encoded bytes. The type and size are not
    /// checked, so that tests can write files lutra must refuse.
    pub fn add_tensor_raw(
        &mut self,
        name: &str,
        dims: &[usize],
        ty_id: u32,
        data: Vec<u8>,
    ) -> Result<()> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::InvalidOption(format!("tensor '{name}' added twice")));
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty_id,
            data,
        });
        Ok(())
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self
            .metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .map_or(DEFAULT_ALIGNMENT, |a| a as usize);
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(t.ty_id.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
        }
        for t in &self.tensors {
            out.resize(out.len().div_ceil(alignment) * alignment, 0);
            out.extend(&t.data);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes()).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn check_len(name: &str, dims: &[usize], values: &[f32], block: usize) -> Result<()> {
    let n: usize = dims.iter().product();
    if dims.is_empty() || n != values.len() {
        return Err(Error::InvalidOption(format!(
            "tensor '{name}': dimensions {dims:?} do not match {} values",
            values.len()
        )));
    }
    if !dims[0].is_multiple_of(block) {
        return Err(Error::InvalidOption(format!(
            "tensor '{name}': row length {} is not a multiple of the block size {block}",
            dims[0]
        )));
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.push(*v as u8),
        MetaValue::U16(v) => out.extend(v.to_le_bytes()),
        MetaValue::I16(v) => out.extend(v.to_le_bytes()),
        MetaValue::U32(v) => out.extend(v.to_le_bytes()),
        MetaValue::I32(v) => out.extend(v.to_le_bytes()),
        MetaValue::F32(v) => out.extend(v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as an array of u8.
            let ty = items.first().map_or(0, MetaValue::type_id);
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        MetaValue::U64(v) => out.extend(v.to_le_bytes()),
        MetaValue::I64(v) => out.extend(v.to_le_bytes()),
        MetaValue::F64(v) => out.extend(v.to_le_bytes()),
    }
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// `quantize_row_q8_0_ref`: d = absmax/127, q = round(x/d).
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
    out
}

/// `quantize_row_q4_0_ref`: d = (signed absmax)/−8, q = min(15, trunc(x/d + 8.5)).
fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = inverse(d);
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    out
}

/// `quantize_row_q4_1_ref`: d = (max − min)/15, m = min, q = min(15, trunc((x − min)/d + 0.5)).
fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    let min = x.iter().copied().fold(f32::MAX, f32::min);
    let max = x.iter().copied().fold(f32::MIN, f32::max);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(f16::from_f32(min).to_le_bytes());
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_layout() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 / 31.0 * 15.0 - 5.0).collect();
        let b = quantize_q4_1(&x);
        assert_eq!(b.len(), 20);
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.0);
        assert_eq!(f16::from_le_bytes([b[2], b[3]]).to_f32(), -5.0);
        // Element 0 → 0, element 31 → 15 in the high nibble of byte 15.
        assert_eq!(b[4] & 0xF, 0);
        assert_eq!(b[19] >> 4, 15);
    }

    #[test]
    fn dims_must_match_values() {
        let mut w = GgufWriter::new();
        assert!(w.add_tensor_f32("a", &[3, 2], &[0.0; 5]).is_err());
        assert!(w.add_tensor_q4_1("b", &[16, 2], &[0.0; 32]).is_err());
        assert!(w.add_tensor_f32("c", &[2], &[0.0; 2]).is_ok());
        assert!(w.add_tensor_f32("c", &[2], &[0.0; 2]).is_err());
    }
}
