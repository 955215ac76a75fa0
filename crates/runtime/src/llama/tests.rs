//! Model-level tests on tiny random models: batching, context limits, fast path vs reference,
//! loading and its errors.

use super::*;
use crate::config::RopeStyle;
use crate::gguf::{tiny_llama_gguf, GgufWriter, MetaValue, TinyModelSpec};

fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        name: "tiny".into(),
        hidden_size: 64,
        ffn_size: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        vocab_size: 100,
        context_length: 128,
        rope_theta: 10000.0,
        rope_dims: 16,
        rope_style: RopeStyle::Adjacent,
        rms_eps: 1e-5,
        tied_embeddings: true,
    }
}

fn options(reference: bool) -> LoadOptions {
    LoadOptions {
        threads: 1,
        reference,
        ..LoadOptions::default()
    }
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

fn rel_error(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Logits of every position, fed one token at a time.
fn decode_one_by_one(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache();
    let mut all = vec![0.0; tokens.len() * vocab];
    for (t, row) in tokens.iter().zip(all.chunks_exact_mut(vocab)) {
        model.forward(&[*t], &mut cache, row).unwrap();
    }
    assert_eq!(cache.len(), tokens.len());
    all
}

#[test]
fn batched_prefill_matches_token_by_token_decode() {
    // 70 tokens: one full batch of MAX_BATCH and a partial one, so causal masking inside a batch
    // and attention across batches are both exercised.
    for reference in [true, false] {
        let model = Model::synthetic(tiny_config(), 4, 32, &options(reference), 7).unwrap();
        let vocab = model.config().vocab_size;
        let tokens = prompt(70, vocab);
        let mut cache = model.new_cache();
        let mut batched = vec![0.0; tokens.len() * vocab];
        model
            .forward_all(&tokens, &mut cache, &mut batched)
            .unwrap();
        assert_eq!(cache.len(), 70);
        let single = decode_one_by_one(&model, &tokens);
        for (t, (b, s)) in batched
            .chunks_exact(vocab)
            .zip(single.chunks_exact(vocab))
            .enumerate()
        {
            assert!(b.iter().all(|v| v.is_finite()));
            let err = rel_error(b, s);
            assert!(
                err < 1e-4,
                "reference {reference}, token {t}: rel error {err}"
            );
        }
        // `forward` writes the last token's logits, the same as forward_all's last row.
        let mut cache = model.new_cache();
        let mut last = vec![0.0; vocab];
        model.forward(&tokens, &mut cache, &mut last).unwrap();
        assert!(rel_error(&last, &batched[69 * vocab..]) < 1e-4);
    }
}

#[test]
fn fast_path_agrees_with_reference() {
    let config = tiny_config();
    let fast = Model::synthetic(config.clone(), 4, 32, &options(false), 3).unwrap();
    let exact = Model::synthetic(config, 4, 32, &options(true), 3).unwrap();
    assert!(exact.is_reference() && !fast.is_reference());
    let vocab = fast.config().vocab_size;
    let tokens = prompt(24, vocab);
    let mut logits = [vec![0.0; 24 * vocab], vec![0.0; 24 * vocab]];
    for (model, out) in [&fast, &exact].into_iter().zip(logits.iter_mut()) {
        model
            .forward_all(&tokens, &mut model.new_cache(), out)
            .unwrap();
    }
    let mut agree = 0;
    for (f, r) in logits[0]
        .chunks_exact(vocab)
        .zip(logits[1].chunks_exact(vocab))
    {
        let err = rel_error(f, r);
        assert!(err < 0.05, "relative error {err}");
        agree += usize::from(argmax(f) == argmax(r));
    }
    assert!(agree >= 22, "top-1 agreed at {agree} of 24 positions");
    // The logits are not degenerate: the test above could fail.
    let r = &logits[1][..vocab];
    assert!(
        r.iter().cloned().fold(f32::MIN, f32::max) - r.iter().cloned().fold(f32::MAX, f32::min)
            > 1.0
    );
}

#[test]
fn f16_cache_and_threads_stay_close() {
    let config = tiny_config();
    let base = Model::synthetic(config.clone(), 2, 32, &options(true), 5).unwrap();
    let opts = LoadOptions {
        threads: 2,
        reference: true,
        kv_f16: true,
        ..LoadOptions::default()
    };
    let half = Model::synthetic(config, 2, 32, &opts, 5).unwrap();
    assert_eq!(half.threads(), 2);
    assert!(half.new_cache().is_f16());
    let vocab = base.config().vocab_size;
    let tokens = prompt(30, vocab);
    let (mut a, mut b) = (vec![0.0; vocab], vec![0.0; vocab]);
    base.forward(&tokens, &mut base.new_cache(), &mut a)
        .unwrap();
    half.forward(&tokens, &mut half.new_cache(), &mut b)
        .unwrap();
    assert!(rel_error(&b, &a) < 1e-2);
}

#[test]
fn context_overflow_and_bad_arguments_are_errors() {
    let opts = LoadOptions {
        context_length: Some(8),
        reference: true,
        threads: 1,
        ..LoadOptions::default()
    };
    let model = Model::synthetic(tiny_config(), 2, 32, &opts, 1).unwrap();
    let mut cache = model.new_cache();
    assert_eq!(cache.capacity(), 8);
    let mut logits = vec![0.0; 100];
    model
        .forward(&[1, 2, 3, 4, 5, 6], &mut cache, &mut logits)
        .unwrap();
    match model.forward(&[7, 8, 9], &mut cache, &mut logits) {
        Err(Error::ContextOverflow { tokens, context }) => assert_eq!((tokens, context), (9, 8)),
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
    assert_eq!(cache.len(), 6, "a refused forward leaves the cache alone");
    model.forward(&[7, 8], &mut cache, &mut logits).unwrap();
    assert_eq!(cache.len(), 8);
    cache.truncate(2);
    model.forward(&[3], &mut cache, &mut logits).unwrap();
    assert!(
        model.forward(&[100], &mut cache, &mut logits).is_err(),
        "token outside vocab"
    );
    assert!(model.forward(&[], &mut cache, &mut logits).is_err());
    assert!(model.forward(&[1], &mut cache, &mut logits[..5]).is_err());
    let mut other = KvCache::new(3, 32, 8, false);
    assert!(model.forward(&[1], &mut other, &mut logits).is_err());
}

#[test]
fn describe_counts_tensors_and_bytes() {
    let model = Model::synthetic(tiny_config(), 2, 32, &options(false), 1).unwrap();
    let info = model.describe();
    let count: usize = info.tensor_types.iter().map(|t| t.count).sum();
    // Embedding + 2 layers · (7 matrices + 2 norms) + final norm.
    assert_eq!(count, 1 + 2 * 9 + 1);
    assert_eq!(info.weight_bytes, model.weight_bytes());
    assert!(info.weight_bytes > 0);
    assert_eq!(info.kv_cache_bytes, model.new_cache().bytes());
    assert!(info.to_string().contains("lut2 g32"), "{info}");
}

fn tiny_file(dir: &str, spec: &TinyModelSpec) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lutra-llama-{dir}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    tiny_llama_gguf(&path, spec, 11).unwrap();
    path
}

#[test]
fn loads_a_gguf_exactly_requantized_and_in_reference_mode() {
    let path = tiny_file("load", &TinyModelSpec::default());
    let exact = Model::load(&path, &options(true)).unwrap();
    let fast = Model::load(&path, &options(false)).unwrap();
    assert!(fast.tokenizer().is_some() && fast.chat_template().is_some());
    let vocab = fast.config().vocab_size;
    let tokens = prompt(12, vocab);
    let run = |m: &Model| {
        let mut logits = vec![0.0; vocab];
        m.forward(&tokens, &mut m.new_cache(), &mut logits).unwrap();
        logits
    };
    let want = run(&exact);
    assert!(rel_error(&run(&fast), &want) < 0.05);
    for bits in 1..=4u8 {
        let opts = LoadOptions {
            requantize: Some(Requantize {
                bits,
                group_size: 32,
            }),
            ..options(false)
        };
        let model = Model::load(&path, &opts).unwrap();
        let logits = run(&model);
        assert!(logits.iter().all(|v| v.is_finite()), "{bits} bits");
        let info = model.describe();
        assert!(info
            .tensor_types
            .iter()
            .any(|t| t.kernel == format!("lut{bits} g32")));
        if bits == 4 {
            // Q4_1 requantized to 4 bits g32 is close to the original.
            assert!(rel_error(&logits, &want) < 0.1);
        }
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let dir = std::env::temp_dir().join(format!("lutra-llama-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |embd_dims: &[usize]| {
        let mut w = GgufWriter::new();
        let s = |v: &str| MetaValue::String(v.to_string());
        let u = |v: usize| MetaValue::U32(v as u32);
        w.add_metadata("general.architecture", s("llama"));
        w.add_metadata("llama.block_count", u(1));
        w.add_metadata("llama.context_length", u(64));
        w.add_metadata("llama.embedding_length", u(64));
        w.add_metadata("llama.feed_forward_length", u(128));
        w.add_metadata("llama.attention.head_count", u(4));
        w.add_metadata("llama.attention.head_count_kv", u(2));
        w.add_metadata("llama.rope.freq_base", MetaValue::F32(10000.0));
        w.add_metadata(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
        w.add_metadata("llama.vocab_size", u(40));
        let n = embd_dims.iter().product::<usize>();
        w.add_tensor_f32("token_embd.weight", embd_dims, &vec![0.5; n])
            .unwrap();
        let path = dir.join(format!("bad-{}.gguf", embd_dims[0]));
        w.write(&path).unwrap();
        path
    };
    match Model::load(&write(&[32, 40]), &options(false)) {
        Err(Error::ShapeMismatch { tensor, .. }) => assert_eq!(tensor, "token_embd.weight"),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    match Model::load(&write(&[64, 40]), &options(false)) {
        Err(Error::MissingTensor { tensor, .. }) => assert_eq!(tensor, "blk.0.attn_norm.weight"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn model_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Model>();
    shared::<KvCache>();
}
