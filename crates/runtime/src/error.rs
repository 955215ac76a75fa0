//! Typed errors of the runtime. Every error that comes from a file names the file.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A model file is malformed: truncated, corrupt, or not what its header says.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A tensor has a type lutra cannot read.
    #[error("{path}: tensor '{tensor}' has type {ty}, which lutra cannot read")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The type's name.
        ty: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{path}: tensor '{tensor}' is missing")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor's shape disagrees with the model configuration.
    #[error("{path}: tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Shape in the file (GGUF order: fastest-varying first).
        found: Vec<usize>,
        /// Shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A tensor was read but could not be put into the form the kernels take (for example a
    /// group size the kernels lack, or a scale out of range).
    #[error("{path}: tensor {tensor} ({ty}): {error}")]
    TensorForm {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The tensor's type in the file (and the requantization target, if any).
        ty: String,
        /// What went wrong (part of this error's message, not a separate cause, so that a
        /// printed chain does not repeat it).
        error: Box<Error>,
    },
    /// A metadata key is missing or has the wrong type.
    #[error("{path}: metadata '{key}': {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A forward pass or a perplexity window needs more positions than the context holds.
    #[error("{tokens} tokens do not fit in the context of {context} tokens; raise the context length (-c)")]
    ContextOverflow {
        /// Tokens needed.
        tokens: usize,
        /// Context length.
        context: usize,
    },
    /// A KV cache of the requested context length would not fit in the address space.
    #[error(
        "a KV cache of {positions} positions × {layers} layers × {kv_heads} KV heads × {head_dim} \
         values is too large to allocate; lower the context length (-c)"
    )]
    KvCacheTooLarge {
        /// Positions asked for.
        positions: usize,
        /// Layers of the model.
        layers: usize,
        /// Key/value heads per layer.
        kv_heads: usize,
        /// Values per head and position.
        head_dim: usize,
    },
    /// A prompt leaves no room in the context for a single generated token.
    #[error(
        "the prompt has {prompt_tokens} tokens and the context holds {context}, which leaves no room \
         to generate; shorten the prompt or raise the context length (-c)"
    )]
    PromptTooLong {
        /// Tokens of the prompt (in a chat, of the whole conversation).
        prompt_tokens: usize,
        /// Context length.
        context: usize,
    },
    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template rendering failed.
    #[error("chat template: {0}")]
    Template(String),
    /// An option value is invalid.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The scheduler's queue is full: as many requests wait as it was allowed to hold.
    #[error("the server is busy: {queue} requests are already waiting; retry later")]
    QueueFull {
        /// How many requests may wait.
        queue: usize,
    },
    /// The scheduler no longer accepts requests (it is shutting down).
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
    /// A kernel rejected its inputs.
    #[error(transparent)]
    Kernel(#[from] lutra_kernels::KernelError),
}

/// Result type of the runtime.
pub type Result<T> = std::result::Result<T, Error>;
