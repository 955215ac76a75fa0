//! The Llama-family transformer: a plain struct of layers built once ([`Model::load`]), and a
//! forward pass that appends tokens to a [`KvCache`] and writes logits.
//!
//! - `load`: GGUF tensors → [`Linear`] kernel matrices (exact, requantized, or dense reference);
//! - `hf`: the same from a Hugging Face folder;
//! - `forward`: the math, top to bottom, with every scratch buffer preallocated in a run state.

mod block;
pub(crate) mod calibrate;
mod forward;
mod hf;
mod load;
/// Random weights of any shape (`crate::fixtures`).
#[cfg(any(test, feature = "fixtures"))]
pub(crate) mod synthetic;
#[cfg(test)]
mod tests;

use lutra_kernels::{Cpu, Isa, PackedMatrix};

use crate::chat::ChatTemplate;
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
pub use crate::quantize::Requantize;
use crate::rope::Rope;
use crate::rotation::InputRotation;
use crate::tokenizer::Tokenizer;
pub use forward::SequenceBatch;
use forward::{RunState, ScratchPool};
pub use hf::HF_DEFAULT_REQUANTIZE;

/// Largest number of tokens pushed through the matrices at once during prefill (llama.cpp's
/// default micro-batch): each weight tile is read, and on the dot path unpacked, once per
/// [`lutra_kernels`] token block of such a batch rather than once per few dozen tokens.
pub const MAX_BATCH: usize = 512;

/// How to load a model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Dequantize every matrix to f32 and use no tables: slow, exact ground truth.
    pub reference: bool,
    /// Requantize every linear layer (not the embedding or the LM head) at load time.
    pub requantize: Option<Requantize>,
    /// Context length (KV cache size); the model's own when `None`.
    pub context_length: Option<usize>,
    /// Store the KV cache as f16 (the default, as in llama.cpp) instead of f32.
    pub kv_f16: bool,
}

impl Default for LoadOptions {
    /// One thread per core, the fast kernels, the file's own weights and context length, an f16
    /// KV cache.
    fn default() -> LoadOptions {
        LoadOptions {
            threads: 0,
            reference: false,
            requantize: None,
            context_length: None,
            kv_f16: true,
        }
    }
}

/// The weights of one transformer block.
#[derive(Debug)]
pub(crate) struct LayerWeights {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    /// q/k/v biases (Qwen2).
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    /// Per-head RMSNorms of queries and keys before RoPE (Qwen3, Gemma 3), `[head_dim]`.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// BitNet's RMSNorm on the attention output, before `wo`.
    attn_sub_norm: Option<Vec<f32>>,
    wo: Linear,
    /// RMSNorm of o_proj's output before the residual add (Gemma 3).
    attn_post_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// BitNet's RMSNorm on the FFN hidden state, before `w_down`.
    ffn_sub_norm: Option<Vec<f32>>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    /// RMSNorm of down_proj's output before the residual add (Gemma 3).
    ffn_post_norm: Option<Vec<f32>>,
    /// The rotation of each matrix input ([`forward::MatrixInput::index`]) whose matrices are
    /// stored rotated (files of `lutra quantize`).
    rotations: [Option<InputRotation>; 4],
}

/// How many tensors of one kind a model holds, for [`ModelInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorTypeCount {
    /// Type in the source (e.g. `low-bit 4b g32`, `int8`, `f32`).
    pub source: String,
    /// Form in memory (e.g. `lut4 g32`, `int8`, `f32`).
    pub kernel: String,
    /// Number of tensors.
    pub count: usize,
    /// Bytes in memory.
    pub bytes: usize,
}

/// One tensor of a loaded model: its name, its type in the file and its form in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorForm {
    /// Name in the file (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Type in the source (e.g. `Q4_K`, `f16→q4g32`).
    pub source: String,
    /// Form in memory (e.g. `lut4 g32 two-level`, `int8`, `f32`).
    pub kernel: String,
    /// Bytes in memory (for a mapped tensor: of the file, read in place).
    pub bytes: usize,
    /// A lutra packed tensor used in place from the file's mapping: loaded with no repack.
    pub mapped: bool,
    /// How a lutra tensor was quantized, as its file records it.
    pub quantization: Option<crate::gguf::lutra::TensorQuantInfo>,
}

/// A summary of a loaded model, for `lutra info`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Shape and hyper-parameters.
    pub config: ModelConfig,
    /// Parameters of all matrices and norms.
    pub parameters: usize,
    /// Tensor kinds, source → memory.
    pub tensor_types: Vec<TensorTypeCount>,
    /// Every tensor, in load order.
    pub tensors: Vec<TensorForm>,
    /// Bytes of all weights in memory.
    pub weight_bytes: usize,
    /// Context length of a new KV cache.
    pub context_length: usize,
    /// Bytes of a KV cache filled to the context length (a cache allocates as it fills).
    pub kv_cache_bytes: usize,
    /// KV cache entries are f16.
    pub kv_f16: bool,
    /// Every matrix is dense f32 (`--reference`).
    pub reference: bool,
    /// Kernel ISA.
    pub isa: Isa,
    /// Worker threads.
    pub threads: usize,
}

