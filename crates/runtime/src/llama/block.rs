//! One transformer block built from any file format, following the architecture table
//! ([`crate::architecture`]): the format only says how a table name becomes a tensor name and
//! how a tensor is read ([`BlockSource`]).

use crate::architecture::{ArchitectureSpec, BlockTensor, Presence, TensorName};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::weights::DecodedTensor;

use super::LayerWeights;

/// Tensors of one file, read by the names of the architecture table.
pub(super) trait BlockSource {
    /// The full name, without `.weight` / `.bias`, of `tensor` in block `layer`.
    fn base_name(&self, layer: usize, tensor: &TensorName) -> String;

    /// Whether the file has the matrix or vector `base` (its `.weight`, or quantized parts).
    fn contains(&self, base: &str) -> bool;

    /// The linear layer `base` of `[rows][cols]`.
    fn matrix(&mut self, base: &str, rows: usize, cols: usize) -> Result<Linear>;

    /// The linear layers stacked along the rows of `base` (`[Σ rows][cols]`), one per entry of
    /// `rows`, in order.
    fn stacked_matrices(&mut self, base: &str, rows: &[usize], cols: usize) -> Result<Vec<Linear>>;

    /// The vector `base.weight` of `len` values.
    fn vector(&mut self, base: &str, len: usize) -> Result<Vec<f32>>;

    /// The optional bias `base.bias` of `len` values.
    fn bias(&mut self, base: &str, len: usize) -> Result<Option<Vec<f32>>>;

    /// Checks a projection that takes no bias: `base.bias`, if any, must be one the forward pass
    /// can leave out.
    fn no_bias(&mut self, base: &str) -> Result<()>;

    /// The error for a required tensor `base` that is absent.
    fn missing(&self, base: &str) -> Error;
}

/// Block `layer` of a model of architecture `spec` and shape `c`.
pub(super) fn load_block<S: BlockSource>(
    s: &mut S,
    spec: &ArchitectureSpec,
    c: &ModelConfig,
    layer: usize,
) -> Result<LayerWeights> {
    let (h, q_dim, kv_dim, f, hd) = (
        c.hidden_size,
        c.heads * c.head_dim,
        c.kv_heads * c.head_dim,
        c.ffn_size,
        c.head_dim,
    );
    let mut reader = BlockReader { s, spec, layer };
    let r = &mut reader;

    let attn_norm = r.required_vector(BlockTensor::AttnNorm, h)?;
    let (wq, wk, wv, bq, bk, bv) = match r.present(BlockTensor::AttnQkv) {
        Some(qkv) => {
            let base = r.s.base_name(layer, qkv);
            let parts = [q_dim, kv_dim, kv_dim];
            let mut m = r.s.stacked_matrices(&base, &parts, h)?.into_iter();
            let (Some(wq), Some(wk), Some(wv)) = (m.next(), m.next(), m.next()) else {
                return Err(r.s.missing(&base));
            };
            let (bq, bk, bv) = match r.s.bias(&base, q_dim + 2 * kv_dim)? {
                Some(b) => (
                    Some(b[..q_dim].to_vec()),
                    Some(b[q_dim..q_dim + kv_dim].to_vec()),
                    Some(b[q_dim + kv_dim..].to_vec()),
                ),
                None => (None, None, None),
            };
            (wq, wk, wv, bq, bk, bv)
        }
        None => {
            let (wq, bq) = r.projection(BlockTensor::AttnQ, q_dim, h)?;
            let (wk, bk) = r.projection(BlockTensor::AttnK, kv_dim, h)?;
            let (wv, bv) = r.projection(BlockTensor::AttnV, kv_dim, h)?;
            (wq, wk, wv, bq, bk, bv)
        }
    };
    let q_norm = r.optional_vector(BlockTensor::AttnQNorm, hd)?;
    let k_norm = r.optional_vector(BlockTensor::AttnKNorm, hd)?;
    let attn_sub_norm = r.optional_vector(BlockTensor::AttnSubNorm, q_dim)?;
    let (wo, _) = r.projection(BlockTensor::AttnOutput, h, q_dim)?;
    let attn_post_norm = r.optional_vector(BlockTensor::AttnPostNorm, h)?;
    let ffn_norm = r.required_vector(BlockTensor::FfnNorm, h)?;
    let (w_gate, w_up) = match r.present(BlockTensor::FfnGateUp) {
        Some(gate_up) => {
            let base = r.s.base_name(layer, gate_up);
            r.s.no_bias(&base)?;
            let mut m = r.s.stacked_matrices(&base, &[f, f], h)?.into_iter();
            let (Some(gate), Some(up)) = (m.next(), m.next()) else {
                return Err(r.s.missing(&base));
            };
            (gate, up)
        }
        None => (
            r.projection(BlockTensor::FfnGate, f, h)?.0,
            r.projection(BlockTensor::FfnUp, f, h)?.0,
        ),
    };
    let ffn_sub_norm = r.optional_vector(BlockTensor::FfnSubNorm, f)?;
    let (w_down, _) = r.projection(BlockTensor::FfnDown, h, f)?;
    let ffn_post_norm = r.optional_vector(BlockTensor::FfnPostNorm, h)?;
    Ok(LayerWeights {
        attn_norm,
        wq,
        wk,
        wv,
        bq,
        bk,
        bv,
        q_norm,
        k_norm,
        attn_sub_norm,
        wo,
        attn_post_norm,
        ffn_norm,
        ffn_sub_norm,
        w_gate,
        w_up,
        w_down,
        ffn_post_norm,
    })
}

