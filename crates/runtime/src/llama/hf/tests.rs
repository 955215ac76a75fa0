//! Tests of loading Hugging Face folders: the same weights as GGUF and as a folder give the same
//! logits; GPTQ and BitNet folders decode to the weights they mean.

use std::path::{Path, PathBuf};

use lutra_kernels::measure::SplitMix64;
use serde_json::Value;

use super::*;
use crate::chat::Message;
use crate::config::Architecture;
use crate::fixtures::{
    gguf_to_hf_folder, tiny_llama_gguf, write_safetensors, GgufWriter, TempDir, TensorData,
    TinyModelSpec,
};
use crate::safetensors::tests::{gptq_layer, GroupOrder};
use crate::safetensors::SINGLE_FILE;

const LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn options(reference: bool) -> LoadOptions {
    LoadOptions {
        threads: 1,
        reference,
        ..LoadOptions::default()
    }
}

/// A tiny random GGUF and the same model converted to an F32 Hugging Face folder, in a
/// temporary folder (removed with the returned guard).
fn tiny_pair(tag: &str, spec: &TinyModelSpec) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(&format!("hf-{tag}"));
    let gguf = dir.join("tiny.gguf");
    tiny_llama_gguf(&gguf, spec, 42).unwrap();
    let folder = dir.join("hf");
    gguf_to_hf_folder(&gguf, &folder, Dtype::F32).unwrap();
    (dir, gguf, folder)
}

/// Logits of every position of `tokens`.
fn logits_all(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut logits = vec![0.0; tokens.len() * model.config().vocab_size];
    model.forward_all(tokens, &mut cache, &mut logits).unwrap();
    logits
}

fn rel_error(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 5) % vocab) as u32).collect()
}

#[test]
fn qwen3_folder_reads_q_and_k_norms_by_the_table() {
    let spec = TinyModelSpec {
        architecture: Architecture::Qwen3,
        head_dim: Some(32),
        ..TinyModelSpec::default()
    };
    let (_tmp, gguf, folder) = tiny_pair("qwen3", &spec);
    let a = Model::load(&gguf, &options(true)).unwrap();
    let b = Model::load(&folder, &options(true)).unwrap();
    assert_eq!(b.config().architecture, Architecture::Qwen3);
    assert_eq!(b.config().head_dim, 32);
    assert!(b
        .layers
        .iter()
        .all(|l| l.q_norm.is_some() && l.k_norm.is_some()));
    let toks = tokens(12, spec.vocab_size());
    let err = rel_error(&logits_all(&b, &toks), &logits_all(&a, &toks));
    assert!(err < 1e-5, "relative error {err}");
    // Without its q/k norms the folder is refused, naming the tensor.
    let broken = folder.with_file_name("no-norm");
    rewrite(
        &folder,
        &broken,
        |_| {},
        |t| match t.name.as_str() {
            "model.layers.1.self_attn.k_norm.weight" => vec![],
            _ => vec![t],
        },
    );
    let err = Model::load(&broken, &options(true))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.self_attn.k_norm.weight"),
        "{err}"
    );
}

