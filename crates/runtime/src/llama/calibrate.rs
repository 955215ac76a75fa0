//! What `lutra quantize` needs of a loaded model: its blocks run one at a time over calibration
//! sequences, the rows each matrix reads there, and a block's matrices swapped for quantized ones.

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::rotation::InputRotation;

pub(crate) use super::forward::MatrixInput;
use super::forward::{InputObserver, RunState, Segment};
use super::{Model, MAX_BATCH};

/// A matrix of a transformer block, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockMatrix {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// FFN gate projection.
    Gate,
    /// FFN up projection.
    Up,
    /// FFN down projection.
    Down,
}

impl BlockMatrix {
    /// Every matrix of a block, in the order the block reads them.
    pub const ALL: [BlockMatrix; 7] = [
        BlockMatrix::Q,
        BlockMatrix::K,
        BlockMatrix::V,
        BlockMatrix::O,
        BlockMatrix::Gate,
        BlockMatrix::Up,
        BlockMatrix::Down,
    ];

    /// The rows this matrix reads.
    pub(crate) fn input(self) -> MatrixInput {
        match self {
            BlockMatrix::Q | BlockMatrix::K | BlockMatrix::V => MatrixInput::Attention,
            BlockMatrix::O => MatrixInput::Output,
            BlockMatrix::Gate | BlockMatrix::Up => MatrixInput::Ffn,
            BlockMatrix::Down => MatrixInput::Down,
        }
    }

    /// The GGUF name of this matrix in block `layer` (`blk.{layer}.attn_q.weight`).
    pub fn gguf_name(self, layer: usize) -> String {
        let stem = match self {
            BlockMatrix::Q => "attn_q",
            BlockMatrix::K => "attn_k",
            BlockMatrix::V => "attn_v",
            BlockMatrix::O => "attn_output",
            BlockMatrix::Gate => "ffn_gate",
            BlockMatrix::Up => "ffn_up",
            BlockMatrix::Down => "ffn_down",
        };
        format!("blk.{layer}.{stem}.weight")
    }
}

/// Scratch for running single blocks over calibration sequences.
pub(crate) struct BlockRunner {
    state: RunState,
    cache: KvCache,
}

impl Model {
    /// The CPU the model runs on.
    pub(crate) fn cpu(&self) -> &lutra_kernels::Cpu {
        &self.cpu
    }

    /// Transformer blocks.
    pub(crate) fn block_count(&self) -> usize {
        self.layers.len()
    }

    /// Matrix `which` of block `layer`.
    pub(crate) fn block_matrix(&self, layer: usize, which: BlockMatrix) -> &Linear {
        let l = &self.layers[layer];
        match which {
            BlockMatrix::Q => &l.wq,
            BlockMatrix::K => &l.wk,
            BlockMatrix::V => &l.wv,
            BlockMatrix::O => &l.wo,
            BlockMatrix::Gate => &l.w_gate,
            BlockMatrix::Up => &l.w_up,
            BlockMatrix::Down => &l.w_down,
        }
    }

    /// Values per row of matrix input `input` of block `layer`.
    pub(crate) fn input_width(&self, layer: usize, input: MatrixInput) -> usize {
        let which = BlockMatrix::ALL
            .into_iter()
            .find(|m| m.input() == input)
            .unwrap_or(BlockMatrix::Q);
        self.block_matrix(layer, which).cols()
    }

    /// Weight rows of the matrices of block `layer` that read input `input`, all together.
    pub(crate) fn input_rows(&self, layer: usize, input: MatrixInput) -> usize {
        BlockMatrix::ALL
            .into_iter()
            .filter(|m| m.input() == input)
            .map(|m| self.block_matrix(layer, m).rows())
            .sum()
    }

    /// The rotation of input `input` of block `layer`, when its matrices are stored rotated.
    pub(crate) fn input_rotation(
        &self,
        layer: usize,
        input: MatrixInput,
    ) -> Option<&InputRotation> {
        self.layers[layer].rotations[input.index()].as_ref()
    }

    /// Sets the rotation of input `input` of block `layer` (which must match its width): the
    /// matrices reading it must then be stored rotated before the block runs again.
    pub(crate) fn set_input_rotation(
        &mut self,
        layer: usize,
        input: MatrixInput,
        rotation: InputRotation,
    ) -> Result<()> {
        let width = self.input_width(layer, input);
        if width != rotation.cols() {
            return Err(Error::InvalidOption(format!(
                "block {layer}: a rotation of {} features for the {input:?} input of {width}",
                rotation.cols()
            )));
        }
        self.layers[layer].rotations[input.index()] = Some(rotation);
        Ok(())
    }

