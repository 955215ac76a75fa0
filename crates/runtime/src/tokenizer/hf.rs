//! [`Tokenizer`] from a Hugging Face folder: `tokenizer.json` (the `tokenizers` crate reads it
//! as it is), `tokenizer_config.json` (BOS/EOS strings, `add_bos_token`, `add_eos_token`) and
//! `generation_config.json` (extra end-of-generation ids).
//!
//! Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) and SentencePiece-style BPE with byte
//! fallback (Llama 2, Mistral) are supported; other models (Unigram, WordPiece) are refused.

use std::path::Path;

use serde_json::Value;

use super::TYPE_USER_DEFINED;
use super::{token_to_bytes, Tokenizer, TokenizerKind, TYPE_BYTE, TYPE_CONTROL};
use crate::{Error, Result};

/// Reads a JSON file, or `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })
}

/// A special token's text in `tokenizer_config.json`: a string or an `AddedToken` object.
pub(crate) fn special_token_text(config: Option<&Value>, key: &str) -> Option<String> {
    match config?.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The first object in `v` with `"type": ty`.
fn find_type<'a>(v: &'a Value, ty: &str) -> Option<&'a Value> {
    match v {
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some(ty) => Some(v),
        Value::Object(o) => o.values().find_map(|x| find_type(x, ty)),
        Value::Array(a) => a.iter().find_map(|x| find_type(x, ty)),
        _ => None,
    }
}

fn has_type(v: &Value, ty: &str) -> bool {
    find_type(v, ty).is_some()
}

/// Whether a SentencePiece `tokenizer.json` adds `▁` in front of the text: a `Prepend`
/// normalizer (Llama 2 style), or a `Metaspace` pre-tokenizer whose `prepend_scheme` is not
/// `never` (older files: `add_prefix_space`, true by default).
fn adds_space_prefix(json: &Value) -> bool {
    let normalizer = json.get("normalizer").unwrap_or(&Value::Null);
    if has_type(normalizer, "Prepend") {
        return true;
    }
    let pre = json.get("pre_tokenizer").unwrap_or(&Value::Null);
    match find_type(pre, "Metaspace") {
        None => false,
        Some(m) => match m.get("prepend_scheme").and_then(Value::as_str) {
            Some(scheme) => scheme != "never",
            None => m
                .get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        },
    }
}

impl Tokenizer {
    /// Builds the tokenizer of the Hugging Face folder `dir` (`tokenizer.json` required,
    /// `tokenizer_config.json` and `generation_config.json` optional).
    pub fn from_hf_folder(dir: &Path) -> Result<Tokenizer> {
        let json_path = dir.join("tokenizer.json");
        let err = |reason: String| Error::Tokenizer(format!("{}: {reason}", json_path.display()));
        let json = read_json(&json_path)?.ok_or_else(|| Error::BadFile {
            path: json_path.clone(),
            reason: "missing: a Hugging Face folder needs tokenizer.json".into(),
        })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_json(&dir.join("generation_config.json"))?;

        let model = json.get("model").unwrap_or(&Value::Null);
        let model_type = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        let byte_level = has_type(json.get("decoder").unwrap_or(&Value::Null), "ByteLevel")
            || has_type(
                json.get("pre_tokenizer").unwrap_or(&Value::Null),
                "ByteLevel",
            );
        let byte_fallback = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
        let kind = match (model_type, byte_level, byte_fallback) {
            ("BPE", true, _) => TokenizerKind::ByteLevelBpe,
            ("BPE", false, true) => TokenizerKind::SentencePiece,
            _ => {
                return Err(err(format!(
                    "a {model_type} tokenizer (byte-level {byte_level}, byte fallback \
                     {byte_fallback}) is not supported: byte-level BPE and SentencePiece BPE are"
                )))
            }
        };

        // The `tokenizers` crate may panic on a hostile file rather than return an error; the
        // panic is turned into an error naming the file.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(&json_path))
            .map_err(|panic| err(format!("cannot read: {}", panic_message(&panic))))?;
        let mut with_special = parsed.map_err(|e| err(format!("cannot read: {e}")))?;
        // Truncation and padding are the caller's business; lutra adds BOS/EOS itself.
        with_special
            .with_truncation(None)
            .map_err(|e| err(e.to_string()))?;
        with_special.with_padding(None);
        let n = with_special.get_vocab_size(true);
        let mut tokens = vec![String::new(); n];
        for (tok, id) in with_special.get_vocab(true) {
            match tokens.get_mut(id as usize) {
                Some(slot) => *slot = tok,
                None => return Err(err(format!("token id {id} of '{tok}' leaves a gap"))),
            }
        }
        let mut types = vec![1i64; n];
        for (id, added) in with_special.get_added_tokens_decoder().iter() {
            if let Some(t) = types.get_mut(*id as usize) {
                *t = if added.special {
                    TYPE_CONTROL
                } else {
                    TYPE_USER_DEFINED
                };
            }
        }
        if kind == TokenizerKind::SentencePiece {
            for (tok, t) in tokens.iter().zip(types.iter_mut()) {
                if *t == 1 && tok.len() == 6 && tok.starts_with("<0x") && tok.ends_with('>') {
                    *t = TYPE_BYTE;
                }
            }
        }
        let control: Vec<bool> = types.iter().map(|&t| t == TYPE_CONTROL).collect();
        let bytes: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&types)
            .map(|(tok, &ty)| token_to_bytes(kind, tok, ty))
            .collect();

