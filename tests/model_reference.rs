//! End-to-end checks of the Llama forward pass on the real SmolLM2-135M-Instruct Q4_1 model
//! against llama.cpp's greedy completions (`tests/data/smollm2-135m-q4_1.json`).
//!
//! A completion must match exactly, including where it stops at EOS. The only divergence allowed
//! is a near tie of the exact f32 `reference` model: at the step where the text first differs,
//! the token the fast path picks must be within `FAST_TIE` of the reference's top logit, and the
//! token llama.cpp's text continues with within `LLAMA_TIE` of it. After such a tie the case is
//! not compared further (the two continuations are different texts).

use std::path::{Path, PathBuf};

use lutra::llama::{LoadOptions, Model, Requantize};

mod common;

const EOS: u32 = 2;
/// How far below the exact model's top logit the fast path's pick may be at a divergence.
///
/// The fast path rounds every matmul input to int8 tables: at the divergences of these prompts its
/// logits differ from the exact model's by up to 0.48 (the largest over the vocabulary). After
/// "The meaning of life is not just a" the exact model ranks " random", " choice", " product"
/// within 0.073, and the fast path picks " product" by a margin of 0.089.
const FAST_TIE: f32 = 0.1;

/// How far below the exact model's top logit llama.cpp's pick may be at a divergence: llama.cpp
/// rounds every matmul input to Q8_1/Q8_0, which moves such gaps by up to about 0.2 in our
/// measurements (" type" 0.134 below " text" late in the Rust prompt); our exact model's
/// perplexity is within 0.12% of llama.cpp's.
const LLAMA_TIE: f32 = 0.2;

fn model_path() -> PathBuf {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run models/fetch.sh to download it",
        path.display()
    );
    path
}

/// Indices of the largest and second-largest logits.
fn top2(logits: &[f32]) -> (usize, usize) {
    let (mut a, mut b) = (0, 1);
    if logits[b] > logits[a] {
        std::mem::swap(&mut a, &mut b);
    }
    for (i, &v) in logits.iter().enumerate().skip(2) {
        if v > logits[a] {
            b = a;
            a = i;
        } else if v > logits[b] {
            b = i;
        }
    }
    (a, b)
}

/// Logits after feeding `tokens` from an empty cache.
fn logits_after(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut logits = vec![0.0; model.config().vocab_size];
    let mut cache = model.new_cache();
    model
        .forward(tokens, &mut cache, &mut logits)
        .expect("forward");
    logits
}

