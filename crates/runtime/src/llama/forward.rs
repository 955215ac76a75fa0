//! The forward pass, read top to bottom like llama2.c's `forward`: embed → per layer (RMSNorm →
//! q/k/v → RoPE → KV cache → attention → o_proj → residual → RMSNorm → gate/up → SiLU·up → down →
//! residual) → final norm → LM head.
//!
//! BitNet b1.58 blocks (HF `modeling_bitnet`, llama.cpp `build_bitnet`) differ in three places:
//! the attention output is RMSNormed (`attn_sub_norm`) before o_proj, the FFN hidden state
//! `act(gate)·up` is RMSNormed (`ffn_sub_norm`) before down_proj, and b1.58-2B-4T's activation is
//! the squared ReLU instead of SiLU ([`FfnActivation`]). BitNet quantizes every BitLinear input to
//! int8 with one absmax scale per token; lutra's tables quantize with one scale per 32
//! activations, which is at least as fine, so the ternary layers see the activations BitNet was
//! trained for or closer to f32 ones. The weights themselves stay exactly ternary.
//!
//! The architecture table ([`crate::architecture`]) adds, where a model has them: per-head RMSNorms
//! of q and k before RoPE (Qwen3, Gemma 3); RMSNorms of the attention and FFN outputs before their
//! residual adds (Gemma 3); the embedding scaled by `sqrt(hidden)`, GELU (tanh) in the gated FFN
//! and `cap·tanh(logits/cap)` on the final logits (Gemma); attention limited to a sliding window,
//! with its own RoPE table where the window-limited layers rotate with another base (Mistral,
//! Gemma 3's local layers).
//!
//! Tokens go through the matrices in batches of up to `max_batch` (prefill via mpGEMM; decode is
//! a batch of one). Every buffer lives in [`RunState`], sized once for the largest batch.

use std::ops::ControlFlow;
use std::sync::Mutex;

use lutra_kernels::{vector, Cpu, PackedMatrix};

use crate::attention::{Attention, AttentionShape};
use crate::config::{FfnActivation, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::{Input, Linear};

use super::{LayerWeights, Model};

/// The inputs of a block's matrices: each is read by one group of them. They order as the block
/// reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum MatrixInput {
    /// The normed residual read by q, k and v.
    Attention,
    /// The attention output read by o_proj.
    Output,
    /// The normed residual read by gate and up.
    Ffn,
    /// The gated hidden state read by down_proj.
    Down,
}

impl MatrixInput {
    /// Every input of a block, in the order the block reads them.
    pub(crate) const ALL: [MatrixInput; 4] = [
        MatrixInput::Attention,
        MatrixInput::Output,
        MatrixInput::Ffn,
        MatrixInput::Down,
    ];

    /// Position in [`MatrixInput::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The GGUF tensor holding this input's rotation in block `layer`
    /// (`blk.{layer}.attn_in_rotation`, see [`crate::rotation`]).
    pub(crate) fn rotation_tensor(self, layer: usize) -> String {
        let stem = match self {
            MatrixInput::Attention => "attn_in",
            MatrixInput::Output => "attn_output_in",
            MatrixInput::Ffn => "ffn_in",
            MatrixInput::Down => "ffn_down_in",
        };
        format!("blk.{layer}.{stem}{}", crate::rotation::ROTATION_TENSOR)
    }
}

/// Sees the rows each group of a block's matrices reads (calibration of `lutra quantize`);
/// `Break` stops the block there, before those matrices run (the rows the block was given then
/// hold partial results). A break at `Attention` comes before the batch stores its keys and
/// values, so an observer that breaks there must do so in every batch of a sequence.
pub(crate) type InputObserver<'a> = &'a mut dyn FnMut(MatrixInput, &[f32]) -> ControlFlow<()>;

