//! A complete tiny random Llama GGUF (weights, byte-level BPE tokenizer, ChatML template), written
//! on the fly by the tests of the model, the generator and the CLI; optionally a BitNet b1.58 one
//! (TQ2_0 ternary matrices with per-tensor scale tensors, sub-norms).

use half::f16;
use lutra_kernels::measure::SplitMix64;
use std::path::Path;

use super::{GgufWriter, MetaValue};
use crate::tokenizer::byte_to_char;
use crate::weights::GgmlType;
use crate::Result;

/// The ChatML template the tiny model carries (the same text SmolLM2-style models use, minus the
/// default system prompt).
pub const TINY_CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Special tokens of the tiny vocabulary, at ids 0, 1, 2 as in SmolLM2.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the tiny vocabulary, in priority order (byte-level spelling: `Ġ` is a space).
const MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("l", "l"),
    ("H", "e"),
    ("He", "ll"),
];

/// Shape of a tiny random model.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyModelSpec {
    /// Hidden size (a multiple of 32).
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// FFN inner size (a multiple of 32).
    pub ffn: usize,
    /// Context length written to the metadata.
    pub context_length: usize,
    /// Write no `output.weight` (LM head = token embedding), as SmolLM2 does.
    pub tied_embeddings: bool,
    /// Write a BitNet b1.58 model (architecture `bitnet-b1.58`: squared-ReLU FFN): TQ2_0 ternary
    /// matrices each with a one-value `.scale` tensor, `attn_sub_norm` and `ffn_sub_norm`. TQ2_0
    /// blocks hold 256 weights, so `hidden` and `ffn` must be multiples of 256.
    pub bitnet: bool,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        TinyModelSpec {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            context_length: 256,
            tied_embeddings: true,
            bitnet: false,
        }
    }
}

impl TinyModelSpec {
    /// Vocabulary size of the tiny tokenizer: 3 specials + 256 bytes + the merges.
    pub fn vocab_size(&self) -> usize {
        SPECIALS.len() + 256 + MERGES.len()
    }
}

/// The shared splitmix64 stream, so that the same seed gives the same model.
struct TinyRng(SplitMix64);

impl TinyRng {
    /// Uniform in [−scale, scale).
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.0.uniform() * 2.0 - 1.0) * scale)
            .collect()
    }
}

