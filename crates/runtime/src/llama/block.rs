//! One transformer block built from any file format, following the architecture table
//! ([`crate::architecture`]): the format only says how a table name becomes a tensor name and
//! how a tensor is read ([`BlockSource`]).

use crate::architecture::{ArchitectureSpec, BlockTensor, Presence, TensorName};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::rotation::InputRotation;

use super::forward::MatrixInput;
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

    /// The rotation of `cols` input features stored as tensor `name`, if the file has it (see
    /// [`crate::rotation`]; only GGUF files written by `lutra quantize` do).
    fn rotation(&mut self, _name: &str, _cols: usize) -> Result<Option<InputRotation>> {
        Ok(None)
    }

    /// Whether the file records matrix `base` as stored for rotated inputs.
    fn stored_rotated(&self, _base: &str) -> Result<bool> {
        Ok(false)
    }

    /// The error for tensors that do not fit together, naming the file where there is one.
    fn inconsistent(&self, reason: String) -> Error {
        Error::InvalidOption(reason)
    }
}

/// The matrices of a block that read each input, by role (either of a pair may be absent: Phi-3
/// stacks q/k/v and gate/up).
const INPUT_READERS: [(MatrixInput, &[BlockTensor]); 4] = [
    (
        MatrixInput::Attention,
        &[
            BlockTensor::AttnQ,
            BlockTensor::AttnK,
            BlockTensor::AttnV,
            BlockTensor::AttnQkv,
        ],
    ),
    (MatrixInput::Output, &[BlockTensor::AttnOutput]),
    (
        MatrixInput::Ffn,
        &[
            BlockTensor::FfnGate,
            BlockTensor::FfnUp,
            BlockTensor::FfnGateUp,
        ],
    ),
    (MatrixInput::Down, &[BlockTensor::FfnDown]),
];

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
    let mut rotations: [Option<InputRotation>; 4] = Default::default();
    for ((input, readers), cols) in INPUT_READERS.into_iter().zip([h, q_dim, h, f]) {
        let name = input.rotation_tensor(layer);
        let rotation = r.s.rotation(&name, cols)?;
        // A matrix stored for rotated inputs and an input left unrotated (or the reverse) would
        // compute something else than the file's model.
        for &role in readers {
            let Some(t) = r.present(role) else { continue };
            let base = r.s.base_name(layer, t);
            if !r.s.contains(&base) {
                continue;
            }
            if r.s.stored_rotated(&base)? != rotation.is_some() {
                return Err(r.s.inconsistent(format!(
                    "{base}: {} but the file {} {name}",
                    if rotation.is_some() {
                        "not recorded as stored for rotated inputs"
                    } else {
                        "recorded as stored for rotated inputs"
                    },
                    if rotation.is_some() { "has" } else { "lacks" }
                )));
            }
        }
        rotations[input.index()] = rotation;
    }
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
        rotations,
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
