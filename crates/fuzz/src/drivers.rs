//! The entry points each fuzz target drives with one input: the bytes become files in a private
//! scratch folder (on tmpfs where there is one), then every reader that takes those files runs on
//! them as far as it goes. A reader may return `Ok` or `Err`; a panic, abort, hang or huge
//! allocation is what the fuzzer reports.
//!
//! Folder inputs are split into files at [`SECTION_MARK`]: `hf_folder` takes `config.json`, the
//! safetensors bytes, an optional `model.safetensors.index.json` and a second shard;
//! `tokenizer_template` takes `tokenizer.json`, `tokenizer_config.json`, a text to tokenize and a
//! raw Jinja template source.
//!
//! This file is also compiled into the stable regression test, which feeds it the saved inputs
//! under `tests/data/fuzz/`.

use std::path::{Path, PathBuf};

use lutra_runtime::chat::{ChatTemplate, Message};
use lutra_runtime::config::ModelConfig;
use lutra_runtime::fixtures::TempDir;
use lutra_runtime::gguf::GgufFile;
use lutra_runtime::llama::{LoadOptions, Model};
use lutra_runtime::safetensors::SafetensorsFolder;
use lutra_runtime::tokenizer::Tokenizer;

/// Separates the files of a folder input.
pub const SECTION_MARK: &[u8] = b"\n--lutra-fuzz-file--\n";

/// The first shard's name when an index is present.
pub const SHARD_1: &str = "model-00001-of-00002.safetensors";
/// The second shard's name.
pub const SHARD_2: &str = "model-00002-of-00002.safetensors";

/// A fresh, empty scratch folder (on tmpfs where there is one), removed when dropped.
pub struct Scratch {
    dir: TempDir,
}

