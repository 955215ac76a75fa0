//! GGUF → Hugging Face folder, for tests and for comparing the two loaders on the same weights.
//!
//! Every tensor is dequantized and written as F32, F16 or BF16 under its Hugging Face name; llama
//! q/k rows are un-permuted (llama.cpp's converter interleaves each head's halves for
//! adjacent-pair RoPE; Hugging Face checkpoints rotate halves). The tokenizer is saved as
//! `tokenizer.json`, and `tokenizer_config.json` gets the BOS/EOS text and the chat template.

use std::path::Path;

use crate::config::{Architecture, RopeScaling, RopeStyle};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

use super::{write_safetensors, Dtype, TensorData, SINGLE_FILE};

/// The Hugging Face name of a GGUF tensor, if it is one lutra's llama loader reads.
fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's q/k row permutation: within each head of `head_dim` rows, GGUF row
/// `2i + j` is Hugging Face row `j·head_dim/2 + i`.
fn unpermute_rows(values: &[f32], rows: usize, cols: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        let (head, within) = (r / head_dim, r % head_dim);
        let (i, j) = (within / 2, within % 2);
        let dst = head * head_dim + j * half + i;
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
    }
    out
}

/// Writes the llama-family GGUF at `gguf` as a Hugging Face folder `dir` with `dtype` weights
/// (F32, F16 or BF16); norms and biases are always F32.
pub fn gguf_to_hf_folder(gguf: &Path, dir: &Path, dtype: Dtype) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    let c = file.config()?;
    let model_type = match c.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::BitNet => {
            return Err(Error::InvalidOption(
                "converting BitNet GGUF files is not supported".into(),
            ))
        }
    };
    // Per-pair factors (`rope_freqs.weight`) have no config.json spelling: refuse rather than
    // write a folder that runs with unscaled positions.
    let rope_scaling = match &c.rope_scaling {
        RopeScaling::None => None,
        RopeScaling::Linear { factor } => {
            Some(serde_json::json!({"rope_type": "linear", "factor": factor}))
        }
        other => {
            return Err(Error::InvalidOption(format!(
                "{}: RoPE scaling {other} cannot be written to config.json",
                gguf.display()
            )))
        }
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors = Vec::new();
    for info in file.tensors() {
        let Some(name) = hf_name(&info.name) else {
            continue;
        };
        let decoded = file.decode_tensor(&info.name)?;
        let (rows, cols) = (decoded.rows(), decoded.cols());
        let mut values = decoded.dequantize();
        let vector = info.dims.len() == 1;
        if c.rope_style == RopeStyle::Adjacent {
            if info.name.contains("attn_q.") {
                values = unpermute_rows(
                    &values,
                    c.heads * c.head_dim,
                    values.len() / (c.heads * c.head_dim),
                    c.head_dim,
                );
            } else if info.name.contains("attn_k.") {
                let kv = c.kv_heads * c.head_dim;
                values = unpermute_rows(&values, kv, values.len() / kv, c.head_dim);
            }
        }
        let shape: Vec<usize> = if vector {
            vec![rows * cols]
        } else {
            vec![rows, cols]
        };
        tensors.push(match (vector, dtype) {
            (true, _) | (false, Dtype::F32) => TensorData::f32(&name, &shape, &values),
            (false, Dtype::F16) => TensorData::f16(&name, &shape, &values),
            (false, Dtype::BF16) => TensorData::bf16(&name, &shape, &values),
            (false, other) => {
                return Err(Error::InvalidOption(format!(
                    "cannot write weights as {other:?}: use F32, F16 or BF16"
                )))
            }
        });
    }
    write_safetensors(&dir.join(SINGLE_FILE), &tensors)?;

    let mut config = serde_json::json!({
        "architectures": [if model_type == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": model_type,
        "_name_or_path": c.name,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_size,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps,
        "tie_word_embeddings": c.tied_embeddings,
        "hidden_act": "silu",
        "torch_dtype": format!("{dtype:?}").to_lowercase(),
    });
    if let Some(scaling) = rope_scaling {
        config["rope_scaling"] = scaling;
    }
    let write_json = |name: &str, v: &serde_json::Value| {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        std::fs::write(&path, text).map_err(io(&path))
    };
    write_json("config.json", &config)?;

    let tokenizer = Tokenizer::from_gguf(&file)?;
    let json_path = dir.join("tokenizer.json");
    tokenizer
        .inner()
        .save(&json_path, false)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", json_path.display())))?;
    let text = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_str(id))
            .map(str::to_string)
    };
    // `encode` adds BOS exactly when the model asks for it.
    let add_bos = tokenizer.bos_id().is_some()
        && tokenizer.encode("", false)?.first().copied() == tokenizer.bos_id();
    let mut tok_config = serde_json::json!({
        "bos_token": text(tokenizer.bos_id()),
        "eos_token": text(tokenizer.eos_id()),
        "add_bos_token": add_bos,
        "add_eos_token": false,
    });
    if let Some(t) = file
        .metadata("tokenizer.chat_template")
        .and_then(|t| t.as_str())
    {
        tok_config["chat_template"] = serde_json::Value::String(t.to_string());
    }
    write_json("tokenizer_config.json", &tok_config)
}
