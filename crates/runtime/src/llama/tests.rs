//! Model-level tests on tiny random models: batching, context limits, fast path vs reference,
//! loading and its errors.

use std::ops::ControlFlow;

use super::*;
use crate::config::FfnActivation;
use crate::fixtures::{
    synthetic_model, synthetic_model_with, tiny_llama_gguf, GgufWriter, SyntheticSpec,
    SyntheticWeights, TempDir, TinyModelSpec,
};
use crate::gguf::MetaValue;
use crate::rope::{RopeScaling, RopeStyle};
use crate::weights::GgmlType;

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
        context_length: 1024,
        rope_theta: 10000.0,
        rope_dims: 16,
        rope_style: RopeStyle::Adjacent,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        tied_embeddings: true,
        ffn_activation: FfnActivation::Silu,
        sliding_window: None,
        embedding_scale: 1.0,
        logit_softcap: None,
    }
}

/// One thread and an f32 KV cache: the tests that compare two paths compare them on exact keys
/// and values (`f16_cache_and_threads_stay_close` measures the f16 cache against this).
fn options(reference: bool) -> LoadOptions {
    LoadOptions {
        threads: 1,
        reference,
        kv_f16: false,
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

/// Runs `tokens` through both models, asserts a relative logit error below 0.05 at every position,
/// and returns how many positions agree on the top token, with the reference logits.
fn agreement_with_reference(fast: &Model, exact: &Model, tokens: &[u32]) -> (usize, Vec<f32>) {
    let vocab = fast.config().vocab_size;
    let mut logits = [
        vec![0.0; tokens.len() * vocab],
        vec![0.0; tokens.len() * vocab],
    ];
    for (model, out) in [fast, exact].into_iter().zip(logits.iter_mut()) {
        model
            .forward_all(tokens, &mut model.new_cache(), out)
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
    let [_, reference] = logits;
    (agree, reference)
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
    // One full batch of MAX_BATCH tokens and a partial one, so causal masking inside a batch and
    // attention across batches are both exercised.
    let n = MAX_BATCH + 6;
    for reference in [true, false] {
        let model = synthetic_model(tiny_config(), 4, 32, &options(reference), 7).unwrap();
        let vocab = model.config().vocab_size;
        let tokens = prompt(n, vocab);
        let mut cache = model.new_cache();
        let mut batched = vec![0.0; tokens.len() * vocab];
        model
            .forward_all(&tokens, &mut cache, &mut batched)
            .unwrap();
        assert_eq!(cache.len(), n);
        let single = decode_one_by_one(&model, &tokens);
        // The fast model's batches take the int8 dot path (on CPUs that have one) and its single
        // tokens the table lookups: two roundings of the activations, each about 1% from the
        // exact logits here (measured 0.8-1.6%) and at most 3.4% from each other over these
        // tokens. The reference model checks the masking and the cache exactly.
        let limit = if reference { 1e-4 } else { 0.06 };
        for (t, (b, s)) in batched
            .chunks_exact(vocab)
            .zip(single.chunks_exact(vocab))
            .enumerate()
        {
            assert!(b.iter().all(|v| v.is_finite()));
            let err = rel_error(b, s);
            assert!(
                err < limit,
                "reference {reference}, token {t}: rel error {err}"
            );
        }
        // `forward` writes the last token's logits, the same as forward_all's last row.
        let mut cache = model.new_cache();
        let mut last = vec![0.0; vocab];
        model.forward(&tokens, &mut cache, &mut last).unwrap();
        assert!(rel_error(&last, &batched[(n - 1) * vocab..]) < 1e-4);
    }
}

#[test]
fn fast_path_agrees_with_reference() {
    let config = tiny_config();
    let fast = synthetic_model(config.clone(), 4, 32, &options(false), 3).unwrap();
    let exact = synthetic_model(config, 4, 32, &options(true), 3).unwrap();
    assert!(exact.is_reference() && !fast.is_reference());
    let vocab = fast.config().vocab_size;
    let (agree, reference) = agreement_with_reference(&fast, &exact, &prompt(24, vocab));
    assert!(agree >= 22, "top-1 agreed at {agree} of 24 positions");
    // The logits are not degenerate: the test above could fail.
    let r = &reference[..vocab];
    assert!(
        r.iter().cloned().fold(f32::MIN, f32::max) - r.iter().cloned().fold(f32::MAX, f32::min)
            > 1.0
    );
}

#[test]
fn f16_cache_and_threads_stay_close() {
    let config = tiny_config();
    let base = synthetic_model(config.clone(), 2, 32, &options(true), 5).unwrap();
    let opts = LoadOptions {
        threads: 2,
        reference: true,
        kv_f16: true,
        ..LoadOptions::default()
    };
    let half = synthetic_model(config, 2, 32, &opts, 5).unwrap();
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
fn set_threads_changes_only_the_thread_count() {
    // The fast path splits work in whole tiles and table chunks, so thread counts give the same bits.
    let mut model = synthetic_model(tiny_config(), 2, 32, &options(false), 9).unwrap();
    let vocab = model.config().vocab_size;
    let tokens = prompt(12, vocab);
    let run = |m: &Model| last_logits(m, &tokens);
    let one = run(&model);
    let isa = model.isa();
    model.set_threads(3).unwrap();
    assert_eq!((model.threads(), model.isa()), (3, isa));
    assert_eq!(run(&model), one);
    model.set_threads(1).unwrap();
    assert_eq!(model.threads(), 1);
    assert_eq!(run(&model), one);
}

#[test]
fn context_overflow_and_bad_arguments_are_errors() {
    let opts = LoadOptions {
        context_length: Some(8),
        reference: true,
        threads: 1,
        ..LoadOptions::default()
    };
    let model = synthetic_model(tiny_config(), 2, 32, &opts, 1).unwrap();
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
    let mut other = KvCache::new(3, 2, 16, 8, false);
    assert!(model.forward(&[1], &mut other, &mut logits).is_err());
}

#[test]
fn describe_counts_tensors_and_bytes() {
    let model = synthetic_model(tiny_config(), 2, 32, &options(false), 1).unwrap();
    let info = model.describe();
    let count: usize = info.tensor_types.iter().map(|t| t.count).sum();
    // Embedding + 2 layers · (7 matrices + 2 norms) + final norm; no sub-norms in Llama blocks.
    assert_eq!(count, 1 + 2 * 9 + 1);
    assert_eq!(info.weight_bytes, model.weight_bytes());
    assert!(info.weight_bytes > 0);
    let mut cache = model.new_cache();
    assert_eq!(cache.bytes(), 0, "a new cache allocates nothing");
    cache.reserve(model.context_length()).unwrap();
    assert_eq!(info.kv_cache_bytes, cache.bytes());
    assert!(info.to_string().contains("lut2 g32"), "{info}");
}

/// Writes the tiny model of `spec` as `dir/name.gguf`.
fn tiny_file(dir: &std::path::Path, name: &str, spec: &TinyModelSpec) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    tiny_llama_gguf(&path, spec, 11).unwrap();
    path
}

#[test]
fn loads_a_gguf_exactly_requantized_and_in_reference_mode() {
    let dir = TempDir::new("llama-load");
    let path = tiny_file(&dir, "tiny", &TinyModelSpec::default());
    let exact = Model::load(&path, &options(true)).unwrap();
    let fast = Model::load(&path, &options(false)).unwrap();
    assert!(fast.tokenizer().is_some() && fast.chat_template().is_some());
    let vocab = fast.config().vocab_size;
    let tokens = prompt(12, vocab);
    let run = |m: &Model| last_logits(m, &tokens);
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
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let dir = TempDir::new("llama-bad");
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
}

/// Random blocks of `ty` for a `[rows][cols]` matrix: random bytes with each f16 field
/// `(byte offset, value)` of `fields` set (the block scales).
fn random_blocks(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    fields: &[(usize, f32)],
    seed: u64,
) -> Vec<u8> {
    let mut rng = lutra_kernels::measure::SplitMix64::new(seed);
    let blocks = rows * cols / ty.block_elems();
    let mut out = Vec::with_capacity(blocks * ty.block_bytes());
    for _ in 0..blocks {
        let mut block: Vec<u8> = (0..ty.block_bytes())
            .map(|_| rng.next_u64() as u8)
            .collect();
        for &(at, value) in fields {
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes());
        }
        out.extend(block);
    }
    out
}

#[test]
fn k_and_i_quant_models_load_exactly_into_their_kernels() {
    // The tiny model with every block matrix rewritten in one type, with random blocks (block
    // scales set to sizes that keep the weights near 1/√K): each loads into its kernel form, never
    // f32, and runs close to the reference (f32) path.
    let spec = TinyModelSpec {
        hidden: 256,
        ffn: 256,
        layers: 1,
        ..TinyModelSpec::default()
    };
    let dir = TempDir::new("llama-kquants");
    let tiny = tiny_file(&dir, "tiny", &spec);
    let file = crate::gguf::GgufFile::open(&tiny).unwrap();
    // (type, f16 fields as (byte offset, size relative to 1/√K), kernel form). Every block of a
    // tensor gets the same scales, so the loader may merge Q5_0/Q5_1 groups into wider ones.
    type Case = (GgmlType, &'static [(usize, f32)], &'static str);
    let cases: [Case; 16] = [
        (GgmlType::IQ4_NL, &[(0, 1.0 / 127.0)], "int8 iq4"),
        (GgmlType::IQ4_XS, &[(0, 1.0 / 4064.0)], "int8 iq4"),
        (
            GgmlType::Q2_K,
            &[(80, 1.0 / 45.0), (82, 1.0 / 45.0)],
            "lut2 g16 two-level",
        ),
        (GgmlType::Q3_K, &[(108, 1.0 / 128.0)], "lut3 g16 two-level"),
        (
            GgmlType::Q4_K,
            &[(0, 1.0 / 945.0), (2, 1.0 / 945.0)],
            "lut4 g32 two-level",
        ),
        (
            GgmlType::Q5_K,
            &[(0, 1.0 / 1953.0), (2, 1.0 / 1953.0)],
            "lut5 g32 two-level",
        ),
        (GgmlType::Q6_K, &[(208, 1.0 / 4096.0)], "lut6 g16 two-level"),
        (GgmlType::Q5_0, &[(0, 1.0 / 16.0)], "lut5 "),
        (GgmlType::Q5_1, &[(0, 1.0 / 31.0), (2, -0.5)], "lut5 "),
        (GgmlType::IQ2_XXS, &[(0, 1.0 / 50.0)], "int8"),
        (GgmlType::IQ2_XS, &[(0, 1.0 / 50.0)], "int8"),
        (GgmlType::IQ2_S, &[(0, 1.0 / 50.0)], "int8"),
        (GgmlType::IQ3_XXS, &[(0, 1.0 / 120.0)], "int8"),
        (GgmlType::IQ3_S, &[(0, 1.0 / 128.0)], "lut4 g32 two-level"),
        (GgmlType::IQ1_S, &[(0, 1.0 / 6.0)], "lut2 g32 two-level"),
        // IQ1_M's scale is spread over four nibbles; set below.
        (GgmlType::IQ1_M, &[], "lut5 g16 two-level"),
    ];
    for (ty, fields, kernel) in cases {
        let mut w = GgufWriter::new();
        for (key, value) in file.metadata_entries() {
            w.add_metadata(key, value.clone());
        }
        for (i, info) in file.tensors().iter().enumerate() {
            let (cols, rows) = (info.dims[0], info.elements() / info.dims[0]);
            let name = info.name.as_str();
            if !name.starts_with("blk.") || info.dims.len() == 1 {
                let data = file.tensor_data(name).unwrap().to_vec();
                w.add_tensor_raw(name, &info.dims, info.ty.id(), data)
                    .unwrap();
                continue;
            }
            let scale = 1.0 / (cols as f32).sqrt();
            let fields: Vec<(usize, f32)> = fields.iter().map(|&(at, f)| (at, f * scale)).collect();
            let mut data = random_blocks(ty, rows, cols, &fields, i as u64);
            if ty == GgmlType::IQ1_M {
                let d = half::f16::from_f32(scale / 6.0).to_bits();
                for block in data.chunks_exact_mut(ty.block_bytes()) {
                    // The high nibble of scale word j (bytes 48..56) is nibble j of d.
                    for j in 0..4 {
                        let nibble = ((d >> (4 * j)) & 0xF) as u8;
                        block[49 + 2 * j] = (block[49 + 2 * j] & 0x0F) | (nibble << 4);
                    }
                }
            }
            w.add_tensor_raw(name, &info.dims, ty.id(), data).unwrap();
        }
        let path = tiny.with_file_name(format!("{}.gguf", ty.name()));
        w.write(&path).unwrap();

        let fast = Model::load(&path, &options(false)).unwrap();
        let exact = Model::load(&path, &options(true)).unwrap();
        let info = fast.describe();
        assert!(
            info.tensor_types
                .iter()
                .any(|t| t.source == ty.name() && t.kernel.starts_with(kernel) && t.count == 7),
            "{}: {:?}",
            ty.name(),
            info.tensor_types
        );
        let prompt = prompt(8, fast.config().vocab_size);
        let (agree, _) = agreement_with_reference(&fast, &exact, &prompt);
        assert!(
            agree >= 6,
            "{}: top token agrees at {agree} of 8",
            ty.name()
        );
    }
}

#[test]
fn kernel_form_errors_name_the_file_and_the_tensor() {
    // A Q4_0 block scale of 60000 makes the offset −8·d overflow the kernel's f16 offsets: loading
    // must say which tensor of which file.
    let dir = TempDir::new("llama-q4-0");
    let mut w = GgufWriter::new();
    let s = |v: &str| MetaValue::String(v.to_string());
    let u = |v: usize| MetaValue::U32(v as u32);
    w.add_metadata("general.architecture", s("llama"));
    w.add_metadata("llama.block_count", u(1));
    w.add_metadata("llama.context_length", u(64));
    w.add_metadata("llama.embedding_length", u(256));
    w.add_metadata("llama.feed_forward_length", u(256));
    w.add_metadata("llama.attention.head_count", u(4));
    w.add_metadata("llama.attention.head_count_kv", u(2));
    w.add_metadata("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.add_metadata(
        "llama.attention.layer_norm_rms_epsilon",
        MetaValue::F32(1e-5),
    );
    w.add_metadata("llama.vocab_size", u(40));
    // 40 rows of 8 Q4_0 blocks (18 bytes): d, then 16 bytes of codes.
    let mut block: Vec<u8> = half::f16::from_f32(60000.0).to_le_bytes().to_vec();
    block.extend((0..16u8).map(|i| i.wrapping_mul(11)));
    let q4_0 = GgmlType::Q4_0;
    w.add_tensor_raw(
        "token_embd.weight",
        &[256, 40],
        q4_0.id(),
        block.repeat(8 * 40),
    )
    .unwrap();
    let path = dir.join("q4-0-embedding.gguf");
    w.write(&path).unwrap();
    let err = Model::load(&path, &options(false)).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, Error::TensorForm { tensor, ty, .. }
            if tensor == "token_embd.weight" && ty == "Q4_0"),
        "{err:?}"
    );
    let expected = format!("{}: tensor token_embd.weight (Q4_0): ", path.display());
    assert!(message.starts_with(&expected), "{message}");
}

