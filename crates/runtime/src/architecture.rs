//! The architectures lutra runs, as one table: for each, the names its files give the tensors of
//! a transformer block (GGUF, and Hugging Face where the folder loader reads it), which of those
//! tensors a block has, and the choices the forward pass makes for it (RoPE pairing, FFN
//! activation, embedding scale). Every block norm is an RMSNorm whose weight is used as stored:
//! llama.cpp's converter has already added Gemma's `1 +` to Gemma norm weights.
//!
//! One loader (`llama::block`) reads any entry; adding an architecture is one entry here plus any
//! operation the forward pass does not have yet.

use crate::rope::RopeStyle;

/// Architecture family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, Mistral.
    Llama,
    /// Qwen2 (q/k/v biases).
    Qwen2,
    /// BitNet b1.58 (ternary weights, squared-ReLU FFN, sub-norms).
    BitNet,
    /// Qwen3 (per-head q/k RMSNorms before RoPE).
    Qwen3,
    /// Gemma 3 (GeGLU, q/k norms, post-norms, interleaved sliding-window layers).
    Gemma3,
    /// Phi-3 (fused q/k/v and gate/up matrices).
    Phi3,
}

/// The gated FFN's activation: `down(act(gate(x)) · up(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// SiLU (SwiGLU): Llama, Qwen2, the original 1bitLLM BitNet b1.58 checkpoints.
    Silu,
    /// Squared ReLU, `max(x, 0)²`: BitNet b1.58 2B-4T (`hidden_act: relu2`).
    ReluSquared,
    /// GELU, tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

impl Architecture {
    /// The architecture named by GGUF's `general.architecture`, if lutra runs it.
    pub fn from_gguf_name(name: &str) -> Option<Architecture> {
        ArchitectureSpec::for_gguf(name).map(|a| a.architecture)
    }
}

/// A tensor of a transformer block, by what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockTensor {
    /// RMSNorm weight before attention `[hidden]`.
    AttnNorm,
    /// Query projection `[heads·head_dim][hidden]` (with an optional bias).
    AttnQ,
    /// Key projection `[kv_heads·head_dim][hidden]` (with an optional bias).
    AttnK,
    /// Value projection `[kv_heads·head_dim][hidden]` (with an optional bias).
    AttnV,
    /// Query, key and value projections stacked in one matrix, in that order (Phi-3); split at
    /// load into [`BlockTensor::AttnQ`], [`BlockTensor::AttnK`] and [`BlockTensor::AttnV`].
    AttnQkv,
    /// Per-head RMSNorm weight of the queries `[head_dim]`, applied before RoPE.
    AttnQNorm,
    /// Per-head RMSNorm weight of the keys `[head_dim]`, applied before RoPE.
    AttnKNorm,
    /// RMSNorm weight of the attention output before the output projection `[heads·head_dim]`.
    AttnSubNorm,
    /// Output projection `[hidden][heads·head_dim]`.
    AttnOutput,
    /// RMSNorm weight of the output projection's result before the residual add `[hidden]`.
    AttnPostNorm,
    /// RMSNorm weight before the FFN `[hidden]`.
    FfnNorm,
    /// Gate projection `[ffn][hidden]`.
    FfnGate,
    /// Up projection `[ffn][hidden]`.
    FfnUp,
    /// Gate and up projections stacked in one matrix `[2·ffn][hidden]`, gate first (Phi-3);
    /// split at load.
    FfnGateUp,
    /// RMSNorm weight of the gated hidden state before the down projection `[ffn]`.
    FfnSubNorm,
    /// Down projection `[hidden][ffn]`.
    FfnDown,
    /// RMSNorm weight of the down projection's result before the residual add `[hidden]`.
    FfnPostNorm,
}

/// Whether a block must, may or does not have a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// A block without it is an error.
    Required,
    /// Used when present.
    Optional,
}

/// One tensor of an architecture's blocks: the names without the `blk.{i}.` /
/// `model.layers.{i}.` prefix and without `.weight` / `.bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorName {
    /// What the tensor does.
    pub role: BlockTensor,
    /// GGUF name (`attn_q` for `blk.{i}.attn_q.weight`).
    pub gguf: &'static str,
    /// Hugging Face name (`self_attn.q_proj` for `model.layers.{i}.self_attn.q_proj.weight`).
    pub hf: &'static str,
    /// Required or optional.
    pub presence: Presence,
    /// The projection may carry a `.bias` vector (always optional).
    pub bias: bool,
}

