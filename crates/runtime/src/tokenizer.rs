//! Tokenizers built from GGUF metadata: byte-level BPE (`gpt2`) and SentencePiece-style BPE with
//! byte fallback (`llama`), wrapping the `tokenizers` crate.
//!
//! Encoding goes through `tokenizers`; decoding is done here from each token's raw bytes, the way
//! llama.cpp's `token_to_piece` does it, so that streaming ([`StreamDecoder`]) and whole decodes
//! agree byte for byte.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{GgufFile, MetaValue};
use crate::{Error, Result};

/// Llama 3's pre-tokenizer regex (`llama-bpe` in llama.cpp).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens that end a turn or a generation when the vocabulary has them as control tokens.
const END_TOKENS: [&str; 8] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
];

/// `ids` plus every control token named in [`END_TOKENS`], sorted without repeats (for binary search).
fn end_of_generation(mut ids: Vec<u32>, tokens: &[String], control: &[bool]) -> Vec<u32> {
    for (id, tok) in tokens.iter().enumerate() {
        if control[id] && END_TOKENS.contains(&tok.as_str()) {
            ids.push(id as u32);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// GGUF `tokenizer.ggml.token_type` values.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// SentencePiece's visible space.
const SPM_SPACE: char = '\u{2581}';

/// Which algorithm the model's vocabulary uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE (GPT-2 style, `tokenizer.ggml.model = "gpt2"`).
    ByteLevelBpe,
    /// SentencePiece BPE with byte fallback (`tokenizer.ggml.model = "llama"`).
    SentencePiece,
}

/// A model's tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    /// Splits control tokens out of the text (`parse_special = true`).
    with_special: tokenizers::Tokenizer,
    /// Treats control tokens as plain text (`parse_special = false`).
    plain: tokenizers::Tokenizer,
    tokens: Vec<String>,
    bytes: Vec<Vec<u8>>,
    control: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    end_of_generation: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by the `tokenizer.ggml.*` metadata of `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let model = file.require_str("tokenizer.ggml.model")?;
        let kind = match model {
            "gpt2" => TokenizerKind::ByteLevelBpe,
            "llama" => TokenizerKind::SentencePiece,
            other => {
                return Err(file.meta_error(
                    "tokenizer.ggml.model",
                    &format!("tokenizer model '{other}' is not supported (gpt2 and llama are)"),
                ))
            }
        };
        let tokens: Vec<String> = string_array(file, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types: Vec<i64> = match file.metadata("tokenizer.ggml.token_type") {
            None => vec![1; n],
            Some(v) => {
                let types: Option<Vec<i64>> = v
                    .as_array()
                    .map(|a| a.iter().map(MetaValue::as_i64).collect())
                    .and_then(|t| t);
                match types {
                    Some(t) if t.len() == n => t,
                    _ => {
                        return Err(file.meta_error(
                            "tokenizer.ggml.token_type",
                            &format!("expected {n} integers"),
                        ))
                    }
                }
            }
        };
        let id_key = |key: &str| -> Result<Option<u32>> {
            match file.metadata(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(id) if (id as usize) < n => Ok(Some(id as u32)),
                    // llama.cpp writes -1 (or a huge u32) for "none".
                    _ if v.as_i64().is_some_and(|i| i < 0) => Ok(None),
                    _ => Err(file.meta_error(
                        key,
                        &format!("token id {v:?} is outside the vocabulary of {n}"),
                    )),
                },
            }
        };
        let flag = |key: &str, default: bool| {
            file.metadata(key)
                .and_then(MetaValue::as_bool)
                .unwrap_or(default)
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let eot = id_key("tokenizer.ggml.eot_token_id")?;
        let eom = id_key("tokenizer.ggml.eom_token_id")?;
        // llama.cpp's defaults: SentencePiece adds BOS and a space prefix, BPE does neither.
        let spm = kind == TokenizerKind::SentencePiece;
        let add_bos = flag("tokenizer.ggml.add_bos_token", spm);
        let add_eos = flag("tokenizer.ggml.add_eos_token", false);
        let add_space_prefix = spm && flag("tokenizer.ggml.add_space_prefix", true);

        let control: Vec<bool> = types.iter().map(|&t| t == TYPE_CONTROL).collect();
        let bytes: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&types)
            .map(|(tok, &ty)| token_to_bytes(kind, tok, ty))
            .collect();

        let model = match kind {
            TokenizerKind::ByteLevelBpe => {
                let merges = string_array(file, "tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| {
                                file.meta_error(
                                    "tokenizer.ggml.merges",
                                    &format!("merge '{m}' has no space"),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let pre = file
                    .metadata("tokenizer.ggml.pre")
                    .and_then(MetaValue::as_str)
                    .unwrap_or("default");
                BPE::builder()
                    .vocab_and_merges(vocab_of(&tokens), merges)
                    // Llama 3 looks whole words up before merging (llama.cpp's ignore_merges).
                    .ignore_merges(pre == "llama-bpe" || pre == "llama3")
                    .build()
            }
            TokenizerKind::SentencePiece => {
                let scores: Vec<f32> = match file
                    .metadata("tokenizer.ggml.scores")
                    .and_then(MetaValue::as_array)
                {
                    Some(a) if a.len() == n => {
                        a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()
                    }
                    _ => vec![0.0; n],
                };
                let mut b = BPE::builder()
                    .vocab_and_merges(vocab_of(&tokens), spm_merges(&tokens, &types, &scores))
                    .byte_fallback(true);
                if let Some(unk) = id_key("tokenizer.ggml.unknown_token_id")? {
                    b = b.unk_token(tokens[unk as usize].clone()).fuse_unk(true);
                }
                b.build()
            }
        }
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.path().display())))?;

        let mut with_special = tokenizers::Tokenizer::new(model);
        match kind {
            TokenizerKind::ByteLevelBpe => {
                let pre = file
                    .metadata("tokenizer.ggml.pre")
                    .and_then(MetaValue::as_str)
                    .unwrap_or("default");
                with_special.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
                with_special.with_decoder(Some(ByteLevelDecoder::default()));
            }
            TokenizerKind::SentencePiece => {
                let mut norms = Vec::new();
                if add_space_prefix {
                    norms.push(Prepend::new(SPM_SPACE.to_string()).into());
                }
                norms.push(
                    Replace::new(" ", SPM_SPACE.to_string())
                        .map_err(|e| Error::Tokenizer(e.to_string()))?
                        .into(),
                );
                with_special.with_normalizer(Some(NormalizerSequence::new(norms)));
            }
        }
        let added = |ty: i64| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == ty)
                .map(|(tok, _)| AddedToken::from(tok.clone(), ty == TYPE_CONTROL).normalized(false))
                .collect()
        };
        // Adding tokens already in the vocabulary keeps their ids. Control tokens are "special"
        // (not parsed when `parse_special` is off); user-defined ones are always parsed, as in
        // llama.cpp.
        with_special.add_special_tokens(&added(TYPE_CONTROL));
        with_special.add_tokens(&added(TYPE_USER_DEFINED));
        let mut plain = with_special.clone();
        plain.set_encode_special_tokens(true);

        let end_of_generation = end_of_generation(
            [eos, eot, eom].into_iter().flatten().collect(),
            &tokens,
            &control,
        );

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

    /// Token ids of `text`. With `parse_special`, control tokens written in the text (`<|im_start|>`)
    /// become their ids; without, they are tokenized as plain text. BOS is added only when the model
    /// asks for it (`tokenizer.ggml.add_bos_token`).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.with_special
        } else {
            &self.plain
        };
        let enc = tok
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        if self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// The text of `ids`. With `skip_special`, control tokens are left out. Invalid UTF-8 (a
    /// character cut off at the end) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut out = Vec::new();
        for &id in ids {
            if id as usize >= self.tokens.len() {
                return Err(Error::Tokenizer(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.tokens.len()
                )));
            }
            if skip_special && self.control[id as usize] {
                continue;
            }
            out.extend_from_slice(&self.bytes[id as usize]);
        }
        let mut text = String::from_utf8_lossy(&out).into_owned();
        // SentencePiece's added space prefix is not part of the text.
        if self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        Ok(text)
    }

    /// Raw bytes of token `id` (byte-level decoded; empty for an id outside the vocabulary).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The token's string as stored in the vocabulary (`Ġthe`, `▁the`, `<|im_end|>`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the token whose vocabulary string is exactly `token`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.with_special.token_to_id(token)
    }

    /// Whether `id` is a control token (`<|im_start|>`, BOS, EOS, ...).
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether generating `id` ends the generation: EOS, EOT, or an end-of-turn control token
    /// such as `<|im_end|>` or `<|eot_id|>`.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Which algorithm this tokenizer runs.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// The underlying `tokenizers` tokenizer (control tokens parsed).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.with_special
    }
}

/// Turns token ids into text one at a time, emitting only complete UTF-8 characters: a character
/// split over several byte tokens (an emoji) comes out whole, once its last byte arrives.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds token `id` and returns the text completed by it (possibly empty). Control tokens are
    /// emitted as their text; callers that do not want them should not push them.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tok.token_bytes(id));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just validated, so this cannot fail.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be valid: replace them, as a whole decode would.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left (an unfinished character becomes U+FFFD), and resets the decoder.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

fn string_array(file: &GgufFile, key: &str) -> Result<Vec<String>> {
    let arr = file
        .require(key)?
        .as_array()
        .ok_or_else(|| file.meta_error(key, "expected an array"))?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| file.meta_error(key, "expected an array of strings"))
}

fn vocab_of(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        // Some vocabularies repeat a string; the first id wins, as in llama.cpp.
        vocab.entry(tok.clone()).or_insert(id as u32);
    }
    vocab
}

fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match pre {
        // SmolLM2's tokenizer.json: single digits, then GPT-2's regex.
        "smollm" | "starcoder" => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3_REGEX),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_REGEX),
        _ => Ok(ByteLevel::new(false, true, true).into()),
    }
}

/// Merges for a SentencePiece vocabulary, which GGUF stores with scores instead: every split of a
/// token into two tokens is a merge, ranked by the merged token's score (then its id), as the
/// `tokenizers` SentencePiece converter does.
fn spm_merges(tokens: &[String], types: &[i64], scores: &[f32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if types[id] == TYPE_CONTROL || types[id] == TYPE_BYTE {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores[id], id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

/// The raw bytes a token stands for.
fn token_to_bytes(kind: TokenizerKind, tok: &str, ty: i64) -> Vec<u8> {
    if ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED {
        return tok.as_bytes().to_vec();
    }
    match kind {
        TokenizerKind::ByteLevelBpe => {
            let mut out = Vec::with_capacity(tok.len());
            for c in tok.chars() {
                match char_to_byte(c) {
                    Some(b) => out.push(b),
                    // Not a byte-level character: keep the text as it is.
                    None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            out
        }
        TokenizerKind::SentencePiece => {
            if ty == TYPE_BYTE {
                if let Some(b) = tok
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    return vec![b];
                }
            }
            tok.replace(SPM_SPACE, " ").into_bytes()
        }
    }
}

fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The printable character GPT-2's byte-level BPE uses for byte `b`.
pub fn byte_to_char(b: u8) -> char {
    if is_printable_byte(b) {
        char::from(b)
    } else {
        // Non-printable bytes map, in order, to U+0100 onwards.
        let rank = (0..b).filter(|&c| !is_printable_byte(c)).count() as u32;
        char::from_u32(0x100 + rank).unwrap_or('?')
    }
}

/// The byte a byte-level BPE character stands for, if it is one.
pub fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 0x100 {
        let b = code as u8;
        return is_printable_byte(b).then_some(b);
    }
    let rank = usize::try_from(code - 0x100).ok()?;
    (0..=255u8).filter(|&b| !is_printable_byte(b)).nth(rank)
}

mod hf;
#[cfg(test)]
mod tests;