/// Scratch memory of the forward pass; `[batch][...]` row-major everywhere.
#[derive(Debug)]
pub(crate) struct RunState {
    max_batch: usize,
    /// Residual stream `[batch][hidden]`.
    x: Vec<f32>,
    /// Normed residual, read by q/k/v.
    attn_in: Input,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output (RMSNormed in BitNet blocks), read by o_proj.
    o_in: Input,
    /// Output of o_proj and down_proj, added to the residual.
    proj: Vec<f32>,
    /// Normed residual, read by gate/up.
    ffn_in: Input,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// act(gate)·up (RMSNormed in BitNet blocks), read by down_proj.
    down_in: Input,
    /// Final-normed residual of the tokens whose logits are wanted.
    head_in: Input,
    attention: Attention,
    /// The layout of a [`Model::forward_sequences`] batch.
    layout: BatchLayout,
    /// A batch of the widest matrix input, for
    /// [`crate::rotation::InputRotation::rotate_activations`] (empty when no layer rotates).
    rotation_scratch: Vec<f32>,
}

/// How a [`Model::forward_sequences`] batch lays its sequences out in rows, rebuilt every step in
/// buffers that keep their capacity (reserved for a full batch), so a step allocates nothing.
#[derive(Debug, Default)]
struct BatchLayout {
    /// Every sequence's tokens, in segment order.
    tokens: Vec<u32>,
    /// One per sequence, prompts first.
    segments: Vec<Segment>,
    /// The batch row of each sequence's last token, in the callers' order.
    last_row: Vec<usize>,
    /// The rows whose logits are wanted, in the callers' order.
    wanted: Vec<usize>,
}

impl BatchLayout {
    fn with_capacity(rows: usize) -> BatchLayout {
        BatchLayout {
            tokens: Vec::with_capacity(rows),
            segments: Vec::with_capacity(rows),
            last_row: Vec::with_capacity(rows),
            wanted: Vec::with_capacity(rows),
        }
    }

    /// Lays out `seqs`: prompts first, so that their rows are one run (`block` multiplies that
    /// run on the dot path), each group in the callers' order.
    fn build(&mut self, seqs: &[SequenceBatch<'_>]) {
        self.tokens.clear();
        self.segments.clear();
        self.last_row.clear();
        self.last_row.resize(seqs.len(), 0);
        for prompts in [true, false] {
            for (i, s) in seqs.iter().enumerate().filter(|(_, s)| s.prompt == prompts) {
                self.tokens.extend_from_slice(s.tokens);
                self.last_row[i] = self.tokens.len() - 1;
                self.segments.push(Segment {
                    rows: s.tokens.len(),
                    pos0: s.cache.len(),
                    cache: i,
                    prompt: s.prompt,
                });
            }
        }
        self.wanted.clear();
        let wanted = seqs.iter().zip(&self.last_row).filter(|(s, _)| s.logits);
        self.wanted.extend(wanted.map(|(_, &row)| row));
    }
}

/// Run states not in use. A forward pass takes one (or makes one when all are in use) and puts it
/// back, so callers on several threads never wait for each other's scratch; the pool keeps as many
/// as were ever in use at once.
#[derive(Debug, Default)]
pub(crate) struct ScratchPool(Mutex<Vec<RunState>>);

impl ScratchPool {
    /// A pool holding `state`.
    pub(crate) fn with(state: RunState) -> ScratchPool {
        ScratchPool(Mutex::new(vec![state]))
    }

    /// A run state for `model`'s forward pass.
    pub(crate) fn take(&self, model: &Model) -> RunState {
        let spare = self.spares().pop();
        spare.unwrap_or_else(|| model.new_run_state())
    }

