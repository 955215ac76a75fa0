//! Named synthetic model shapes for benchmarks: the hyper-parameters of well-known models, so that
//! [`synthetic_model_with`](lutra_runtime::fixtures::synthetic_model_with) can build random
//! weights of exactly those shapes without the real files.
//!
//! Decode speed of a LUT kernel depends on shapes and bit widths, never on weight values, so a
//! synthetic 7B model measures what a real one would.

use lutra_runtime::config::{Architecture, FfnActivation, ModelConfig};
use lutra_runtime::fixtures::{SyntheticSpec, SyntheticWeights};
use lutra_runtime::rope::{RopeScaling, RopeStyle};
use lutra_runtime::{Error, Result};

/// A named shape with the quantization a benchmark uses by default.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticShape {
    /// The name accepted by [`shape`] (e.g. `llama2-7b`).
    pub name: &'static str,
    /// Hyper-parameters of the real model.
    pub config: ModelConfig,
    /// Bits per weight used when the user gives none (2 for ternary models: codes 0..=2).
    pub default_bits: u8,
    /// Group size used when the user gives none.
    pub default_group_size: usize,
    /// Weights are ternary {-1, 0, +1} with one scale per tensor (BitNet b1.58).
    pub ternary: bool,
    /// Embedding / LM head weights.
    pub head: SyntheticWeights,
}

/// Every name [`shape`] accepts, smallest model first.
pub const NAMES: [&str; 5] = [
    "smollm2-135m",
    "bitnet-2b",
    "bitnet-3b",
    "llama2-7b",
    "llama3-8b",
];

/// Bits used by non-ternary shapes when the user gives none.
pub const DEFAULT_BITS: u8 = 2;
/// Group size used when the user gives none and the shape allows it.
pub const DEFAULT_GROUP_SIZE: usize = 128;
/// The LM head (and tied embedding) of the BitNet shapes: 4-bit codes in groups of 128 on the
/// LUT kernels. The real checkpoints keep it in bf16; at int8 it would be a third of the bytes a
/// decode step reads for bitnet-2b (128256 × 2560), at 4 bits g128 it is about a fifth.
pub const BITNET_HEAD: SyntheticWeights = SyntheticWeights::LowBit {
    bits: 4,
    group_size: 128,
};

/// Plain numbers of one shape; turned into a [`ModelConfig`] by [`Dims::config`].
struct Dims {
    architecture: Architecture,
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    context: usize,
    rope_theta: f32,
    tied: bool,
    activation: FfnActivation,
    /// Default group size: 128 where it divides every K, smaller otherwise.
    group: usize,
}

impl Dims {
    fn config(&self, name: &str) -> ModelConfig {
        let head_dim = self.hidden / self.heads;
        ModelConfig {
            architecture: self.architecture,
            name: format!("synthetic:{name}"),
            hidden_size: self.hidden,
            ffn_size: self.ffn,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim,
            vocab_size: self.vocab,
            context_length: self.context,
            rope_theta: self.rope_theta,
            rope_dims: head_dim,
            // Synthetic weights are laid out as a GGUF converter would write them.
            rope_style: RopeStyle::Adjacent,
            // None of these shapes scales RoPE (Llama 3 8B predates Llama 3.1's scaling).
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            tied_embeddings: self.tied,
            ffn_activation: self.activation,
            sliding_window: None,
            embedding_scale: 1.0,
            logit_softcap: None,
        }
    }
}

