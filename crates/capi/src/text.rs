//! Rust text as C strings.

use std::ffi::CString;

/// `text` as a C string. A C string cannot hold a NUL character, so any NUL in `text` (a model
/// may generate one) is left out.
pub(crate) fn to_c_string(text: &str) -> CString {
    let bytes: Vec<u8> = text.bytes().filter(|&b| b != 0).collect();
    // Never the default: every NUL was removed above.
    CString::new(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::to_c_string;

    #[test]
    fn nul_characters_are_left_out() {
        assert_eq!(to_c_string("Paris\0 is\0").as_bytes(), b"Paris is");
        assert_eq!(to_c_string("東京").to_str().unwrap(), "東京");
    }
}