#[test]
fn folder_and_gguf_give_the_same_logits_and_tokens() {
    for tied in [true, false] {
        let spec = TinyModelSpec {
            tied_embeddings: tied,
            ..TinyModelSpec::default()
        };
        let (_tmp, gguf, folder) = tiny_pair("pair", &spec);
        let a = Model::load(&gguf, &options(true)).unwrap();
        let b = Model::load(&folder, &options(true)).unwrap();
        assert_eq!(b.config().rope_style, crate::rope::RopeStyle::Halves);
        assert_eq!(b.config().tied_embeddings, tied);
        let toks = tokens(12, spec.vocab_size());
        let (la, lb) = (logits_all(&a, &toks), logits_all(&b, &toks));
        // Same f32 weights; only the order of float sums differs (rows un-permuted for halves).
        let err = rel_error(&lb, &la);
        assert!(err < 1e-5, "tied {tied}: relative error {err}");

        // Tokenizer and chat template from tokenizer.json / tokenizer_config.json.
        let (ta, tb) = (a.tokenizer().unwrap(), b.tokenizer().unwrap());
        for text in [
            "Hello the world",
            "<|im_start|>user\nhi<|im_end|>",
            " a🦀é\n\n",
        ] {
            for special in [false, true] {
                assert_eq!(
                    tb.encode(text, special).unwrap(),
                    ta.encode(text, special).unwrap()
                );
            }
            let ids = ta.encode(text, true).unwrap();
            assert_eq!(
                tb.decode(&ids, false).unwrap(),
                ta.decode(&ids, false).unwrap()
            );
            assert_eq!(
                tb.decode(&ids, true).unwrap(),
                ta.decode(&ids, true).unwrap()
            );
        }
        assert_eq!((tb.bos_id(), tb.eos_id()), (ta.bos_id(), ta.eos_id()));
        assert_eq!(tb.end_of_generation_ids(), ta.end_of_generation_ids());
        assert_eq!(tb.vocab_size(), ta.vocab_size());
        let chat = [Message::new("user", "hi")];
        assert_eq!(
            b.chat_template().unwrap().render(&chat, true).unwrap(),
            a.chat_template().unwrap().render(&chat, true).unwrap()
        );

        // The default load requantizes f32 layers to 4-bit g32 and the embedding to int8, and
        // says so.
        let fast = Model::load(&folder, &options(false)).unwrap();
        let kinds: Vec<(String, String)> = fast
            .describe()
            .tensor_types
            .iter()
            .map(|t| (t.source.clone(), t.kernel.clone()))
            .collect();
        assert!(
            kinds.contains(&("f32→q4g32".into(), "lut4 g32".into())),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&("f32→int8".into(), "int8".into())),
            "{kinds:?}"
        );
        let err = rel_error(&logits_all(&fast, &toks), &lb);
        assert!(err < 0.1, "requantized model: relative error {err}");
    }
}

/// Copies folder `from` to `to`, passing every tensor through `map` and `config.json` through
/// `patch`.
fn rewrite(
    from: &Path,
    to: &Path,
    patch: impl Fn(&mut Value),
    mut map: impl FnMut(TensorData) -> Vec<TensorData>,
) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    patch(&mut config);
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
    let folder = SafetensorsFolder::open(from).unwrap();
    let mut out = Vec::new();
    for name in folder.names() {
        let t = folder.tensor(name).unwrap();
        out.extend(map(TensorData::raw(
            name,
            t.dtype,
            t.shape,
            t.data.to_vec(),
        )));
    }
    write_safetensors(&to.join(SINGLE_FILE), &out).unwrap();
}

/// The projection a weight belongs to, if it is a linear layer's.
fn linear_prefix(t: &TensorData) -> Option<String> {
    let prefix = t.name.strip_suffix(".weight")?;
    LINEARS
        .iter()
        .any(|l| prefix.ends_with(l))
        .then(|| prefix.to_string())
}

/// Logits of every position of `tokens`, fed one token per forward (decode).
fn logits_one_by_one(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let vocab = model.config().vocab_size;
    let mut logits = vec![0.0; tokens.len() * vocab];
    for (t, out) in tokens.iter().zip(logits.chunks_exact_mut(vocab)) {
        model.forward(&[*t], &mut cache, out).unwrap();
    }
    logits
}

/// Which input of its layer a projection reads (q/k/v, o, gate/up, down), times the layer.
fn input_of(prefix: &str) -> u64 {
    let mut parts = prefix.split('.').skip(2);
    let layer: u64 = parts.next().and_then(|l| l.parse().ok()).unwrap();
    let input = match prefix.rsplit('.').next() {
        Some("q_proj" | "k_proj" | "v_proj") => 0,
        Some("o_proj") => 1,
        Some("gate_proj" | "up_proj") => 2,
        _ => 3,
    };
    10 * layer + input
}

