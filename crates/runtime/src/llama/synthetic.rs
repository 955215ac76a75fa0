//! Random models of any shape, generated directly in decoded form (no file, no tokenizer).
//!
//! Decode speed does not depend on weight values, so a synthetic 7B model measures what a real one
//! would. Weights are scaled so that activations stay O(1) through the layers: the logits of a
//! synthetic model are finite and not all equal, which tests rely on.

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::weights::DecodedTensor;

use super::{count_tensor, LayerWeights, LoadOptions, Model, ModelParts, TensorForm};

/// How the random weights of one kind of matrix are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntheticWeights {
    /// `bits`-bit codes in groups of `group_size` with random scales and offsets (the LUT grid).
    LowBit {
        /// Bits per code, 1 to 4.
        bits: u8,
        /// Elements per scale group along K.
        group_size: usize,
    },
    /// Ternary weights {−s, 0, +s} with one scale `s` per tensor (BitNet b1.58): codes {0, 1, 2}
    /// with offset −s, the form GGUF's TQ1_0/TQ2_0 decode to, so the same kernel runs them.
    Ternary,
    /// int8 codes with a scale per 32 (Q8_0).
    Int8,
}

impl std::fmt::Display for SyntheticWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyntheticWeights::LowBit { bits, group_size } => write!(f, "{bits}-bit g{group_size}"),
            SyntheticWeights::Ternary => write!(f, "ternary, per-tensor scale"),
            SyntheticWeights::Int8 => write!(f, "int8 b32"),
        }
    }
}

/// The weights of a synthetic model: its linear layers, and its embedding / LM head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// q/k/v/o and gate/up/down of every layer.
    pub layers: SyntheticWeights,
    /// The token embedding, which is also the LM head when the model ties them, and the untied
    /// LM head.
    pub head: SyntheticWeights,
}

/// One layer's weights with the kinds of its tensors.
type BuiltLayer = (LayerWeights, Vec<TensorForm>);

/// xorshift64*: cheap and good enough for random weights; 8 codes per step.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point).
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Fills `out` with random bytes, each masked by `mask`.
    fn fill_bytes(&mut self, out: &mut [u8], mask: u8) {
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            let bytes = self.next().to_le_bytes();
            for (o, b) in chunk.iter_mut().zip(bytes) {
                *o = b & mask;
            }
        }
        let bytes = self.next().to_le_bytes();
        for (o, b) in chunks.into_remainder().iter_mut().zip(bytes) {
            *o = b & mask;
        }
    }
}

/// A random low-bit matrix whose rows have roughly unit gain: `w = s·(q − (2^b−1)/2)` with
/// `s ≈ sqrt(12 / K) / 2^b` jittered per group.
fn low_bit(rng: &mut Rng, rows: usize, cols: usize, bits: u8, group_size: usize) -> DecodedTensor {
    let mut codes = vec![0u8; rows * cols];
    rng.fill_bytes(&mut codes, ((1u16 << bits) - 1) as u8);
    let groups = rows * cols / group_size;
    let levels = (1u32 << bits) as f32;
    let base = (12.0 / cols as f32).sqrt() / levels;
    let scales: Vec<f32> = (0..groups).map(|_| base * (0.5 + rng.unit())).collect();
    let offsets = scales.iter().map(|s| -s * (levels - 1.0) / 2.0).collect();
    DecodedTensor::LowBit {
        rows,
        cols,
        bits,
        group_size,
        codes,
        scales,
        offsets,
    }
}

/// A random ternary matrix `w = s·(q − 1)`, `q ∈ {0, 1, 2}`, with one `s` for the whole tensor
/// (stored as the same scale for every row) chosen so that rows have roughly unit gain:
/// `K · (2/3)·s² = 1`.
fn ternary(rng: &mut Rng, rows: usize, cols: usize) -> DecodedTensor {
    let mut codes = vec![0u8; rows * cols];
    rng.fill_bytes(&mut codes, 0xff);
    for c in &mut codes {
        *c %= 3;
    }
    let s = (1.5 / cols as f32).sqrt() * (0.75 + 0.5 * rng.unit());
    DecodedTensor::LowBit {
        rows,
        cols,
        bits: 2,
        group_size: cols,
        codes,
        scales: vec![s; rows],
        offsets: vec![-s; rows],
    }
}