#[test]
fn model_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Model>();
    shared::<KvCache>();
}

// ---- BitNet b1.58 ----

/// A tiny BitNet: hidden 256 and FFN 512 (TQ2_0 blocks are 256 wide), GQA 4/2.
fn tiny_bitnet_spec(layers: usize) -> TinyModelSpec {
    TinyModelSpec {
        hidden: 256,
        ffn: 512,
        layers,
        heads: 4,
        kv_heads: 2,
        context_length: 64,
        tied_embeddings: true,
        architecture: Architecture::BitNet,
        ..TinyModelSpec::default()
    }
}

/// The GGUF of [`tiny_bitnet_spec`], with TQ2_0 matrices, as `dir/name.gguf`.
fn tiny_bitnet_file(dir: &std::path::Path, name: &str, layers: usize) -> std::path::PathBuf {
    tiny_file(dir, name, &tiny_bitnet_spec(layers))
}

#[test]
fn bitnet_i2_s_file_gives_the_logits_of_the_same_weights_in_tq2_0() {
    // The same ternary weights in bitnet.cpp's I2_S (each tensor's scale inside it) and in TQ2_0
    // (block scales times a `.scale` tensor): the loaded weights are equal, so are the logits.
    let dir = TempDir::new("llama-bitnet-i2s");
    let tq2 = tiny_bitnet_file(&dir, "tq2_0", 2);
    let i2s_spec = TinyModelSpec {
        ternary_type: GgmlType::I2_S,
        ..tiny_bitnet_spec(2)
    };
    let i2s = tiny_file(&dir, "i2_s", &i2s_spec);
    let file = crate::gguf::GgufFile::open(&i2s).unwrap();
    let types = |ty: GgmlType| file.tensors().iter().filter(|t| t.ty == ty).count();
    assert_eq!((types(GgmlType::I2_S), types(GgmlType::TQ2_0)), (2 * 7, 0));
    assert!(file.tensors().iter().all(|t| !t.name.ends_with(".scale")));
    for reference in [false, true] {
        let (a, b) = (
            Model::load(&tq2, &options(reference)).unwrap(),
            Model::load(&i2s, &options(reference)).unwrap(),
        );
        let vocab = a.config().vocab_size;
        let tokens = prompt(7, vocab);
        let logits = |m: &Model| last_logits(m, &tokens);
        let want = logits(&a);
        assert!(want.iter().any(|&v| v != 0.0));
        assert_eq!(logits(&b), want, "reference: {reference}");
        if !reference {
            // Every I2_S matrix runs on the ternary kernel, as the TQ2_0 ones do.
            let info = b.describe();
            let i2s: Vec<_> = info
                .tensor_types
                .iter()
                .filter(|t| t.source == "I2_S")
                .collect();
            assert_eq!(i2s.iter().map(|t| t.count).sum::<usize>(), 2 * 7, "{info}");
            assert!(i2s.iter().all(|t| t.kernel == "ternary 1.67b"), "{info}");
        }
    }
}