/// How the test GPTQ folders order each layer's groups along K.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Orders {
    Natural,
    /// Act-order; matrices that read the same input (q/k/v, gate/up) have the same order, as
    /// GPTQ writes them.
    SharedPerInput,
    /// Act-order; every matrix its own order.
    PerMatrix,
    /// Act-order with uneven groups.
    Uneven,
}

#[test]
fn gptq_folders_load_exactly() {
    let spec = TinyModelSpec {
        layers: 2,
        ..TinyModelSpec::default()
    };
    let (_tmp, _, base) = tiny_pair("gptq", &spec);
    let toks = tokens(8, spec.vocab_size());
    // (bits, group size, sym, v2, group orders)
    let cases: [(u32, usize, bool, bool, Orders); 8] = [
        (4, 32, true, false, Orders::Natural),
        (3, 32, false, true, Orders::Natural),
        (2, 0, false, false, Orders::Natural),
        (4, 32, false, false, Orders::SharedPerInput),
        (3, 32, true, false, Orders::SharedPerInput),
        (2, 32, false, true, Orders::SharedPerInput),
        (4, 32, false, false, Orders::PerMatrix),
        (4, 32, false, false, Orders::Uneven),
    ];
    for (i, &(bits, gs, sym, v2, orders)) in cases.iter().enumerate() {
        let what = format!("{bits}b g{gs} sym {sym} v2 {v2} {orders:?}");
        let act = orders != Orders::Natural;
        let mut rng = SplitMix64::new(100 + i as u64);
        let mut expected = Vec::new();
        let gptq_dir = base.with_file_name(format!("gptq-{i}"));
        let quant = serde_json::json!({
            "quant_method": "gptq", "bits": bits, "group_size": if gs == 0 { -1 } else { gs as i64 },
            "sym": sym, "desc_act": act,
            "checkpoint_format": if v2 { "gptq_v2" } else { "gptq" },
        });
        rewrite(
            &base,
            &gptq_dir,
            |c| c["quantization_config"] = quant.clone(),
            |t| match linear_prefix(&t) {
                Some(prefix) => {
                    let (n, k) = (t.shape[0], t.shape[1]);
                    let gs = if gs == 0 { k } else { gs };
                    let order = match orders {
                        Orders::Natural => GroupOrder::Natural,
                        // One seed per case, layer and input.
                        Orders::SharedPerInput => {
                            GroupOrder::Shuffled(1000 * i as u64 + input_of(&prefix))
                        }
                        Orders::PerMatrix => GroupOrder::Shuffled(rng.next_u64()),
                        Orders::Uneven => GroupOrder::Uneven(rng.next_u64()),
                    };
                    let (tensors, values) =
                        gptq_layer(&mut rng, &prefix, n, k, bits, gs, sym, v2, order);
                    expected.push(TensorData::f32(&t.name, &t.shape, &values));
                    tensors
                }
                None => vec![t],
            },
        );
        // The same weights, dequantized independently, as a plain f32 folder.
        let dense_dir = base.with_file_name(format!("gptq-dense-{i}"));
        let mut expected = expected.into_iter();
        rewrite(
            &base,
            &dense_dir,
            |_| {},
            |t| match linear_prefix(&t) {
                Some(_) => vec![expected.next().unwrap()],
                None => vec![t],
            },
        );
        let exact = Model::load(&gptq_dir, &options(true)).unwrap();
        let dense = Model::load(&dense_dir, &options(true)).unwrap();
        let want = logits_all(&dense, &toks);
        let err = rel_error(&logits_all(&exact, &toks), &want);
        assert!(err < 1e-5, "{what}: reference GPTQ vs dense: {err}");

        let fast = Model::load(&gptq_dir, &options(false)).unwrap();
        let info = fast.describe();
        let gptq: Vec<_> = info
            .tensor_types
            .iter()
            .filter(|t| t.source.starts_with("gptq"))
            .collect();
        let count: usize = gptq.iter().map(|t| t.count).sum();
        assert_eq!(count, 7 * spec.layers, "{what}: {info}");
        for source in gptq {
            match orders {
                Orders::Natural => {
                    // Exact codes: the kernels' matrix has the checkpoint's bit width.
                    assert!(
                        source.kernel.starts_with(&format!("lut{bits} ")),
                        "{what}: {info}"
                    );
                    assert!(!source.kernel.contains("permuted"), "{what}: {info}");
                }
                Orders::SharedPerInput | Orders::PerMatrix => {
                    // Exact codes sorted by group, read through a gathered input: no int8.
                    let (src, kernel) = (&source.source, &source.kernel);
                    assert_eq!(src, &format!("gptq{bits} g{gs} act-order"), "{what}");
                    assert_eq!(kernel, &format!("lut{bits} g{gs} permuted"), "{what}");
                }
                Orders::Uneven => {
                    // Uneven groups: dequantized and kept as int8.
                    assert!(source.source.ends_with("act-order→int8"), "{what}: {info}");
                    assert_eq!(source.kernel, "int8", "{what}: {info}");
                }
            }
        }
        if matches!(orders, Orders::SharedPerInput | Orders::PerMatrix) {
            let shared = orders == Orders::SharedPerInput;
            for l in &fast.layers {
                let order = |m: &Linear| m.column_order().cloned().unwrap();
                let (q, k, v) = (order(&l.wq), order(&l.wk), order(&l.wv));
                let (gate, up) = (order(&l.w_gate), order(&l.w_up));
                // Equal orders are loaded once, so their matrices share one gathered input.
                for (a, b) in [(&q, &k), (&q, &v), (&gate, &up)] {
                    assert_eq!(Arc::ptr_eq(a, b), shared, "{what}");
                    assert_eq!(a[..] == b[..], shared, "{what}");
                }
            }
        }
        // Prefill (one batch of 8) and decode (8 forwards of one token) both match.
        let err = rel_error(&logits_all(&fast, &toks), &want);
        assert!(err < 0.1, "{what}: kernels vs reference, prefill: {err}");
        let err = rel_error(&logits_one_by_one(&fast, &toks), &want);
        assert!(err < 0.1, "{what}: kernels vs reference, decode: {err}");
    }
}

