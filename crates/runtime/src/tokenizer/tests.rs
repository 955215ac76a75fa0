//! Unit tests of `tokenizer`.
use super::*;
use crate::fixtures::{tiny_llama_gguf, GgufWriter, TempDir, TinyModelSpec};

fn tiny() -> Tokenizer {
    let dir = TempDir::new("tok");
    let path = dir.join("tiny.gguf");
    tiny_llama_gguf(
        &path,
        &TinyModelSpec {
            layers: 1,
            ..TinyModelSpec::default()
        },
        1,
    )
    .unwrap();
    Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
}

#[test]
fn byte_level_alphabet_is_a_bijection() {
    for b in 0..=255u8 {
        assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
    }
    assert_eq!(byte_to_char(b' '), 'Ġ');
    assert_eq!(byte_to_char(b'\n'), 'Ċ');
    assert_eq!(char_to_byte('\u{3000}'), None);
}

#[test]
fn tiny_bpe_encodes_with_merges_and_specials() {
    let t = tiny();
    let the = t.token_id("Ġthe").unwrap();
    let hell = t.token_id("Hell").unwrap();
    let ids = t.encode("Hello the", false).unwrap();
    assert_eq!(ids, vec![hell, t.token_id("o").unwrap(), the]);
    assert_eq!(t.decode(&ids, false).unwrap(), "Hello the");
    let ids = t.encode("<|im_start|>user\n", true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(t.decode(&ids, false).unwrap(), "<|im_start|>user\n");
    assert_eq!(t.decode(&ids, true).unwrap(), "user\n");
    // Without parse_special the marker is plain text.
    let plain = t.encode("<|im_start|>", false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&1));
    assert_eq!(t.decode(&plain, false).unwrap(), "<|im_start|>");
    assert!(t.is_end_of_generation(2));
    assert!(!t.is_end_of_generation(the));
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
}

#[test]
fn stream_decoder_never_splits_a_character() {
    let t = tiny();
    let text = "a🦀é";
    let ids = t.encode(text, false).unwrap();
    // The crab is four byte tokens; nothing of it may come out before the last one.
    let mut dec = StreamDecoder::new();
    let pieces: Vec<String> = ids.iter().map(|&id| dec.push(&t, id)).collect();
    assert_eq!(pieces[0], "a");
    assert_eq!(&pieces[1..4], ["", "", ""]);
    assert_eq!(pieces[4], "🦀");
    assert_eq!(pieces.concat() + &dec.finish(), text);
    // A dangling half character comes out as U+FFFD at the end.
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push(&t, ids[1]), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(dec.finish(), "");
}

fn pre_split(pre: &str, text: &str) -> Vec<String> {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let mut s = PreTokenizedString::from(text);
    byte_level_pre_tokenizer(pre)
        .unwrap()
        .pre_tokenize(&mut s)
        .unwrap();
    s.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(piece, _, _)| piece.to_string())
        .collect()
}

#[test]
fn pre_tokenizer_families() {
    // SmolLM2: one digit at a time, GPT-2 words with their leading space.
    assert_eq!(pre_split("smollm", "ab 123"), ["ab", "Ġ", "1", "2", "3"]);
    // Llama 3: digits in threes, and a space never joins digits.
    assert_eq!(pre_split("llama-bpe", "ab 12345"), ["ab", "Ġ", "123", "45"]);
    assert_eq!(pre_split("qwen2", "ab 12"), ["ab", "Ġ", "1", "2"]);
    // GPT-2: digits run together with the space.
    assert_eq!(pre_split("gpt2", "ab 123"), ["ab", "Ġ123"]);
}

/// A SentencePiece vocabulary with byte fallback as GGUF metadata: `▁ h e l o`, merges ranked by
/// score (`▁hello` reachable), byte tokens for everything else; BOS 1, EOS 2, UNK 0.
pub(crate) fn tiny_sentencepiece_gguf() -> GgufWriter {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i64, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TYPE_BYTE);
    }
    for t in ["▁", "h", "e", "l", "o", "he", "ll", "▁he", "llo", "▁hello"] {
        tokens.push(t.into());
        types.push(1);
    }
    let scores: Vec<MetaValue> = (0..tokens.len())
        .map(|i| MetaValue::F32(-(i as f32)))
        .collect();
    let mut w = GgufWriter::new();
    w.add_metadata("tokenizer.ggml.model", MetaValue::String("llama".into()));
    w.add_metadata(
        "tokenizer.ggml.tokens",
        MetaValue::Array(tokens.iter().cloned().map(MetaValue::String).collect()),
    );
    w.add_metadata(
        "tokenizer.ggml.token_type",
        MetaValue::Array(types.iter().map(|&t| MetaValue::I32(t as i32)).collect()),
    );
    w.add_metadata("tokenizer.ggml.scores", MetaValue::Array(scores));
    w.add_metadata("tokenizer.ggml.bos_token_id", MetaValue::U32(1));
    w.add_metadata("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    w.add_metadata("tokenizer.ggml.unknown_token_id", MetaValue::U32(0));
    w
}

#[test]
fn sentencepiece_with_byte_fallback() {
    let w = tiny_sentencepiece_gguf();
    let dir = TempDir::new("spm");
    let path = dir.join("spm.gguf");
    w.write(&path).unwrap();
    let t = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let id = |s: &str| t.token_id(s).unwrap();
    let ids = t.encode("hello é", true).unwrap();
    // BOS (SentencePiece default), ▁hello, ▁, then é as two byte tokens.
    assert_eq!(
        ids,
        vec![1, id("▁hello"), id("▁"), id("<0xC3>"), id("<0xA9>")]
    );
    assert_eq!(t.decode(&ids, true).unwrap(), "hello é");
}

#[test]
fn user_defined_tokens_are_always_parsed() {
    // A byte-level vocabulary with one user-defined token "<tool>" and one control token.
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    let mut types = vec![1i32; 256];
    tokens.push("<tool>".into());
    types.push(4);
    tokens.push("<|eot_id|>".into());
    types.push(3);
    let mut w = GgufWriter::new();
    w.add_metadata("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    w.add_metadata(
        "tokenizer.ggml.tokens",
        MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()),
    );
    w.add_metadata(
        "tokenizer.ggml.token_type",
        MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
    );
    w.add_metadata("tokenizer.ggml.merges", MetaValue::Array(vec![]));
    let dir = TempDir::new("userdef");
    let path = dir.join("userdef.gguf");
    w.write(&path).unwrap();
    let t = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(
        t.encode("a<tool>", false).unwrap(),
        vec![u32::from(b'a'), 256]
    );
    assert_eq!(t.encode("<|eot_id|>", true).unwrap(), vec![257]);
    assert_eq!(t.encode("<|eot_id|>", false).unwrap().len(), 10);
    // <|eot_id|> ends a generation even without an eot_token_id key; BOS/EOS are absent.
    assert!(t.is_end_of_generation(257));
    assert_eq!((t.bos_id(), t.eos_id()), (None, None));
    assert_eq!(t.decode(&[97, 256, 257], true).unwrap(), "a<tool>");
}