/// A random matrix drawn as `kind` says.
fn random_matrix(rng: &mut Rng, rows: usize, cols: usize, kind: SyntheticWeights) -> DecodedTensor {
    match kind {
        SyntheticWeights::LowBit { bits, group_size } => low_bit(rng, rows, cols, bits, group_size),
        SyntheticWeights::Ternary => ternary(rng, rows, cols),
        SyntheticWeights::Int8 => int8(rng, rows, cols),
    }
}

/// Refuses a weight kind that cannot be drawn for rows of length `k`.
fn check_weights(kind: SyntheticWeights, k: usize) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidOption(format!("synthetic model: {what}")));
    match kind {
        SyntheticWeights::LowBit { bits, .. } if !(1..=4).contains(&bits) => {
            bad(format!("{bits}-bit weights: use 1, 2, 3 or 4"))
        }
        SyntheticWeights::LowBit { group_size, .. }
            if group_size == 0 || !k.is_multiple_of(group_size) =>
        {
            bad(format!(
                "group size {group_size} does not divide the row length {k}"
            ))
        }
        SyntheticWeights::Int8 | SyntheticWeights::Ternary if !k.is_multiple_of(32) => {
            bad(format!("{kind} needs rows of a multiple of 32, not {k}"))
        }
        _ => Ok(()),
    }
}

/// A random int8 matrix with values in about `[−1, 1]` (embeddings, LM head).
fn int8(rng: &mut Rng, rows: usize, cols: usize) -> DecodedTensor {
    let mut bytes = vec![0u8; rows * cols];
    rng.fill_bytes(&mut bytes, 0xff);
    // −128 never occurs in Q8_0 codes; fold it onto −127.
    let codes = bytes.iter().map(|&b| (b as i8).max(-127)).collect();
    let scales = (0..rows * cols / 32)
        .map(|_| (0.5 + rng.unit()) / 127.0)
        .collect();
    DecodedTensor::Int8 {
        rows,
        cols,
        block: 32,
        codes,
        scales,
    }
}

/// A model of `config`'s shape with random `bits`-bit codes (groups of `group_size`), random
/// scales and offsets, int8 embeddings and LM head, and no tokenizer. Generated directly, so
/// even 7B shapes take seconds. `opts.requantize` is ignored (the weights are already low-bit).
pub fn synthetic_model(
    config: ModelConfig,
    bits: u8,
    group_size: usize,
    opts: &LoadOptions,
    seed: u64,
) -> Result<Model> {
    let spec = SyntheticSpec {
        layers: SyntheticWeights::LowBit { bits, group_size },
        head: SyntheticWeights::Int8,
    };
    synthetic_model_with(config, spec, opts, seed)
}

