//! Unit tests of `gguf`.
use super::*;
use crate::fixtures::{GgufWriter, TempDir};

fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", MetaValue::String("llama".into()));
    w.add_metadata("test.u8", MetaValue::U8(7));
    w.add_metadata("test.i64", MetaValue::I64(-5));
    w.add_metadata("test.f64", MetaValue::F64(0.25));
    w.add_metadata("test.bool", MetaValue::Bool(true));
    w.add_metadata(
        "test.strings",
        MetaValue::Array(vec![
            MetaValue::String("a".into()),
            MetaValue::String("bé".into()),
        ]),
    );
    w.add_metadata(
        "test.ints",
        MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
    );
    let vals: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    w.add_tensor_f32("norm.weight", &[64], &vals).unwrap();
    w.add_tensor_f16("half.weight", &[32, 2], &vals).unwrap();
    w.add_tensor_q4_1("q41.weight", &[32, 2], &vals).unwrap();
    w.add_tensor_q4_0("q40.weight", &[64, 1], &vals).unwrap();
    w.add_tensor_q8_0("q80.weight", &[32, 2], &vals).unwrap();
    w
}

#[test]
fn round_trip_metadata_and_tensors() {
    let dir = TempDir::new("gguf-roundtrip");
    let path = dir.join("roundtrip.gguf");
    sample_writer().write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.metadata("test.u8"), Some(&MetaValue::U8(7)));
    assert_eq!(f.metadata("test.i64").and_then(MetaValue::as_i64), Some(-5));
    assert_eq!(f.metadata("test.f64"), Some(&MetaValue::F64(0.25)));
    assert_eq!(
        f.metadata("test.bool").and_then(MetaValue::as_bool),
        Some(true)
    );
    let strings = f
        .metadata("test.strings")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(strings[1].as_str(), Some("bé"));
    assert_eq!(
        f.metadata("test.ints").unwrap().as_array().unwrap()[1],
        MetaValue::I32(-2)
    );
    assert_eq!(
        f.tensor_names().collect::<Vec<_>>(),
        [
            "norm.weight",
            "half.weight",
            "q41.weight",
            "q40.weight",
            "q80.weight"
        ]
    );
    for t in f.tensors() {
        assert_eq!(
            (t.offset - f.data_offset()) % f.alignment(),
            0,
            "{}",
            t.name
        );
    }
    let vals: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(f.decode_tensor("norm.weight").unwrap().dequantize(), vals);
    let half = f.decode_tensor("half.weight").unwrap();
    assert_eq!((half.rows(), half.cols()), (2, 32));
    for (a, b) in half.dequantize().iter().zip(&vals) {
        assert!((a - b).abs() < 1e-3);
    }
    // 4-bit: error at most half a step (range/15/2) plus f16 rounding of the scale.
    for name in ["q41.weight", "q40.weight"] {
        let t = f.decode_tensor(name).unwrap();
        assert!(matches!(
            t,
            DecodedTensor::LowBit {
                bits: 4,
                group_size: 32,
                ..
            }
        ));
        for (a, b) in t.dequantize().iter().zip(&vals) {
            assert!((a - b).abs() < 0.15, "{name}: {a} vs {b}");
        }
    }
    let q8 = f.decode_tensor("q80.weight").unwrap();
    assert!(matches!(
        q8,
        DecodedTensor::Int8 {
            rows: 2,
            cols: 32,
            ..
        }
    ));
    for (a, b) in q8.dequantize().iter().zip(&vals) {
        assert!((a - b).abs() < 0.01);
    }
    assert!(matches!(
        f.decode_tensor("nope"),
        Err(Error::MissingTensor { .. })
    ));
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let bytes = sample_writer().to_bytes();
    let dir = TempDir::new("gguf-truncated");
    let path = dir.join("truncated.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::BadFile { .. }), "{msg}");
    assert!(msg.contains("truncated.gguf"), "{msg}");
    assert!(
        msg.contains("q80.weight") && msg.contains("data ends at byte"),
        "{msg}"
    );

    // Cut inside the header: every prefix must fail cleanly, never panic.
    let header_end = GgufFile::open(&{
        let p = dir.join("full.gguf");
        std::fs::write(&p, &bytes).unwrap();
        p
    })
    .unwrap()
    .data_offset();
    for cut in (0..header_end).step_by(7) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&path).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "cut {cut}: {err}");
    }
}

#[test]
fn corrupt_header_is_bad_file() {
    let mut bytes = sample_writer().to_bytes();
    let dir = TempDir::new("gguf-corrupt");
    let path = dir.join("corrupt.gguf");
    bytes[0] = b'X';
    std::fs::write(&path, &bytes).unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("corrupt.gguf") && msg.contains("not a GGUF file"),
        "{msg}"
    );

    let mut bytes = sample_writer().to_bytes();
    bytes[4] = 9; // version
    std::fs::write(&path, &bytes).unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    assert!(msg.contains("version 9"), "{msg}");

    // A string length of 2^60 in the first key.
    let mut bytes = sample_writer().to_bytes();
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(GgufFile::open(&path), Err(Error::BadFile { .. })));
}

