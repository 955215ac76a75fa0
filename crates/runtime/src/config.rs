//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.
//!
//! OWNER: formats helper (constructors); the struct is shared by every module.

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs `(x[2i], x[2i+1])`: GGUF llama weights (the converter permutes q/k rows).
    Adjacent,
    /// Rotate halves `(x[i], x[i + d/2])`: Hugging Face checkpoints and GGUF qwen2.
    Halves,
}

/// Architecture family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, Mistral.
    Llama,
    /// Qwen2 (q/k/v biases).
    Qwen2,
    /// BitNet b1.58 (ternary weights, squared-ReLU FFN, sub-norms).
    BitNet,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub architecture: Architecture,
    /// Human-readable name (`general.name`), if any.
    pub name: String,
    /// Hidden size (embedding length).
    pub hidden_size: usize,
    /// FFN inner size.
    pub ffn_size: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA when fewer than `heads`).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Training context length.
    pub context_length: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Dimensions of a head that RoPE rotates (usually `head_dim`).
    pub rope_dims: usize,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// The LM head is the token embedding.
    pub tied_embeddings: bool,
}
