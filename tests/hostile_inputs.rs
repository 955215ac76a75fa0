//! Hostile model files: each case below is a file a stranger could hand over, and each must end
//! in an error that names the file and, where there is one, the metadata key or tensor — never a
//! panic, a hang or an allocation sized by a count in the file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lutra_runtime::chat::{ChatTemplate, Message};
use lutra_runtime::config::ModelConfig;
use lutra_runtime::fixtures::{tiny_llama_gguf, GgufWriter, TempDir, TinyModelSpec};
use lutra_runtime::gguf::{GgufFile, MetaValue};
use lutra_runtime::llama::{LoadOptions, Model};
use lutra_runtime::safetensors::SafetensorsFolder;
use lutra_runtime::tokenizer::Tokenizer;

/// A fresh scratch folder for one test, removed when dropped.
fn scratch(name: &str) -> TempDir {
    TempDir::new(&format!("hostile-{name}"))
}

/// A small GGUF: one string metadata entry and one F32 tensor `[4, 2]`.
fn small_gguf() -> Vec<u8> {
    let dir = scratch("small");
    let path = dir.join("small.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("general.name", MetaValue::String("small".into()));
    w.add_tensor_f32("blk.0.attn_norm.weight", &[4, 2], &[0.5; 8])
        .unwrap();
    w.write(&path).unwrap();
    std::fs::read(&path).unwrap()
}

fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in file")
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `bytes` as `name` in a scratch folder and opens it; returns the error text and the
/// path the file had.
fn open_error(name: &str, bytes: &[u8]) -> (String, PathBuf) {
    let dir = scratch(name);
    let path = dir.join(format!("{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).expect_err("a hostile file must be refused");
    (err.to_string(), path)
}

fn assert_names(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error '{err}' does not name '{part}'");
    }
}

#[test]
fn tensor_count_of_2_pow_60_is_refused() {
    let mut bytes = small_gguf();
    put_u64(&mut bytes, 8, 1 << 60);
    let (err, path) = open_error("tensor-count", &bytes);
    assert_names(&err, &[&path.display().to_string(), "tensor count"]);
}

#[test]
fn metadata_count_past_the_file_is_refused() {
    let mut bytes = small_gguf();
    put_u64(&mut bytes, 16, 1 << 30);
    let (err, path) = open_error("metadata-count", &bytes);
    assert_names(&err, &[&path.display().to_string(), "metadata count"]);
}

#[test]
fn string_length_past_the_end_is_refused() {
    let mut bytes = small_gguf();
    // general.name's value: key, type u32 (8), then the string's u64 length.
    let at = find(&bytes, b"general.name") + "general.name".len() + 4;
    let past_end = bytes.len() as u64 + 5;
    put_u64(&mut bytes, at, past_end);
    let (err, path) = open_error("string-length", &bytes);
    assert_names(&err, &[&path.display().to_string(), "general.name"]);
}

#[test]
fn array_length_past_the_end_is_refused() {
    let dir = scratch("array");
    let path = dir.join("array.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata(
        "tokenizer.ggml.tokens",
        MetaValue::Array(vec![MetaValue::String("a".into()); 3]),
    );
    w.write(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // Key, type 9, element type 8, then the array's u64 length.
    let at = find(&bytes, b"tokenizer.ggml.tokens") + "tokenizer.ggml.tokens".len() + 8;
    put_u64(&mut bytes, at, 1 << 59);
    let (err, path) = open_error("array-length", &bytes);
    assert_names(
        &err,
        &[&path.display().to_string(), "tokenizer.ggml.tokens"],
    );
}

#[test]
fn dimensions_whose_product_overflows_are_refused() {
    let mut bytes = small_gguf();
    let name = b"blk.0.attn_norm.weight";
    // Name, then n_dims u32 (2), then the two u64 dimensions.
    let at = find(&bytes, name) + name.len() + 4;
    put_u64(&mut bytes, at, 1 << 36);
    put_u64(&mut bytes, at + 8, 1 << 36);
    let (err, path) = open_error("dims-overflow", &bytes);
    assert_names(
        &err,
        &[&path.display().to_string(), "blk.0.attn_norm.weight"],
    );
}

#[test]
fn tensor_offset_past_the_end_is_refused() {
    let mut bytes = small_gguf();
    let name = b"blk.0.attn_norm.weight";
    // Name, n_dims, two dimensions, type u32, then the u64 offset.
    let at = find(&bytes, name) + name.len() + 4 + 16 + 4;
    put_u64(&mut bytes, at, 1 << 32);
    let (err, path) = open_error("offset", &bytes);
    assert_names(
        &err,
        &[&path.display().to_string(), "blk.0.attn_norm.weight"],
    );
}

#[test]
fn overlapping_tensor_data_is_refused() {
    let dir = scratch("overlap");
    let path = dir.join("overlap.gguf");
    let mut w = GgufWriter::new();
    w.add_tensor_f32("first.weight", &[8], &[1.0; 8]).unwrap();
    w.add_tensor_f32("second.weight", &[8], &[2.0; 8]).unwrap();
    w.write(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // Point the second tensor at the first one's data.
    let at = find(&bytes, b"second.weight") + "second.weight".len() + 4 + 8 + 4;
    put_u64(&mut bytes, at, 0);
    let (err, path) = open_error("overlap", &bytes);
    assert_names(
        &err,
        &[&path.display().to_string(), "first.weight", "second.weight"],
    );
}

#[test]
fn huge_context_length_is_refused_before_any_allocation() {
    let dir = scratch("context");
    let path = dir.join("context.gguf");
    let spec = TinyModelSpec::default();
    tiny_llama_gguf(&path, &spec, 3).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let key = b"llama.context_length";
    let at = find(&bytes, key) + key.len();
    let ty = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    match ty {
        4 => bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes()),
        10 => put_u64(&mut bytes, at + 4, 1 << 50),
        other => panic!("context_length has type {other}"),
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = ModelConfig::from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert_names(&err, &[&path.display().to_string(), "llama.context_length"]);
    let err = Model::load(&path, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert_names(&err, &[&path.display().to_string(), "llama.context_length"]);
}

#[test]
fn huge_block_count_is_an_error() {
    let dir = scratch("blocks");
    let path = dir.join("blocks.gguf");
    tiny_llama_gguf(&path, &TinyModelSpec::default(), 4).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let key = b"llama.block_count";
    let at = find(&bytes, key) + key.len();
    let ty = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(ty, 4, "block_count is a u32");
    bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let opts = LoadOptions {
        threads: 1,
        ..LoadOptions::default()
    };
    let err = Model::load(&path, &opts).unwrap_err().to_string();
    assert_names(&err, &[&path.display().to_string(), "blk.2."]);
}

/// A tiny model GGUF whose chat template is `template`; returns the path the file had (its
/// folder is removed on return) and the rendered template.
fn template_from_gguf(name: &str, template: &str) -> (PathBuf, lutra_runtime::Result<String>) {
    let dir = scratch(name);
    let tiny = dir.join("tiny.gguf");
    tiny_llama_gguf(&tiny, &TinyModelSpec::default(), 5).unwrap();
    let file = GgufFile::open(&tiny).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata_entries() {
        w.add_metadata(key, value.clone());
    }
    w.add_metadata(
        "tokenizer.chat_template",
        MetaValue::String(template.into()),
    );
    let path = dir.join(format!("{name}.gguf"));
    w.write(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let rendered = ChatTemplate::from_gguf(&file, &tokenizer)
        .and_then(|t| t.render(&[Message::new("user", "hi")], true));
    (path, rendered)
}

fn assert_template_refused(name: &str, template: &str) {
    let start = Instant::now();
    let (path, rendered) = template_from_gguf(name, template);
    let err = rendered.expect_err("the template must fail").to_string();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{name} took {:?}",
        start.elapsed()
    );
    assert_names(
        &err,
        &[&path.display().to_string(), "tokenizer.chat_template"],
    );
}

#[test]
fn endless_template_runs_out_of_fuel() {
    assert_template_refused(
        "endless",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
         {% endfor %}{% endfor %}{% endfor %}",
    );
}

#[test]
fn recursive_template_hits_the_recursion_limit() {
    assert_template_refused(
        "recursive",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    );
}

#[test]
fn huge_template_output_is_refused() {
    assert_template_refused(
        "huge-output",
        "{% for i in range(10000) %}{{ 'x' * 100000 }}{% endfor %}",
    );
}

#[test]
fn template_syntax_error_names_the_file() {
    assert_template_refused("syntax", "{% for m in messages %}");
}

/// A Hugging Face folder with `config.json` = `config` and no weights; returns the error and the
/// path `config.json` had (its folder is removed on return).
fn hf_config_error(name: &str, edit: &dyn Fn(&mut serde_json::Value)) -> (String, PathBuf) {
    let dir = scratch(name);
    let mut config = serde_json::json!({
        "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
        "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 300
    });
    edit(&mut config);
    let path = dir.join("config.json");
    let text = config.to_string();
    std::fs::write(&path, &text).unwrap();
    let err = ModelConfig::from_hf_json(&text, &path).unwrap_err();
    (err.to_string(), path)
}

#[test]
fn hf_config_with_huge_context_is_refused() {
    let (err, path) = hf_config_error("hf-context", &|c| {
        c["max_position_embeddings"] = serde_json::json!(1u64 << 60)
    });
    assert_names(
        &err,
        &[&path.display().to_string(), "max_position_embeddings"],
    );
}

#[test]
fn hf_config_with_overflowing_head_dim_is_refused() {
    let (err, path) = hf_config_error("hf-head-dim", &|c| {
        c["head_dim"] = serde_json::json!(1u64 << 62)
    });
    assert_names(&err, &[&path.display().to_string(), "head_dim"]);
}

/// Writes a safetensors file whose header says `header` (length prefix `len`); returns the error
/// and the path the file had (its folder is removed on return).
fn safetensors_error(name: &str, len: u64, header: &[u8], tail: &[u8]) -> (String, PathBuf) {
    let dir = scratch(name);
    let path = dir.join("model.safetensors");
    let mut bytes = len.to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(tail);
    std::fs::write(&path, bytes).unwrap();
    let err = SafetensorsFolder::open(&dir).unwrap_err().to_string();
    (err, path)
}

#[test]
fn safetensors_header_length_past_the_end_is_refused() {
    let (err, path) = safetensors_error("st-len", u64::MAX - 3, b"{}", b"");
    assert_names(&err, &[&path.display().to_string()]);
}

#[test]
fn safetensors_offsets_past_the_end_are_refused() {
    let header = br#"{"w":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}}"#;
    let (err, path) = safetensors_error("st-offsets", header.len() as u64, header, &[0; 16]);
    assert_names(&err, &[&path.display().to_string()]);
}

#[test]
fn safetensors_shape_overflow_is_refused() {
    let header =
        br#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#;
    let (err, path) = safetensors_error("st-shape", header.len() as u64, header, &[0; 16]);
    assert_names(&err, &[&path.display().to_string()]);
}

#[test]
fn index_naming_a_shard_outside_the_folder_is_refused() {
    let dir = scratch("index");
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map":{"w":"../../etc/passwd"}}"#).unwrap();
    let err = SafetensorsFolder::open(&dir).unwrap_err().to_string();
    assert_names(&err, &[&index.display().to_string(), "../../etc/passwd"]);
}

#[test]
fn garbage_tokenizer_json_names_the_file() {
    let dir = scratch("tokenizer");
    for text in [
        "{",
        r#"{"model":{"type":"BPE","vocab":{"a":4294967295},"merges":[]},"decoder":{"type":"ByteLevel"}}"#,
        r#"{"model":{"type":"BPE","vocab":{"a":0},"merges":["a b"]},"decoder":{"type":"ByteLevel"}}"#,
    ] {
        std::fs::write(dir.join("tokenizer.json"), text).unwrap();
        let err = Tokenizer::from_hf_folder(&dir).unwrap_err().to_string();
        assert_names(&err, &[&dir.join("tokenizer.json").display().to_string()]);
    }
}