impl std::fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        writeln!(f, "name:            {}", c.name)?;
        writeln!(f, "architecture:    {:?}", c.architecture)?;
        writeln!(
            f,
            "shape:           hidden {}, ffn {}, layers {}, heads {} (kv {}), head dim {}, vocab {}",
            c.hidden_size, c.ffn_size, c.layers, c.heads, c.kv_heads, c.head_dim, c.vocab_size
        )?;
        writeln!(
            f,
            "rope:            {:?}, theta {}, dims {}, scaling {}; rms eps {}; tied embeddings {}",
            c.rope_style, c.rope_theta, c.rope_dims, c.rope_scaling, c.rms_eps, c.tied_embeddings
        )?;
        writeln!(f, "ffn activation:  {:?}", c.ffn_activation)?;
        if let Some(w) = &c.sliding_window {
            let local = w.local_layers.iter().filter(|&&l| l).count();
            write!(
                f,
                "sliding window:  {} positions in {local} of {} layers",
                w.size, c.layers
            )?;
            match w.local_rope_theta {
                Some(theta) => writeln!(f, " (rope theta {theta} there)")?,
                None => writeln!(f)?,
            }
        }
        if c.embedding_scale != 1.0 || c.logit_softcap.is_some() {
            writeln!(
                f,
                "scaling:         embeddings ×{}, logit soft-cap {}",
                c.embedding_scale,
                c.logit_softcap
                    .map_or_else(|| "none".to_string(), |cap| cap.to_string())
            )?;
        }
        writeln!(f, "parameters:      {}", self.parameters)?;
        writeln!(f, "tensors:")?;
        for t in &self.tensor_types {
            writeln!(
                f,
                "  {:>4} × {:<16} → {:<18} {:>9.2} MiB",
                t.count,
                t.source,
                t.kernel,
                mib(t.bytes)
            )?;
        }
        writeln!(f, "weights:         {:.2} MiB", mib(self.weight_bytes))?;
        let mapped = self.tensors.iter().filter(|t| t.mapped).count();
        if mapped > 0 {
            let bytes: usize = self
                .tensors
                .iter()
                .filter(|t| t.mapped)
                .map(|t| t.bytes)
                .sum();
            writeln!(
                f,
                "lutra tensors:   {mapped} read in place from the file ({:.2} MiB), no repack",
                mib(bytes)
            )?;
        }
        writeln!(
            f,
            "kv cache:        up to {:.2} MiB ({} positions, {}; allocated as it fills)",
            mib(self.kv_cache_bytes),
            self.context_length,
            if self.kv_f16 { "f16" } else { "f32" }
        )?;
        write!(
            f,
            "compute:         {} on {} thread(s){}",
            self.isa,
            self.threads,
            if self.reference {
                ", reference f32"
            } else {
                ""
            }
        )
    }
}

/// A loaded model: weights in kernel form, the compute context, and (for files) the tokenizer
/// and chat template.
pub struct Model {
    config: ModelConfig,
    cpu: Cpu,
    reference: bool,
    context_length: usize,
    kv_f16: bool,
    /// `[vocab][hidden]`; also the LM head when `output` is `None` (tied embeddings).
    embedding: Linear,
    layers: Vec<LayerWeights>,
    output_norm: Vec<f32>,
    output: Option<Linear>,
    rope: Rope,
    /// Rotations of the sliding-window layers when their RoPE base differs (Gemma 3).
    rope_local: Option<Rope>,
    tensors: Vec<TensorForm>,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    /// Scratch of the forward passes running now and of those that ran before.
    scratch: ScratchPool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("cpu", &self.cpu)
            .field("reference", &self.reference)
            .finish_non_exhaustive()
    }
}

/// Everything a constructor produces before the run state is sized.
pub(crate) struct ModelParts {
    config: ModelConfig,
    embedding: Linear,
    layers: Vec<LayerWeights>,
    output_norm: Vec<f32>,
    output: Option<Linear>,
    tensors: Vec<TensorForm>,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<ChatTemplate>,
}

impl Model {
    /// Loads a GGUF file, or a Hugging Face folder (`config.json`, `tokenizer.json`,
    /// `model.safetensors` or shards; f16/bf16/f32, GPTQ or BitNet weights) when `path` is a
    /// directory: weights, tokenizer and chat template.
    pub fn load(path: &std::path::Path, opts: &LoadOptions) -> Result<Model> {
        if path.is_dir() {
            return hf::load(path, opts);
        }
        load::load(path, opts)
    }