#[test]
fn greedy_completions_match_llama_cpp() {
    let path = model_path();
    // The f32 KV cache: with the default f16 cache the first prompt's near tie (exact-model gap
    // 0.013 after " not just a") goes to a third token (" product"), which this exact comparison
    // with llama.cpp would count as a divergence.
    let opts = LoadOptions {
        threads: 2,
        context_length: Some(512),
        kv_f16: false,
        ..LoadOptions::default()
    };
    let model = Model::load(&path, &opts).expect("model loads");
    let tokenizer = model.tokenizer().expect("the file has a tokenizer");
    let mut reference: Option<Model> = None;
    let cases = &common::reference().greedy.cases;
    assert!(!cases.is_empty());
    // Every case is checked; failures are collected so that one report shows them all.
    let mut failures = Vec::new();

    for case in cases {
        let prompt = case.prompt.as_str();
        let expected = case.completion.as_str();
        let n_predict = case.n_predict;
        let expect_eos = case.stopped_at_eos;

        let mut tokens = tokenizer.encode(prompt, true).expect("encode");
        let prompt_len = tokens.len();
        let mut cache = model.new_cache();
        let mut logits = vec![0.0; model.config().vocab_size];
        model
            .forward(&tokens, &mut cache, &mut logits)
            .expect("prefill");
        let mut stopped_at_eos = false;
        let mut tie = false;
        for _ in 0..n_predict {
            let (next, _) = top2(&logits);
            let next = next as u32;
            let is_eos = |id: u32| id == EOS || tokenizer.is_end_of_generation(id);
            let so_far = tokenizer
                .decode(&tokens[prompt_len..], false)
                .expect("decode");
            // The text llama.cpp would have after token `id`, or None when `id` ends it.
            let continues = |id: u32| -> bool {
                if is_eos(id) {
                    return so_far == expected;
                }
                let mut ids = tokens[prompt_len..].to_vec();
                ids.push(id);
                let text = tokenizer.decode(&ids, false).expect("decode");
                expected.starts_with(&text)
            };
            if !continues(next) {
                // Divergence: allowed only for a near tie that the exact model confirms.
                let exact = reference.get_or_insert_with(|| {
                    let opts = LoadOptions {
                        reference: true,
                        threads: 2,
                        context_length: Some(512),
                        kv_f16: false,
                        ..LoadOptions::default()
                    };
                    Model::load(&path, &opts).expect("reference model loads")
                });
                let ref_logits = logits_after(exact, &tokens);
                let (first, _) = top2(&ref_logits);
                let below_top = |id: u32| ref_logits[first] - ref_logits[id as usize];
                // The token llama.cpp's text continues with, among the exact model's nearest.
                let llama_pick = (0..ref_logits.len() as u32)
                    .filter(|&id| below_top(id) < LLAMA_TIE)
                    .find(|&id| continues(id));
                let fast_gap = below_top(next);
                match llama_pick {
                    Some(pick) if fast_gap < FAST_TIE => eprintln!(
                        "prompt {prompt:?}: near tie after {so_far:?}: fast path {:?} {fast_gap:.4} and \
                         llama.cpp {:?} {:.4} below the exact top {:?}; not compared further",
                        tokenizer.decode(&[next], false).unwrap_or_default(),
                        tokenizer.decode(&[pick], false).unwrap_or_default(),
                        below_top(pick),
                        tokenizer.decode(&[first as u32], false).unwrap_or_default(),
                    ),
                    _ => failures.push(format!(
                        "prompt {prompt:?}: diverged after {so_far:?}: fast path picked {next} ({:?}) \
                         {fast_gap:.4} below the exact top {first} ({:?}) (a tie needs < {FAST_TIE}); \
                         llama.cpp's continuation within {LLAMA_TIE} of it: {llama_pick:?}; \
                         llama.cpp continues {expected:?}",
                        tokenizer.decode(&[next], false).unwrap_or_default(),
                        tokenizer.decode(&[first as u32], false).unwrap_or_default(),
                    )),
                }
                tie = true;
                break;
            }
            if is_eos(next) {
                stopped_at_eos = true;
                break;
            }
            tokens.push(next);
            model
                .forward(&[next], &mut cache, &mut logits)
                .expect("decode step");
        }
        if tie {
            continue;
        }
        let text = tokenizer
            .decode(&tokens[prompt_len..], false)
            .expect("decode");
        if text != expected || stopped_at_eos != expect_eos {
            failures.push(format!(
                "prompt {prompt:?}: generated {text:?} (stopped at EOS: {stopped_at_eos}), \
                 llama.cpp {expected:?} (stopped at EOS: {expect_eos})"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn requantized_loads_produce_finite_logits() {
    let path = model_path();
    let tokens = [504u32, 3458, 282, 1029, 314];
    for (bits, group_size) in [(1u8, 64usize), (2, 32), (3, 64), (4, 32)] {
        let opts = LoadOptions {
            threads: 2,
            requantize: Some(Requantize { bits, group_size }),
            context_length: Some(64),
            ..LoadOptions::default()
        };
        let model = Model::load(&path, &opts).expect("requantized model loads");
        let info = model.describe();
        let lut = format!("lut{bits} g{group_size}");
        assert!(
            info.tensor_types
                .iter()
                .any(|t| t.kernel == lut && t.count == 30 * 7),
            "{info}"
        );
        let logits = logits_after(&model, &tokens);
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "{bits} bits: non-finite logits"
        );
        let spread = logits.iter().cloned().fold(f32::MIN, f32::max)
            - logits.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1.0, "{bits} bits: flat logits");
    }
}