/// `W·x` for a row-major `[rows][x.len()]` matrix.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn plain_rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * w).collect()
}

/// What to do differently from the file in [`plain_bitnet_forward`], to show each part matters.
#[derive(Clone, Copy)]
struct Variant {
    /// The FFN activation applied to the gate.
    act: fn(f32) -> f32,
    /// Replace the sub-norm weights by ones (the normalization itself stays).
    unit_sub_norms: bool,
}

fn relu_sq(g: f32) -> f32 {
    g.max(0.0) * g.max(0.0)
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// The logits of the last of `tokens`, computed from the file's tensors with plain f32 loops:
/// no kernels, no KV cache, no Rope tables; per-tensor `.scale`s multiplied in by hand.
fn plain_bitnet_forward(path: &std::path::Path, tokens: &[u32], v: Variant) -> Vec<f32> {
    let file = crate::gguf::GgufFile::open(path).unwrap();
    let c = ModelConfig::from_gguf(&file).unwrap();
    let tensor = |name: &str| file.decode_tensor(name).unwrap().dequantize();
    let matrix = |name: &str| {
        let mut w = tensor(&format!("{name}.weight"));
        if file.tensor_info(&format!("{name}.scale")).is_some() {
            let s = tensor(&format!("{name}.scale"))[0];
            w.iter_mut().for_each(|x| *x *= s);
        }
        w
    };
    let (h, hd, eps) = (c.hidden_size, c.head_dim, c.rms_eps);
    let group = c.heads / c.kv_heads;
    let embd = tensor("token_embd.weight");
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| embd[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    // RoPE on the halves of a head (ggml's NEOX, as for BitNet GGUFs), angle pos·θ^(−2i/d).
    let rope = |x: &mut [f32], pos: usize| {
        for head in x.chunks_exact_mut(hd) {
            for i in 0..hd / 2 {
                let angle = pos as f64 * (c.rope_theta as f64).powf(-2.0 * i as f64 / hd as f64);
                let (cos, sin) = (angle.cos() as f32, angle.sin() as f32);
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * cos - b * sin;
                head[i + hd / 2] = a * sin + b * cos;
            }
        }
    };
    let sub_norm = |name: &str| {
        let w = tensor(name);
        if v.unit_sub_norms {
            vec![1.0; w.len()]
        } else {
            w
        }
    };
    for l in 0..c.layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        let (wq, wk, wv, wo) = (
            matrix(&p("attn_q")),
            matrix(&p("attn_k")),
            matrix(&p("attn_v")),
            matrix(&p("attn_output")),
        );
        let attn_norm = tensor(&p("attn_norm.weight"));
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let xn = plain_rmsnorm(x, &attn_norm, eps);
            let (mut q, mut k) = (matvec(&wq, &xn), matvec(&wk, &xn));
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &xn));
        }
        let attn_sub = sub_norm(&p("attn_sub_norm.weight"));
        for pos in 0..xs.len() {
            let mut att = vec![0.0f32; c.heads * hd];
            for head in 0..c.heads {
                let kv = head / group;
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f32> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][kv * hd..(kv + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        att[head * hd + d] += ej / sum * vs[j][kv * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &plain_rmsnorm(&att, &attn_sub, eps));
            xs[pos].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
        let (wg, wu, wd) = (
            matrix(&p("ffn_gate")),
            matrix(&p("ffn_up")),
            matrix(&p("ffn_down")),
        );
        let (ffn_norm, ffn_sub) = (
            tensor(&p("ffn_norm.weight")),
            sub_norm(&p("ffn_sub_norm.weight")),
        );
        for x in xs.iter_mut() {
            let xn = plain_rmsnorm(x, &ffn_norm, eps);
            let (g, u) = (matvec(&wg, &xn), matvec(&wu, &xn));
            let hidden: Vec<f32> = g.iter().zip(&u).map(|(g, u)| (v.act)(*g) * u).collect();
            let d = matvec(&wd, &plain_rmsnorm(&hidden, &ffn_sub, eps));
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
    }
    let last = plain_rmsnorm(xs.last().unwrap(), &tensor("output_norm.weight"), c.rms_eps);
    matvec(&embd, &last)
}

#[test]
fn bitnet_gguf_loads_with_sub_norms_and_fast_path_agrees_with_reference() {
    let dir = TempDir::new("llama-bitnet-load");
    let path = tiny_bitnet_file(&dir, "bitnet", 2);
    let exact = Model::load(&path, &options(true)).unwrap();
    let fast = Model::load(&path, &options(false)).unwrap();
    let c = fast.config();
    assert_eq!(c.architecture, Architecture::BitNet);
    assert_eq!(c.ffn_activation, FfnActivation::ReluSquared);
    assert_eq!(c.rope_style, RopeStyle::Halves);
    assert!(fast
        .layers
        .iter()
        .all(|l| l.attn_sub_norm.as_ref().map(Vec::len) == Some(256)
            && l.ffn_sub_norm.as_ref().map(Vec::len) == Some(512)));
    // TQ2_0 stores the tensor's one scale in every 256-block: the loader makes it one group per
    // row, so the ternary kernel can take it; 32-wide groups would be a sign it did not.
    let info = fast.describe();
    let tq2: Vec<_> = info
        .tensor_types
        .iter()
        .filter(|t| t.source == "TQ2_0")
        .collect();
    assert_eq!(tq2.iter().map(|t| t.count).sum::<usize>(), 2 * 7);
    assert!(
        tq2.iter()
            .all(|t| !t.kernel.contains("g32") && t.kernel != "f32"),
        "{info}"
    );

    let vocab = c.vocab_size;
    // The tables quantize activations to int8 per 32 (BitNet itself: per token).
    let (agree, _) = agreement_with_reference(&fast, &exact, &prompt(16, vocab));
    assert!(agree >= 14, "top-1 agreed at {agree} of 16 positions");
}

#[test]
fn bitnet_blocks_match_plain_f32_loops_with_sub_norms_and_squared_relu() {
    let dir = TempDir::new("llama-bitnet-plain");
    let path = tiny_bitnet_file(&dir, "bitnet", 2);
    let model = Model::load(&path, &options(true)).unwrap();
    let vocab = model.config().vocab_size;
    let tokens = prompt(5, vocab);
    let mut logits = vec![0.0; vocab];
    model
        .forward(&tokens, &mut model.new_cache(), &mut logits)
        .unwrap();
    let plain = |act, unit_sub_norms| {
        plain_bitnet_forward(
            &path,
            &tokens,
            Variant {
                act,
                unit_sub_norms,
            },
        )
    };
    let want = plain(relu_sq as fn(f32) -> f32, false);
    let err = rel_error(&logits, &want);
    assert!(err < 1e-4, "model vs plain loops: relative error {err}");
    // Each BitNet ingredient changes the answer well beyond that tolerance, so the match above
    // could not hold with SiLU or with the sub-norm weights ignored.
    let with_silu = rel_error(&logits, &plain(silu, false));
    assert!(
        with_silu > 1e-2,
        "SiLU gives nearly the same logits: {with_silu}"
    );
    let unit_norms = rel_error(&logits, &plain(relu_sq, true));
    assert!(
        unit_norms > 1e-2,
        "sub-norm weights do not matter: {unit_norms}"
    );
}

#[test]
fn bitnet_named_file_runs_swiglu_as_llama_cpp_does() {
    // llama.cpp's `bitnet` graph gates its FFN with SiLU (Microsoft's `bitnet-b1.58` squares
    // ReLU); both rotate head halves.
    let spec = TinyModelSpec {
        gguf_name: Some("bitnet"),
        ..tiny_bitnet_spec(2)
    };
    let dir = TempDir::new("llama-bitnet-swiglu");
    let path = tiny_file(&dir, "bitnet-swiglu", &spec);
    let file = crate::gguf::GgufFile::open(&path).unwrap();
    assert_eq!(
        file.metadata("general.architecture"),
        Some(&MetaValue::String("bitnet".into()))
    );
    assert_eq!(
        file.tensors()
            .iter()
            .filter(|t| t.name.ends_with(".scale"))
            .count(),
        2 * 7
    );
    let model = Model::load(&path, &options(true)).unwrap();
    let c = model.config();
    assert_eq!(c.architecture, Architecture::BitNet);
    assert_eq!(c.ffn_activation, FfnActivation::Silu);
    assert_eq!(c.rope_style, RopeStyle::Halves);
    let tokens = prompt(5, c.vocab_size);
    let mut logits = vec![0.0; c.vocab_size];
    model
        .forward(&tokens, &mut model.new_cache(), &mut logits)
        .unwrap();
    let plain = |act| {
        let v = Variant {
            act,
            unit_sub_norms: false,
        };
        rel_error(&logits, &plain_bitnet_forward(&path, &tokens, v))
    };
    let err = plain(silu as fn(f32) -> f32);
    assert!(
        err < 1e-4,
        "model vs plain SwiGLU loops: relative error {err}"
    );
    let with_relu_sq = plain(relu_sq);
    assert!(
        with_relu_sq > 1e-2,
        "squared ReLU gives nearly the same logits: {with_relu_sq}"
    );

    // A name of another architecture is refused, naming the key.
    let wrong = TinyModelSpec {
        gguf_name: Some("qwen3"),
        ..spec
    };
    let err = tiny_llama_gguf(&path.with_file_name("wrong.gguf"), &wrong, 11)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("general.architecture") && err.contains("'qwen3'"),
        "{err}"
    );
}

#[test]
fn tq2_0_groups_become_per_row_exactly() {
    use crate::weights::DecodedTensor;
    // Row 0: two groups with scale 0.5; row 1: an all-zero group (scale 0, any codes) and 0.25.
    let codes: Vec<u8> = (0..128).map(|i| (i * 7 % 3) as u8).collect();
    let t = DecodedTensor::LowBit {
        rows: 2,
        cols: 64,
        bits: 2,
        group_size: 32,
        codes,
        scales: vec![0.5, 0.5, 0.0, 0.25],
        offsets: vec![-0.5, -0.5, 0.0, -0.25],
    };
    let values = t.dequantize();
    let per_row = super::load::per_row_if_uniform(t.clone());
    match &per_row {
        DecodedTensor::LowBit {
            group_size,
            scales,
            offsets,
            codes,
            ..
        } => {
            assert_eq!(*group_size, 64);
            assert_eq!(
                (scales.as_slice(), offsets.as_slice()),
                (&[0.5, 0.25][..], &[-0.5, -0.25][..])
            );
            assert!(codes[64..96].iter().all(|&q| q == 1));
        }
        other => panic!("expected low-bit, got {other:?}"),
    }
    assert_eq!(per_row.dequantize(), values);
    // Different scales within a row stay as they are.
    let mut mixed = t;
    if let DecodedTensor::LowBit {
        scales, offsets, ..
    } = &mut mixed
    {
        scales[1] = 0.75;
        offsets[1] = -0.75;
    }
    assert_eq!(super::load::per_row_if_uniform(mixed.clone()), mixed);
    // A folded tensor scale keeps the ternary form: offset = −scale.
    let mut scaled = per_row;
    super::load::scale_tensor(&mut scaled, 2.0);
    assert_eq!(
        scaled.dequantize(),
        values.iter().map(|v| v * 2.0).collect::<Vec<_>>()
    );
}

/// A small BitNet configuration for synthetic models (head group 128 divides the hidden size).
fn tiny_bitnet_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::BitNet,
        hidden_size: 256,
        ffn_size: 512,
        head_dim: 64,
        rope_dims: 64,
        ffn_activation: FfnActivation::ReluSquared,
        sliding_window: None,
        embedding_scale: 1.0,
        logit_softcap: None,
        ..tiny_config()
    }
}

