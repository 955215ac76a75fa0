//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

pub use crate::architecture::{Architecture, FfnActivation};
use crate::architecture::{ArchitectureSpec, EmbeddingScale};
use crate::rope::{RopeScaling, RopeStyle};

/// GGUF's tensor of per-pair RoPE frequency divisors.
pub const ROPE_FREQS_TENSOR: &str = "rope_freqs.weight";

/// Attention limited to the last `size` positions (the query's own included) in some layers.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Positions a query sees.
    pub size: usize,
    /// Per layer: whether it is limited to the window (the others see the whole context).
    pub local_layers: Vec<bool>,
    /// RoPE base frequency of the window-limited layers, when it differs from the model's (Gemma
    /// 3's local layers rotate with 10000, its global ones with `rope_theta`; local layers take no
    /// RoPE scaling then).
    pub local_rope_theta: Option<f32>,
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
    /// RoPE frequency scaling (Llama 3.1's, linear), [`RopeScaling::None`] for most models.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// The LM head is the token embedding.
    pub tied_embeddings: bool,
    /// Activation of the gated FFN.
    pub ffn_activation: FfnActivation,
    /// Attention limited to a window of recent positions (Mistral, Gemma 3's local layers).
    pub sliding_window: Option<SlidingWindow>,
    /// Factor of the token embedding before the first block (`sqrt(hidden)` for Gemma, else 1).
    pub embedding_scale: f32,
    /// Final logits become `cap·tanh(logits/cap)` (Gemma's final logit soft-capping).
    pub logit_softcap: Option<f32>,
}

/// Most bytes a model file's context length may ask for in RoPE tables and attention scratch
/// (both are sized by it when the model loads): 4 GiB, far above any published model (a 1M-token
/// context with 128-dimensional heads needs about 0.6 GiB) and far below what a corrupt count
/// would ask for.
pub const MAX_CONTEXT_STATE_BYTES: usize = 4 << 30;

/// Largest head dimension (and RoPE dimension count) a model file may claim; real models use 64
/// to 256.
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// Which size of a configuration is out of bounds, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SizeProblem {
    /// The head dimension is above [`MAX_HEAD_DIM`], or `heads·head_dim` overflows.
    HeadDim,
    /// The RoPE dimension count is above [`MAX_HEAD_DIM`].
    RopeDims,
    /// The context length's tables would be larger than [`MAX_CONTEXT_STATE_BYTES`].
    ContextLength,
}

impl ModelConfig {
    /// Bytes of the RoPE tables (cos and sin of each rotated pair at each position) and of the
    /// attention scratch (one score per head and position) that a context of `context_length`
    /// positions needs; `None` on overflow.
    pub fn context_state_bytes(&self, context_length: usize) -> Option<usize> {
        let per_position = (self.rope_dims.min(self.head_dim) / 2)
            .checked_mul(8)?
            .checked_add(self.heads.checked_mul(4)?)?;
        context_length.checked_mul(per_position)
    }

    /// Checks the sizes that allocations are made from before any tensor is read.
    fn check_sizes(&self) -> Result<(), (SizeProblem, String)> {
        if self.rope_dims > MAX_HEAD_DIM {
            return Err((
                SizeProblem::RopeDims,
                format!(
                    "{} RoPE dimensions is more than {MAX_HEAD_DIM}; the value is corrupt",
                    self.rope_dims
                ),
            ));
        }
        if self.head_dim > MAX_HEAD_DIM
            || self.heads.checked_mul(self.head_dim).is_none()
            || self.kv_heads.checked_mul(self.head_dim).is_none()
        {
            return Err((
                SizeProblem::HeadDim,
                format!(
                    "head dimension {} (with {} heads) is larger than any model's; the value is \
                     corrupt",
                    self.head_dim, self.heads
                ),
            ));
        }
        match self.context_state_bytes(self.context_length) {
            Some(b) if b <= MAX_CONTEXT_STATE_BYTES => Ok(()),
            _ => Err((
                SizeProblem::ContextLength,
                format!(
                    "context length {} would need more than {} GiB of RoPE tables and \
                     attention scratch; the value is corrupt",
                    self.context_length,
                    MAX_CONTEXT_STATE_BYTES >> 30
                ),
            )),
        }
    }