/// How the token embedding is scaled before the first block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingScale {
    /// Used as stored.
    None,
    /// Multiplied by `sqrt(hidden)` (Gemma).
    SqrtHidden,
}

/// How an architecture's blocks are laid out and computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArchitectureSpec {
    /// The family.
    pub architecture: Architecture,
    /// `general.architecture` values of GGUF files of this layout.
    pub gguf_names: &'static [&'static str],
    /// `model_type` values of Hugging Face `config.json` files the folder loader reads with this
    /// layout (empty: not read from Hugging Face folders).
    pub hf_model_types: &'static [&'static str],
    /// RoPE pairing of GGUF files (Hugging Face checkpoints always rotate halves).
    pub gguf_rope_style: RopeStyle,
    /// Activation of the gated FFN (a `config.json`'s `hidden_act` overrides it).
    pub activation: FfnActivation,
    /// Scale of the token embedding.
    pub embedding_scale: EmbeddingScale,
    /// The block's tensors.
    pub tensors: &'static [TensorName],
    /// Chat template used when a GGUF file carries none.
    pub default_chat_template: Option<&'static str>,
}

const fn required(role: BlockTensor, gguf: &'static str, hf: &'static str) -> TensorName {
    TensorName {
        role,
        gguf,
        hf,
        presence: Presence::Required,
        bias: false,
    }
}

const fn with_bias(name: TensorName) -> TensorName {
    TensorName { bias: true, ..name }
}

const fn optional(name: TensorName) -> TensorName {
    TensorName {
        presence: Presence::Optional,
        ..name
    }
}

use BlockTensor as T;

const ATTN_NORM: TensorName = required(T::AttnNorm, "attn_norm", "input_layernorm");
const ATTN_Q: TensorName = with_bias(required(T::AttnQ, "attn_q", "self_attn.q_proj"));
const ATTN_K: TensorName = with_bias(required(T::AttnK, "attn_k", "self_attn.k_proj"));
const ATTN_V: TensorName = with_bias(required(T::AttnV, "attn_v", "self_attn.v_proj"));
const ATTN_Q_NORM: TensorName = required(T::AttnQNorm, "attn_q_norm", "self_attn.q_norm");
const ATTN_K_NORM: TensorName = required(T::AttnKNorm, "attn_k_norm", "self_attn.k_norm");
const ATTN_OUTPUT: TensorName = required(T::AttnOutput, "attn_output", "self_attn.o_proj");
const FFN_GATE: TensorName = required(T::FfnGate, "ffn_gate", "mlp.gate_proj");
const FFN_UP: TensorName = required(T::FfnUp, "ffn_up", "mlp.up_proj");
const FFN_DOWN: TensorName = required(T::FfnDown, "ffn_down", "mlp.down_proj");

/// Llama's block (Llama 2/3, SmolLM2, Mistral; Qwen2 too, whose q/k/v biases are optional here).
const LLAMA_BLOCK: &[TensorName] = &[
    ATTN_NORM,
    ATTN_Q,
    ATTN_K,
    ATTN_V,
    ATTN_OUTPUT,
    required(T::FfnNorm, "ffn_norm", "post_attention_layernorm"),
    FFN_GATE,
    FFN_UP,
    FFN_DOWN,
];

/// BitNet b1.58: Llama's block plus RMSNorms before both output projections.
const BITNET_BLOCK: &[TensorName] = &[
    ATTN_NORM,
    ATTN_Q,
    ATTN_K,
    ATTN_V,
    required(T::AttnSubNorm, "attn_sub_norm", "self_attn.attn_sub_norm"),
    ATTN_OUTPUT,
    required(T::FfnNorm, "ffn_norm", "post_attention_layernorm"),
    FFN_GATE,
    FFN_UP,
    required(T::FfnSubNorm, "ffn_sub_norm", "mlp.ffn_sub_norm"),
    FFN_DOWN,
];

/// Qwen3: Llama's block with per-head q/k RMSNorms before RoPE.
const QWEN3_BLOCK: &[TensorName] = &[
    ATTN_NORM,
    ATTN_Q,
    ATTN_K,
    ATTN_V,
    ATTN_Q_NORM,
    ATTN_K_NORM,
    ATTN_OUTPUT,
    required(T::FfnNorm, "ffn_norm", "post_attention_layernorm"),
    FFN_GATE,
    FFN_UP,
    FFN_DOWN,
];