#[test]
fn bad_gptq_and_config_are_typed_errors() {
    let spec = TinyModelSpec {
        layers: 1,
        ..TinyModelSpec::default()
    };
    let (_tmp, _, base) = tiny_pair("gptq-bad", &spec);
    let mut rng = SplitMix64::new(1);
    let dir = base.with_file_name("gptq-asym-as-sym");
    rewrite(
        &base,
        &dir,
        |c| {
            c["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": true})
        },
        |t| match linear_prefix(&t) {
            Some(prefix) => {
                gptq_layer(
                    &mut rng,
                    &prefix,
                    t.shape[0],
                    t.shape[1],
                    4,
                    32,
                    false,
                    false,
                    GroupOrder::Natural,
                )
                .0
            }
            None => vec![t],
        },
    );
    let err = Model::load(&dir, &options(false)).unwrap_err().to_string();
    assert!(err.contains("qzeros") && err.contains(SINGLE_FILE), "{err}");

    // A weight of the wrong shape names the tensor.
    let dir = base.with_file_name("shape");
    rewrite(
        &base,
        &dir,
        |_| {},
        |t| {
            if t.name == "model.layers.0.mlp.up_proj.weight" {
                vec![TensorData::f32(&t.name, &[3, 64], &[0.0; 192])]
            } else {
                vec![t]
            }
        },
    );
    let err = Model::load(&dir, &options(false)).unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { ref tensor, .. } if tensor == "model.layers.0.mlp.up_proj.weight"),
        "{err}"
    );
    // Zero biases on o/gate/up/down (AutoGPTQ writes them) are fine; others are refused.
    for (tag, value) in [("zero-bias", 0.0), ("bias", 0.5)] {
        let dir = base.with_file_name(tag);
        rewrite(
            &base,
            &dir,
            |_| {},
            |t| {
                let mut out = vec![];
                if t.name == "model.layers.0.self_attn.o_proj.weight" {
                    out.push(TensorData::f32(
                        "model.layers.0.self_attn.o_proj.bias",
                        &[64],
                        &[value; 64],
                    ));
                }
                out.push(t);
                out
            },
        );
        match Model::load(&dir, &options(false)) {
            Ok(_) => assert_eq!(value, 0.0),
            Err(e) => assert!(value != 0.0 && e.to_string().contains("o_proj.bias"), "{e}"),
        }
    }
    // A missing tensor, unsupported rope scaling (YaRN), an unknown quantization method.
    let dir = base.with_file_name("missing");
    rewrite(
        &base,
        &dir,
        |_| {},
        |t| {
            if t.name == "model.norm.weight" {
                vec![]
            } else {
                vec![t]
            }
        },
    );
    let err = Model::load(&dir, &options(false)).unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref tensor, .. } if tensor == "model.norm.weight"),
        "{err}"
    );
    let dir = base.with_file_name("rope");
    rewrite(
        &base,
        &dir,
        |c| {
            c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 32768})
        },
        |t| vec![t],
    );
    let err = Model::load(&dir, &options(false)).unwrap_err().to_string();
    assert!(
        err.contains("rope_scaling") && err.contains("'yarn' is not supported"),
        "{err}"
    );
    let dir = base.with_file_name("awq");
    rewrite(
        &base,
        &dir,
        |c| c["quantization_config"] = serde_json::json!({"quant_method": "awq"}),
        |t| vec![t],
    );
    let err = Model::load(&dir, &options(false)).unwrap_err().to_string();
    assert!(err.contains("awq"), "{err}");
}