    /// Reads the configuration from `{arch}.*` GGUF metadata (`arch` = `general.architecture`).
    ///
    /// Required keys missing or of the wrong type are [`crate::Error::Metadata`]; optional ones
    /// take llama.cpp's defaults (`rope.freq_base` 10000, `head_count_kv` = `head_count`,
    /// `rope.dimension_count` = head dim). RoPE scaling comes from `rope.scaling.type` /
    /// `rope.scaling.factor` (linear) and the `rope_freqs.weight` tensor (per-pair factors);
    /// other scaling types (`yarn`, ...) are refused.
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> crate::Result<ModelConfig> {
        let arch_name = file.require_str("general.architecture")?;
        let spec = ArchitectureSpec::for_gguf(arch_name).ok_or_else(|| {
            file.meta_error(
                "general.architecture",
                &format!(
                    "architecture '{arch_name}' is not supported ({} are)",
                    ArchitectureSpec::gguf_names_list()
                ),
            )
        })?;
        let architecture = spec.architecture;
        let key = |k: &str| format!("{arch_name}.{k}");
        let opt_usize = |k: &str| -> crate::Result<Option<usize>> {
            match file.metadata(&key(k)) {
                None => Ok(None),
                Some(_) => file.require_usize(&key(k)).map(Some),
            }
        };
        let layers = file.require_usize(&key("block_count"))?;
        let hidden_size = file.require_usize(&key("embedding_length"))?;
        let ffn_size = file.require_usize(&key("feed_forward_length"))?;
        let heads = file.require_usize(&key("attention.head_count"))?;
        let key_length = opt_usize("attention.key_length")?;
        // Without `key_length` the head dimension is hidden/heads, which must then be whole.
        if heads == 0 || (key_length.is_none() && hidden_size % heads != 0) {
            return Err(file.meta_error(
                &key("attention.head_count"),
                &format!("{heads} heads do not divide the hidden size {hidden_size}"),
            ));
        }
        let kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(file.meta_error(
                &key("attention.head_count_kv"),
                &format!("{kv_heads} KV heads do not divide {heads} query heads"),
            ));
        }
        let head_dim = key_length.unwrap_or(hidden_size / heads);
        if let Some(v) = opt_usize("attention.value_length")? {
            if v != head_dim {
                return Err(file.meta_error(
                    &key("attention.value_length"),
                    &format!("value heads of {v} differ from key heads of {head_dim}"),
                ));
            }
        }
        let rope_dims = opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        let rope_theta = match file.metadata(&key("rope.freq_base")) {
            None => 10000.0,
            Some(_) => file.require_f32(&key("rope.freq_base"))?,
        };
        let rope_scaling = gguf_rope_scaling(file, arch_name, rope_theta, rope_dims)?;
        let rms_eps = file.require_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let context_length = file.require_usize(&key("context_length"))?;
        let vocab_size = match opt_usize("vocab_size")? {
            Some(v) => v,
            None => file
                .require("tokenizer.ggml.tokens")?
                .as_array()
                .map(<[_]>::len)
                .ok_or_else(|| file.meta_error("tokenizer.ggml.tokens", "expected an array"))?,
        };
        let name = file
            .metadata("general.name")
            .and_then(|v| v.as_str())
            .unwrap_or(arch_name)
            .to_string();
        // Phi-3's long-context RoPE ("su" / longrope) keeps per-pair factors in these tensors.
        for t in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            if file.tensor_info(t).is_some() {
                return Err(file.meta_error(
                    &key("rope.scaling.type"),
                    &format!(
                        "the file has '{t}': longrope (Phi-3 128k) RoPE scaling is not supported"
                    ),
                ));
            }
        }
        let sliding_window = gguf_sliding_window(file, architecture, arch_name, layers)?;
        let logit_softcap = match file.metadata(&key("final_logit_softcapping")) {
            None => None,
            Some(_) => {
                Some(file.require_f32(&key("final_logit_softcapping"))?).filter(|&cap| cap != 0.0)
            }
        };
        let config = ModelConfig {
            architecture,
            name,
            hidden_size,
            ffn_size,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab_size,
            context_length,
            rope_theta,
            rope_dims,
            rope_style: spec.gguf_rope_style,
            rope_scaling,
            rms_eps,
            tied_embeddings: file.tensor_info("output.weight").is_none(),
            ffn_activation: spec.activation,
            sliding_window,
            embedding_scale: match spec.embedding_scale {
                EmbeddingScale::None => 1.0,
                EmbeddingScale::SqrtHidden => (hidden_size as f32).sqrt(),
            },
            logit_softcap,
        };
        config.check_sizes().map_err(|(problem, reason)| {
            let k = match problem {
                SizeProblem::HeadDim => "attention.key_length",
                SizeProblem::RopeDims => "rope.dimension_count",
                SizeProblem::ContextLength => "context_length",
            };
            file.meta_error(&key(k), &reason)
        })?;
        Ok(config)
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (already read into `json`; `path` names it in errors).
    ///
    /// Hugging Face checkpoints rotate halves, so `rope_style` is always [`RopeStyle::Halves`].
    pub fn from_hf_json(json: &str, path: &std::path::Path) -> crate::Result<ModelConfig> {
        let err = |key: &str, reason: String| crate::Error::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| crate::Error::BadFile {
                path: path.to_path_buf(),
                reason: format!("not valid JSON: {e}"),
            })?;
        let opt_usize = |key: &str| -> crate::Result<Option<usize>> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| err(key, format!("expected a non-negative integer, found {x}"))),
            }
        };
        let usize_of = |key: &str| -> crate::Result<usize> {
            opt_usize(key)?.ok_or_else(|| err(key, "missing".to_string()))
        };
        let f32_of = |key: &str| -> crate::Result<Option<f32>> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(|f| Some(f as f32))
                    .ok_or_else(|| err(key, format!("expected a number, found {x}"))),
            }
        };
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("llama");
        let Some(spec) = ArchitectureSpec::for_hf(model_type) else {
            return Err(err(
                "model_type",
                format!(
                    "model type '{model_type}' is not supported ({} are)",
                    ArchitectureSpec::hf_model_types_list()
                ),
            ));
        };
        let architecture = spec.architecture;
        let hidden_size = usize_of("hidden_size")?;
        let heads = usize_of("num_attention_heads")?;
        if heads == 0 || hidden_size % heads != 0 {
            return Err(err(
                "num_attention_heads",
                format!("{heads} heads do not divide the hidden size {hidden_size}"),
            ));
        }
        let kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(err(
                "num_key_value_heads",
                format!("{kv_heads} KV heads do not divide {heads} query heads"),
            ));
        }
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / heads);
        // transformers 5 writes `rope_parameters` (rope_type, rope_theta, factors) in place of the
        // top-level `rope_theta` and `rope_scaling` of earlier versions.
        let parameters = v.get("rope_parameters").filter(|p| !p.is_null());
        let inner_theta =
            match parameters.and_then(|p| p.get("rope_theta")) {
                None => None,
                Some(t) => Some(t.as_f64().ok_or_else(|| {
                    err("rope_parameters.rope_theta", format!("not a number: {t}"))
                })? as f32),
            };
        let rope_theta = match (f32_of("rope_theta")?, inner_theta) {
            (Some(a), Some(b)) if a != b => {
                return Err(err(
                    "rope_theta",
                    format!("{a} disagrees with rope_parameters.rope_theta {b}"),
                ))
            }
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => 10000.0,
        };
        let rope_scaling = match (parameters, v.get("rope_scaling").filter(|s| !s.is_null())) {
            (Some(p), _) => hf_rope_scaling(p, "rope_parameters", &err)?,
            (None, Some(scaling)) => hf_rope_scaling(scaling, "rope_scaling", &err)?,
            (None, None) => RopeScaling::None,
        };
        let layers = usize_of("num_hidden_layers")?;
        let sliding_window = hf_sliding_window(&v, model_type, layers, &err)?;
        let ffn_activation = match v.get("hidden_act").and_then(|a| a.as_str()) {
            None => spec.activation,
            Some("silu") | Some("swish") => FfnActivation::Silu,
            Some("relu2") => FfnActivation::ReluSquared,
            Some("gelu_pytorch_tanh") => FfnActivation::GeluTanh,
            Some(other) => {
                return Err(err(
                    "hidden_act",
                    format!(
                        "activation '{other}' is not supported (silu, relu2, gelu_pytorch_tanh \
                         are)"
                    ),
                ))
            }
        };
        let config = ModelConfig {
            architecture,
            name: v
                .get("_name_or_path")
                .and_then(|n| n.as_str())
                .unwrap_or(model_type)
                .to_string(),
            hidden_size,
            ffn_size: usize_of("intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab_size: usize_of("vocab_size")?,
            context_length: usize_of("max_position_embeddings")?,
            rope_theta,
            rope_dims: head_dim,
            rope_style: RopeStyle::Halves,
            rope_scaling,
            rms_eps: f32_of("rms_norm_eps")?
                .ok_or_else(|| err("rms_norm_eps", "missing".into()))?,
            tied_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|t| t.as_bool())
                .unwrap_or(false),
            ffn_activation,
            sliding_window,
            embedding_scale: 1.0,
            logit_softcap: None,
        };
        config.check_sizes().map_err(|(problem, reason)| {
            let key = match problem {
                SizeProblem::HeadDim | SizeProblem::RopeDims => "head_dim",
                SizeProblem::ContextLength => "max_position_embeddings",
            };
            err(key, reason)
        })?;
        // Scaling that the tables cannot use (a factor of 0, empty Llama 3 bands) is refused here,
        // where the file can be named.
        crate::rope::frequency_factors(&config.rope_scaling, rope_theta, head_dim)
            .map_err(|reason| err("rope_scaling", reason))?;
        Ok(config)
    }
}