/// Gemma 3: q/k norms, and RMSNorms after attention and after the FFN as well as before. Its
/// Hugging Face names differ from Llama's (`post_attention_layernorm` is the post-attention
/// norm, not the FFN's input norm), and it is not read from Hugging Face folders.
const GEMMA3_BLOCK: &[TensorName] = &[
    ATTN_NORM,
    ATTN_Q,
    ATTN_K,
    ATTN_V,
    ATTN_Q_NORM,
    ATTN_K_NORM,
    ATTN_OUTPUT,
    required(
        T::AttnPostNorm,
        "post_attention_norm",
        "post_attention_layernorm",
    ),
    required(T::FfnNorm, "ffn_norm", "pre_feedforward_layernorm"),
    FFN_GATE,
    FFN_UP,
    FFN_DOWN,
    required(
        T::FfnPostNorm,
        "post_ffw_norm",
        "post_feedforward_layernorm",
    ),
];

/// Phi-3: q/k/v in one matrix (or three, as llama.cpp also accepts), gate and up in one.
const PHI3_BLOCK: &[TensorName] = &[
    ATTN_NORM,
    with_bias(optional(required(
        T::AttnQkv,
        "attn_qkv",
        "self_attn.qkv_proj",
    ))),
    ATTN_Q,
    ATTN_K,
    ATTN_V,
    ATTN_OUTPUT,
    required(T::FfnNorm, "ffn_norm", "post_attention_layernorm"),
    required(T::FfnGateUp, "ffn_up", "mlp.gate_up_proj"),
    FFN_DOWN,
];