/// Like [`synthetic_model`], with the weights of the layers and of the embedding / LM head
/// drawn as `spec` says (e.g. ternary layers and a 4-bit head for BitNet shapes). BitNet
/// configurations get their sub-norms (all ones).
pub fn synthetic_model_with(
    config: ModelConfig,
    spec: SyntheticSpec,
    opts: &LoadOptions,
    seed: u64,
) -> Result<Model> {
    super::check_config(&config)?;
    let c = &config;
    let (h, q_dim, kv_dim, f) = (
        c.hidden_size,
        c.heads * c.head_dim,
        c.kv_heads * c.head_dim,
        c.ffn_size,
    );
    for k in [h, q_dim, f] {
        check_weights(spec.layers, k)?;
    }
    check_weights(spec.head, h)?;
    // BitNet blocks carry RMSNorms on the attention output and on the FFN hidden state.
    let bitnet = c.architecture == Architecture::BitNet;
    let mut rng = Rng::new(seed);
    let mut types = Vec::new();
    // Tensors are named as in a GGUF file of the same model.
    let linear = |name: &str, t: DecodedTensor, types: &mut Vec<_>| -> Result<Linear> {
        let m = Linear::from_decoded(&t, opts.reference)?;
        count_tensor(types, name, source_kind(&t), m.kind(), m.bytes());
        Ok(m)
    };
    let norm_of = |name: &str, len: usize, types: &mut Vec<_>| {
        count_tensor(types, name, "f32".into(), "f32".into(), 4 * len);
        vec![1.0f32; len]
    };
    let embedding = linear(
        "token_embd.weight",
        random_matrix(&mut rng, c.vocab_size, h, spec.head),
        &mut types,
    )?;

    // Layers are generated and packed in parallel (packing dominates for 7B shapes), each from
    // its own generator so that the weights do not depend on the number of threads. At most 4
    // at once: each holds a few hundred MB of unpacked codes.
    let build_threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let build_cpu = lutra_kernels::Cpu::new(build_threads)?;
    let layer = |i: usize| -> Result<BuiltLayer> {
        let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut types = Vec::new();
        let name = |s: &str| format!("blk.{i}.{s}.weight");
        let mut m = |s: &str, rows, cols, types: &mut Vec<_>| {
            let t = random_matrix(&mut rng, rows, cols, spec.layers);
            linear(&name(s), t, types)
        };
        let norm = |s: &str, types: &mut Vec<_>| norm_of(&name(s), h, types);
        let sub_norm =
            |s: &str, len: usize, types: &mut Vec<_>| bitnet.then(|| norm_of(&name(s), len, types));
        let weights = LayerWeights {
            attn_norm: norm("attn_norm", &mut types),
            wq: m("attn_q", q_dim, h, &mut types)?,
            wk: m("attn_k", kv_dim, h, &mut types)?,
            wv: m("attn_v", kv_dim, h, &mut types)?,
            bq: None,
            bk: None,
            bv: None,
            q_norm: None,
            k_norm: None,
            wo: m("attn_output", h, q_dim, &mut types)?,
            attn_post_norm: None,
            attn_sub_norm: sub_norm("attn_sub_norm", q_dim, &mut types),
            ffn_norm: norm("ffn_norm", &mut types),
            ffn_sub_norm: sub_norm("ffn_sub_norm", f, &mut types),
            w_gate: m("ffn_gate", f, h, &mut types)?,
            w_up: m("ffn_up", f, h, &mut types)?,
            w_down: m("ffn_down", h, f, &mut types)?,
            ffn_post_norm: None,
            rotations: Default::default(),
        };
        Ok((weights, types))
    };
    let mut built: Vec<Option<Result<BuiltLayer>>> = (0..c.layers).map(|_| None).collect();
    build_cpu.for_each_chunk(&mut built, 1, |i, slot| slot[0] = Some(layer(i)));
    let mut layers = Vec::with_capacity(c.layers);
    for result in built.into_iter().flatten() {
        let (weights, layer_types) = result?;
        types.extend(layer_types);
        layers.push(weights);
    }
    let output_norm = norm_of("output_norm.weight", h, &mut types);
    let output = if c.tied_embeddings {
        None
    } else {
        Some(linear(
            "output.weight",
            random_matrix(&mut rng, c.vocab_size, h, spec.head),
            &mut types,
        )?)
    };
    let parts = ModelParts {
        config,
        embedding,
        layers,
        output_norm,
        output,
        tensors: types,
        tokenizer: None,
        chat_template: None,
    };
    Model::from_parts(parts, opts)
}

/// The source type of a decoded tensor, in words.
fn source_kind(t: &DecodedTensor) -> String {
    match t {
        DecodedTensor::LowBit {
            bits: 2,
            codes,
            scales,
            offsets,
            ..
        } if codes.iter().all(|&q| q <= 2) && offsets.iter().zip(scales).all(|(o, s)| *o == -s) => {
            "ternary".to_string()
        }
        DecodedTensor::LowBit {
            bits, group_size, ..
        } => format!("low-bit {bits}b g{group_size}"),
        DecodedTensor::PlaneLowBit {
            bits, group_size, ..
        } => format!("per-plane {bits}b g{group_size}"),
        DecodedTensor::SuperBlock { bits, group, .. } => format!("k-quant {bits}b g{group}"),
        DecodedTensor::Int8 { block, .. } => format!("int8 b{block}"),
        DecodedTensor::Iq4 { .. } => "iq4 b32".to_string(),
        DecodedTensor::Dense { .. } => "f32".to_string(),
    }
}