#[test]
fn bitnet_folders_load_ternary_weights_and_sub_norms() {
    let spec = TinyModelSpec {
        layers: 1,
        ..TinyModelSpec::default()
    };
    let (_tmp, _, base) = tiny_pair("bitnet", &spec);
    let toks = tokens(8, spec.vocab_size());
    let mut rng = SplitMix64::new(7);
    let mut expected = Vec::new();
    let to_bitnet = |c: &mut Value| {
        c["model_type"] = "bitnet".into();
        c["hidden_act"] = "relu2".into();
    };
    let sub_norms = |t: &TensorData| -> Vec<TensorData> {
        let layer = t.name.strip_suffix(".input_layernorm.weight");
        match layer {
            Some(l) => vec![
                TensorData::f32(
                    &format!("{l}.self_attn.attn_sub_norm.weight"),
                    &[64],
                    &[1.1; 64],
                ),
                TensorData::f32(&format!("{l}.mlp.ffn_sub_norm.weight"), &[128], &[0.9; 128]),
            ],
            None => vec![],
        }
    };
    let dir = base.with_file_name("bitnet");
    rewrite(
        &base,
        &dir,
        |c| {
            to_bitnet(c);
            c["quantization_config"] =
                serde_json::json!({"quant_method": "bitnet", "linear_class": "bitlinear"});
        },
        |t| {
            let mut out = sub_norms(&t);
            match linear_prefix(&t) {
                Some(prefix) => {
                    let (n, k) = (t.shape[0], t.shape[1]);
                    let codes: Vec<u8> = (0..n * k).map(|_| (rng.next_u64() % 3) as u8).collect();
                    let ws = 2.0 + (rng.next_u64() % 8) as f32;
                    let values: Vec<f32> =
                        codes.iter().map(|&c| (f32::from(c) - 1.0) / ws).collect();
                    expected.push(TensorData::f32(&t.name, &t.shape, &values));
                    out.push(TensorData::raw(
                        &t.name,
                        Dtype::U8,
                        &[n / 4, k],
                        crate::safetensors::bitnet::pack(&codes, n, k),
                    ));
                    out.push(TensorData::bf16(
                        &format!("{prefix}.weight_scale"),
                        &[1],
                        &[ws],
                    ));
                }
                None => out.push(t),
            }
            out
        },
    );
    let dense_dir = base.with_file_name("bitnet-dense");
    let mut expected = expected.into_iter();
    rewrite(&base, &dense_dir, to_bitnet, |t| {
        let mut out = sub_norms(&t);
        match linear_prefix(&t) {
            Some(_) => out.push(expected.next().unwrap()),
            None => out.push(t),
        }
        out
    });
    let exact = Model::load(&dir, &options(true)).unwrap();
    assert!(exact.layers[0]
        .attn_sub_norm
        .as_ref()
        .is_some_and(|n| n[0] == 1.1));
    assert!(exact.layers[0]
        .ffn_sub_norm
        .as_ref()
        .is_some_and(|n| n[0] == 0.9));
    let dense = Model::load(&dense_dir, &options(true)).unwrap();
    let want = logits_all(&dense, &toks);
    let err = rel_error(&logits_all(&exact, &toks), &want);
    assert!(err < 1e-5, "reference BitNet vs dense: {err}");
    let fast = Model::load(&dir, &options(false)).unwrap();
    let info = fast.describe();
    assert!(
        info.tensor_types
            .iter()
            .any(|t| t.source == "bitnet ternary"),
        "{info}"
    );
    let err = rel_error(&logits_all(&fast, &toks), &want);
    assert!(err < 0.1, "kernels vs reference: {err}");
}