/// Reads the tensors of one block by role.
struct BlockReader<'a, S> {
    s: &'a mut S,
    spec: &'a ArchitectureSpec,
    layer: usize,
}

impl<S: BlockSource> BlockReader<'_, S> {
    /// The table entry of `role` when the file has it (or must have it: a required tensor that is
    /// absent is then reported by the read that follows).
    fn present(&self, role: BlockTensor) -> Option<&'static TensorName> {
        let t = self.spec.tensor(role)?;
        match t.presence {
            Presence::Required => Some(t),
            Presence::Optional => self
                .s
                .contains(&self.s.base_name(self.layer, t))
                .then_some(t),
        }
    }

    /// A vector every block of every architecture has.
    fn required_vector(&mut self, role: BlockTensor, len: usize) -> Result<Vec<f32>> {
        let Some(t) = self.spec.tensor(role) else {
            return Err(Error::InvalidOption(format!(
                "{:?} blocks have no {role:?} in the architecture table",
                self.spec.architecture
            )));
        };
        let base = self.s.base_name(self.layer, t);
        self.s.vector(&base, len)
    }

    /// A vector that only some architectures (or files) have.
    fn optional_vector(&mut self, role: BlockTensor, len: usize) -> Result<Option<Vec<f32>>> {
        match self.present(role) {
            Some(t) => {
                let base = self.s.base_name(self.layer, t);
                self.s.vector(&base, len).map(Some)
            }
            None => Ok(None),
        }
    }

    /// A projection `[rows][cols]` with its bias, where the table allows one.
    fn projection(
        &mut self,
        role: BlockTensor,
        rows: usize,
        cols: usize,
    ) -> Result<(Linear, Option<Vec<f32>>)> {
        let Some(t) = self.spec.tensor(role) else {
            return Err(Error::InvalidOption(format!(
                "{:?} blocks have no {role:?} in the architecture table",
                self.spec.architecture
            )));
        };
        let base = self.s.base_name(self.layer, t);
        let m = self.s.matrix(&base, rows, cols)?;
        let bias = if t.bias {
            self.s.bias(&base, rows)?
        } else {
            self.s.no_bias(&base)?;
            None
        };
        Ok((m, bias))
    }
}