/// The sliding window of a GGUF file: `{arch}.attention.sliding_window` (0 or absent: none).
/// Gemma 3 limits five layers of every six to it (llama.cpp's rule; the last of each six is
/// global), or those `attention.sliding_window_pattern` names (a period, or a per-layer array of
/// booleans), with RoPE base `rope.freq_base_swa` (10000 when absent) in those layers; Llama
/// files (Mistral) limit every layer. Phi-3 files' window is ignored, as llama.cpp ignores it.
fn gguf_sliding_window(
    file: &crate::gguf::GgufFile,
    architecture: Architecture,
    arch_name: &str,
    layers: usize,
) -> crate::Result<Option<SlidingWindow>> {
    let key = |k: &str| format!("{arch_name}.{k}");
    let size = match file.metadata(&key("attention.sliding_window")) {
        None => return Ok(None),
        Some(_) => file.require_usize(&key("attention.sliding_window"))?,
    };
    if size == 0 {
        return Ok(None);
    }
    match architecture {
        Architecture::Gemma3 => {
            let pattern_key = key("attention.sliding_window_pattern");
            let local_layers = match file.metadata(&pattern_key) {
                Some(crate::gguf::MetaValue::Array(values)) => {
                    let flags: Option<Vec<bool>> = values
                        .iter()
                        .map(|v| match v {
                            crate::gguf::MetaValue::Bool(b) => Some(*b),
                            _ => None,
                        })
                        .collect();
                    match flags {
                        Some(flags) if flags.len() == layers => flags,
                        _ => {
                            return Err(file.meta_error(
                                &pattern_key,
                                &format!("expected {layers} booleans, one per layer"),
                            ))
                        }
                    }
                }
                Some(_) => {
                    let period = file.require_usize(&pattern_key)?;
                    (0..layers)
                        .map(|l| period == 0 || l % period < period - 1)
                        .collect()
                }
                None => (0..layers).map(|l| l % 6 < 5).collect(),
            };
            let local_rope_theta = match file.metadata(&key("rope.freq_base_swa")) {
                None => 10000.0,
                Some(_) => file.require_f32(&key("rope.freq_base_swa"))?,
            };
            Ok(Some(SlidingWindow {
                size,
                local_layers,
                local_rope_theta: Some(local_rope_theta),
            }))
        }
        Architecture::Llama => Ok(Some(SlidingWindow {
            size,
            local_layers: vec![true; layers],
            local_rope_theta: None,
        })),
        _ => Ok(None),
    }
}

