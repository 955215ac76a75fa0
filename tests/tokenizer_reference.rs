//! The GGUF tokenizer of the real SmolLM2-135M model against llama.cpp's token ids
//! (`tests/data/smollm2-135m-q4_1.json`), plus decode round trips and the chat template.

use std::path::PathBuf;

use lutra_runtime::chat::{ChatTemplate, Message};
use lutra_runtime::config::ModelConfig;
use lutra_runtime::gguf::GgufFile;
use lutra_runtime::tokenizer::{StreamDecoder, Tokenizer};

mod common;

fn model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run models/fetch.sh to download the SmolLM2-135M test model",
        path.display()
    );
    path
}

fn load() -> (GgufFile, Tokenizer) {
    let file = GgufFile::open(&model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    (file, tok)
}

#[test]
fn token_ids_match_llama_cpp() {
    let (_, tok) = load();
    let cases = &common::reference().tokenization.cases;
    assert!(
        cases.len() >= 6,
        "reference has {} tokenization cases",
        cases.len()
    );
    for case in cases {
        let text = case.text.as_str();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, case.ids, "token ids of {text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "decode of {text:?}");
        // Streaming gives the same text, one complete character at a time.
        let mut dec = StreamDecoder::new();
        let mut streamed = String::new();
        for &id in &ids {
            let piece = dec.push(&tok, id);
            assert!(
                !piece.contains('\u{FFFD}'),
                "{text:?}: half a character in {piece:?}"
            );
            streamed += &piece;
        }
        streamed += &dec.finish();
        assert_eq!(streamed, text);
    }
}

#[test]
fn special_tokens_and_end_of_generation() {
    let (file, tok) = load();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(ModelConfig::from_gguf(&file).unwrap().vocab_size, 49152);
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.token_str(2), Some("<|im_end|>"));
    assert!(tok.is_end_of_generation(2));
    let hello = common::reference().tokenization_of("Hello, world!");
    assert!(!tok.is_end_of_generation(hello.ids[0]));
    // add_bos_token is false: nothing is prepended.
    assert_eq!(tok.encode(&hello.text, true).unwrap()[0], hello.ids[0]);
    // Without parse_special the markers are text, not control tokens.
    let plain = tok.encode("<|im_start|>user", false).unwrap();
    assert!(!plain.contains(&1), "{plain:?}");
    assert_eq!(tok.decode(&plain, false).unwrap(), "<|im_start|>user");
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn smollm2_chat_template_from_file() {
    let (file, tok) = load();
    let t = ChatTemplate::from_gguf(&file, &tok).unwrap();
    // One user message renders (with the template's default system message) to the prompt of
    // the reference's chat case.
    let out = t
        .render(&[Message::new("user", "What is 2+2?")], true)
        .unwrap();
    assert_eq!(out, common::reference().greedy_chat_case().prompt);
    assert_eq!(t.end_of_turn(), Some("<|im_end|>"));
    // The rendered prompt tokenizes to control tokens where expected.
    let ids = tok.encode(&out, true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
}

#[test]
fn real_model_config_and_tensors() {
    let (file, _) = load();
    let c = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(
        (c.hidden_size, c.layers, c.heads, c.kv_heads, c.ffn_size),
        (576, 30, 9, 3, 1536)
    );
    assert_eq!(c.head_dim, 64);
    assert!(c.tied_embeddings);
    let q = file.decode_tensor("blk.0.attn_q.weight").unwrap();
    assert!(matches!(
        q,
        lutra_runtime::weights::DecodedTensor::LowBit {
            bits: 4,
            group_size: 32,
            ..
        }
    ));
    assert_eq!((q.rows(), q.cols()), (576, 576));
    let e = file.decode_tensor("token_embd.weight").unwrap();
    assert!(matches!(
        e,
        lutra_runtime::weights::DecodedTensor::Int8 { .. }
    ));
    assert_eq!((e.rows(), e.cols()), (49152, 576));
}