/// Rows `start..start + count` of a decoded matrix, in the same form.
pub(super) fn row_range(t: &DecodedTensor, start: usize, count: usize) -> DecodedTensor {
    match t {
        DecodedTensor::LowBit {
            cols,
            bits,
            group_size,
            codes,
            scales,
            offsets,
            ..
        } => {
            let groups = cols / (*group_size).max(1);
            DecodedTensor::LowBit {
                rows: count,
                cols: *cols,
                bits: *bits,
                group_size: *group_size,
                codes: codes[start * cols..(start + count) * cols].to_vec(),
                scales: scales[start * groups..(start + count) * groups].to_vec(),
                offsets: offsets[start * groups..(start + count) * groups].to_vec(),
            }
        }
        DecodedTensor::Int8 {
            cols,
            block,
            codes,
            scales,
            ..
        } => {
            let blocks = cols / (*block).max(1);
            DecodedTensor::Int8 {
                rows: count,
                cols: *cols,
                block: *block,
                codes: codes[start * cols..(start + count) * cols].to_vec(),
                scales: scales[start * blocks..(start + count) * blocks].to_vec(),
            }
        }
        DecodedTensor::SuperBlock {
            cols,
            bits,
            group,
            zero_point,
            codes,
            sub_scales,
            sub_mins,
            d,
            dmin,
            ..
        } => {
            let (groups, supers) = (cols / group, cols / 256);
            let rows_of = |v: &[u16]| v[start * supers..(start + count) * supers].to_vec();
            DecodedTensor::SuperBlock {
                rows: count,
                cols: *cols,
                bits: *bits,
                group: *group,
                zero_point: *zero_point,
                codes: codes[start * cols..(start + count) * cols].to_vec(),
                sub_scales: sub_scales[start * groups..(start + count) * groups].to_vec(),
                sub_mins: sub_mins
                    .as_ref()
                    .map(|m| m[start * groups..(start + count) * groups].to_vec()),
                d: rows_of(d),
                dmin: dmin.as_deref().map(rows_of),
            }
        }
        DecodedTensor::Dense { cols, values, .. } => DecodedTensor::Dense {
            rows: count,
            cols: *cols,
            values: values[start * cols..(start + count) * cols].to_vec(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_ranges_of_every_form_dequantize_to_the_same_rows() {
        let (rows, cols) = (6, 256);
        let low = DecodedTensor::LowBit {
            rows,
            cols,
            bits: 4,
            group_size: 32,
            codes: (0..rows * cols).map(|i| (i * 7 % 16) as u8).collect(),
            scales: (0..rows * 8).map(|i| 0.5 + i as f32).collect(),
            offsets: (0..rows * 8).map(|i| -(i as f32)).collect(),
        };
        let int8 = DecodedTensor::Int8 {
            rows,
            cols,
            block: 32,
            codes: (0..rows * cols).map(|i| (i * 13 % 255) as i8).collect(),
            scales: (0..rows * 8).map(|i| 0.25 * (i + 1) as f32).collect(),
        };
        let f16 = |x: f32| half::f16::from_f32(x).to_bits();
        let super_block = DecodedTensor::SuperBlock {
            rows,
            cols,
            bits: 4,
            group: 32,
            zero_point: 0,
            codes: (0..rows * cols).map(|i| (i * 5 % 16) as u8).collect(),
            sub_scales: (0..rows * 8).map(|i| (i % 60) as i8).collect(),
            sub_mins: Some((0..rows * 8).map(|i| (i * 3 % 64) as u8).collect()),
            d: (0..rows).map(|r| f16(0.01 * (r + 1) as f32)).collect(),
            dmin: Some((0..rows).map(|r| f16(0.002 * (r + 2) as f32)).collect()),
        };
        let dense = DecodedTensor::Dense {
            rows,
            cols,
            values: (0..rows * cols).map(|i| i as f32 * 0.1).collect(),
        };
        for t in [low, int8, super_block, dense] {
            let all = t.dequantize();
            let mut start = 0;
            for count in [1, 3, 2] {
                let part = row_range(&t, start, count);
                assert_eq!(part.rows(), count);
                assert_eq!(part.dequantize(), all[start * cols..(start + count) * cols]);
                start += count;
            }
        }
    }
}
