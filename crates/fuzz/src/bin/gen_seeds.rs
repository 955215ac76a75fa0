//! Writes the seed corpora of the three fuzz targets into `corpus/<target>/` beside this crate's
//! manifest, from the tiny model writer of `lutra-runtime` (no downloaded files):
//!
//! ```text
//! cargo +nightly fuzz build --fuzz-dir crates/fuzz
//! crates/fuzz/target/x86_64-unknown-linux-gnu/release/gen_seeds
//! ```

use std::path::{Path, PathBuf};

use lutra_fuzz::drivers::{join_sections, SHARD_1};
use lutra_runtime::fixtures::{
    gguf_to_hf_folder, tiny_llama_gguf, write_safetensors, GgufWriter, TempDir, TinyModelSpec,
};
use lutra_runtime::gguf::MetaValue;
use lutra_runtime::safetensors::{Dtype, SafetensorsFolder};
use lutra_runtime::weights::GgmlType;

type Error = Box<dyn std::error::Error>;

fn small_spec() -> TinyModelSpec {
    TinyModelSpec {
        hidden: 32,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        ffn: 32,
        context_length: 64,
        ..TinyModelSpec::default()
    }
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)?;
    Ok(())
}

/// A GGUF with one metadata entry of every value type and no tensors.
fn every_metadata_type(path: &Path) -> Result<(), Error> {
    let mut w = GgufWriter::new();
    let values = [
        MetaValue::U8(1),
        MetaValue::I8(-1),
        MetaValue::U16(2),
        MetaValue::I16(-2),
        MetaValue::U32(3),
        MetaValue::I32(-3),
        MetaValue::F32(0.5),
        MetaValue::Bool(true),
        MetaValue::String("text".into()),
        MetaValue::Array(vec![
            MetaValue::String("a".into()),
            MetaValue::String("b".into()),
        ]),
        MetaValue::U64(4),
        MetaValue::I64(-4),
        MetaValue::F64(0.25),
    ];
    for (i, v) in values.into_iter().enumerate() {
        w.add_metadata(&format!("key.{i}"), v);
    }
    w.write(path)?;
    Ok(())
}

/// A GGUF with a two-row tensor of every ggml type lutra decodes, filled with varied bytes.
fn every_tensor_type(path: &Path) -> Result<(), Error> {
    let mut w = GgufWriter::new();
    for id in 0..64 {
        let Some(ty) = GgmlType::from_id(id) else {
            continue;
        };
        if !ty.is_decodable() {
            continue;
        }
        let bytes = ty.tensor_bytes(2 * ty.block_elems()).unwrap_or(0);
        let data: Vec<u8> = (0..bytes).map(|i| (i * 37 % 251) as u8).collect();
        w.add_tensor_raw(&format!("t{id}.weight"), &[ty.block_elems(), 2], id, data)?;
    }
    w.write(path)?;
    Ok(())
}

fn main() -> Result<(), Error> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    // The files the seeds are read from; removed on return, also on an error.
    let work = TempDir::new("fuzz-seeds");

    // gguf: tiny llama models (tied and untied) and a metadata-only file.
    let gguf_dir = root.join("gguf");
    let tied = work.join("tied.gguf");
    tiny_llama_gguf(&tied, &small_spec(), 1)?;
    save(&gguf_dir, "tiny-tied.gguf", &std::fs::read(&tied)?)?;
    let untied = work.join("untied.gguf");
    let spec = TinyModelSpec {
        tied_embeddings: false,
        ..small_spec()
    };
    tiny_llama_gguf(&untied, &spec, 2)?;
    save(&gguf_dir, "tiny-untied.gguf", &std::fs::read(&untied)?)?;
    let meta = work.join("meta.gguf");
    every_metadata_type(&meta)?;
    save(&gguf_dir, "metadata.gguf", &std::fs::read(&meta)?)?;
    let types = work.join("types.gguf");
    every_tensor_type(&types)?;
    save(&gguf_dir, "tensor-types.gguf", &std::fs::read(&types)?)?;

    // hf_folder: the tiny model as a Hugging Face folder, single-file and sharded.
    let hf = work.join("hf");
    gguf_to_hf_folder(&tied, &hf, Dtype::F16)?;
    let config = std::fs::read(hf.join("config.json"))?;
    let weights = std::fs::read(hf.join("model.safetensors"))?;
    let tokenizer = std::fs::read(hf.join("tokenizer.json"))?;
    let tokenizer_config = std::fs::read(hf.join("tokenizer_config.json"))?;
    let hf_dir = root.join("hf_folder");
    save(
        &hf_dir,
        "single",
        &join_sections(&[&config, &weights, b"", b"", &tokenizer]),
    )?;
    let names: Vec<String> = SafetensorsFolder::open(&hf)?
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| (n.clone(), serde_json::Value::from(SHARD_1)))
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map }).to_string();
    let empty = work.join("empty.safetensors");
    write_safetensors(&empty, &[])?;
    save(
        &hf_dir,
        "sharded",
        &join_sections(&[
            &config,
            &weights,
            index.as_bytes(),
            &std::fs::read(&empty)?,
            &tokenizer,
        ]),
    )?;
    save(&hf_dir, "config-only", &join_sections(&[&config]))?;

    // tokenizer_template: the tiny tokenizer, its config with the chat template, a text and a
    // template source.
    let tok_dir = root.join("tokenizer_template");
    let template = "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}\
        {{ m['role'] | upper }}: {{ m['content'] | trim }}{% if not loop.last %}\n{% endif %}\
        {% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";
    save(
        &tok_dir,
        "tiny",
        &join_sections(&[
            &tokenizer,
            &tokenizer_config,
            "Hello, wörld! 123 <|im_end|>".as_bytes(),
            template.as_bytes(),
        ]),
    )?;
    save(
        &tok_dir,
        "tokenizer-only",
        &join_sections(&[&tokenizer, b"{}", b"a b c"]),
    )?;
    println!("seeds written under {}", root.display());
    Ok(())
}