/// The sliding window of a Hugging Face `config.json`: Mistral's `sliding_window` (null: none)
/// limits every layer. Qwen2/Qwen3 configs carry a `sliding_window` that only applies with
/// `use_sliding_window: true`, which is refused (their per-layer rule is not implemented).
fn hf_sliding_window(
    v: &serde_json::Value,
    model_type: &str,
    layers: usize,
    err: &dyn Fn(&str, String) -> crate::Error,
) -> crate::Result<Option<SlidingWindow>> {
    if v.get("use_sliding_window").and_then(|u| u.as_bool()) == Some(true)
        && model_type.starts_with("qwen")
    {
        return Err(err(
            "use_sliding_window",
            "Qwen's sliding-window layers are not supported".into(),
        ));
    }
    if !matches!(model_type, "llama" | "mistral") {
        return Ok(None);
    }
    match v.get("sliding_window") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(w) => match w.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(0) => Ok(None),
            Some(size) => Ok(Some(SlidingWindow {
                size,
                local_layers: vec![true; layers],
                local_rope_theta: None,
            })),
            None => Err(err(
                "sliding_window",
                format!("expected a non-negative integer or null, found {w}"),
            )),
        },
    }
}

/// The RoPE scaling of a GGUF file: llama.cpp's `{arch}.rope.scaling.type` (absent = `linear`,
/// as llama.cpp reads it) with `{arch}.rope.scaling.factor` (or the older `rope.scale_linear`; 0
/// or 1 = none), and the per-pair divisors of [`ROPE_FREQS_TENSOR`], multiplied together.
fn gguf_rope_scaling(
    file: &crate::gguf::GgufFile,
    arch: &str,
    theta: f32,
    rope_dims: usize,
) -> crate::Result<RopeScaling> {
    let type_key = format!("{arch}.rope.scaling.type");
    let kind = match file.metadata(&type_key) {
        None => None,
        Some(_) => Some(file.require_str(&type_key)?),
    };
    let mut linear = None;
    for k in ["rope.scaling.factor", "rope.scale_linear"] {
        let key = format!("{arch}.{k}");
        if file.metadata(&key).is_some() {
            let factor = file.require_f32(&key)?;
            if !(factor.is_finite() && factor >= 0.0) {
                return Err(file.meta_error(
                    &key,
                    &format!("RoPE scaling factor {factor} is not a positive number"),
                ));
            }
            linear = Some(factor).filter(|&f| f != 0.0 && f != 1.0);
            break;
        }
    }
    match kind {
        None | Some("linear") => {}
        // llama.cpp never scales when the type is `none`, whatever the factor says.
        Some("none") => linear = None,
        Some(other) => {
            return Err(file.meta_error(
                &type_key,
                &format!(
                    "RoPE scaling '{other}' is not supported (none, linear and per-pair factors \
                     in {ROPE_FREQS_TENSOR} are)"
                ),
            ))
        }
    }
    let Some(info) = file.tensor_info(ROPE_FREQS_TENSOR) else {
        return Ok(match linear {
            Some(factor) => RopeScaling::Linear { factor },
            None => RopeScaling::None,
        });
    };
    let path = file.path().to_path_buf();
    if info.ty != crate::weights::GgmlType::F32 {
        return Err(crate::Error::BadFile {
            path,
            reason: format!(
                "tensor '{ROPE_FREQS_TENSOR}' has type {}; RoPE frequency factors must be F32",
                info.ty.name()
            ),
        });
    }
    if info.elements() != rope_dims / 2 {
        return Err(crate::Error::ShapeMismatch {
            path,
            tensor: ROPE_FREQS_TENSOR.to_string(),
            found: info.dims.clone(),
            expected: vec![rope_dims / 2],
        });
    }
    let factors: Vec<f32> = file
        .decode_tensor(ROPE_FREQS_TENSOR)?
        .dequantize()
        .iter()
        .map(|f| f * linear.unwrap_or(1.0))
        .collect();
    let scaling = RopeScaling::Factors(factors);
    crate::rope::frequency_factors(&scaling, theta, rope_dims).map_err(|reason| {
        crate::Error::BadFile {
            path: file.path().to_path_buf(),
            reason: format!("tensor '{ROPE_FREQS_TENSOR}': {reason}"),
        }
    })?;
    Ok(scaling)
}