    /// Replaces matrix `which` of block `layer` by `matrix`, which must have its shape.
    pub(crate) fn replace_block_matrix(
        &mut self,
        layer: usize,
        which: BlockMatrix,
        matrix: Linear,
    ) -> Result<()> {
        let old = self.block_matrix(layer, which);
        if (old.rows(), old.cols()) != (matrix.rows(), matrix.cols()) {
            return Err(Error::InvalidOption(format!(
                "{}: a {}x{} matrix cannot replace a {}x{} one",
                which.gguf_name(layer),
                matrix.rows(),
                matrix.cols(),
                old.rows(),
                old.cols()
            )));
        }
        let l = &mut self.layers[layer];
        let slot = match which {
            BlockMatrix::Q => &mut l.wq,
            BlockMatrix::K => &mut l.wk,
            BlockMatrix::V => &mut l.wv,
            BlockMatrix::O => &mut l.wo,
            BlockMatrix::Gate => &mut l.w_gate,
            BlockMatrix::Up => &mut l.w_up,
            BlockMatrix::Down => &mut l.w_down,
        };
        *slot = matrix;
        // Run states are sized for the matrices they were made for.
        self.scratch = super::forward::ScratchPool::default();
        Ok(())
    }

    /// The residual rows `[tokens][hidden]` that enter the first block.
    pub(crate) fn embed_tokens(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidOption(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let mut x = vec![0.0; tokens.len() * self.config.hidden_size];
        self.embed(tokens, &mut x)?;
        Ok(x)
    }

    /// Scratch for [`Model::run_block`] over sequences of up to `positions` tokens, sized for
    /// the matrices the model holds now (make a new one after replacing matrices).
    pub(crate) fn block_runner(&self, positions: usize) -> BlockRunner {
        let c = &self.config;
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        BlockRunner {
            state: RunState::new(c, &self.layers, head, positions, MAX_BATCH),
            cache: KvCache::new(1, c.kv_heads, c.head_dim, positions, false),
        }
    }

    /// Runs block `layer` over one sequence: `x` (`[tokens][hidden]`, positions from 0) is
    /// replaced by the block's output; `observe` sees each matrix input's rows, a batch at a
    /// time. Where it breaks, that batch stops there (after attention it has stored its keys and
    /// values, which the next batch's attention reads) and the next batch runs: `x` then holds
    /// the residual as it stands at the input where it broke.
    pub(crate) fn run_block(
        &self,
        runner: &mut BlockRunner,
        layer: usize,
        x: &mut [f32],
        observe: Option<InputObserver<'_>>,
    ) -> Result<()> {
        self.run_block_from(runner, layer, MatrixInput::Attention, &[], x, observe)
    }

    /// [`Model::run_block`] from matrix input `from` on: `rows` are that input's rows
    /// (`[tokens][width]`, unrotated, as an observer of an earlier run saw them; ignored for
    /// [`MatrixInput::Attention`]) and `x` the residual where the run that saw them broke. The
    /// matrices before `from` do not run.
    pub(crate) fn run_block_from(
        &self,
        runner: &mut BlockRunner,
        layer: usize,
        from: MatrixInput,
        rows: &[f32],
        x: &mut [f32],
        mut observe: Option<InputObserver<'_>>,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        if layer >= self.layers.len() || !x.len().is_multiple_of(h) {
            return Err(Error::InvalidOption(format!(
                "block {layer} of {} over {} values of width {h}",
                self.layers.len(),
                x.len()
            )));
        }
        let tokens = x.len() / h;
        let width = self.input_width(layer, from);
        if from != MatrixInput::Attention && rows.len() != tokens * width {
            return Err(Error::InvalidOption(format!(
                "block {layer} from its {from:?} input: {} values for {tokens} rows of {width}",
                rows.len()
            )));
        }
        runner.cache.clear();
        runner.cache.reserve(tokens)?;
        for (b, chunk) in x.chunks_mut(MAX_BATCH * h).enumerate() {
            let n = chunk.len() / h;
            runner.state.x_mut(n).copy_from_slice(chunk);
            if from != MatrixInput::Attention {
                let first = b * MAX_BATCH * width;
                runner
                    .state
                    .input_mut(from, n)
                    .copy_from_slice(&rows[first..first + n * width]);
            }
            let observe = observe.as_mut().map(|f| &mut **f as InputObserver<'_>);
            let segs = [Segment {
                prompt: true,
                rows: n,
                pos0: b * MAX_BATCH,
                cache: 0,
            }];
            self.block(
                &mut runner.state,
                layer,
                &segs,
                &mut runner.cache,
                0,
                from,
                observe,
            )?;
            chunk.copy_from_slice(runner.state.x_mut(n));
        }
        Ok(())
    }
}