    /// Gives back a run state taken from this pool.
    pub(crate) fn put(&self, state: RunState) {
        self.spares().push(state);
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<RunState>> {
        // A poisoned lock only means a thread panicked while pushing or popping; the list is
        // still a list of complete run states.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RunState {
    /// The residual rows of a batch of `n` tokens.
    pub(crate) fn x_mut(&mut self, n: usize) -> &mut [f32] {
        let h = self.x.len() / self.max_batch;
        &mut self.x[..n * h]
    }

    /// The rows of matrix input `input` for a batch of `n` tokens.
    pub(crate) fn input_mut(&mut self, input: MatrixInput, n: usize) -> &mut [f32] {
        match input {
            MatrixInput::Attention => self.attn_in.values_mut(n),
            MatrixInput::Output => self.o_in.values_mut(n),
            MatrixInput::Ffn => self.ffn_in.values_mut(n),
            MatrixInput::Down => self.down_in.values_mut(n),
        }
    }

    pub(crate) fn new(
        c: &ModelConfig,
        layers: &[LayerWeights],
        head: &Linear,
        context: usize,
        max_batch: usize,
    ) -> RunState {
        let (h, q_dim, kv_dim, f) = (
            c.hidden_size,
            c.heads * c.head_dim,
            c.kv_heads * c.head_dim,
            c.ffn_size,
        );
        let shape = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        RunState {
            max_batch,
            x: vec![0.0; max_batch * h],
            attn_in: Input::for_consumers(h, max_batch, layers.iter().map(LayerWeights::qkv)),
            q: vec![0.0; max_batch * q_dim],
            k: vec![0.0; max_batch * kv_dim],
            v: vec![0.0; max_batch * kv_dim],
            o_in: Input::for_consumers(q_dim, max_batch, layers.iter().map(|l| [&l.wo])),
            proj: vec![0.0; max_batch * h],
            ffn_in: Input::for_consumers(h, max_batch, layers.iter().map(LayerWeights::gate_up)),
            gate: vec![0.0; max_batch * f],
            up: vec![0.0; max_batch * f],
            down_in: Input::for_consumers(f, max_batch, layers.iter().map(|l| [&l.w_down])),
            head_in: Input::for_consumers(h, max_batch, [[head]]),
            attention: Attention::new(shape, context, max_batch),
            layout: BatchLayout::with_capacity(max_batch),
            rotation_scratch: if layers
                .iter()
                .any(|l| l.rotations.iter().any(Option::is_some))
            {
                vec![0.0; max_batch * h.max(q_dim).max(f)]
            } else {
                Vec::new()
            },
        }
    }
}

/// One sequence's share of a batched forward pass ([`Model::forward_sequences`]).
pub struct SequenceBatch<'a> {
    /// Tokens appended to the sequence, at positions `cache.len()..`.
    pub tokens: &'a [u32],
    /// The sequence's KV cache.
    pub cache: &'a mut KvCache,
    /// Whether to write the logits of the last of `tokens`.
    pub logits: bool,
    /// Whether `tokens` are (part of) a prompt rather than one sampled token: prompts are
    /// multiplied on the int8 dot path where the CPU has one, sampled tokens on the table
    /// lookups (see [`Model::forward`]).
    pub prompt: bool,
}

/// One sequence's rows in a block's batch: `rows` residual rows at positions `pos0..`, whose keys
/// and values go to KV cache `cache` of the batch's [`Caches`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    pub(super) rows: usize,
    pub(super) pos0: usize,
    pub(super) cache: usize,
    /// Prompt rows, which take the dot path (see [`SequenceBatch::prompt`]).
    pub(super) prompt: bool,
}

/// The rows of a batch whose logits are written, and where.
pub(super) struct LogitRows<'a, I> {
    /// Indices within the batch, in the order their logits are written to `out`.
    pub(super) rows: I,
    /// Whether the rows are every row of one prompt (perplexity): the LM head then multiplies
    /// them as prompt rows, on the dot path where the CPU has one.
    pub(super) prompt: bool,
    /// `[rows][vocab_size]`.
    pub(super) out: &'a mut [f32],
}

/// The KV caches of a batch's sequences, by the index its [`Segment`]s name.
pub(super) trait Caches {
    /// The cache of the segments that name `index`.
    fn cache(&mut self, index: usize) -> &mut KvCache;
}

/// A single sequence's cache (index 0).
impl Caches for KvCache {
    fn cache(&mut self, _: usize) -> &mut KvCache {
        self
    }
}

/// Sequence `index`'s cache.
impl Caches for [SequenceBatch<'_>] {
    fn cache(&mut self, index: usize) -> &mut KvCache {
        self[index].cache
    }
}