const TERNARY_SPEC: SyntheticSpec = SyntheticSpec {
    layers: SyntheticWeights::Ternary,
    head: SyntheticWeights::LowBit {
        bits: 4,
        group_size: 128,
    },
};

#[test]
fn synthetic_bitnet_has_ternary_layers_sub_norms_and_a_low_bit_head() {
    let fast =
        synthetic_model_with(tiny_bitnet_config(), TERNARY_SPEC, &options(false), 9).unwrap();
    let exact =
        synthetic_model_with(tiny_bitnet_config(), TERNARY_SPEC, &options(true), 9).unwrap();
    let info = fast.describe();
    let count = |source: &str| -> usize {
        info.tensor_types
            .iter()
            .filter(|t| t.source == source)
            .map(|t| t.count)
            .sum()
    };
    assert_eq!(count("ternary"), 2 * 7, "{info}");
    // Embedding (tied head) + 2 layers · 4 norms + final norm.
    assert_eq!(count("low-bit 4b g128"), 1, "{info}");
    assert_eq!(count("f32"), 2 * 4 + 1, "{info}");
    assert!(
        info.tensor_types.iter().any(|t| t.kernel == "lut4 g128"),
        "{info}"
    );
    assert!(fast
        .layers
        .iter()
        .all(|l| l.attn_sub_norm.is_some() && l.ffn_sub_norm.is_some()));

    let vocab = fast.config().vocab_size;
    let tokens = prompt(20, vocab);
    let run = |m: &Model| last_logits(m, &tokens);
    let (f, r) = (run(&fast), run(&exact));
    assert!(r.iter().all(|v| v.is_finite()));
    let spread =
        r.iter().cloned().fold(f32::MIN, f32::max) - r.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 0.5, "degenerate logits: spread {spread}");
    let err = rel_error(&f, &r);
    assert!(err < 0.05, "relative error {err}");

    // A ternary-looking config without BitNet's architecture has no sub-norms.
    let llama = ModelConfig {
        architecture: Architecture::Llama,
        ..tiny_bitnet_config()
    };
    let plain = synthetic_model_with(llama, TERNARY_SPEC, &options(false), 9).unwrap();
    assert!(plain.layers.iter().all(|l| l.attn_sub_norm.is_none()));
}