/// The shape called `name` (see [`NAMES`]); the `synthetic:` prefix is accepted and ignored.
///
/// Sources: the `config.json` of each model on Hugging Face (meta-llama/Llama-2-7b-hf,
/// meta-llama/Meta-Llama-3-8B, microsoft/bitnet-b1.58-2B-4T, 1bitLLM/bitnet_b1_58-3B,
/// HuggingFaceTB/SmolLM2-135M-Instruct): bitnet-2b is b1.58-2B-4T (squared ReLU, GQA),
/// bitnet-3b is 1bitLLM's b1.58-3B (SiLU, `hidden_act: silu`).
pub fn shape(name: &str) -> Result<SyntheticShape> {
    let key = name.strip_prefix("synthetic:").unwrap_or(name);
    let key = key.trim().to_ascii_lowercase();
    let (name, dims, ternary) = match key.as_str() {
        "smollm2-135m" => (
            NAMES[0],
            Dims {
                architecture: Architecture::Llama,
                hidden: 576,
                ffn: 1536,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                vocab: 49152,
                context: 8192,
                rope_theta: 100_000.0,
                tied: true,
                activation: FfnActivation::Silu,
                // 576 = 4.5 × 128.
                group: 64,
            },
            false,
        ),
        "bitnet-2b" => (
            NAMES[1],
            Dims {
                architecture: Architecture::BitNet,
                hidden: 2560,
                ffn: 6912,
                layers: 30,
                heads: 20,
                kv_heads: 5,
                vocab: 128_256,
                context: 4096,
                rope_theta: 500_000.0,
                tied: true,
                activation: FfnActivation::ReluSquared,
                group: DEFAULT_GROUP_SIZE,
            },
            true,
        ),
        "bitnet-3b" => (
            NAMES[2],
            Dims {
                architecture: Architecture::BitNet,
                hidden: 3200,
                ffn: 8640,
                layers: 26,
                heads: 32,
                kv_heads: 32,
                vocab: 32_002,
                context: 2048,
                rope_theta: 10_000.0,
                tied: true,
                activation: FfnActivation::Silu,
                // 8640 = 67.5 × 128.
                group: 64,
            },
            true,
        ),
        "llama2-7b" => (
            NAMES[3],
            Dims {
                architecture: Architecture::Llama,
                hidden: 4096,
                ffn: 11008,
                layers: 32,
                heads: 32,
                kv_heads: 32,
                vocab: 32_000,
                context: 4096,
                rope_theta: 10_000.0,
                tied: false,
                activation: FfnActivation::Silu,
                group: DEFAULT_GROUP_SIZE,
            },
            false,
        ),
        "llama3-8b" => (
            NAMES[4],
            Dims {
                architecture: Architecture::Llama,
                hidden: 4096,
                ffn: 14336,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                vocab: 128_256,
                context: 8192,
                rope_theta: 500_000.0,
                tied: false,
                activation: FfnActivation::Silu,
                group: DEFAULT_GROUP_SIZE,
            },
            false,
        ),
        _ => {
            return Err(Error::InvalidOption(format!(
                "unknown synthetic model '{name}'; known: {}",
                NAMES.join(", ")
            )))
        }
    };
    Ok(SyntheticShape {
        name,
        config: dims.config(name),
        default_bits: DEFAULT_BITS,
        default_group_size: dims.group,
        ternary,
        head: if ternary {
            BITNET_HEAD
        } else {
            SyntheticWeights::Int8
        },
    })
}

impl SyntheticShape {
    /// The configuration to build a speed benchmark with: the shape's own (BitNet shapes stay
    /// BitNet, with their sub-norms and activation).
    pub fn benchmark_config(&self) -> ModelConfig {
        self.config.clone()
    }

    /// The weights a benchmark builds: ternary layers with a per-tensor scale for the BitNet
    /// shapes when neither `bits` nor `group_size` is given, else `bits`-bit codes in groups of
    /// `group_size` (the shape's defaults for the one not given); the head is [`Self::head`].
    pub fn weights(&self, bits: Option<u8>, group_size: Option<usize>) -> SyntheticSpec {
        let layers = if self.ternary && bits.is_none() && group_size.is_none() {
            SyntheticWeights::Ternary
        } else {
            SyntheticWeights::LowBit {
                bits: bits.unwrap_or(self.default_bits),
                group_size: group_size.unwrap_or(self.default_group_size),
            }
        };
        SyntheticSpec {
            layers,
            head: self.head,
        }
    }
}

