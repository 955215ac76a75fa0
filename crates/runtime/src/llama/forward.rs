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

use lutra_kernels::{vector, Cpu};

use crate::attention::{Attention, AttentionShape};
use crate::config::{FfnActivation, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::{Input, Linear};

use super::{LayerWeights, Model};

/// The inputs of a block's matrices: each is read by one group of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// Sees the rows each group of a block's matrices reads (calibration of `lutra quantize`).
pub(crate) type InputObserver<'a> = &'a mut dyn FnMut(MatrixInput, &[f32]);

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
}

impl RunState {
    /// The residual rows of a batch of `n` tokens.
    pub(crate) fn x_mut(&mut self, n: usize) -> &mut [f32] {
        let h = self.x.len() / self.max_batch;
        &mut self.x[..n * h]
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
        }
    }
}

impl Model {
    /// Checks the arguments, then runs the tokens through in batches.
    pub(super) fn run(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: &mut [f32],
        all_logits: bool,
    ) -> Result<()> {
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
        let context = cache.capacity().min(self.context_length);
        if cache.len() + tokens.len() > context {
            return Err(Error::ContextOverflow {
                tokens: cache.len() + tokens.len(),
                context,
            });
        }
        cache.reserve(cache.len() + tokens.len())?;

        // A poisoned lock only means an earlier forward panicked mid-way; the scratch is
        // overwritten before it is read, so it is still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *state;
        let batches = tokens.chunks(st.max_batch);
        let last = batches.len() - 1;
        for (b, batch) in batches.enumerate() {
            let n = batch.len();
            let out = if all_logits {
                let start = b * st.max_batch * vocab;
                Some((&mut logits[start..start + n * vocab], 0..n))
            } else if b == last {
                Some((&mut logits[..], n - 1..n))
            } else {
                None
            };
            self.forward_batch(st, batch, cache, out)?;
        }
        Ok(())
    }