#[test]
fn synthetic_bitnet_2b_shape_builds_as_bitnet() {
    // BitNet b1.58 2B-4T's matrices (`synthetic:bitnet-2b` of `lutra bench`); one layer and a
    // small vocabulary keep it quick.
    let config = ModelConfig {
        architecture: Architecture::BitNet,
        name: "bitnet-2b".into(),
        hidden_size: 2560,
        ffn_size: 6912,
        layers: 1,
        heads: 20,
        kv_heads: 5,
        head_dim: 128,
        vocab_size: 1024,
        context_length: 4096,
        rope_theta: 500_000.0,
        rope_dims: 128,
        ffn_activation: FfnActivation::ReluSquared,
        sliding_window: None,
        embedding_scale: 1.0,
        logit_softcap: None,
        ..tiny_config()
    };
    let spec = TERNARY_SPEC;
    let model = synthetic_model_with(config.clone(), spec, &options(false), 1).unwrap();
    let c = model.config();
    assert_eq!(c, &config);
    assert_eq!(c.architecture, Architecture::BitNet);
    assert_eq!(
        (c.hidden_size, c.ffn_size, c.heads, c.kv_heads, c.head_dim),
        (2560, 6912, 20, 5, 128)
    );
    let l = &model.layers[0];
    assert_eq!((l.wq.rows(), l.wq.cols(), l.wk.rows()), (2560, 2560, 640));
    assert_eq!((l.w_gate.rows(), l.w_down.cols()), (6912, 6912));
    assert_eq!(l.attn_sub_norm.as_ref().map(Vec::len), Some(2560));
    assert_eq!(l.ffn_sub_norm.as_ref().map(Vec::len), Some(6912));
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

#[test]
fn sub_norms_must_match_the_architecture() {
    let config = tiny_bitnet_config();
    let model = synthetic_model_with(config.clone(), TERNARY_SPEC, &options(true), 2).unwrap();
    let mut parts_layers = model.layers;
    parts_layers[1].ffn_sub_norm = None;
    let head = Linear::from_decoded(
        &crate::weights::DecodedTensor::Dense {
            rows: config.vocab_size,
            cols: 256,
            values: vec![0.0; config.vocab_size * 256],
        },
        true,
    )
    .unwrap();
    let parts = ModelParts {
        config,
        embedding: head,
        layers: parts_layers,
        output_norm: vec![1.0; 256],
        output: None,
        tensors: vec![],
        tokenizer: None,
        chat_template: None,
    };
    let err = Model::from_parts(parts, &options(true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 1") && err.contains("sub-norm"), "{err}");
}

// ---- Architectures of the table ----

/// The tiny model of `architecture` that `tests/data/architectures` holds (seed 11).
fn tiny_arch_spec(architecture: Architecture) -> TinyModelSpec {
    let base = TinyModelSpec {
        architecture,
        ..TinyModelSpec::default()
    };
    match architecture {
        Architecture::Qwen3 => TinyModelSpec {
            head_dim: Some(32),
            tied_embeddings: false,
            ..base
        },
        Architecture::Gemma3 => TinyModelSpec {
            head_dim: Some(32),
            sliding_window: Some(8),
            logit_softcap: Some(5.0),
            ..base
        },
        Architecture::Phi3 => TinyModelSpec {
            tied_embeddings: false,
            ..base
        },
        _ => base,
    }
}

#[test]
fn qwen3_gemma3_phi3_load_by_the_table_and_agree_with_reference() {
    for arch in [
        Architecture::Qwen3,
        Architecture::Gemma3,
        Architecture::Phi3,
    ] {
        let spec = tiny_arch_spec(arch);
        let dir = TempDir::new(&format!("llama-arch-{arch:?}"));
        let path = tiny_file(&dir, "tiny", &spec);
        let exact = Model::load(&path, &options(true)).unwrap();
        let fast = Model::load(&path, &options(false)).unwrap();
        let c = fast.config();
        assert_eq!(c.architecture, arch);
        assert_eq!(c.head_dim, spec.head_dim());
        assert_eq!(c.rope_style, RopeStyle::Halves, "{arch:?}");
        let layer = &fast.layers[1];
        let qk_norms = matches!(arch, Architecture::Qwen3 | Architecture::Gemma3);
        assert_eq!(
            layer.q_norm.as_ref().map(Vec::len),
            qk_norms.then_some(c.head_dim)
        );
        assert_eq!(
            layer.k_norm.as_ref().map(Vec::len),
            qk_norms.then_some(c.head_dim)
        );
        let gemma = arch == Architecture::Gemma3;
        assert_eq!(layer.attn_post_norm.is_some(), gemma);
        assert_eq!(layer.ffn_post_norm.is_some(), gemma);
        assert!(layer.bq.is_none() && layer.attn_sub_norm.is_none());
        // Phi-3's stacked matrices are split into the usual shapes.
        assert_eq!(
            (layer.wq.rows(), layer.wk.rows(), layer.wv.rows()),
            (
                c.heads * c.head_dim,
                c.kv_heads * c.head_dim,
                c.kv_heads * c.head_dim
            )
        );
        assert_eq!(
            (layer.w_gate.rows(), layer.w_up.rows()),
            (c.ffn_size, c.ffn_size)
        );
        if gemma {
            assert_eq!(c.ffn_activation, FfnActivation::GeluTanh);
            assert_eq!(c.embedding_scale, (c.hidden_size as f32).sqrt());
            assert_eq!(c.logit_softcap, Some(5.0));
            let w = c.sliding_window.as_ref().unwrap();
            assert_eq!((w.size, &w.local_layers[..]), (8, &[true, false][..]));
            assert_eq!(
                (w.local_rope_theta, c.rope_theta),
                (Some(10000.0), 1_000_000.0)
            );
            // Gemma 3 files carry no chat template of their own here: the table's is used.
            assert!(fast.chat_template().is_some());
        } else {
            assert!(c.sliding_window.is_none() && c.logit_softcap.is_none());
            assert_eq!(c.embedding_scale, 1.0);
        }
        let vocab = c.vocab_size;
        let (agree, reference) = agreement_with_reference(&fast, &exact, &prompt(20, vocab));
        assert!(
            agree >= 17,
            "{arch:?}: top-1 agreed at {agree} of 20 positions"
        );
        if gemma {
            assert!(reference.iter().all(|v| v.abs() <= 5.0));
        }
        // Prefill in one batch and decode one token at a time give the same logits (the window
        // and the local RoPE table apply to both paths).
        let tokens = prompt(24, vocab);
        let mut batched = vec![0.0; tokens.len() * vocab];
        exact
            .forward_all(&tokens, &mut exact.new_cache(), &mut batched)
            .unwrap();
        let err = rel_error(&batched, &decode_one_by_one(&exact, &tokens));
        assert!(err < 1e-5, "{arch:?}: batched vs one by one {err}");
    }
}

/// Logits of the last position of `tokens`, in a fresh cache.
fn last_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut out = vec![0.0; model.config().vocab_size];
    model
        .forward(tokens, &mut model.new_cache(), &mut out)
        .unwrap();
    out
}

/// Logits of every position of `tokens` in one batch.
fn all_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut out = vec![0.0; tokens.len() * model.config().vocab_size];
    model
        .forward_all(tokens, &mut model.new_cache(), &mut out)
        .unwrap();
    out
}

#[test]
fn sliding_window_limits_what_every_layer_sees() {
    let spec = |window| TinyModelSpec {
        sliding_window: window,
        ..TinyModelSpec::default()
    };
    let dir = TempDir::new("llama-swa");
    let load = |name: &str, window| {
        Model::load(&tiny_file(&dir, name, &spec(window)), &options(true)).unwrap()
    };
    let full = load("none", None);
    let windowed = load("window-16", Some(16));
    let w = windowed.config().sliding_window.as_ref().unwrap();
    assert_eq!(
        (w.size, w.local_layers.len(), w.local_rope_theta),
        (16, 2, None)
    );
    assert!(w.local_layers.iter().all(|&l| l));
    let vocab = full.config().vocab_size;
    let tokens = prompt(40, vocab);
    let (a, b) = (all_logits(&full, &tokens), all_logits(&windowed, &tokens));
    // The first 16 positions see all they would see anyway; later ones lose the oldest.
    for t in 0..tokens.len() {
        let err = rel_error(&b[t * vocab..][..vocab], &a[t * vocab..][..vocab]);
        if t < 16 {
            assert_eq!(err, 0.0, "position {t}");
        } else {
            assert!(
                err > 1e-3,
                "position {t}: the window changed nothing ({err})"
            );
        }
    }
    assert_eq!(b, decode_one_by_one(&windowed, &tokens));

    // A window of one: each token attends only to itself, whose RoPE angle cancels in q·k, so
    // every position's logits are those of the token alone at position 0.
    let one = load("window-1", Some(1));
    let logits = all_logits(&one, &tokens);
    for (t, &token) in tokens.iter().enumerate() {
        let alone = all_logits(&one, &[token]);
        let err = rel_error(&logits[t * vocab..][..vocab], &alone);
        assert!(err < 1e-5, "position {t}: {err}");
    }
}

#[test]
fn a_block_stopped_at_an_input_sees_its_rows_and_none_after() {
    use calibrate::MatrixInput;
    // Two batches: the second one's attention reads the keys and values the first stored.
    let model = synthetic_model(tiny_config(), 4, 32, &options(true), 5).unwrap();
    let tokens = prompt(MAX_BATCH + 36, model.config().vocab_size);
    let x = model.embed_tokens(&tokens).unwrap();
    for (i, stop_at) in MatrixInput::ALL.into_iter().enumerate() {
        // The rows of `stop_at`, and the later inputs seen, in a run that stops there or not.
        let run = |runner: &mut calibrate::BlockRunner, stop: bool| {
            let (mut seen, mut later) = (Vec::new(), Vec::new());
            let mut observe = |input, rows: &[f32]| {
                if input == stop_at {
                    seen.extend_from_slice(rows);
                    if stop {
                        return ControlFlow::Break(());
                    }
                } else if MatrixInput::ALL[i..].contains(&input) {
                    later.push(input);
                }
                ControlFlow::Continue(())
            };
            let mut y = x.clone();
            model
                .run_block(runner, 1, &mut y, Some(&mut observe))
                .unwrap();
            (seen, later)
        };
        // The stopped run first, on a fresh cache: no full run stored keys and values for it.
        let mut runner = model.block_runner(tokens.len());
        let (stopped, later) = run(&mut runner, true);
        let (full, _) = run(&mut runner, false);
        assert_eq!(full.len(), tokens.len() * model.input_width(1, stop_at));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&stopped), bits(&full), "{stop_at:?}");
        assert!(later.is_empty(), "{stop_at:?}: then saw {later:?}");
    }
}