    fn from_parts(parts: ModelParts, opts: &LoadOptions) -> Result<Model> {
        let config = parts.config;
        check_config(&config)?;
        check_sub_norms(&config, &parts.layers)?;
        let cpu = Cpu::new(opts.threads)?;
        let context_length = match opts.context_length {
            Some(0) => return Err(Error::InvalidOption("context length 0".into())),
            Some(n) => n,
            None => config.context_length.max(1),
        };
        let kv_dim = config.kv_heads.saturating_mul(config.head_dim);
        if KvCache::bytes_for(config.layers, kv_dim, context_length, opts.kv_f16).is_none() {
            return Err(Error::KvCacheTooLarge {
                positions: context_length,
                layers: config.layers,
                kv_heads: config.kv_heads,
                head_dim: config.head_dim,
            });
        }
        let rope = Rope::new(
            config.rope_style,
            config.head_dim,
            config.rope_dims,
            config.rope_theta,
            &config.rope_scaling,
            context_length,
        )?;
        let rope_local = match config
            .sliding_window
            .as_ref()
            .and_then(|w| w.local_rope_theta)
        {
            Some(theta) => Some(Rope::new(
                config.rope_style,
                config.head_dim,
                config.rope_dims,
                theta,
                &crate::rope::RopeScaling::None,
                context_length,
            )?),
            None => None,
        };
        let head = parts.output.as_ref().unwrap_or(&parts.embedding);
        let state = RunState::new(&config, &parts.layers, head, context_length, MAX_BATCH);
        Ok(Model {
            cpu,
            reference: opts.reference,
            context_length,
            kv_f16: opts.kv_f16,
            embedding: parts.embedding,
            layers: parts.layers,
            output_norm: parts.output_norm,
            output: parts.output,
            rope,
            rope_local,
            tensors: parts.tensors,
            tokenizer: parts.tokenizer,
            chat_template: parts.chat_template,
            scratch: ScratchPool::with(state),
            config,
        })
    }

    /// Scratch for one forward pass of up to [`MAX_BATCH`] tokens.
    fn new_run_state(&self) -> RunState {
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        RunState::new(
            &self.config,
            &self.layers,
            head,
            self.context_length,
            MAX_BATCH,
        )
    }

    /// Shape and hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer (absent for synthetic models).
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The chat template (absent for synthetic models).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// An empty KV cache for up to the context length (`LoadOptions::context_length` or the
    /// model's); it allocates memory as positions fill.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.layers,
            self.config.kv_heads,
            self.config.head_dim,
            self.context_length,
            self.kv_f16,
        )
    }

    /// Context length of [`Model::new_cache`].
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Appends `tokens` at position `cache.len()` (prefill in batches of up to [`MAX_BATCH`]) and
    /// writes the logits of the last token into `logits` (`vocab_size` values).
    ///
    /// Several tokens are taken as a prompt, one as a sampled token: prompts are multiplied on
    /// the int8 dot path where the CPU has one (faster for batches), sampled tokens on the table
    /// lookups (faster for one). The two round activations differently, so a token's logits
    /// depend on which it was; [`Model::forward_prompt`] feeds a one-token prompt as a prompt.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, logits: &mut [f32]) -> Result<()> {
        self.run(tokens, cache, logits, false, tokens.len() > 1)
    }

    /// [`Model::forward`] of a prompt, whatever its length.
    pub fn forward_prompt(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<()> {
        self.run(tokens, cache, logits, false, true)
    }

    /// Like [`Model::forward`], but writes the logits of every token: `logits` is
    /// `[tokens.len()][vocab_size]` (perplexity).
    pub fn forward_all(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<()> {
        self.run(tokens, cache, logits, true, true)
    }

    /// Bytes of all weights in memory.
    pub fn weight_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.cpu.threads()
    }

    /// Runs later calls on `threads` worker threads (0: one per core), with the same ISA. The
    /// weights are not touched: a thread sweep does not need to load the model again.
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        self.cpu = Cpu::with_isa(self.cpu.isa(), threads)?;
        Ok(())
    }

    /// Kernel ISA.
    pub fn isa(&self) -> Isa {
        self.cpu.isa()
    }

    /// How this model's matrices multiply prompts, for reports.
    pub fn prefill_kernel(&self) -> String {
        let Some(op) = PackedMatrix::dot_instruction(&self.cpu) else {
            return "table lookups".to_string();
        };
        let unpack = PackedMatrix::dot_unpack_instruction(&self.cpu)
            .map_or(String::new(), |unpack| format!(", {unpack} unpack"));
        format!("int8 dot ({op}{unpack}); sampled tokens: table lookups")
    }

    /// Whether every matrix is dense f32 (reference mode).
    pub fn is_reference(&self) -> bool {
        self.reference
    }

    /// A summary for `lutra info`.
    pub fn describe(&self) -> ModelInfo {
        let c = &self.config;
        let sub_norms = match c.architecture {
            Architecture::BitNet => c.heads * c.head_dim + c.ffn_size,
            _ => 0,
        };
        let norms = |l: &LayerWeights| {
            [&l.q_norm, &l.k_norm, &l.attn_post_norm, &l.ffn_post_norm]
                .iter()
                .map(|n| n.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
        };
        let extra_norms: usize = self.layers.iter().map(norms).sum();
        let per_layer = c.hidden_size * (c.heads + 2 * c.kv_heads) * c.head_dim
            + c.heads * c.head_dim * c.hidden_size
            + 3 * c.hidden_size * c.ffn_size
            + 2 * c.hidden_size
            + sub_norms;
        let head = if self.output.is_some() {
            c.vocab_size * c.hidden_size
        } else {
            0
        };
        ModelInfo {
            config: c.clone(),
            parameters: c.layers * per_layer
                + extra_norms
                + c.vocab_size * c.hidden_size
                + head
                + c.hidden_size,
            tensor_types: count_kinds(&self.tensors),
            tensors: self.tensors.clone(),
            weight_bytes: self.weight_bytes(),
            context_length: self.context_length,
            // Checked when the model was built.
            kv_cache_bytes: KvCache::bytes_for(
                c.layers,
                c.kv_heads * c.head_dim,
                self.context_length,
                self.kv_f16,
            )
            .unwrap_or(usize::MAX),
            kv_f16: self.kv_f16,
            reference: self.reference,
            isa: self.isa(),
            threads: self.threads(),
        }
    }
}