#[test]
fn unknown_tensor_type_is_unsupported() {
    let mut w = GgufWriter::new();
    w.add_tensor_raw("odd.weight", &[4], 99, vec![0; 4])
        .unwrap();
    let dir = TempDir::new("gguf-unknown");
    let path = dir.join("unknown.gguf");
    w.write(&path).unwrap();
    match GgufFile::open(&path) {
        Err(Error::UnsupportedTensorType { tensor, ty, .. }) => {
            assert_eq!(tensor, "odd.weight");
            assert!(ty.contains("99"));
        }
        other => panic!("expected UnsupportedTensorType, got {other:?}"),
    }
    // A known but undecodable type opens, and fails only when decoded.
    let mut w = GgufWriter::new();
    w.add_tensor_raw("fp4.weight", &[32], GgmlType::MXFP4.id(), vec![0; 17])
        .unwrap();
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let err = f.decode_tensor("fp4.weight").unwrap_err();
    assert!(matches!(err, Error::UnsupportedTensorType { .. }), "{err}");
    assert!(err.to_string().contains("MXFP4"));
}

#[test]
fn missing_metadata_is_metadata_error() {
    let dir = TempDir::new("gguf-nometa");
    let path = dir.join("nometa.gguf");
    sample_writer().write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let err = crate::config::ModelConfig::from_gguf(&f).unwrap_err();
    assert!(
        matches!(err, Error::Metadata { ref key, .. } if key == "llama.block_count"),
        "{err}"
    );
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = sample_writer();
    w.add_metadata("general.alignment", MetaValue::U32(64));
    let dir = TempDir::new("gguf-align64");
    let path = dir.join("align64.gguf");
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    for t in f.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    let vals: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(f.decode_tensor("norm.weight").unwrap().dequantize(), vals);
    // An alignment that is not a power of two is refused.
    w.add_metadata("general.alignment", MetaValue::U32(48));
    w.write(&path).unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    assert!(msg.contains("general.alignment"), "{msg}");
}

#[test]
fn released_tensor_pages_decode_unchanged() {
    // A tensor spanning several pages, between two small ones.
    let big: Vec<f32> = (0..64 * 1024).map(|i| (i as f32 * 0.01).cos()).collect();
    let small: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", MetaValue::String("llama".into()));
    w.add_tensor_f32("before.weight", &[64], &small).unwrap();
    w.add_tensor_f32("big.weight", &[1024, 64], &big).unwrap();
    w.add_tensor_f32("after.weight", &[64], &small).unwrap();
    let dir = TempDir::new("gguf-release");
    let path = dir.join("release.gguf");
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.decode_tensor("big.weight").unwrap().dequantize(), big);
    let released = f.release_tensor("big.weight");
    if cfg!(unix) {
        // At most one partial page at either end is kept.
        assert!(released > 0 && released <= 4 * big.len(), "{released}");
        assert!(4 * big.len() - released < 2 * 65536, "{released}");
    }
    assert_eq!(f.release_tensor("no.such.tensor"), 0);
    // Half the rows: about half the bytes (whole pages only); rows past the end are clamped.
    let half = f.release_rows("big.weight", 0..32);
    if cfg!(unix) {
        assert!(half > 0 && half <= 2 * big.len(), "{half}");
    }
    assert_eq!(f.release_rows("big.weight", 100..200), 0);
    assert_eq!(f.decode_tensor("big.weight").unwrap().dequantize(), big);
    assert_eq!(
        f.decode_tensor("before.weight").unwrap().dequantize(),
        small
    );
    assert_eq!(f.decode_tensor("after.weight").unwrap().dequantize(), small);
}

#[test]
fn decoded_rows_are_the_rows_of_the_decoded_tensor() {
    let vals: Vec<f32> = (0..64 * 6).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", MetaValue::String("llama".into()));
    w.add_tensor_q4_0("q40.weight", &[64, 6], &vals).unwrap();
    w.add_tensor_f32("f32.weight", &[64, 6], &vals).unwrap();
    // I2_S keeps its scale after the blocks of all rows: every row range must still see it.
    let codes: Vec<u8> = (0..128 * 6).map(|i| (i * 7 % 3) as u8).collect();
    let i2_s = crate::fixtures::i2_s_tensor(&codes, 0.375);
    w.add_tensor_raw("i2s.weight", &[128, 6], GgmlType::I2_S.id(), i2_s)
        .unwrap();
    let dir = TempDir::new("gguf-rows");
    let path = dir.join("rows.gguf");
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    for name in ["q40.weight", "f32.weight", "i2s.weight"] {
        let whole = f.decode_tensor(name).unwrap().dequantize();
        let cols = f.tensor_info(name).unwrap().cols();
        for range in [0..6, 0..1, 2..5, 5..6, 3..3] {
            let rows = f.decode_rows(name, range.clone()).unwrap();
            assert_eq!(rows.rows(), range.len());
            assert_eq!(
                rows.dequantize(),
                whole[range.start * cols..range.end * cols],
                "{name} {range:?}"
            );
        }
        for bad in [5..7, 7..8] {
            let err = f.decode_rows(name, bad).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("rows"), "{err}");
        }
    }
}