/// Number of weights in the matrices a decode step multiplies (attention, FFN, LM head), i.e.
/// what dominates the bytes read per token. Embedding rows are gathered, not multiplied, so an
/// untied embedding is not counted.
pub fn matmul_params(config: &ModelConfig) -> usize {
    let h = config.hidden_size;
    let q = config.heads * config.head_dim;
    let kv = config.kv_heads * config.head_dim;
    let attention = h * q + 2 * h * kv + q * h;
    let ffn = 3 * h * config.ffn_size;
    config.layers * (attention + ffn) + config.vocab_size * h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_resolves_with_consistent_heads() {
        for name in NAMES {
            let s = shape(name).unwrap();
            assert_eq!(s.name, name);
            let c = &s.config;
            assert_eq!(c.heads * c.head_dim, c.hidden_size, "{name}");
            assert_eq!(c.heads % c.kv_heads, 0, "{name}: GQA groups must be whole");
            assert_eq!(c.rope_dims, c.head_dim);
            for k in [c.hidden_size, c.ffn_size] {
                assert_eq!(
                    k % s.default_group_size,
                    0,
                    "{name}: K={k} is not whole groups"
                );
            }
        }
    }

    #[test]
    fn prefix_and_case_are_ignored_and_unknown_names_fail() {
        assert_eq!(shape("synthetic:Llama2-7B").unwrap().name, "llama2-7b");
        let err = shape("gpt-5").unwrap_err().to_string();
        assert!(err.contains("gpt-5") && err.contains("llama3-8b"), "{err}");
    }

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // Llama-2-7B has 6.74e9 parameters, 6.61e9 of them in matmuls (embedding 131M excluded).
        let llama2 = matmul_params(&shape("llama2-7b").unwrap().config);
        assert!((6.55e9..6.65e9).contains(&(llama2 as f64)), "{llama2}");
        // SmolLM2-135M: 134.5M parameters, its tied embedding (28.3M) being the head.
        let smol = matmul_params(&shape("smollm2-135m").unwrap().config);
        assert!((1.30e8..1.36e8).contains(&(smol as f64)), "{smol}");
        let llama3 = matmul_params(&shape("llama3-8b").unwrap().config);
        assert!((7.4e9..7.6e9).contains(&(llama3 as f64)), "{llama3}");
    }

    #[test]
    fn bitnet_shapes_are_ternary() {
        assert!(shape("bitnet-2b").unwrap().ternary);
        assert!(shape("bitnet-3b").unwrap().ternary);
        assert!(!shape("llama3-8b").unwrap().ternary);
        let bitnet = shape("bitnet-3b").unwrap();
        assert_eq!(bitnet.config.vocab_size, 32_002);
        assert_eq!(bitnet.config.architecture, Architecture::BitNet);
        assert_eq!(bitnet.config.ffn_activation, FfnActivation::Silu);
        let two = shape("bitnet-2b").unwrap();
        assert_eq!(two.config.ffn_activation, FfnActivation::ReluSquared);
        assert_eq!(
            (
                two.config.hidden_size,
                two.config.ffn_size,
                two.config.layers
            ),
            (2560, 6912, 30)
        );
        assert_eq!((two.config.heads, two.config.kv_heads), (20, 5));
    }

    #[test]
    fn bitnet_weights_are_ternary_unless_the_grid_is_asked_for() {
        let s = shape("bitnet-2b").unwrap();
        let ternary = s.weights(None, None);
        assert_eq!(ternary.layers, SyntheticWeights::Ternary);
        assert_eq!(ternary.head, BITNET_HEAD);
        let grid = s.weights(Some(2), None).layers;
        assert_eq!(
            grid,
            SyntheticWeights::LowBit {
                bits: 2,
                group_size: 128
            }
        );
        assert_eq!(
            s.weights(None, Some(64)).layers,
            SyntheticWeights::LowBit {
                bits: DEFAULT_BITS,
                group_size: 64
            }
        );
        let llama = shape("llama2-7b").unwrap().weights(None, None);
        assert_eq!(llama.head, SyntheticWeights::Int8);
        assert!(matches!(llama.layers, SyntheticWeights::LowBit { .. }));
    }

    #[test]
    fn bitnet_2b_shape_builds_as_bitnet() {
        use lutra_runtime::fixtures::synthetic_model_with;
        use lutra_runtime::llama::LoadOptions;

        let shape = shape("bitnet-2b").unwrap();
        // One layer and a small vocabulary keep it quick; the matrices are the real ones.
        let config = ModelConfig {
            layers: 1,
            vocab_size: 1024,
            ..shape.benchmark_config()
        };
        let opts = LoadOptions {
            threads: 1,
            ..LoadOptions::default()
        };
        let model =
            synthetic_model_with(config.clone(), shape.weights(None, None), &opts, 1).unwrap();
        let c = model.config();
        assert_eq!(c, &config);
        assert_eq!(c.architecture, Architecture::BitNet);
        assert_eq!(
            (c.hidden_size, c.ffn_size, c.heads, c.kv_heads, c.head_dim),
            (2560, 6912, 20, 5, 128)
        );
        let info = model.describe();
        assert!(
            info.tensor_types
                .iter()
                .any(|t| t.source == "ternary" && t.count == 7),
            "{info}"
        );
        let mut logits = vec![0.0; 1024];
        model
            .forward(&[3, 1, 4], &mut model.new_cache(), &mut logits)
            .unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