    /// One batch of tokens at positions `cache.len()..`; writes the logits of the tokens in
    /// `out.1` (indices within the batch) into `out.0`.
    fn forward_batch(
        &self,
        st: &mut RunState,
        tokens: &[u32],
        cache: &mut KvCache,
        out: Option<(&mut [f32], std::ops::Range<usize>)>,
    ) -> Result<()> {
        let c = &self.config;
        let cpu = &self.cpu;
        let (n, pos0) = (tokens.len(), cache.len());
        let (h, eps) = (c.hidden_size, c.rms_eps);
        self.embed(tokens, &mut st.x[..n * h])?;

        for l in 0..self.layers.len() {
            self.block(st, l, n, pos0, cache, l, None)?;
        }
        cache.advance(n);
        let x = &st.x[..n * h];

        // Final norm and LM head, only for the tokens whose logits are wanted.
        if let Some((logits, wanted)) = out {
            let m = wanted.len();
            rmsnorm(
                cpu,
                st.head_in.values_mut(m),
                &x[wanted.start * h..wanted.end * h],
                &self.output_norm,
                eps,
            );
            let head = self.output.as_ref().unwrap_or(&self.embedding);
            st.head_in.prepare(cpu, &[head])?;
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

    /// Transformer block `l` on the `n` residual rows in `st.x`, at positions `pos0..pos0 + n`,
    /// storing keys and values in layer `cache_layer` of `cache` (which has room for them).
    /// `observe`, when given, sees the input rows of each group of matrices as they read them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block(
        &self,
        st: &mut RunState,
        l: usize,
        n: usize,
        pos0: usize,
        cache: &mut KvCache,
        cache_layer: usize,
        mut observe: Option<InputObserver<'_>>,
    ) -> Result<()> {
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
        let x = &mut st.x[..n * h];
        // Attention: q/k/v share one input (one set of tables, one per column order).
        rmsnorm(cpu, st.attn_in.values_mut(n), x, &layer.attn_norm, eps);
        if let Some(observe) = observe.as_mut() {
            observe(MatrixInput::Attention, st.attn_in.values());
        }
        st.attn_in.prepare(cpu, &layer.qkv())?;
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
        for (t, (qt, kt)) in q
            .chunks_exact_mut(q_dim)
            .zip(k.chunks_exact_mut(kv_dim))
            .enumerate()
        {
            rope.apply(qt, pos0 + t);
            rope.apply(kt, pos0 + t);
        }
        cache.store(cache_layer, pos0, k, v);
        let att = st.o_in.values_mut(n);
        let window = window.map(|w| w.size);
        st.attention
            .attend(cpu, cache.layer(cache_layer), q, n, pos0, window, att);
        if let Some(w) = &layer.attn_sub_norm {
            rmsnorm_in_place(cpu, att, w, eps);
        }
        if let Some(observe) = observe.as_mut() {
            observe(MatrixInput::Output, att);
        }
        st.o_in.prepare(cpu, &[&layer.wo])?;
        let proj = &mut st.proj[..n * h];
        layer.wo.matmul(cpu, &st.o_in, proj)?;
        if let Some(w) = &layer.attn_post_norm {
            rmsnorm_in_place(cpu, proj, w, eps);
        }
        add_assign(x, proj);

        // Feed-forward: gate/up share one input.
        rmsnorm(cpu, st.ffn_in.values_mut(n), x, &layer.ffn_norm, eps);
        if let Some(observe) = observe.as_mut() {
            observe(MatrixInput::Ffn, st.ffn_in.values());
        }
        st.ffn_in.prepare(cpu, &layer.gate_up())?;
        let (gate, up) = (&mut st.gate[..n * f], &mut st.up[..n * f]);
        Linear::matmul_many(cpu, &st.ffn_in, layer.gate_up(), [&mut *gate, &mut *up])?;
        let hidden = st.down_in.values_mut(n);
        glu(cpu, c.ffn_activation, hidden, gate, up);
        if let Some(w) = &layer.ffn_sub_norm {
            rmsnorm_in_place(cpu, hidden, w, eps);
        }
        if let Some(observe) = observe.as_mut() {
            observe(MatrixInput::Down, hidden);
        }
        st.down_in.prepare(cpu, &[&layer.w_down])?;
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
            FfnActivation::Silu => swiglu(out, gate, up),
            FfnActivation::ReluSquared => relu_squared_glu(out, gate, up),
            FfnActivation::GeluTanh => gelu_tanh_glu(out, gate, up),
        }
    });
}

/// `out = GELU(gate) · up` with GELU's tanh approximation,
/// `0.5·g·(1 + tanh(sqrt(2/π)·(g + 0.044715·g³)))` (Gemma's GeGLU).
pub(crate) fn gelu_tanh_glu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = 0.5 * g * (1.0 + (SQRT_2_OVER_PI * g * (1.0 + 0.044715 * g * g)).tanh()) * u;
    }
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

/// `out = SiLU(gate) · up`, elementwise.
pub(crate) fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
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
    fn swiglu_matches_definition() {
        let mut out = [0.0; 3];
        swiglu(&mut out, &[0.0, 2.0, -30.0], &[5.0, 3.0, 1.0]);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 2.0 / (1.0 + (-2.0f32).exp()) * 3.0).abs() < 1e-6);
        assert!(out[2].abs() < 1e-9);
    }

    #[test]
    fn relu_squared_glu_matches_definition_and_differs_from_swiglu() {
        let (gate, up) = ([-2.0, 0.0, 0.5, 3.0], [7.0, 7.0, 2.0, -1.0]);
        let mut out = [1.0; 4];
        relu_squared_glu(&mut out, &gate, &up);
        assert_eq!(out, [0.0, 0.0, 0.5, -9.0]);
        let mut silu = [0.0; 4];
        swiglu(&mut silu, &gate, &up);
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
                FfnActivation::Silu => swiglu(&mut want, &gate, &up),
                FfnActivation::ReluSquared => relu_squared_glu(&mut want, &gate, &up),
                FfnActivation::GeluTanh => gelu_tanh_glu(&mut want, &gate, &up),
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
        gelu_tanh_glu(&mut out, &[1.0, -1.0, 0.0, 3.0], &[1.0, 1.0, 9.0, 2.0]);
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