impl Scratch {
    /// Creates a folder unique to this process and call.
    pub fn new(tag: &str) -> Scratch {
        Scratch {
            dir: TempDir::in_memory(&format!("fuzz-{tag}")),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bytes` to `name` in the folder and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, bytes).expect("scratch file");
        path
    }
}

/// Replaces libFuzzer's panic hook (which aborts on every panic, even one the runtime catches
/// and turns into an error) with one that only prints. A panic that escapes the entry point still
/// fails the input: the fuzzer's harness catches it and aborts.
pub fn report_panics_without_aborting() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
}

/// Splits a folder input into its files.
pub fn sections(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = rest
        .windows(SECTION_MARK.len())
        .position(|w| w == SECTION_MARK)
    {
        out.push(&rest[..at]);
        rest = &rest[at + SECTION_MARK.len()..];
    }
    out.push(rest);
    out
}

/// Joins files into one folder input (for seeds).
pub fn join_sections(files: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(SECTION_MARK);
        }
        out.extend_from_slice(f);
    }
    out
}

fn load_options() -> LoadOptions {
    LoadOptions {
        threads: 1,
        ..LoadOptions::default()
    }
}

/// A short conversation rendered with `template`, then tokenized and decoded with `tokenizer`.
fn exercise_text(tokenizer: Option<&Tokenizer>, template: Option<&ChatTemplate>, text: &str) {
    let messages = [
        Message::new("system", "You are terse."),
        Message::new("user", text),
        Message::new("assistant", "ok"),
    ];
    let mut rendered = None;
    if let Some(template) = template {
        let _ = template.end_of_turn();
        rendered = template.render(&messages, true).ok();
    }
    if let Some(tokenizer) = tokenizer {
        for (input, special) in [(text, false), (rendered.as_deref().unwrap_or(""), true)] {
            if let Ok(ids) = tokenizer.encode(input, special) {
                let _ = tokenizer.decode(&ids, false);
                let _ = tokenizer.decode(&ids, true);
            }
        }
        let n = tokenizer.vocab_size().min(64) as u32;
        let _ = tokenizer.decode(&(0..n).collect::<Vec<_>>(), false);
        let _ = tokenizer.bos_id();
        let _ = tokenizer.eos_id();
    }
}

/// GGUF bytes: header, metadata, tensor infos, config, every tensor's decode, tokenizer and
/// chat template from the metadata, then the whole model load and its summary.
pub fn gguf(data: &[u8]) {
    let scratch = Scratch::new("gguf");
    let path = scratch.write("model.gguf", data);
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    for (key, value) in file.metadata_entries() {
        let _ = (key.len(), value.type_id());
    }
    let _ = ModelConfig::from_gguf(&file);
    let names: Vec<String> = file.tensor_names().map(str::to_string).collect();
    for name in &names {
        let _ = file.decode_tensor(name).map(|t| t.dequantize().len());
    }
    let tokenizer = Tokenizer::from_gguf(&file).ok();
    let template = tokenizer
        .as_ref()
        .and_then(|t| ChatTemplate::from_gguf(&file, t).ok());
    exercise_text(tokenizer.as_ref(), template.as_ref(), "Hello, world!");
    drop(file);
    if let Ok(model) = Model::load(&path, &load_options()) {
        let _ = model.describe().to_string();
    }
}

/// A Hugging Face folder: `config.json`, safetensors (one file, or two shards with an index),
/// read by the folder reader, the config reader and the whole model load.
pub fn hf_folder(data: &[u8]) {
    let files = sections(data);
    let scratch = Scratch::new("hf");
    let config = files.first().copied().unwrap_or_default();
    let config_path = scratch.write("config.json", config);
    match files.get(2) {
        Some(index) if !index.is_empty() => {
            scratch.write("model.safetensors.index.json", index);
            scratch.write(SHARD_1, files.get(1).copied().unwrap_or_default());
            scratch.write(SHARD_2, files.get(3).copied().unwrap_or_default());
        }
        _ => {
            scratch.write(
                "model.safetensors",
                files.get(1).copied().unwrap_or_default(),
            );
        }
    }
    if let Some(tokenizer) = files.get(4) {
        scratch.write("tokenizer.json", tokenizer);
    }
    if let Ok(text) = std::str::from_utf8(config) {
        let _ = ModelConfig::from_hf_json(text, &config_path);
    }
    if let Ok(folder) = SafetensorsFolder::open(scratch.dir()) {
        for name in folder.names() {
            if let Ok(t) = folder.tensor(name) {
                let _ = t.elements();
                let _ = t.to_f32().map(|v| v.len());
                let _ = t.to_i32().map(|v| v.len());
                let _ = t.to_u8().map(<[u8]>::len);
            }
        }
    }
    if let Ok(model) = Model::load(scratch.dir(), &load_options()) {
        let _ = model.describe().to_string();
    }
}

/// `tokenizer.json`, `tokenizer_config.json` (with the chat template), a text and a raw template:
/// the tokenizer and template loaders, rendered conversations, encoding and decoding.
pub fn tokenizer_template(data: &[u8]) {
    let files = sections(data);
    let scratch = Scratch::new("tok");
    if let Some(json) = files.first() {
        scratch.write("tokenizer.json", json);
    }
    if let Some(config) = files.get(1) {
        scratch.write("tokenizer_config.json", config);
    }
    let text = String::from_utf8_lossy(files.get(2).copied().unwrap_or(b"Hello"));
    let tokenizer = Tokenizer::from_hf_folder(scratch.dir()).ok();
    let template = match &tokenizer {
        Some(t) => ChatTemplate::from_hf_folder(scratch.dir(), t).ok(),
        None => None,
    };
    exercise_text(tokenizer.as_ref(), template.as_ref(), &text);
    // A raw template source, with no tokenizer behind it.
    if let Some(source) = files.get(3) {
        let source = String::from_utf8_lossy(source);
        if let Ok(template) = ChatTemplate::new(&source, "<s>", "</s>") {
            exercise_text(None, Some(&template), &text);
        }
    }
}