#[test]
fn sharded_folders_load_like_single_files() {
    let spec = TinyModelSpec {
        layers: 2,
        ..TinyModelSpec::default()
    };
    let (_tmp, _, base) = tiny_pair("shard", &spec);
    let folder = SafetensorsFolder::open(&base).unwrap();
    let dir = base.with_file_name("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), dir.join(f)).unwrap();
    }
    // Layer 1 in the second shard, the rest in the first.
    let (mut one, mut two) = (Vec::new(), Vec::new());
    let mut map = serde_json::Map::new();
    for name in folder.names() {
        let t = folder.tensor(name).unwrap();
        let data = TensorData::raw(name, t.dtype, t.shape, t.data.to_vec());
        let file = if name.starts_with("model.layers.1.") {
            two.push(data);
            "model-00002-of-00002.safetensors"
        } else {
            one.push(data);
            "model-00001-of-00002.safetensors"
        };
        map.insert(name.to_string(), file.into());
    }
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), &one).unwrap();
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &two).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join(crate::safetensors::INDEX_FILE), index.to_string()).unwrap();
    let toks = tokens(6, spec.vocab_size());
    let a = logits_all(&Model::load(&base, &options(true)).unwrap(), &toks);
    let b = logits_all(&Model::load(&dir, &options(true)).unwrap(), &toks);
    assert_eq!(a, b);
    // Without its second shard the folder is refused, naming the shard.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Model::load(&dir, &options(true)).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn qwen2_folders_load_their_biases() {
    let spec = TinyModelSpec {
        layers: 1,
        ..TinyModelSpec::default()
    };
    let (_tmp, _, base) = tiny_pair("qwen2", &spec);
    let dir = base.with_file_name("qwen2");
    let bias = |n: usize| {
        (0..n)
            .map(|i| i as f32 / n as f32 - 0.5)
            .collect::<Vec<f32>>()
    };
    rewrite(
        &base,
        &dir,
        |c| c["model_type"] = "qwen2".into(),
        |t| {
            let mut out = vec![];
            for (p, n) in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)] {
                if t.name == format!("model.layers.0.self_attn.{p}.weight") {
                    let name = format!("model.layers.0.self_attn.{p}.bias");
                    out.push(TensorData::bf16(&name, &[n], &bias(n)));
                }
            }
            out.push(t);
            out
        },
    );
    let with = Model::load(&dir, &options(true)).unwrap();
    assert_eq!(with.config().architecture, Architecture::Qwen2);
    let l = &with.layers[0];
    assert_eq!(l.bq.as_deref(), Some(&bias(64)[..]));
    assert_eq!(l.bk.as_deref(), Some(&bias(32)[..]));
    assert_eq!(l.bv.as_deref(), Some(&bias(32)[..]));
    let without = Model::load(&base, &options(true)).unwrap();
    assert!(without.layers[0].bq.is_none());
    let toks = tokens(6, spec.vocab_size());
    let err = rel_error(&logits_all(&with, &toks), &logits_all(&without, &toks));
    assert!(err > 1e-3, "the biases changed nothing: {err}");
}

