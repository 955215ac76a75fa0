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

/// The gated FFN's activation: `down(act(gate(x)) · up(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// SiLU (SwiGLU): Llama, Qwen2, the original 1bitLLM BitNet b1.58 checkpoints.
    Silu,
    /// Squared ReLU, `max(x, 0)²`: BitNet b1.58 2B-4T (`hidden_act: relu2`).
    ReluSquared,
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
    /// Activation of the gated FFN.
    pub ffn_activation: FfnActivation,
}

impl Architecture {
    /// The architecture named by GGUF's `general.architecture`, if lutra runs it.
    pub fn from_gguf_name(name: &str) -> Option<Architecture> {
        match name {
            "llama" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            "bitnet" | "bitnet-b1.58" | "bitnet-25" => Some(Architecture::BitNet),
            _ => None,
        }
    }
}

impl ModelConfig {
    /// Reads the configuration from `{arch}.*` GGUF metadata (`arch` = `general.architecture`).
    ///
    /// Required keys missing or of the wrong type are [`crate::Error::Metadata`]; optional ones
    /// take llama.cpp's defaults (`rope.freq_base` 10000, `head_count_kv` = `head_count`,
    /// `rope.dimension_count` = head dim).
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> crate::Result<ModelConfig> {
        let arch_name = file.require_str("general.architecture")?;
        let architecture = Architecture::from_gguf_name(arch_name).ok_or_else(|| {
            file.meta_error(
                "general.architecture",
                &format!("architecture '{arch_name}' is not supported (llama, qwen2, bitnet are)"),
            )
        })?;
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
        if heads == 0 || hidden_size % heads != 0 {
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
        let head_dim = opt_usize("attention.key_length")?.unwrap_or(hidden_size / heads);
        let rope_dims = opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        let rope_theta = match file.metadata(&key("rope.freq_base")) {
            None => 10000.0,
            Some(_) => file.require_f32(&key("rope.freq_base"))?,
        };
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
        let rope_style = match architecture {
            // llama.cpp's converter permuted q/k for llama-style rope; qwen2 keeps neox halves.
            Architecture::Llama | Architecture::BitNet => RopeStyle::Adjacent,
            Architecture::Qwen2 => RopeStyle::Halves,
        };
        // GGUF does not record the activation. llama.cpp's `bitnet` (1bitLLM's bitnet_b1_58
        // checkpoints) is SwiGLU; `bitnet-b1.58` / `bitnet-25` (Microsoft's converter, b1.58-2B-4T)
        // use squared ReLU.
        let ffn_activation = match arch_name {
            "bitnet-b1.58" | "bitnet-25" => FfnActivation::ReluSquared,
            _ => FfnActivation::Silu,
        };
        Ok(ModelConfig {
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
            rope_style,
            rms_eps,
            tied_embeddings: file.tensor_info("output.weight").is_none(),
            ffn_activation,
        })
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
        let architecture = match model_type {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "bitnet" => Architecture::BitNet,
            other => {
                return Err(err(
                    "model_type",
                    format!(
                        "model type '{other}' is not supported (llama, mistral, qwen2, bitnet are)"
                    ),
                ))
            }
        };
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
        // Scaled RoPE (Llama 3.1's `llama3`, `linear`, `yarn`, ...) changes the frequencies, which
        // the rope tables do not model yet: refuse rather than run with wrong positions.
        if let Some(scaling) = v.get("rope_scaling").filter(|s| !s.is_null()) {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("unknown");
            return Err(err(
                "rope_scaling",
                format!("RoPE scaling '{kind}' is not supported yet"),
            ));
        }
        let ffn_activation = match v.get("hidden_act").and_then(|a| a.as_str()) {
            None | Some("silu") | Some("swish") => FfnActivation::Silu,
            Some("relu2") => FfnActivation::ReluSquared,
            Some(other) => {
                return Err(err(
                    "hidden_act",
                    format!("activation '{other}' is not supported (silu, relu2 are)"),
                ))
            }
        };
        Ok(ModelConfig {
            architecture,
            name: v
                .get("_name_or_path")
                .and_then(|n| n.as_str())
                .unwrap_or(model_type)
                .to_string(),
            hidden_size,
            ffn_size: usize_of("intermediate_size")?,
            layers: usize_of("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab_size: usize_of("vocab_size")?,
            context_length: usize_of("max_position_embeddings")?,
            rope_theta: f32_of("rope_theta")?.unwrap_or(10000.0),
            rope_dims: head_dim,
            rope_style: RopeStyle::Halves,
            rms_eps: f32_of("rms_norm_eps")?
                .ok_or_else(|| err("rms_norm_eps", "missing".into()))?,
            tied_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|t| t.as_bool())
                .unwrap_or(false),
            ffn_activation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{tiny_llama_gguf, GgufFile, GgufWriter, MetaValue, TinyModelSpec};

    #[test]
    fn tiny_model_config() {
        let path = std::env::temp_dir().join(format!("lutra-config-{}.gguf", std::process::id()));
        let spec = TinyModelSpec {
            tied_embeddings: false,
            ..TinyModelSpec::default()
        };
        tiny_llama_gguf(&path, &spec, 7).unwrap();
        let c = GgufFile::open(&path).unwrap().config().unwrap();
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
        let path = std::env::temp_dir().join(format!("lutra-config-q-{}.gguf", std::process::id()));
        w.write(&path).unwrap();
        let err = GgufFile::open(&path).unwrap().config().unwrap_err();
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
        let c = GgufFile::open(&path).unwrap().config().unwrap();
        assert_eq!((c.kv_heads, c.vocab_size, c.context_length), (4, 10, 1024));
        assert_eq!(c.rope_style, RopeStyle::Halves);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(c.tied_embeddings);
    }
}