#[test]
fn a_block_resumed_at_each_input_gives_the_whole_run() {
    use crate::rotation::InputRotation;
    use calibrate::MatrixInput;
    // Two batches, and rotated inputs: a resumed run rotates the rows it is handed.
    let mut model = synthetic_model(tiny_config(), 4, 32, &options(true), 5).unwrap();
    for input in [MatrixInput::Output, MatrixInput::Down] {
        let r = InputRotation::random(model.input_width(1, input), 9).unwrap();
        model.set_input_rotation(1, input, r).unwrap();
    }
    let tokens = prompt(MAX_BATCH + 36, model.config().vocab_size);
    let x = model.embed_tokens(&tokens).unwrap();
    let mut runner = model.block_runner(tokens.len());
    let mut whole = x.clone();
    model.run_block(&mut runner, 1, &mut whole, None).unwrap();
    // Every chain of stops: each run resumes where the one before broke.
    for skip in 0..MatrixInput::ALL.len() {
        let (mut from, mut rows, mut residual) = (MatrixInput::Attention, Vec::new(), x.clone());
        for stop_at in MatrixInput::ALL.into_iter().filter(|i| i.index() != skip) {
            let mut seen = Vec::new();
            let mut observe = |input, r: &[f32]| {
                if input == stop_at {
                    seen.extend_from_slice(r);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            };
            model
                .run_block_from(
                    &mut runner,
                    1,
                    from,
                    &rows,
                    &mut residual,
                    Some(&mut observe),
                )
                .unwrap();
            assert_eq!(seen.len(), tokens.len() * model.input_width(1, stop_at));
            (from, rows) = (stop_at, seen);
        }
        model
            .run_block_from(&mut runner, 1, from, &rows, &mut residual, None)
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&residual), bits(&whole), "without stop {skip}");
    }
    // Rows of the wrong length are refused.
    let mut y = x.clone();
    let e = model
        .run_block_from(&mut runner, 1, MatrixInput::Ffn, &x[1..], &mut y, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Ffn"), "{e}");
}