/// The `rope_scaling` object of a Hugging Face `config.json` (`rope_parameters` from
/// transformers 5 on; `name` is the key it came from): `rope_type` (or its older alias `type`)
/// `default`, `linear` or `llama3`; other types are refused, naming the type.
fn hf_rope_scaling(
    scaling: &serde_json::Value,
    name: &str,
    err: &dyn Fn(&str, String) -> crate::Error,
) -> crate::Result<RopeScaling> {
    let Some(kind) = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(|t| t.as_str())
    else {
        return Err(err(name, format!("no rope_type in {scaling}")));
    };
    let number = |key: &str| -> crate::Result<f64> {
        scaling.get(key).and_then(|x| x.as_f64()).ok_or_else(|| {
            err(
                &format!("{name}.{key}"),
                format!("missing or not a number ('{kind}' scaling needs it)"),
            )
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: number("factor")? as f32,
        }),
        "llama3" => {
            let original = number("original_max_position_embeddings")?;
            if !(original >= 1.0 && original.fract() == 0.0) {
                return Err(err(
                    &format!("{name}.original_max_position_embeddings"),
                    format!("expected a positive integer, found {original}"),
                ));
            }
            Ok(RopeScaling::Llama3 {
                factor: number("factor")? as f32,
                low_freq_factor: number("low_freq_factor")? as f32,
                high_freq_factor: number("high_freq_factor")? as f32,
                original_context_length: original as usize,
            })
        }
        other => Err(err(
            name,
            format!("RoPE scaling '{other}' is not supported (llama3, linear are)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{tiny_llama_gguf, GgufWriter, TempDir, TinyModelSpec};
    use crate::gguf::{GgufFile, MetaValue};
    use std::path::Path;

    #[test]
    fn tiny_model_config() {
        let dir = TempDir::new("config");
        let path = dir.join("tiny.gguf");
        let spec = TinyModelSpec {
            tied_embeddings: false,
            ..TinyModelSpec::default()
        };
        tiny_llama_gguf(&path, &spec, 7).unwrap();
        let c = ModelConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(
            (c.hidden_size, c.layers, c.heads, c.kv_heads, c.ffn_size),
            (64, 2, 4, 2, 128)
        );
        assert_eq!(
            (c.head_dim, c.rope_dims, c.vocab_size),
            (16, 16, spec.vocab_size())
        );
        assert_eq!(c.rope_style, RopeStyle::Adjacent);
        assert!(!c.tied_embeddings);
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn hugging_face_config_json() {
        // SmolLM2-135M-Instruct's config.json (abridged).
        let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
            "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
            "rope_theta": 100000, "tie_word_embeddings": true, "vocab_size": 49152}"#;
        let path = std::path::Path::new("config.json");
        let c = ModelConfig::from_hf_json(json, path).unwrap();
        assert_eq!(
            (c.hidden_size, c.layers, c.heads, c.kv_heads, c.head_dim),
            (576, 30, 9, 3, 64)
        );
        assert_eq!(
            (c.rope_theta, c.rms_eps, c.vocab_size),
            (100000.0, 1e-5, 49152)
        );
        assert_eq!(c.rope_style, RopeStyle::Halves);
        assert!(c.tied_embeddings);
        let err = ModelConfig::from_hf_json(&json.replace("\"num_hidden_layers\": 30,", ""), path)
            .unwrap_err();
        assert!(err.to_string().contains("num_hidden_layers"), "{err}");
        assert!(matches!(
            ModelConfig::from_hf_json("{", path),
            Err(crate::Error::BadFile { .. })
        ));
    }

    #[test]
    fn qwen2_defaults_and_missing_keys() {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", MetaValue::String("qwen2".into()));
        w.add_metadata("qwen2.block_count", MetaValue::U32(2));
        w.add_metadata("qwen2.embedding_length", MetaValue::U32(64));
        w.add_metadata("qwen2.feed_forward_length", MetaValue::U32(128));
        w.add_metadata("qwen2.attention.head_count", MetaValue::U32(4));
        w.add_metadata("qwen2.context_length", MetaValue::U64(1024));
        w.add_metadata(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![MetaValue::String("a".into()); 10]),
        );
        let dir = TempDir::new("config-q");
        let path = dir.join("qwen2.gguf");
        w.write(&path).unwrap();
        let err = ModelConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("qwen2.attention.layer_norm_rms_epsilon"),
            "{err}"
        );
        w.add_metadata(
            "qwen2.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-6),
        );
        w.write(&path).unwrap();
        let c = ModelConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!((c.kv_heads, c.vocab_size, c.context_length), (4, 10, 1024));
        assert_eq!(c.rope_style, RopeStyle::Halves);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(c.tied_embeddings);
    }

    /// Metadata of a llama GGUF (head dim 16: 8 rotated pairs) and no tensors.
    fn llama_metadata() -> GgufWriter {
        arch_metadata("llama")
    }

    /// The same shape under architecture `arch`'s keys.
    fn arch_metadata(arch: &str) -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", MetaValue::String(arch.into()));
        for (k, v) in [
            ("block_count", 2),
            ("embedding_length", 64),
            ("feed_forward_length", 128),
            ("attention.head_count", 4),
            ("context_length", 1024),
            ("vocab_size", 10),
        ] {
            w.add_metadata(&format!("{arch}.{k}"), MetaValue::U32(v));
        }
        w.add_metadata(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            MetaValue::F32(1e-5),
        );
        w
    }

    fn config_of(w: &GgufWriter, path: &std::path::Path) -> crate::Result<ModelConfig> {
        w.write(path).unwrap();
        ModelConfig::from_gguf(&GgufFile::open(path).unwrap())
    }

    #[test]
    fn sliding_windows_from_gguf_and_config_json() {
        let dir = TempDir::new("config-swa");
        let path = dir.join("config.gguf");
        let mut w = llama_metadata();
        assert_eq!(config_of(&w, &path).unwrap().sliding_window, None);
        // Mistral in a llama file: every layer.
        w.add_metadata("llama.attention.sliding_window", MetaValue::U32(4096));
        let window = config_of(&w, &path).unwrap().sliding_window.unwrap();
        assert_eq!(
            (window.size, window.local_layers, window.local_rope_theta),
            (4096, vec![true, true], None)
        );
        w.add_metadata("llama.attention.sliding_window", MetaValue::U32(0));
        assert_eq!(config_of(&w, &path).unwrap().sliding_window, None);

        // Gemma 3: five local layers of every six unless the file says otherwise.
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", MetaValue::String("gemma3".into()));
        for (k, v) in [
            ("block_count", 13),
            ("embedding_length", 64),
            ("feed_forward_length", 128),
            ("attention.head_count", 4),
            ("attention.key_length", 32),
            ("context_length", 1024),
            ("vocab_size", 10),
            ("attention.sliding_window", 512),
        ] {
            w.add_metadata(&format!("gemma3.{k}"), MetaValue::U32(v));
        }
        w.add_metadata(
            "gemma3.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-6),
        );
        let c = config_of(&w, &path).unwrap();
        assert_eq!((c.head_dim, c.rope_style), (32, RopeStyle::Halves));
        assert_eq!(c.ffn_activation, FfnActivation::GeluTanh);
        assert_eq!(c.embedding_scale, 8.0);
        let window = c.sliding_window.unwrap();
        let globals: Vec<usize> = (0..13).filter(|&l| !window.local_layers[l]).collect();
        assert_eq!((window.size, globals), (512, vec![5, 11]));
        assert_eq!(window.local_rope_theta, Some(10000.0));
        w.add_metadata("gemma3.attention.sliding_window_pattern", MetaValue::U32(3));
        w.add_metadata("gemma3.rope.freq_base_swa", MetaValue::F32(5000.0));
        let window = config_of(&w, &path).unwrap().sliding_window.unwrap();
        let globals: Vec<usize> = (0..13).filter(|&l| !window.local_layers[l]).collect();
        assert_eq!(
            (globals, window.local_rope_theta),
            (vec![2, 5, 8, 11], Some(5000.0))
        );
        let flags: Vec<bool> = (0..13).map(|l| l == 4).collect();
        w.add_metadata(
            "gemma3.attention.sliding_window_pattern",
            MetaValue::Array(flags.iter().map(|&b| MetaValue::Bool(b)).collect()),
        );
        let window = config_of(&w, &path).unwrap().sliding_window.unwrap();
        assert_eq!(window.local_layers, flags);
        w.add_metadata(
            "gemma3.attention.sliding_window_pattern",
            MetaValue::Array(vec![MetaValue::Bool(true); 3]),
        );
        let err = config_of(&w, &path).unwrap_err().to_string();
        assert!(
            err.contains("sliding_window_pattern") && err.contains("13"),
            "{err}"
        );

        // config.json: Mistral's window; Qwen's only with use_sliding_window, which is refused.
        let json = |extra: &str| {
            format!(
                r#"{{"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
                "num_attention_heads": 4, "num_hidden_layers": 3, "rms_norm_eps": 1e-05,
                "vocab_size": 10{extra}}}"#
            )
        };
        let hf = |extra: &str| ModelConfig::from_hf_json(&json(extra), Path::new("config.json"));
        let mistral = hf(r#", "model_type": "mistral", "sliding_window": 4096"#).unwrap();
        let window = mistral.sliding_window.unwrap();
        assert_eq!((window.size, window.local_layers.len()), (4096, 3));
        assert!(window.local_layers.iter().all(|&l| l));
        let none = hf(r#", "model_type": "mistral", "sliding_window": null"#).unwrap();
        assert_eq!(none.sliding_window, None);
        let qwen = r#", "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": "#;
        assert_eq!(hf(&format!("{qwen}false")).unwrap().sliding_window, None);
        let err = hf(&format!("{qwen}true")).unwrap_err().to_string();
        assert!(err.contains("use_sliding_window"), "{err}");
        let qwen3 = hf(r#", "model_type": "qwen3", "head_dim": 32"#).unwrap();
        assert_eq!(
            (qwen3.architecture, qwen3.head_dim),
            (Architecture::Qwen3, 32)
        );
        let err = hf(r#", "model_type": "gemma3""#).unwrap_err().to_string();
        assert!(err.contains("'gemma3' is not supported"), "{err}");
    }

    #[test]
    fn longrope_phi3_files_are_refused() {
        let dir = TempDir::new("config-phi3");
        let path = dir.join("config.gguf");
        let mut w = arch_metadata("phi3");
        w.add_metadata("phi3.attention.sliding_window", MetaValue::U32(2048));
        let c = config_of(&w, &path).unwrap();
        // llama.cpp ignores Phi-3's window; so does lutra.
        assert_eq!(
            (c.architecture, c.sliding_window),
            (Architecture::Phi3, None)
        );
        w.add_tensor_f32("rope_factors_long.weight", &[8], &[1.0; 8])
            .unwrap();
        let err = config_of(&w, &path).unwrap_err().to_string();
        assert!(
            err.contains("longrope") && err.contains("rope_factors_long"),
            "{err}"
        );
    }

    #[test]
    fn gguf_rope_scaling_from_metadata_and_rope_freqs() {
        let dir = TempDir::new("config-rope");
        let path = dir.join("config.gguf");
        let scaling = |w: &GgufWriter| config_of(w, &path).unwrap().rope_scaling;
        let mut w = llama_metadata();
        assert_eq!(scaling(&w), RopeScaling::None);
        // llama.cpp reads a factor without a type as linear, and `none` as no scaling at all.
        w.add_metadata("llama.rope.scaling.factor", MetaValue::F32(4.0));
        assert_eq!(scaling(&w), RopeScaling::Linear { factor: 4.0 });
        let set_type = |w: &mut GgufWriter, t: &str| {
            w.add_metadata("llama.rope.scaling.type", MetaValue::String(t.into()));
        };
        set_type(&mut w, "none");
        assert_eq!(scaling(&w), RopeScaling::None);
        set_type(&mut w, "linear");
        assert_eq!(scaling(&w), RopeScaling::Linear { factor: 4.0 });
        // Per-pair factors, times the linear factor when there is one.
        let factors = [1.0, 1.0, 1.5, 4.0, 8.0, 8.0, 8.0, 8.0];
        w.add_tensor_f32(ROPE_FREQS_TENSOR, &[8], &factors).unwrap();
        let times4: Vec<f32> = factors.iter().map(|f| f * 4.0).collect();
        assert_eq!(scaling(&w), RopeScaling::Factors(times4));
        set_type(&mut w, "none");
        assert_eq!(scaling(&w), RopeScaling::Factors(factors.to_vec()));
        // A linear factor of 1 (BitNet converters write it) is no scaling.
        let mut w = llama_metadata();
        w.add_metadata(
            "llama.rope.scaling.type",
            MetaValue::String("linear".into()),
        );
        w.add_metadata("llama.rope.scaling.factor", MetaValue::F32(1.0));
        assert_eq!(scaling(&w), RopeScaling::None);
        // YaRN (and anything else) is refused, naming the key and the type.
        set_type(&mut w, "yarn");
        let err = config_of(&w, &path).unwrap_err().to_string();
        assert!(
            err.contains("llama.rope.scaling.type") && err.contains("'yarn' is not supported"),
            "{err}"
        );
    }

    #[test]
    fn bad_rope_freqs_are_errors_naming_the_tensor() {
        let dir = TempDir::new("config-rope-bad");
        let path = dir.join("config.gguf");
        let mut w = llama_metadata();
        w.add_tensor_f32(ROPE_FREQS_TENSOR, &[7], &[1.0; 7])
            .unwrap();
        let err = config_of(&w, &path).unwrap_err();
        assert!(
            matches!(&err, crate::Error::ShapeMismatch { tensor, expected, .. }
                if tensor == ROPE_FREQS_TENSOR && expected == &[8]),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let mut w = llama_metadata();
        w.add_tensor_f16(ROPE_FREQS_TENSOR, &[8], &[1.0; 8])
            .unwrap();
        let err = config_of(&w, &path).unwrap_err().to_string();
        assert!(
            err.contains(ROPE_FREQS_TENSOR) && err.contains("F32"),
            "{err}"
        );
        let mut w = llama_metadata();
        w.add_tensor_f32(
            ROPE_FREQS_TENSOR,
            &[8],
            &[1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        )
        .unwrap();
        let err = config_of(&w, &path).unwrap_err().to_string();
        assert!(
            err.contains(ROPE_FREQS_TENSOR) && err.contains("factor 1"),
            "{err}"
        );
    }

    /// A Llama 3.2 1B `config.json` without its RoPE keys, with `rope` (JSON members, each
    /// preceded by a comma) appended, parsed.
    fn llama32_config(rope: &str) -> crate::Result<ModelConfig> {
        let json = format!(
            r#"{{"hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
            "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "vocab_size": 128256{rope}}}"#
        );
        ModelConfig::from_hf_json(&json, std::path::Path::new("config.json"))
    }

    #[test]
    fn hugging_face_rope_scaling() {
        let with = |scaling: &str| {
            llama32_config(&format!(
                r#", "rope_theta": 500000.0, "rope_scaling": {scaling}"#
            ))
            .map(|c| c.rope_scaling)
        };
        // Llama 3.2 1B's.
        let llama32 = r#"{"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#;
        assert_eq!(
            with(llama32).unwrap(),
            RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context_length: 8192
            }
        );
        // `type` is the older spelling of `rope_type`.
        assert_eq!(
            with(r#"{"type": "linear", "factor": 2.0}"#).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        assert_eq!(
            with(r#"{"rope_type": "default"}"#).unwrap(),
            RopeScaling::None
        );
        assert_eq!(with("null").unwrap(), RopeScaling::None);
        for (scaling, words) in [
            (
                r#"{"rope_type": "yarn", "factor": 4.0}"#,
                ["rope_scaling", "'yarn'"],
            ),
            (
                r#"{"type": "dynamic", "factor": 2.0}"#,
                ["rope_scaling", "'dynamic'"],
            ),
            (
                llama32.replace(r#""low_freq_factor": 1.0,"#, "").as_str(),
                ["rope_scaling.low_freq_factor", "missing"],
            ),
            (
                llama32
                    .replace(r#""low_freq_factor": 1.0"#, r#""low_freq_factor": 4.0"#)
                    .as_str(),
                ["rope_scaling", "greater than low_freq_factor"],
            ),
            (
                r#"{"rope_type": "linear", "factor": 0}"#,
                ["rope_scaling", "factor is 0"],
            ),
        ] {
            let err = with(scaling).unwrap_err().to_string();
            assert!(words.iter().all(|w| err.contains(w)), "{scaling}: {err}");
        }
    }

    #[test]
    fn transformers_5_rope_parameters() {
        let with = |rope: &str| llama32_config(rope).map(|c| (c.rope_theta, c.rope_scaling));
        let params = r#", "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192}"#;
        let llama3 = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context_length: 8192,
        };
        // Theta and scaling both come from rope_parameters (no top-level keys in v5 files).
        assert_eq!(with(params).unwrap(), (500000.0, llama3.clone()));
        // A top-level theta that agrees is fine; one that disagrees is an error.
        let agree = format!(r#", "rope_theta": 500000.0{params}"#);
        assert_eq!(with(&agree).unwrap(), (500000.0, llama3));
        let disagree = format!(r#", "rope_theta": 10000.0{params}"#);
        let e = with(&disagree).unwrap_err().to_string();
        assert!(e.contains("rope_theta") && e.contains("disagrees"), "{e}");
        let default = r#", "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}"#;
        assert_eq!(with(default).unwrap(), (1000000.0, RopeScaling::None));
        let yarn =
            r#", "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}"#;
        let e = with(yarn).unwrap_err().to_string();
        assert!(e.contains("rope_parameters") && e.contains("'yarn'"), "{e}");
    }
}