        let id_of = |key: &str| -> Result<Option<u32>> {
            match special_token_text(config.as_ref(), key) {
                None => Ok(None),
                Some(text) => with_special.token_to_id(&text).map(Some).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "{}: {key} '{text}' is not in the vocabulary",
                        dir.join("tokenizer_config.json").display()
                    ))
                }),
            }
        };
        let bos = id_of("bos_token")?;
        let eos = id_of("eos_token")?;
        let flag = |key: &str| config.as_ref()?.get(key)?.as_bool();
        // Without `add_bos_token`, ask the post-processor whether it inserts BOS.
        let add_bos = match flag("add_bos_token") {
            Some(b) => b,
            None => bos.is_some_and(|bos| {
                with_special
                    .encode("a", true)
                    .is_ok_and(|e| e.get_ids().first() == Some(&bos))
            }),
        };
        let add_eos = flag("add_eos_token").unwrap_or(false);
        let add_space_prefix = kind == TokenizerKind::SentencePiece && adds_space_prefix(&json);

        let mut plain = with_special.clone();
        plain.set_encode_special_tokens(true);

        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        let ids = generation.as_ref().and_then(|g| g.get("eos_token_id"));
        match ids {
            Some(Value::Number(id)) => end_of_generation.extend(id.as_u64().map(|i| i as u32)),
            Some(Value::Array(a)) => {
                end_of_generation.extend(a.iter().filter_map(Value::as_u64).map(|i| i as u32))
            }
            _ => {}
        }
        end_of_generation.retain(|&id| (id as usize) < n);
        let end_of_generation = super::end_of_generation(end_of_generation, &tokens, &control);

        Ok(Tokenizer {
            kind,
            with_special,
            plain,
            tokens,
            bytes,
            control,
            bos,
            eos,
            add_bos,
            add_eos,
            add_space_prefix,
            end_of_generation,
        })
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the tokenizer library panicked".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    /// A SentencePiece vocabulary with byte fallback, as a GGUF tokenizer and as a Hugging Face
    /// folder written from it.
    #[test]
    fn sentencepiece_folder_matches_the_gguf_tokenizer() {
        let w = crate::tokenizer::tests::tiny_sentencepiece_gguf();
        let dir = crate::fixtures::TempDir::new("hf-spm");
        let path = dir.join("spm.gguf");
        w.write(&path).unwrap();
        let gguf = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        gguf.inner()
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "special": true}, "eos_token": "</s>", "add_bos_token": true}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [2, 5]}"#,
        )
        .unwrap();
        let hf = Tokenizer::from_hf_folder(&dir).unwrap();
        assert_eq!(hf.kind(), TokenizerKind::SentencePiece);
        assert!(hf.add_space_prefix);
        assert_eq!((hf.bos_id(), hf.eos_id()), (Some(1), Some(2)));
        // generation_config's extra end ids count too.
        assert_eq!(hf.end_of_generation_ids(), &[2, 5]);
        for text in ["hello é", "hello hello\nhe", "<s>hello"] {
            for special in [false, true] {
                let ids = gguf.encode(text, special).unwrap();
                assert_eq!(hf.encode(text, special).unwrap(), ids, "{text:?}");
                assert_eq!(
                    hf.decode(&ids, true).unwrap(),
                    gguf.decode(&ids, true).unwrap()
                );
            }
        }

        // A bos_token that is not in the vocabulary is an error naming the file.
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<bos>"}"#,
        )
        .unwrap();
        let err = Tokenizer::from_hf_folder(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("<bos>"),
            "{err}"
        );
        // No tokenizer.json.
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        let err = Tokenizer::from_hf_folder(&dir).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn space_prefix_detection() {
        let j = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert!(adds_space_prefix(&j(
            r#"{"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}]}}"#
        )));
        assert!(adds_space_prefix(&j(
            r#"{"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "first"}}"#
        )));
        assert!(!adds_space_prefix(&j(
            r#"{"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}}"#
        )));
        assert!(adds_space_prefix(&j(
            r#"{"pre_tokenizer": {"type": "Metaspace", "add_prefix_space": true}}"#
        )));
        assert!(!adds_space_prefix(&j(
            r#"{"normalizer": null, "pre_tokenizer": null}"#
        )));
    }
}