/// Writes a complete tiny random Llama GGUF to `path`: Q4_1 matrices, Q8_0 `token_embd`, F32
/// norms, a gpt2-style byte-level BPE tokenizer (specials `<|endoftext|>` = 0, `<|im_start|>` = 1,
/// `<|im_end|>` = 2 = EOS, no BOS added) and a ChatML chat template. With `spec.bitnet`, a BitNet
/// b1.58 model instead (see [`TinyModelSpec::bitnet`]).
pub fn tiny_llama_gguf(path: &Path, spec: &TinyModelSpec, seed: u64) -> Result<()> {
    let mut rng = TinyRng(SplitMix64::new(seed ^ 0x006C_7574_7261));
    let mut w = GgufWriter::new();
    let head_dim = spec.hidden / spec.heads.max(1);
    let vocab = spec.vocab_size();
    let s = |v: &str| MetaValue::String(v.to_string());
    let u = |v: usize| MetaValue::U32(v as u32);
    let (arch, name) = if spec.bitnet {
        ("bitnet-b1.58", "tiny-bitnet")
    } else {
        ("llama", "tiny-llama")
    };
    let key = |k: &str| format!("{arch}.{k}");
    w.add_metadata("general.architecture", s(arch));
    w.add_metadata("general.name", s(name));
    w.add_metadata(&key("block_count"), u(spec.layers));
    w.add_metadata(&key("context_length"), u(spec.context_length));
    w.add_metadata(&key("embedding_length"), u(spec.hidden));
    w.add_metadata(&key("feed_forward_length"), u(spec.ffn));
    w.add_metadata(&key("attention.head_count"), u(spec.heads));
    w.add_metadata(&key("attention.head_count_kv"), u(spec.kv_heads));
    w.add_metadata(&key("rope.freq_base"), MetaValue::F32(10000.0));
    w.add_metadata(&key("rope.dimension_count"), u(head_dim));
    w.add_metadata(
        &key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(1e-5),
    );
    w.add_metadata(&key("vocab_size"), u(vocab));

    let mut tokens: Vec<String> = SPECIALS.iter().map(|t| t.to_string()).collect();
    tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let types: Vec<MetaValue> = (0..vocab)
        .map(|i| MetaValue::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    w.add_metadata("tokenizer.ggml.model", s("gpt2"));
    w.add_metadata("tokenizer.ggml.pre", s("smollm"));
    w.add_metadata(
        "tokenizer.ggml.tokens",
        MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()),
    );
    w.add_metadata("tokenizer.ggml.token_type", MetaValue::Array(types));
    w.add_metadata(
        "tokenizer.ggml.merges",
        MetaValue::Array(
            MERGES
                .iter()
                .map(|(a, b)| MetaValue::String(format!("{a} {b}")))
                .collect(),
        ),
    );
    w.add_metadata("tokenizer.ggml.bos_token_id", MetaValue::U32(1));
    w.add_metadata("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    w.add_metadata("tokenizer.ggml.padding_token_id", MetaValue::U32(2));
    w.add_metadata("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    w.add_metadata("tokenizer.chat_template", s(TINY_CHATML_TEMPLATE));

    let (h, f, kv) = (spec.hidden, spec.ffn, spec.kv_heads * head_dim);
    let wscale = |k: usize| 1.0 / (k as f32).sqrt();
    // A linear layer `[rows][cols]` (GGUF dims `[cols, rows]`) with rows of about unit gain: Q4_1,
    // or TQ2_0 ternary plus a `.scale` tensor for BitNet.
    let matrix = |w: &mut GgufWriter, rng: &mut TinyRng, name: &str, cols: usize, rows: usize| {
        let weight = format!("{name}.weight");
        if !spec.bitnet {
            return w.add_tensor_q4_1(
                &weight,
                &[cols, rows],
                &rng.values(cols * rows, wscale(cols)),
            );
        }
        // Ternary weights of about unit row gain: K·(2/3)·(d·scale)² ≈ 1; the split of the
        // magnitude between the TQ2_0 block scale d and the tensor's scale is arbitrary.
        let tensor_scale = 0.5 + rng.0.uniform();
        let d = f16::from_f32((1.5 / cols as f32).sqrt() / tensor_scale);
        let codes: Vec<u8> = (0..cols * rows)
            .map(|_| (rng.0.next_u64() % 3) as u8)
            .collect();
        w.add_tensor_raw(
            &weight,
            &[cols, rows],
            GgmlType::TQ2_0.id(),
            tq2_0(&codes, d),
        )?;
        w.add_tensor_f32(&format!("{name}.scale"), &[1], &[tensor_scale])
    };
    w.add_tensor_q8_0(
        "token_embd.weight",
        &[h, vocab],
        &rng.values(h * vocab, 1.0),
    )?;
    for l in 0..spec.layers {
        let p = format!("blk.{l}");
        let norm = |rng: &mut TinyRng| {
            rng.values(h, 0.1)
                .iter()
                .map(|v| 1.0 + v)
                .collect::<Vec<_>>()
        };
        w.add_tensor_f32(&format!("{p}.attn_norm.weight"), &[h], &norm(&mut rng))?;
        matrix(&mut w, &mut rng, &format!("{p}.attn_q"), h, h)?;
        matrix(&mut w, &mut rng, &format!("{p}.attn_k"), h, kv)?;
        matrix(&mut w, &mut rng, &format!("{p}.attn_v"), h, kv)?;
        matrix(&mut w, &mut rng, &format!("{p}.attn_output"), h, h)?;
        if spec.bitnet {
            let sub_norm = |rng: &mut TinyRng, len: usize| {
                rng.values(len, 0.5)
                    .iter()
                    .map(|v| 1.0 + v)
                    .collect::<Vec<_>>()
            };
            w.add_tensor_f32(
                &format!("{p}.attn_sub_norm.weight"),
                &[h],
                &sub_norm(&mut rng, h),
            )?;
            w.add_tensor_f32(
                &format!("{p}.ffn_sub_norm.weight"),
                &[f],
                &sub_norm(&mut rng, f),
            )?;
        }
        w.add_tensor_f32(&format!("{p}.ffn_norm.weight"), &[h], &norm(&mut rng))?;
        matrix(&mut w, &mut rng, &format!("{p}.ffn_gate"), h, f)?;
        matrix(&mut w, &mut rng, &format!("{p}.ffn_up"), h, f)?;
        matrix(&mut w, &mut rng, &format!("{p}.ffn_down"), f, h)?;
    }
    let out_norm: Vec<f32> = rng.values(h, 0.1).iter().map(|v| 1.0 + v).collect();
    w.add_tensor_f32("output_norm.weight", &[h], &out_norm)?;
    if !spec.tied_embeddings {
        w.add_tensor_q8_0(
            "output.weight",
            &[h, vocab],
            &rng.values(h * vocab, wscale(h)),
        )?;
    }
    w.write(path)
}

/// TQ2_0 blocks of ternary `codes` (0, 1, 2 meaning −1, 0, +1; a multiple of 256 of them) with
/// scale `d` in every block: 64 bytes of 2-bit codes (element `128·c + 32·l + m` of a block in
/// bits `2l` of byte `32·c + m`), then `d` as f16, as ggml's `block_tq2_0`.
fn tq2_0(codes: &[u8], d: f16) -> Vec<u8> {
    let mut out = Vec::with_capacity(codes.len() / 256 * 66);
    for block in codes.chunks_exact(256) {
        for chunk in block.chunks_exact(128) {
            for m in 0..32 {
                out.push((0..4).fold(0u8, |b, l| b | (chunk[32 * l + m] & 3) << (2 * l)));
            }
        }
        out.extend(d.to_le_bytes());
    }
    out
}