/// Copies the GGUF `from` to `to`, letting `extra` add metadata and tensors.
fn copy_gguf(from: &Path, to: &Path, extra: impl FnOnce(&mut GgufWriter)) {
    let file = crate::gguf::GgufFile::open(from).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata_entries() {
        w.add_metadata(key, value.clone());
    }
    for info in file.tensors() {
        let data = file.tensor_data(&info.name).unwrap().to_vec();
        w.add_tensor_raw(&info.name, &info.dims, info.ty.id(), data)
            .unwrap();
    }
    extra(&mut w);
    w.write(to).unwrap();
}

#[test]
fn llama3_rope_scaling_is_the_same_from_rope_freqs_and_config_json() {
    use crate::config::ROPE_FREQS_TENSOR;
    use crate::rope::RopeScaling;
    let spec = TinyModelSpec::default();
    let (_tmp, gguf, folder) = tiny_pair("llama3-rope", &spec);
    // Head dim 16, θ 10000: wavelengths 2π·10000^(i/8) put pairs 0–2 below 256/4 (kept), pair 3
    // in the blend, pairs 4–7 above 256 (divided by 8).
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context_length: 256,
    };
    let head_dim = spec.hidden / spec.heads;
    let factors: Vec<f32> = crate::rope::frequency_factors(&scaling, 10000.0, head_dim)
        .unwrap()
        .iter()
        .map(|&f| f as f32)
        .collect();
    assert_eq!(factors[..3], [1.0; 3]);
    assert!(factors[3] > 1.0 && factors[3] < 8.0, "{factors:?}");
    assert_eq!(factors[4..], [8.0; 4]);

    // The GGUF carries the factors as llama.cpp's converter writes them; the folder carries
    // Llama 3.2's kind of `rope_scaling`.
    let scaled_gguf = gguf.with_file_name("scaled.gguf");
    copy_gguf(&gguf, &scaled_gguf, |w| {
        w.add_tensor_f32(ROPE_FREQS_TENSOR, &[head_dim / 2], &factors)
            .unwrap()
    });
    // Per-pair factors have no config.json spelling: the test converter refuses them.
    let err = gguf_to_hf_folder(&scaled_gguf, &folder.with_file_name("x"), Dtype::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("RoPE scaling"), "{err}");
    let scaled_folder = folder.with_file_name("scaled-hf");
    rewrite(
        &folder,
        &scaled_folder,
        |c| {
            c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256})
        },
        |t| vec![t],
    );
    let load = |path: &Path, reference: bool| Model::load(path, &options(reference)).unwrap();
    let (a, b) = (load(&scaled_gguf, true), load(&scaled_folder, true));
    assert_eq!(
        a.config().rope_scaling,
        RopeScaling::Factors(factors.clone())
    );
    assert_eq!(b.config().rope_scaling, scaling);
    let toks = tokens(40, spec.vocab_size());
    let (la, lb) = (logits_all(&a, &toks), logits_all(&b, &toks));
    let err = rel_error(&lb, &la);
    assert!(err < 1e-5, "scaled GGUF vs folder: relative error {err}");

    // Both differ from the unscaled model after position 0 (which no frequency turns).
    let vocab = spec.vocab_size();
    let plain_a = logits_all(&load(&gguf, true), &toks);
    let plain_b = logits_all(&load(&folder, true), &toks);
    for (scaled, plain) in [(&la, &plain_a), (&lb, &plain_b)] {
        assert!(rel_error(&scaled[..vocab], &plain[..vocab]) < 1e-6);
        let change = rel_error(&scaled[vocab..], &plain[vocab..]);
        assert!(change > 1e-3, "scaling changed the logits by only {change}");
    }

    // The fast path builds the same tables as the reference.
    let fast = load(&scaled_gguf, false);
    assert_eq!(fast.rope, a.rope);
    assert_ne!(fast.rope, load(&gguf, false).rope);
}
