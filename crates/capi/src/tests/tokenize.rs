//! `lutra_tokenize`: the model's tokenizer, and its buffer-size contract.

use std::ptr::null_mut;

use super::{c_string, last_error, real_model};
use crate::tokenize::lutra_tokenize;

/// Tokenizes through the C function with a buffer of `capacity` ids (pre-filled with a marker).
fn tokenize(text: &str, parse_special: bool, capacity: usize) -> (i32, usize, Vec<u32>) {
    let text = c_string(text);
    let mut buffer = vec![u32::MAX; capacity];
    let mut n = usize::MAX;
    let ptr = if capacity == 0 {
        null_mut()
    } else {
        buffer.as_mut_ptr()
    };
    let status = lutra_tokenize(
        real_model(),
        text.as_ptr(),
        i32::from(parse_special),
        ptr,
        capacity,
        &mut n,
    );
    (status, n, buffer)
}

#[test]
fn tokens_round_trip_through_the_tokenizer() {
    let tokenizer = real_model().model().tokenizer().unwrap();
    for text in [
        "Hello, world!",
        "The capital of France is Paris.",
        "naïve café ☕ 東京",
        "",
    ] {
        let (status, n, buffer) = tokenize(text, false, 64);
        assert_eq!(status, 0, "{text:?}: {:?}", last_error());
        let ids = &buffer[..n];
        assert_eq!(
            ids,
            tokenizer.encode(text, false).unwrap().as_slice(),
            "{text:?}"
        );
        assert_eq!(tokenizer.decode(ids, false).unwrap(), text);
        assert!(
            buffer[n..].iter().all(|&t| t == u32::MAX),
            "nothing is written past n"
        );
    }
}

#[test]
fn special_tokens_are_parsed_only_when_asked() {
    let (status, n, buffer) = tokenize("<|im_start|>user", true, 16);
    assert_eq!(status, 0);
    let im_start = real_model()
        .model()
        .tokenizer()
        .unwrap()
        .token_id("<|im_start|>")
        .unwrap();
    assert_eq!(buffer[0], im_start);
    assert_eq!(n, 2);
    let (status, plain, buffer) = tokenize("<|im_start|>user", false, 16);
    assert_eq!(status, 0);
    assert!(plain > 2, "as plain text the marker is several tokens");
    assert_ne!(buffer[0], im_start);
}

#[test]
fn a_small_buffer_gets_the_count_and_the_first_tokens() {
    let text = "The quick brown fox jumps over the lazy dog.";
    // Sizing call: no buffer.
    let (status, n, _) = tokenize(text, true, 0);
    assert_eq!(status, -1);
    assert!(n > 4, "the full count is reported: {n}");
    let message = last_error().unwrap();
    assert_eq!(
        message,
        format!("the text has {n} tokens, more than the capacity of 0")
    );

    let (_, _, all) = tokenize(text, true, n);
    let (status, reported, buffer) = tokenize(text, true, n - 1);
    assert_eq!((status, reported), (-1, n));
    assert_eq!(
        buffer,
        all[..n - 1],
        "the first capacity tokens are written"
    );

    let (status, reported, buffer) = tokenize(text, true, n + 3);
    assert_eq!((status, reported), (0, n));
    assert_eq!(&buffer[..n], &all[..]);
    assert_eq!(&buffer[n..], &[u32::MAX; 3]);
}