#[test]
fn blocks_run_one_at_a_time_give_the_forward_pass() {
    // MAX_BATCH + 36 tokens: run_block cuts them into batches of MAX_BATCH, like the forward pass.
    let model = synthetic_model(tiny_config(), 4, 32, &options(true), 5).unwrap();
    let (vocab, h) = (model.config().vocab_size, model.config().hidden_size);
    let tokens = prompt(MAX_BATCH + 36, vocab);
    let mut logits = vec![0.0; vocab];
    model
        .forward(&tokens, &mut model.new_cache(), &mut logits)
        .unwrap();

    let mut x = model.embed_tokens(&tokens).unwrap();
    let mut runner = model.block_runner(tokens.len());
    let mut seen = Vec::new();
    for layer in 0..model.block_count() {
        let mut observe = |input, rows: &[f32]| {
            seen.push((layer, input, rows.len()));
            ControlFlow::Continue(())
        };
        model
            .run_block(&mut runner, layer, &mut x, Some(&mut observe))
            .unwrap();
    }
    // Each of the four inputs of each block, in two batches (MAX_BATCH + 36 rows).
    assert_eq!(seen.len(), 2 * 4 * 2);
    assert!(seen.contains(&(1, calibrate::MatrixInput::Down, 36 * 128)));
    let last = &x[(tokens.len() - 1) * h..];
    let mut normed = vec![0.0; h];
    forward::rmsnorm(
        &model.cpu,
        &mut normed,
        last,
        &model.output_norm,
        model.config.rms_eps,
    );
    let head = model.output.as_ref().unwrap_or(&model.embedding);
    let mut row = vec![0.0; h];
    let mine: Vec<f32> = (0..vocab)
        .map(|v| {
            head.row(v, &mut row).unwrap();
            row.iter().zip(&normed).map(|(a, b)| a * b).sum()
        })
        .collect();
    let err = rel_error(&mine, &logits);
    assert!(err < 1e-4, "relative error {err}");
}

