//! A complete tiny random Llama GGUF (weights, byte-level BPE tokenizer, ChatML template), written
//! on the fly by the tests of the model, the generator and the CLI.

use lutra_kernels::measure::SplitMix64;
use std::path::Path;

use super::{GgufWriter, MetaValue};
use crate::tokenizer::byte_to_char;
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
/// `<|im_end|>` = 2 = EOS, no BOS added) and a ChatML chat template.
pub fn tiny_llama_gguf(path: &Path, spec: &TinyModelSpec, seed: u64) -> Result<()> {
    let mut rng = TinyRng(SplitMix64::new(seed ^ 0x006C_7574_7261));
    let mut w = GgufWriter::new();
    let head_dim = spec.hidden / spec.heads.max(1);
    let vocab = spec.vocab_size();
    let s = |v: &str| MetaValue::String(v.to_string());
    let u = |v: usize| MetaValue::U32(v as u32);
    w.add_metadata("general.architecture", s("llama"));
    w.add_metadata("general.name", s("tiny-llama"));
    w.add_metadata("llama.block_count", u(spec.layers));
    w.add_metadata("llama.context_length", u(spec.context_length));
    w.add_metadata("llama.embedding_length", u(spec.hidden));
    w.add_metadata("llama.feed_forward_length", u(spec.ffn));
    w.add_metadata("llama.attention.head_count", u(spec.heads));
    w.add_metadata("llama.attention.head_count_kv", u(spec.kv_heads));
    w.add_metadata("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.add_metadata("llama.rope.dimension_count", u(head_dim));
    w.add_metadata(
        "llama.attention.layer_norm_rms_epsilon",
        MetaValue::F32(1e-5),
    );
    w.add_metadata("llama.vocab_size", u(vocab));

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
        w.add_tensor_q4_1(
            &format!("{p}.attn_q.weight"),
            &[h, h],
            &rng.values(h * h, wscale(h)),
        )?;
        w.add_tensor_q4_1(
            &format!("{p}.attn_k.weight"),
            &[h, kv],
            &rng.values(h * kv, wscale(h)),
        )?;
        w.add_tensor_q4_1(
            &format!("{p}.attn_v.weight"),
            &[h, kv],
            &rng.values(h * kv, wscale(h)),
        )?;
        w.add_tensor_q4_1(
            &format!("{p}.attn_output.weight"),
            &[h, h],
            &rng.values(h * h, wscale(h)),
        )?;
        w.add_tensor_f32(&format!("{p}.ffn_norm.weight"), &[h], &norm(&mut rng))?;
        w.add_tensor_q4_1(
            &format!("{p}.ffn_gate.weight"),
            &[h, f],
            &rng.values(h * f, wscale(h)),
        )?;
        w.add_tensor_q4_1(
            &format!("{p}.ffn_up.weight"),
            &[h, f],
            &rng.values(h * f, wscale(h)),
        )?;
        w.add_tensor_q4_1(
            &format!("{p}.ffn_down.weight"),
            &[f, h],
            &rng.values(f * h, wscale(f)),
        )?;
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