/// Rejects configurations the forward pass cannot run.
fn check_config(c: &ModelConfig) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidOption(format!("model config: {what}")));
    if c.hidden_size == 0 || c.layers == 0 || c.heads == 0 || c.head_dim == 0 || c.vocab_size == 0 {
        return bad(format!("empty dimension in {c:?}"));
    }
    if c.kv_heads == 0 || !c.heads.is_multiple_of(c.kv_heads) {
        return bad(format!(
            "{} heads are not a multiple of {} kv heads",
            c.heads, c.kv_heads
        ));
    }
    if let Some(w) = &c.sliding_window {
        if w.size == 0 || w.local_layers.len() != c.layers {
            return bad(format!(
                "a sliding window of {} positions over {} of {} layers",
                w.size,
                w.local_layers.len(),
                c.layers
            ));
        }
    }
    if c.rope_dims > c.head_dim || !c.rope_dims.is_multiple_of(2) {
        return bad(format!(
            "rope dims {} must be even and at most head dim {}",
            c.rope_dims, c.head_dim
        ));
    }
    Ok(())
}

/// BitNet blocks need both sub-norms, sized `[heads·head_dim]` and `[ffn]`; other architectures
/// have none.
fn check_sub_norms(c: &ModelConfig, layers: &[LayerWeights]) -> Result<()> {
    let bitnet = c.architecture == Architecture::BitNet;
    let q_dim = c.heads * c.head_dim;
    for (i, l) in layers.iter().enumerate() {
        let ok = |norm: &Option<Vec<f32>>, len: usize| match norm {
            Some(w) => bitnet && w.len() == len,
            None => !bitnet,
        };
        if !ok(&l.attn_sub_norm, q_dim) || !ok(&l.ffn_sub_norm, c.ffn_size) {
            return Err(Error::InvalidOption(format!(
                "layer {i}: {:?} blocks {} an attention sub-norm of {q_dim} and an FFN sub-norm \
                 of {} values",
                c.architecture,
                if bitnet { "need" } else { "have no" },
                c.ffn_size
            )));
        }
    }
    Ok(())
}

/// Records one loaded tensor.
fn count_tensor(
    tensors: &mut Vec<TensorForm>,
    name: &str,
    source: String,
    kernel: String,
    bytes: usize,
) {
    tensors.push(TensorForm {
        name: name.to_string(),
        source,
        kernel,
        bytes,
        mapped: false,
        quantization: None,
    });
}

/// The tensors grouped by (source, kernel form), in order of first appearance.
fn count_kinds(tensors: &[TensorForm]) -> Vec<TensorTypeCount> {
    let mut kinds: Vec<TensorTypeCount> = Vec::new();
    for t in tensors {
        match kinds
            .iter_mut()
            .find(|k| k.source == t.source && k.kernel == t.kernel)
        {
            Some(k) => {
                k.count += 1;
                k.bytes += t.bytes;
            }
            None => kinds.push(TensorTypeCount {
                source: t.source.clone(),
                kernel: t.kernel.clone(),
                count: 1,
                bytes: t.bytes,
            }),
        }
    }
    kinds
}