/// Gemma's chat turns (Gemma 3's `chat_template` with the system prompt folded into the first
/// user turn, as Gemma's own template does).
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}{% for message in turns %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + (system if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// Every architecture lutra runs.
pub const ARCHITECTURES: &[ArchitectureSpec] = &[
    ArchitectureSpec {
        architecture: Architecture::Llama,
        gguf_names: &["llama"],
        hf_model_types: &["llama", "mistral"],
        // llama.cpp's converter permutes q/k rows for adjacent-pair RoPE.
        gguf_rope_style: RopeStyle::Adjacent,
        activation: FfnActivation::Silu,
        embedding_scale: EmbeddingScale::None,
        tensors: LLAMA_BLOCK,
        default_chat_template: None,
    },
    ArchitectureSpec {
        architecture: Architecture::Qwen2,
        gguf_names: &["qwen2"],
        hf_model_types: &["qwen2"],
        gguf_rope_style: RopeStyle::Halves,
        activation: FfnActivation::Silu,
        embedding_scale: EmbeddingScale::None,
        tensors: LLAMA_BLOCK,
        default_chat_template: None,
    },
    ArchitectureSpec {
        architecture: Architecture::Qwen3,
        gguf_names: &["qwen3"],
        hf_model_types: &["qwen3"],
        gguf_rope_style: RopeStyle::Halves,
        activation: FfnActivation::Silu,
        embedding_scale: EmbeddingScale::None,
        tensors: QWEN3_BLOCK,
        default_chat_template: None,
    },
    // llama.cpp's `bitnet` (1bitLLM's bitnet_b1_58 checkpoints) is SwiGLU. The BitNet converters
    // keep q/k rows as Hugging Face orders them and ggml rotates halves (`LLAMA_ROPE_TYPE_NEOX`),
    // for this name and for Microsoft's below.
    ArchitectureSpec {
        architecture: Architecture::BitNet,
        gguf_names: &["bitnet"],
        hf_model_types: &["bitnet"],
        gguf_rope_style: RopeStyle::Halves,
        activation: FfnActivation::Silu,
        embedding_scale: EmbeddingScale::None,
        tensors: BITNET_BLOCK,
        default_chat_template: None,
    },
    // Microsoft's converter (b1.58-2B-4T) writes `bitnet-b1.58` / `bitnet-25`: squared ReLU.
    ArchitectureSpec {
        architecture: Architecture::BitNet,
        gguf_names: &["bitnet-b1.58", "bitnet-25"],
        hf_model_types: &[],
        gguf_rope_style: RopeStyle::Halves,
        activation: FfnActivation::ReluSquared,
        embedding_scale: EmbeddingScale::None,
        tensors: BITNET_BLOCK,
        default_chat_template: None,
    },
    ArchitectureSpec {
        architecture: Architecture::Gemma3,
        gguf_names: &["gemma3"],
        hf_model_types: &[],
        gguf_rope_style: RopeStyle::Halves,
        activation: FfnActivation::GeluTanh,
        embedding_scale: EmbeddingScale::SqrtHidden,
        tensors: GEMMA3_BLOCK,
        default_chat_template: Some(GEMMA_CHAT_TEMPLATE),
    },
    ArchitectureSpec {
        architecture: Architecture::Phi3,
        gguf_names: &["phi3"],
        hf_model_types: &[],
        gguf_rope_style: RopeStyle::Halves,
        activation: FfnActivation::Silu,
        embedding_scale: EmbeddingScale::None,
        tensors: PHI3_BLOCK,
        default_chat_template: None,
    },
];

impl ArchitectureSpec {
    /// The entry for GGUF's `general.architecture` value `name`.
    pub fn for_gguf(name: &str) -> Option<&'static ArchitectureSpec> {
        ARCHITECTURES.iter().find(|a| a.gguf_names.contains(&name))
    }

    /// The entry for a Hugging Face `model_type`.
    pub fn for_hf(model_type: &str) -> Option<&'static ArchitectureSpec> {
        ARCHITECTURES
            .iter()
            .find(|a| a.hf_model_types.contains(&model_type))
    }

    /// The first entry of `architecture` (its GGUF layout).
    pub fn of(architecture: Architecture) -> &'static ArchitectureSpec {
        ARCHITECTURES
            .iter()
            .find(|a| a.architecture == architecture)
            .unwrap_or(&ARCHITECTURES[0])
    }

    /// The block tensor of `role`, if this architecture's blocks have one.
    pub fn tensor(&self, role: BlockTensor) -> Option<&'static TensorName> {
        self.tensors.iter().find(|t| t.role == role)
    }

    /// Every GGUF architecture name of the table, for error messages.
    pub fn gguf_names_list() -> String {
        ARCHITECTURES
            .iter()
            .flat_map(|a| a.gguf_names.iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every Hugging Face model type of the table, for error messages.
    pub fn hf_model_types_list() -> String {
        ARCHITECTURES
            .iter()
            .flat_map(|a| a.hf_model_types.iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_block_is_complete() {
        let mut gguf = std::collections::HashSet::new();
        let mut hf = std::collections::HashSet::new();
        for a in ARCHITECTURES {
            assert!(a.gguf_names.iter().all(|n| gguf.insert(*n)), "{a:?}");
            assert!(a.hf_model_types.iter().all(|n| hf.insert(*n)), "{a:?}");
            let has = |r| a.tensor(r).is_some();
            // Every block projects q, k, v (separately or fused), o, and gate/up/down.
            assert!(has(T::AttnQ) || has(T::AttnQkv), "{a:?}");
            assert!(
                has(T::AttnNorm) && has(T::AttnOutput) && has(T::FfnNorm),
                "{a:?}"
            );
            assert!(
                (has(T::FfnGate) && has(T::FfnUp)) || has(T::FfnGateUp),
                "{a:?}"
            );
            assert!(has(T::FfnDown), "{a:?}");
            assert_eq!(has(T::AttnQNorm), has(T::AttnKNorm), "{a:?}");
            let mut roles = std::collections::HashSet::new();
            assert!(a.tensors.iter().all(|t| roles.insert(t.role)), "{a:?}");
        }
        assert_eq!(
            ArchitectureSpec::for_gguf("bitnet-25").map(|a| a.activation),
            Some(FfnActivation::ReluSquared)
        );
        // llama.cpp's `llm_build_bitnet`: SwiGLU, and `LLAMA_ROPE_TYPE_NEOX` for the name.
        assert_eq!(
            ArchitectureSpec::for_gguf("bitnet").map(|a| (a.activation, a.gguf_rope_style)),
            Some((FfnActivation::Silu, RopeStyle::Halves))
        );
        assert_eq!(
            ArchitectureSpec::for_hf("mistral").map(|a| a.architecture),
            Some(Architecture::Llama)
        );
        assert!(ArchitectureSpec::for_gguf("gpt2").is_none());
    }
}
