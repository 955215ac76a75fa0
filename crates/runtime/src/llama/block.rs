//! One transformer block built from any file format, following the architecture table
//! ([`crate::architecture`]): the format only says how a table name becomes a tensor name and
//! how a tensor is read ([`BlockSource`]).

use crate::architecture::{ArchitectureSpec, BlockTensor, Presence, TensorName};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::Linear;

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