impl Model {
    /// Checks that `tokens` can be appended to `cache`, and makes room for them.
    fn check_sequence(&self, tokens: &[u32], cache: &mut KvCache) -> Result<()> {
        let c = &self.config;
        let vocab = c.vocab_size;
        if tokens.is_empty() {
            return Err(Error::InvalidOption("forward of zero tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidOption(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        if cache.layers() != c.layers
            || cache.kv_heads() != c.kv_heads
            || cache.head_dim() != c.head_dim
        {
            return Err(Error::InvalidOption(
                "the KV cache was made for a different model".into(),
            ));
        }
        let context = cache.capacity().min(self.context_length);
        if cache.len() + tokens.len() > context {
            return Err(Error::ContextOverflow {
                tokens: cache.len() + tokens.len(),
                context,
            });
        }
        cache.reserve(cache.len() + tokens.len())
    }

    /// Checks the arguments, then runs the tokens through in batches.
    pub(super) fn run(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: &mut [f32],
        all_logits: bool,
        prompt: bool,
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        self.check_sequence(tokens, cache)?;
        let want = if all_logits {
            tokens.len() * vocab
        } else {
            vocab
        };
        if logits.len() != want {
            return Err(Error::InvalidOption(format!(
                "logits buffer holds {} values, expected {want}",
                logits.len()
            )));
        }
        let mut st = self.scratch.take(self);
        let batches = tokens.chunks(st.max_batch);
        let last = batches.len() - 1;
        let result = batches.enumerate().try_for_each(|(b, batch)| {
            let n = batch.len();
            let (out, wanted) = if all_logits {
                let start = b * st.max_batch * vocab;
                (&mut logits[start..start + n * vocab], 0..n)
            } else if b == last {
                (&mut logits[..], n - 1..n)
            } else {
                (&mut logits[..0], 0..0)
            };
            let segs = [Segment {
                rows: n,
                pos0: cache.len(),
                cache: 0,
                prompt,
            }];
            let wanted = LogitRows {
                rows: wanted,
                prompt: all_logits && prompt,
                out,
            };
            self.forward_rows(&mut st, batch, &segs, cache, wanted)
        });
        self.scratch.put(st);
        result
    }

    /// Runs the tokens of several sequences through the model together: each matrix multiplies
    /// the rows of all of them at once (the weights are read once per step, not once per
    /// sequence), while each sequence attends only to its own KV cache at its own positions.
    /// For every sequence whose `logits` is set, in order, the logits of its last token are
    /// written to `logits` (`[wanted][vocab_size]`).
    ///
    /// At most [`MAX_BATCH`](super::MAX_BATCH) tokens in all. The result for each sequence
    /// equals a [`Model::forward`] of its tokens alone, up to the rounding of the batched kernels.
    pub fn forward_sequences(
        &self,
        seqs: &mut [SequenceBatch<'_>],
        logits: &mut [f32],
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if seqs.is_empty() {
            return Err(Error::InvalidOption("forward of zero sequences".into()));
        }
        if total > super::MAX_BATCH {
            return Err(Error::InvalidOption(format!(
                "a batch of {total} tokens; at most {} go through at once",
                super::MAX_BATCH
            )));
        }
        let wanted = seqs.iter().filter(|s| s.logits).count();
        if logits.len() != wanted * vocab {
            return Err(Error::InvalidOption(format!(
                "logits buffer holds {} values, expected {}",
                logits.len(),
                wanted * vocab
            )));
        }
        for s in seqs.iter_mut() {
            self.check_sequence(s.tokens, s.cache)?;
        }
        let mut st = self.scratch.take(self);
        // Taken out of the run state while the blocks borrow it; given back with its buffers.
        let mut layout = std::mem::take(&mut st.layout);
        layout.build(seqs);
        let wanted = LogitRows {
            rows: layout.wanted.iter().copied(),
            prompt: false,
            out: logits,
        };
        let result = self.forward_rows(&mut st, &layout.tokens, &layout.segments, seqs, wanted);
        st.layout = layout;
        self.scratch.put(st);
        result
    }

    /// One batch of rows: `tokens` split into `segs` (one per sequence, in order, with their
    /// caches in `caches`); writes the logits of the rows `wanted` asks for.
    fn forward_rows(
        &self,
        st: &mut RunState,
        tokens: &[u32],
        segs: &[Segment],
        caches: &mut (impl Caches + ?Sized),
        wanted: LogitRows<'_, impl ExactSizeIterator<Item = usize>>,
    ) -> Result<()> {
        let LogitRows {
            rows: wanted,
            prompt: head_prompt,
            out: logits,
        } = wanted;
        let c = &self.config;
        let cpu = &self.cpu;
        let n = tokens.len();
        let (h, eps) = (c.hidden_size, c.rms_eps);
        self.embed(tokens, &mut st.x[..n * h])?;

        for l in 0..self.layers.len() {
            self.block(st, l, segs, caches, l, MatrixInput::Attention, None)?;
        }
        for seg in segs {
            caches.cache(seg.cache).advance(seg.rows);
        }
        let x = &st.x[..n * h];

        // Final norm and LM head, only for the rows whose logits are wanted.
        let m = wanted.len();
        if m > 0 {
            let head_in = st.head_in.values_mut(m);
            for (out, r) in head_in.chunks_exact_mut(h).zip(wanted) {
                rmsnorm(cpu, out, &x[r * h..(r + 1) * h], &self.output_norm, eps);
            }
            let head = self.output.as_ref().unwrap_or(&self.embedding);
            let dot = match PackedMatrix::dot_instruction(cpu) {
                Some(_) if head_prompt => m,
                _ => 0,
            };
            st.head_in.prepare_rows(cpu, &[head], dot)?;
            head.matmul(cpu, &st.head_in, logits)?;
            if let Some(cap) = c.logit_softcap {
                soft_cap(logits, cap);
            }
        }
        Ok(())
    }

    /// The embeddings of `tokens` (scaled where the architecture scales them) into `x`
    /// (`[tokens][hidden]`).
    pub(super) fn embed(&self, tokens: &[u32], x: &mut [f32]) -> Result<()> {
        let h = self.config.hidden_size;
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            self.embedding.row(t as usize, row)?;
        }
        if self.config.embedding_scale != 1.0 {
            let scale = self.config.embedding_scale;
            x.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }

    /// Transformer block `l` on the residual rows in `st.x`: the rows of each sequence in
    /// `segs`, in order, at that sequence's positions, storing keys and values in layer
    /// `cache_layer` of its cache in `caches` (which has room for them). The matrices read all
    /// rows at once; attention reads each sequence's own cache. `observe`, when given, sees the
    /// input rows of each group of matrices as they read them.
    ///
    /// The block starts at input `from`: after [`MatrixInput::Attention`], `st` already holds
    /// that input's rows (unrotated, as an observer sees them) and `st.x` the residual as it stands
    /// where the block reads them (the block's input before o_proj's addition, the sum after it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block(
        &self,
        st: &mut RunState,
        l: usize,
        segs: &[Segment],
        caches: &mut (impl Caches + ?Sized),
        cache_layer: usize,
        from: MatrixInput,
        mut observe: Option<InputObserver<'_>>,
    ) -> Result<()> {
        let n: usize = segs.iter().map(|s| s.rows).sum();
        let c = &self.config;
        let cpu = &self.cpu;
        let layer = &self.layers[l];
        let (h, q_dim, kv_dim, f) = (
            c.hidden_size,
            c.heads * c.head_dim,
            c.kv_heads * c.head_dim,
            c.ffn_size,
        );
        let eps = c.rms_eps;
        // The leading prompt rows take the dot path where the CPU has one: a sequence's results
        // depend on whether its tokens are a prompt, not on what else shares the batch.
        let dot: usize = if PackedMatrix::dot_instruction(cpu).is_some() {
            segs.iter().take_while(|s| s.prompt).map(|s| s.rows).sum()
        } else {
            0
        };
        let x = &mut st.x[..n * h];
        if from == MatrixInput::Attention {
            // Attention: q/k/v share one input (one set of tables, one per column order).
            rmsnorm(cpu, st.attn_in.values_mut(n), x, &layer.attn_norm, eps);
            if stop(&mut observe, MatrixInput::Attention, st.attn_in.values()) {
                return Ok(());
            }
            layer.rotate(
                cpu,
                MatrixInput::Attention,
                st.attn_in.values_mut(n),
                &mut st.rotation_scratch,
            )?;
            st.attn_in.prepare_rows(cpu, &layer.qkv(), dot)?;
            let (q, k, v) = (
                &mut st.q[..n * q_dim],
                &mut st.k[..n * kv_dim],
                &mut st.v[..n * kv_dim],
            );
            Linear::matmul_many(cpu, &st.attn_in, layer.qkv(), [&mut *q, &mut *k, &mut *v])?;
            add_bias(q, layer.bq.as_deref());
            add_bias(k, layer.bk.as_deref());
            add_bias(v, layer.bv.as_deref());
            // Per-head norms: every `head_dim` values of q and k are one head.
            if let Some(w) = &layer.q_norm {
                rmsnorm_in_place(cpu, q, w, eps);
            }
            if let Some(w) = &layer.k_norm {
                rmsnorm_in_place(cpu, k, w, eps);
            }
            let window = c
                .sliding_window
                .as_ref()
                .filter(|w| w.local_layers.get(l).copied().unwrap_or(false));
            let rope = match window {
                Some(_) => self.rope_local.as_ref().unwrap_or(&self.rope),
                None => &self.rope,
            };
            let att = st.o_in.values_mut(n);
            let window = window.map(|w| w.size);
            let mut row = 0;
            for seg in segs {
                let (rows, pos0) = (row..row + seg.rows, seg.pos0);
                row += seg.rows;
                let qs = &mut q[rows.start * q_dim..rows.end * q_dim];
                let ks = &mut k[rows.start * kv_dim..rows.end * kv_dim];
                for (t, (qt, kt)) in qs
                    .chunks_exact_mut(q_dim)
                    .zip(ks.chunks_exact_mut(kv_dim))
                    .enumerate()
                {
                    rope.apply(qt, pos0 + t);
                    rope.apply(kt, pos0 + t);
                }
                let vs = &v[rows.start * kv_dim..rows.end * kv_dim];
                let cache = caches.cache(seg.cache);
                cache.store(cache_layer, pos0, ks, vs);
                st.attention.attend(
                    cpu,
                    cache.layer(cache_layer),
                    qs,
                    seg.rows,
                    pos0,
                    window,
                    &mut att[rows.start * q_dim..rows.end * q_dim],
                );
            }
            if let Some(w) = &layer.attn_sub_norm {
                rmsnorm_in_place(cpu, att, w, eps);
            }
        }
        let proj = &mut st.proj[..n * h];
        if from <= MatrixInput::Output {
            let att = st.o_in.values_mut(n);
            if stop(&mut observe, MatrixInput::Output, att) {
                return Ok(());
            }
            layer.rotate(cpu, MatrixInput::Output, att, &mut st.rotation_scratch)?;
            st.o_in.prepare_rows(cpu, &[&layer.wo], dot)?;
            layer.wo.matmul(cpu, &st.o_in, proj)?;
            if let Some(w) = &layer.attn_post_norm {
                rmsnorm_in_place(cpu, proj, w, eps);
            }
            add_assign(x, proj);
        }

        // Feed-forward: gate/up share one input.
        if from <= MatrixInput::Ffn {
            if from < MatrixInput::Ffn {
                rmsnorm(cpu, st.ffn_in.values_mut(n), x, &layer.ffn_norm, eps);
            }
            if stop(&mut observe, MatrixInput::Ffn, st.ffn_in.values()) {
                return Ok(());
            }
            layer.rotate(
                cpu,
                MatrixInput::Ffn,
                st.ffn_in.values_mut(n),
                &mut st.rotation_scratch,
            )?;
            st.ffn_in.prepare_rows(cpu, &layer.gate_up(), dot)?;
            let (gate, up) = (&mut st.gate[..n * f], &mut st.up[..n * f]);
            Linear::matmul_many(cpu, &st.ffn_in, layer.gate_up(), [&mut *gate, &mut *up])?;
            let hidden = st.down_in.values_mut(n);
            glu(cpu, c.ffn_activation, hidden, gate, up);
            if let Some(w) = &layer.ffn_sub_norm {
                rmsnorm_in_place(cpu, hidden, w, eps);
            }
        }
        let hidden = st.down_in.values_mut(n);
        if stop(&mut observe, MatrixInput::Down, hidden) {
            return Ok(());
        }
        layer.rotate(cpu, MatrixInput::Down, hidden, &mut st.rotation_scratch)?;
        st.down_in.prepare_rows(cpu, &[&layer.w_down], dot)?;
        layer.w_down.matmul(cpu, &st.down_in, proj)?;
        if let Some(w) = &layer.ffn_post_norm {
            rmsnorm_in_place(cpu, proj, w, eps);
        }
        add_assign(x, proj);
        Ok(())
    }
}

impl LayerWeights {
    /// The matrices that read the normed residual before attention.
    fn qkv(&self) -> [&Linear; 3] {
        [&self.wq, &self.wk, &self.wv]
    }

    /// The matrices that read the normed residual before the feed-forward.
    fn gate_up(&self) -> [&Linear; 2] {
        [&self.w_gate, &self.w_up]
    }

    /// Rotates the rows `x` of `input` when the matrices reading it are stored rotated (their
    /// inputs seen by an observer are the unrotated rows).
    fn rotate(
        &self,
        cpu: &Cpu,
        input: MatrixInput,
        x: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<()> {
        match &self.rotations[input.index()] {
            Some(r) => r.rotate_activations(cpu, x, scratch),
            None => Ok(()),
        }
    }
}

/// Shows `rows` of `input` to the observer, if any: whether it asked the block to stop.
fn stop(observe: &mut Option<InputObserver<'_>>, input: MatrixInput, rows: &[f32]) -> bool {
    observe.as_mut().is_some_and(|o| o(input, rows).is_break())
}

/// `out[t] = x[t] / rms(x[t]) · weight` for every row `t` of `x` (`[n][weight.len()]`).
pub(crate) fn rmsnorm(cpu: &Cpu, out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean_square = vector::dot(cpu, x, x) / d as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(weight) {
            *o = x * inv * w;
        }
    }
}

/// [`rmsnorm`] of every row of `x` (`[n][weight.len()]`), in place.
pub(crate) fn rmsnorm_in_place(cpu: &Cpu, x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for x in x.chunks_exact_mut(d) {
        let mean_square = vector::dot(cpu, x, x) / d as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        for (x, &w) in x.iter_mut().zip(weight) {
            *x = *x * inv * w;
        }
    }
}

/// Below this many elements one thread computes the gated activation alone: splitting one
/// decoded token's 1536 (SmolLM2) did not measurably help, while a prefill batch's 128·1536 run on
/// one thread while the others waited.
const GLU_PARALLEL_MIN: usize = 8192;

/// `out = act(gate) · up`, elementwise, spread over the threads in contiguous chunks (the same
/// operations per element whatever the split, so the result does not depend on the thread count).
pub(crate) fn glu(cpu: &Cpu, act: FfnActivation, out: &mut [f32], gate: &[f32], up: &[f32]) {
    let chunk = if out.len() < GLU_PARALLEL_MIN {
        out.len()
    } else {
        out.len().div_ceil(cpu.threads())
    };
    cpu.for_each_chunk(out, chunk, |start, out| {
        let (gate, up) = (&gate[start..][..out.len()], &up[start..][..out.len()]);
        match act {
            FfnActivation::Silu => vector::silu_mul(cpu, out, gate, up),
            FfnActivation::ReluSquared => relu_squared_glu(out, gate, up),
            FfnActivation::GeluTanh => vector::gelu_tanh_mul(cpu, out, gate, up),
        }
    });
}

/// `x = cap · tanh(x / cap)`, elementwise (final logit soft-capping).
fn soft_cap(x: &mut [f32], cap: f32) {
    for v in x {
        *v = cap * (*v / cap).tanh();
    }
}

/// `out = max(gate, 0)² · up`, elementwise (BitNet b1.58's `relu2`).
pub(crate) fn relu_squared_glu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let r = g.max(0.0);
        *o = r * r * u;
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Adds `bias` to every row of `x`.
fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for row in x.chunks_exact_mut(bias.len()) {
            add_assign(row, bias);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar() -> Cpu {
        Cpu::with_isa(lutra_kernels::Isa::Scalar, 1).unwrap()
    }

    #[test]
    fn rmsnorm_normalizes_each_row() {
        let x = [3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let w = [1.0, 2.0, 1.0, 1.0];
        let mut out = [0.0; 8];
        rmsnorm(&scalar(), &mut out, &x, &w, 0.0);
        // Row 0: rms = sqrt(25/4) = 2.5.
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6);
        assert_eq!(&out[4..], &[1.0, 2.0, 1.0, 1.0]);
        // eps keeps a zero row finite.
        rmsnorm(&scalar(), &mut out[..4], &[0.0; 4], &w, 1e-5);
        assert!(out[..4].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn relu_squared_glu_matches_definition_and_differs_from_silu() {
        let (gate, up) = ([-2.0, 0.0, 0.5, 3.0], [7.0, 7.0, 2.0, -1.0]);
        let mut out = [1.0; 4];
        relu_squared_glu(&mut out, &gate, &up);
        assert_eq!(out, [0.0, 0.0, 0.5, -9.0]);
        let mut silu = [0.0; 4];
        vector::silu_mul(&scalar(), &mut silu, &gate, &up);
        // SiLU lets negative gates through and does not square: a mix-up would show.
        assert!(silu[0] < -0.5 && (silu[3] - out[3]).abs() > 5.0);
    }

    #[test]
    fn glu_on_several_threads_equals_one_thread() {
        let len = 3 * GLU_PARALLEL_MIN + 37;
        let gate: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let up: Vec<f32> = (0..len)
            .map(|i| ((i * 104729) % 997) as f32 / 250.0 - 2.0)
            .collect();
        for act in [
            FfnActivation::Silu,
            FfnActivation::ReluSquared,
            FfnActivation::GeluTanh,
        ] {
            let mut want = vec![0.0; len];
            match act {
                FfnActivation::Silu => vector::silu_mul(&scalar(), &mut want, &gate, &up),
                FfnActivation::ReluSquared => relu_squared_glu(&mut want, &gate, &up),
                FfnActivation::GeluTanh => vector::gelu_tanh_mul(&scalar(), &mut want, &gate, &up),
            }
            for threads in [1, 2, 3] {
                let cpu = Cpu::with_isa(lutra_kernels::Isa::Scalar, threads).unwrap();
                // Long enough to be split, and short enough to run on one thread.
                for n in [len, GLU_PARALLEL_MIN - 1] {
                    let mut got = vec![f32::NAN; n];
                    glu(&cpu, act, &mut got, &gate[..n], &up[..n]);
                    assert_eq!(got, want[..n], "{act:?} on {threads} threads, {n} elements");
                }
            }
        }
    }

    #[test]
    fn gelu_tanh_glu_matches_known_values_and_soft_cap_bounds() {
        // GELU(1) ≈ 0.841192, GELU(-1) ≈ -0.158808 (tanh form), GELU(0) = 0.
        let mut out = [0.0; 4];
        vector::gelu_tanh_mul(
            &scalar(),
            &mut out,
            &[1.0, -1.0, 0.0, 3.0],
            &[1.0, 1.0, 9.0, 2.0],
        );
        assert!((out[0] - 0.841_192).abs() < 1e-5, "{out:?}");
        assert!((out[1] + 0.158_808).abs() < 1e-5, "{out:?}");
        assert_eq!(out[2], 0.0);
        assert!((out[3] - 2.0 * 2.996_363).abs() < 1e-4, "{out:?}");
        let mut x = [0.0, 1.0, 100.0, -1000.0];
        soft_cap(&mut x, 30.0);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 30.0 * (1.0f32 / 30.0).tanh()).abs() < 1e-6);
        assert!(x[2] < 30.0 && x[2] > 29.0 && x[3] >= -30.0);
    }

    #[test]
    fn rmsnorm_in_place_equals_rmsnorm() {
        let x: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.3).collect();
        let w = [0.5, 1.0, 2.0, -1.0];
        let mut want = vec![0.0; 12];
        rmsnorm(&scalar(), &mut want, &x, &w, 1e-6);
        let mut got = x.clone();
        rmsnorm_in_place(&scalar(), &mut got, &w, 1e-6);
        assert_eq!(got, want);
    }
}