#[test]
fn a_block_matrix_is_replaced_only_by_one_of_its_shape() {
    let mut model = synthetic_model(tiny_config(), 4, 32, &options(false), 6).unwrap();
    let (vocab, h) = (model.config().vocab_size, model.config().hidden_size);
    let tokens = prompt(10, vocab);
    let run = |m: &Model| last_logits(m, &tokens);
    let before = run(&model);
    let wrong = Linear::from_decoded(
        &crate::quantize::quantize_rtn(h + 32, h, &vec![0.5; (h + 32) * h], 2, 32).unwrap(),
        false,
    )
    .unwrap();
    let err = model
        .replace_block_matrix(1, calibrate::BlockMatrix::Q, wrong)
        .unwrap_err();
    assert!(err.to_string().contains("blk.1.attn_q.weight"), "{err}");
    let zeros = Linear::from_decoded(
        &crate::quantize::quantize_rtn(h, h, &vec![0.0; h * h], 2, 32).unwrap(),
        false,
    )
    .unwrap();
    model
        .replace_block_matrix(1, calibrate::BlockMatrix::O, zeros)
        .unwrap();
    assert_ne!(run(&model), before);
}

/// Three sequences at different depths in one batch (a prefill chunk between two decode steps)
/// give each the logits it gets alone, and fill each cache as running alone does.
#[test]
fn sequences_batched_together_equal_each_alone() {
    for (reference, threads) in [(true, 1), (false, 1), (false, 2)] {
        let opts = LoadOptions {
            threads,
            ..options(reference)
        };
        let model = synthetic_model(tiny_config(), 4, 32, &opts, 11).unwrap();
        let vocab = model.config().vocab_size;
        let histories = [prompt(9, vocab), prompt(1, vocab), prompt(30, vocab)];
        // The middle step is a prompt, multiplied on the dot path where the CPU has one (it then
        // runs first in the batch), the others single sampled tokens, as `forward` takes them
        // alone: each must equal its own run alone.
        let steps: [Vec<u32>; 3] = [vec![5], (7..27).collect(), vec![42]];
        let mut alone = Vec::new();
        let mut caches = Vec::new();
        for (history, step) in histories.iter().zip(&steps) {
            let mut cache = model.new_cache();
            let mut logits = vec![0.0; vocab];
            model.forward(history, &mut cache, &mut logits).unwrap();
            caches.push(cache.clone());
            model.forward(step, &mut cache, &mut logits).unwrap();
            alone.push(logits);
        }
        let mut again = caches.clone();
        let [c0, c1, c2] = &mut caches[..] else {
            unreachable!()
        };
        let mut seqs = [
            SequenceBatch {
                tokens: &steps[0],
                cache: c0,
                logits: true,
                prompt: false,
            },
            SequenceBatch {
                tokens: &steps[1],
                cache: c1,
                logits: true,
                prompt: true,
            },
            SequenceBatch {
                tokens: &steps[2],
                cache: c2,
                logits: true,
                prompt: false,
            },
        ];
        let mut logits = vec![0.0; 3 * vocab];
        model.forward_sequences(&mut seqs, &mut logits).unwrap();
        for (got, want) in logits.chunks_exact(vocab).zip(&alone) {
            let err = rel_error(got, want);
            assert!(
                err < 1e-4,
                "reference {reference}, {threads} threads: {err}"
            );
        }
        let lens: Vec<usize> = caches.iter().map(KvCache::len).collect();
        assert_eq!(lens, [10, 21, 31]);
        // The same step again without the prompt's logits: the others' rows still come in the
        // callers' order.
        let mut seqs: Vec<SequenceBatch<'_>> = (steps.iter().zip(&mut again).enumerate())
            .map(|(i, (tokens, cache))| SequenceBatch {
                tokens,
                cache,
                logits: i != 1,
                prompt: i == 1,
            })
            .collect();
        let mut two = vec![0.0; 2 * vocab];
        model.forward_sequences(&mut seqs, &mut two).unwrap();
        for (got, want) in two.chunks_exact(vocab).zip([&alone[0], &alone[2]]) {
            assert!(rel_error(got, want) < 1e-4);
        }
        // The middle sequence's cache now holds its step: its next token matches running alone.
        let mut next = vec![0.0; vocab];
        model.forward(&[3], &mut caches[1], &mut next).unwrap();
        let mut cache = model.new_cache();
        let mut want = vec![0.0; vocab];
        for part in [&histories[1][..], &steps[1], &[3]] {
            model.forward(part, &mut cache, &mut want).unwrap();
        }
        assert!(rel_error(&next, &want) < 1e-4);
    }
}

#[test]
fn batched_sequences_are_checked() {
    let model = synthetic_model(tiny_config(), 4, 32, &options(false), 11).unwrap();
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache();
    let long = prompt(MAX_BATCH + 1, vocab);
    let mut logits = vec![0.0; vocab];
    let too_many = model.forward_sequences(
        &mut [SequenceBatch {
            tokens: &long,
            cache: &mut cache,
            logits: true,
            prompt: true,
        }],
        &mut logits,
    );
    assert!(matches!(too_many, Err(Error::InvalidOption(m)) if m.contains("at most")));
    let wrong_logits = model.forward_sequences(
        &mut [SequenceBatch {
            tokens: &[1, 2],
            cache: &mut cache,
            logits: false,
            prompt: true,
        }],
        &mut logits,
    );
    assert!(matches!(wrong_logits, Err(Error::InvalidOption(m)) if m.contains("logits")));
    let bad_token = model.forward_sequences(
        &mut [SequenceBatch {
            tokens: &[vocab as u32],
            cache: &mut cache,
            logits: true,
            prompt: true,
        }],
        &mut logits,
    );
    assert!(matches!(bad_token, Err(Error::InvalidOption(m)) if m.contains("vocabulary")));
    assert_eq!(cache.len(), 0);
}

/// Forward passes on several threads at once (each with its own cache) give what one gives alone:
/// each takes its own scratch, and the worker pool serves one dispatch at a time.
#[test]
fn concurrent_forwards_do_not_share_scratch() {
    let opts = LoadOptions {
        threads: 2,
        ..options(false)
    };
    let model = synthetic_model(tiny_config(), 4, 32, &opts, 13).unwrap();
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(20 + 13 * i, vocab)).collect();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut logits = vec![0.0; vocab];
            model
                .forward(p, &mut model.new_cache(), &mut logits)
                .unwrap();
            logits
        })
        .collect();
    std::thread::scope(|s| {
        for (p, want) in prompts.iter().zip(&alone) {
            let model = &model;
            s.spawn(move || {
                for _ in 0..10 {
                    let mut logits = vec![0.0; vocab];
                    model
                        .forward(p, &mut model.new_cache(), &mut logits)
                        .unwrap();
                    assert_eq!(&logits, want);
                }
            });
        }
    });
}
