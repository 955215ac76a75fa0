//! Unit tests of `safetensors`: folders and shards, dtypes, GPTQ and BitNet decoding, errors.

use super::*;
use crate::fixtures::{write_safetensors, TempDir, TensorData};
use crate::weights::DecodedTensor;
use lutra_kernels::measure::SplitMix64;

fn below(rng: &mut SplitMix64, n: u32) -> u32 {
    (rng.next_u64() % u64::from(n)) as u32
}

#[test]
fn dense_dtypes_widen_exactly() {
    let dir = TempDir::new("st-dense");
    let v = [1.5f32, -2.25, 0.0, 65504.0];
    write_safetensors(
        &dir.join(SINGLE_FILE),
        &[
            TensorData::f32("a", &[2, 2], &v),
            TensorData::f16("b", &[4], &v),
            TensorData::bf16("c", &[1, 4], &[1.5, -2.25, 0.0, 3.0]),
            TensorData::i32("d", &[2], &[7, -1]),
        ],
    )
    .unwrap();
    let f = SafetensorsFolder::open(&dir).unwrap();
    assert_eq!(f.names(), vec!["a", "b", "c", "d"]);
    assert_eq!(f.tensor("a").unwrap().to_f32().unwrap(), v);
    assert_eq!(f.tensor("a").unwrap().shape, &[2, 2]);
    assert_eq!(f.tensor("b").unwrap().to_f32().unwrap(), v);
    assert_eq!(
        f.tensor("c").unwrap().to_f32().unwrap(),
        [1.5, -2.25, 0.0, 3.0]
    );
    assert_eq!(f.tensor("d").unwrap().to_i32().unwrap(), [7, -1]);
    // An integer tensor is not a float one, and the error names file and tensor.
    let err = f.tensor("d").unwrap().to_f32().unwrap_err();
    assert!(matches!(err, Error::UnsupportedTensorType { ref tensor, .. } if tensor == "d"));
    assert!(err.to_string().contains(SINGLE_FILE), "{err}");
    let err = f.tensor("zz").unwrap_err();
    assert!(matches!(err, Error::MissingTensor { ref tensor, .. } if tensor == "zz"));
    let err = f.tensor("a").unwrap().expect_shape(&[4]).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn shards_are_found_through_the_index() {
    let dir = TempDir::new("st-shards");
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[TensorData::f32("x", &[2], &[1.0, 2.0])],
    )
    .unwrap();
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[TensorData::f32("y", &[1], &[3.0])],
    )
    .unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.join(INDEX_FILE), index).unwrap();
    let f = SafetensorsFolder::open(&dir).unwrap();
    assert_eq!(f.tensor("y").unwrap().to_f32().unwrap(), [3.0]);
    assert!(f
        .tensor("y")
        .unwrap()
        .path
        .ends_with("model-00002-of-00002.safetensors"));

    // A tensor listed in the wrong shard.
    std::fs::write(
        dir.join(INDEX_FILE),
        index.replace("\"y\": \"model-00002", "\"y\": \"model-00001"),
    )
    .unwrap();
    let err = SafetensorsFolder::open(&dir).unwrap_err();
    assert!(err.to_string().contains("'y'"), "{err}");
    // A missing shard is named.
    std::fs::write(
        dir.join(INDEX_FILE),
        index.replace("00002-of-00002", "00003-of-00002"),
    )
    .unwrap();
    let err = SafetensorsFolder::open(&dir).unwrap_err();
    assert!(matches!(err, Error::BadFile { .. }), "{err}");
    assert!(
        err.to_string().contains("model-00003-of-00002.safetensors"),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
    // No checkpoint at all.
    let empty = TempDir::new("st-empty");
    let err = SafetensorsFolder::open(&empty).unwrap_err();
    assert!(err.to_string().contains(SINGLE_FILE), "{err}");
}

#[test]
fn truncated_and_malformed_files_are_refused() {
    let dir = TempDir::new("st-trunc");
    let path = dir.join(SINGLE_FILE);
    write_safetensors(&path, &[TensorData::f32("w", &[4, 4], &[0.5; 16])]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = SafetensorsFolder::open(&dir).unwrap_err();
    assert!(
        matches!(err, Error::BadFile { ref path, .. } if path.ends_with(SINGLE_FILE)),
        "{err}"
    );
    // A header naming a dtype that does not exist.
    let header = br#"{"w":{"dtype":"Q5","shape":[2],"data_offsets":[0,2]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0, 0]);
    std::fs::write(&path, &file).unwrap();
    let err = SafetensorsFolder::open(&dir).unwrap_err();
    assert!(matches!(err, Error::BadFile { .. }), "{err}");
    // A known dtype lutra does not read as weights.
    write_safetensors(&path, &[TensorData::raw("w", Dtype::F64, &[1], vec![0; 8])]).unwrap();
    let f = SafetensorsFolder::open(&dir).unwrap();
    let err = f.tensor("w").unwrap().to_f32().unwrap_err();
    assert!(err.to_string().contains("F64"), "{err}");
}

/// Packs `bits`-bit values into 32-bit words as one LSB-first bit stream, through a u128: an
/// implementation independent of `gptq`'s.
fn bit_stream(values: &[u32], bits: u32) -> Vec<u32> {
    let mut acc: u128 = 0;
    for (i, &v) in values.iter().enumerate() {
        acc |= u128::from(v) << (i as u32 * bits);
    }
    (0..values.len() * bits as usize / 32)
        .map(|w| (acc >> (32 * w)) as u32)
        .collect()
}

#[test]
fn gptq_packing_matches_an_independent_bit_stream() {
    let mut rng = SplitMix64::new(3);
    for bits in [2u32, 3, 4] {
        // One column of 32 codes: 3-bit values straddle words 0/1 and 1/2.
        let q: Vec<u32> = (0..32).map(|_| below(&mut rng, 1 << bits)).collect();
        let words: Vec<u32> = gptq::pack_along_rows(&q, 32, 1, bits)
            .into_iter()
            .map(|w| w as u32)
            .collect();
        assert_eq!(words, bit_stream(&q, bits), "{bits} bits");
    }
}

/// The groups of a test GPTQ layer along K (`g_idx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GroupOrder {
    /// `g_idx[k] = k / group_size`.
    Natural,
    /// Act-order: a random assignment of `group_size` features per group, drawn from the seed
    /// alone (the same seed, the same order).
    Shuffled(u64),
    /// Like `Shuffled`, with one feature of the last group moved to the first: uneven groups.
    Uneven(u64),
}

/// A random GPTQ layer: file tensors and the weights they mean, computed directly.
struct GptqCase {
    tensors: Vec<TensorData>,
    expected: Vec<f32>,
    codes: Vec<u8>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gptq_layer(
    rng: &mut SplitMix64,
    prefix: &str,
    n: usize,
    k: usize,
    bits: u32,
    gs: usize,
    sym: bool,
    v2: bool,
    order: GroupOrder,
) -> (Vec<TensorData>, Vec<f32>) {
    let c = gptq_case(rng, prefix, n, k, bits, gs, sym, v2, order);
    (c.tensors, c.expected)
}

#[allow(clippy::too_many_arguments)]
fn gptq_case(
    rng: &mut SplitMix64,
    prefix: &str,
    n: usize,
    k: usize,
    bits: u32,
    gs: usize,
    sym: bool,
    v2: bool,
    order: GroupOrder,
) -> GptqCase {
    let groups = k / gs;
    let levels = 1u32 << bits;
    let q: Vec<u32> = (0..k * n).map(|_| below(rng, levels)).collect(); // [K][N]
                                                                        // v1 cannot store a zero of 0 (it would read back as 2^bits).
    let zeros: Vec<u32> = (0..groups * n)
        .map(|_| match (sym, v2) {
            (true, _) => levels / 2,
            (false, true) => below(rng, levels),
            (false, false) => 1 + below(rng, levels - 1),
        })
        .collect();
    let scales: Vec<f32> = (0..groups * n)
        .map(|_| half::f16::from_f32(0.001 + rng.uniform() * 0.05).to_f32())
        .collect();
    let g_idx: Vec<i32> = match order {
        GroupOrder::Natural => (0..k).map(|i| (i / gs) as i32).collect(),
        GroupOrder::Shuffled(seed) | GroupOrder::Uneven(seed) => {
            // A random assignment with `gs` features per group.
            let mut rng = SplitMix64::new(seed);
            let mut shuffled: Vec<usize> = (0..k).collect();
            for i in (1..k).rev() {
                shuffled.swap(i, below(&mut rng, i as u32 + 1) as usize);
            }
            let mut g = vec![0i32; k];
            for (rank, &feature) in shuffled.iter().enumerate() {
                g[feature] = (rank / gs) as i32;
            }
            if matches!(order, GroupOrder::Uneven(_)) {
                g[shuffled[k - 1]] = 0;
            }
            g
        }
    };
    let stored: Vec<u32> = zeros
        .iter()
        .map(|&z| if v2 { z } else { (z - 1) & (levels - 1) })
        .collect();
    let mut expected = vec![0.0f32; n * k];
    let mut codes = vec![0u8; n * k];
    for r in 0..n {
        for c in 0..k {
            let g = g_idx[c] as usize;
            let v = q[c * n + r] as f32 - zeros[g * n + r] as f32;
            expected[r * k + c] = scales[g * n + r] * v;
            codes[r * k + c] = q[c * n + r] as u8;
        }
    }
    let name = |s: &str| format!("{prefix}.{s}");
    let tensors = vec![
        TensorData::i32(
            &name("qweight"),
            &[k * bits as usize / 32, n],
            &gptq::pack_along_rows(&q, k, n, bits),
        ),
        TensorData::i32(
            &name("qzeros"),
            &[groups, n * bits as usize / 32],
            &gptq::pack_along_cols(&stored, groups, n, bits),
        ),
        TensorData::f16(&name("scales"), &[groups, n], &scales),
        TensorData::i32(&name("g_idx"), &[k], &g_idx),
    ];
    GptqCase {
        tensors,
        expected,
        codes,
    }
}

fn open_gptq(case_tensors: &[TensorData], tag: &str) -> SafetensorsFolder {
    // The map stays valid after the file is unlinked (the folder is removed right away).
    let dir = TempDir::new(&format!("st-{tag}"));
    write_safetensors(&dir.join(SINGLE_FILE), case_tensors).unwrap();
    SafetensorsFolder::open(&dir).unwrap()
}

fn gptq_tensors<'a>(f: &'a SafetensorsFolder, names: &'a [String; 4]) -> gptq::GptqTensors<'a> {
    gptq::GptqTensors {
        qweight: f.tensor(&names[0]).unwrap(),
        qzeros: f.tensor(&names[1]).unwrap(),
        scales: f.tensor(&names[2]).unwrap(),
        g_idx: Some(f.tensor(&names[3]).unwrap()),
    }
}

fn names(prefix: &str) -> [String; 4] {
    ["qweight", "qzeros", "scales", "g_idx"].map(|s| format!("{prefix}.{s}"))
}

#[test]
fn gptq_decodes_every_bit_width_format_and_order() {
    let mut rng = SplitMix64::new(11);
    let (n, k) = (64, 128);
    for bits in [2u32, 3, 4] {
        for (gs, group_size) in [(32, Some(32)), (128, None)] {
            for v2 in [false, true] {
                for sym in [false, true] {
                    let seed = rng.next_u64();
                    for order in [
                        GroupOrder::Natural,
                        GroupOrder::Shuffled(seed),
                        GroupOrder::Uneven(seed),
                    ] {
                        let act_order = order != GroupOrder::Natural;
                        if act_order && gs == k {
                            continue; // one group: every order is the same
                        }
                        let case = gptq_case(&mut rng, "l", n, k, bits, gs, sym, v2, order);
                        let f = open_gptq(&case.tensors, "gptq");
                        let cfg = gptq::GptqConfig {
                            bits: bits as u8,
                            group_size,
                            sym,
                            desc_act: act_order,
                            v2,
                        };
                        let names = names("l");
                        let d = gptq::decode(&cfg, &gptq_tensors(&f, &names), n, k).unwrap();
                        let what = format!("{bits}b gs{gs} v2 {v2} sym {sym} {order:?}");
                        assert_eq!(d.act_order, act_order, "{what}");
                        // Even act-order groups keep the codes, in group order; uneven ones are
                        // dense.
                        let shuffled = matches!(order, GroupOrder::Shuffled(_));
                        assert_eq!(d.perm.is_some(), shuffled, "{what}");
                        let natural: Vec<u32> = (0..k as u32).collect();
                        let perm = d.perm.as_deref().unwrap_or(&natural);
                        if shuffled {
                            // Sorted by group: every group's features are contiguous.
                            let g_idx = f.tensor(&names[3]).unwrap().to_i32().unwrap();
                            for (i, &c) in perm.iter().enumerate() {
                                assert_eq!(g_idx[c as usize] as usize, i / gs, "{what}");
                            }
                        }
                        let got = d.tensor.dequantize();
                        for (i, a) in got.iter().enumerate() {
                            let (r, c) = (i / k, perm[i % k] as usize);
                            let b = case.expected[r * k + c];
                            assert!(
                                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                                "{what} [{i}] {a} vs {b}"
                            );
                        }
                        if let DecodedTensor::LowBit {
                            codes,
                            group_size: g,
                            bits: b,
                            ..
                        } = &d.tensor
                        {
                            assert_eq!((*b as u32, *g), (bits, gs), "{what}");
                            for (i, &q) in codes.iter().enumerate() {
                                let (r, c) = (i / k, perm[i % k] as usize);
                                assert_eq!(q, case.codes[r * k + c], "{what} [{i}]");
                            }
                        } else {
                            assert_eq!(order, GroupOrder::Uneven(seed), "{what}: dense");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gptq_act_order_stays_dense_when_the_lut_kernels_cannot_take_it() {
    // The tables read K in blocks of 32 and the kernels take groups of 32/64/128/256 (or a whole
    // row): a 48-column layer, and a 128-column layer in groups of 16, keep exact dense values.
    for (k, what) in [(48, "gptq-k48"), (128, "gptq-g16")] {
        let mut rng = SplitMix64::new(9);
        let (n, order) = (8, GroupOrder::Shuffled(4));
        let case = gptq_case(&mut rng, "l", n, k, 4, 16, false, true, order);
        let f = open_gptq(&case.tensors, what);
        let cfg = gptq::GptqConfig {
            bits: 4,
            group_size: Some(16),
            sym: false,
            desc_act: true,
            v2: true,
        };
        let d = gptq::decode(&cfg, &gptq_tensors(&f, &names("l")), n, k).unwrap();
        assert!(d.act_order && d.perm.is_none(), "{what}");
        assert!(matches!(d.tensor, DecodedTensor::Dense { .. }), "{what}");
        for (a, b) in d.tensor.dequantize().iter().zip(&case.expected) {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{what}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn gptq_refuses_what_does_not_add_up() {
    let mut rng = SplitMix64::new(5);
    let (n, k, order) = (32, 64, GroupOrder::Natural);
    let cfg = gptq::GptqConfig {
        bits: 4,
        group_size: Some(32),
        sym: true,
        desc_act: false,
        v2: false,
    };
    // Asymmetric zeros under a symmetric config (or a v2 file read as v1).
    let case = gptq_case(&mut rng, "l", n, k, 4, 32, false, false, order);
    let f = open_gptq(&case.tensors, "gptq-bad");
    let names = names("l");
    let err = gptq::decode(&cfg, &gptq_tensors(&f, &names), n, k).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("l.qzeros") && msg.contains(SINGLE_FILE) && msg.contains("must read 8"),
        "{msg}"
    );
    // Symmetric v1 zeros read as v2: 7, not 8.
    let case = gptq_case(&mut rng, "l", n, k, 4, 32, true, false, order);
    let f = open_gptq(&case.tensors, "gptq-v2");
    let err = gptq::decode(
        &gptq::GptqConfig { v2: true, ..cfg },
        &gptq_tensors(&f, &names),
        n,
        k,
    )
    .unwrap_err();
    assert!(err.to_string().contains("found 7"), "{err}");
    // g_idx out of range.
    let mut tensors = case.tensors.clone();
    let mut g: Vec<i32> = (0..k as i32).map(|i| i / 32).collect();
    g[5] = 9;
    tensors[3] = TensorData::i32("l.g_idx", &[k], &g);
    let f = open_gptq(&tensors, "gptq-gidx");
    let err = gptq::decode(&cfg, &gptq_tensors(&f, &names), n, k).unwrap_err();
    assert!(err.to_string().contains("g_idx[5] = 9"), "{err}");
    // Wrong shape for the configured size.
    let f = open_gptq(&case.tensors, "gptq-shape");
    let err = gptq::decode(&cfg, &gptq_tensors(&f, &names), n, 2 * k).unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { ref tensor, .. } if tensor == "l.qweight"),
        "{err}"
    );
    // A group size that does not divide K.
    let err = gptq::decode(
        &gptq::GptqConfig {
            group_size: Some(48),
            ..cfg
        },
        &gptq_tensors(&f, &names),
        n,
        k,
    )
    .unwrap_err();
    assert!(err.to_string().contains("group size 48"), "{err}");
}

#[test]
fn gptq_config_json() {
    let path = Path::new("config.json");
    let q = serde_json::json!({"quant_method": "gptq", "bits": 3, "group_size": -1, "desc_act": true, "sym": false, "checkpoint_format": "gptq_v2"});
    let c = gptq::GptqConfig::from_json(&q, path).unwrap();
    assert_eq!(
        c,
        gptq::GptqConfig {
            bits: 3,
            group_size: None,
            sym: false,
            desc_act: true,
            v2: true
        }
    );
    let q = serde_json::json!({"quant_method": "gptq", "bits": 8, "group_size": 128});
    assert!(gptq::GptqConfig::from_json(&q, path)
        .unwrap_err()
        .to_string()
        .contains("8-bit"));
    let q = serde_json::json!({"bits": 4, "checkpoint_format": "marlin"});
    assert!(gptq::GptqConfig::from_json(&q, path).is_err());
}

#[test]
fn bitnet_decodes_four_row_blocks() {
    let mut rng = SplitMix64::new(9);
    let (n, k) = (16, 64);
    let codes: Vec<u8> = (0..n * k).map(|_| below(&mut rng, 3) as u8).collect();
    let packed = bitnet::pack(&codes, n, k);
    // Independently: bits 2i..2i+1 of packed row r hold row i·N/4 + r.
    for (r, c, i) in [(0, 0, 0), (1, 5, 2), (3, 63, 3)] {
        assert_eq!(
            (packed[r * k + c] >> (2 * i)) & 3,
            codes[(i * n / 4 + r) * k + c]
        );
    }
    let dir = TempDir::new("st-bitnet");
    write_safetensors(
        &dir.join(SINGLE_FILE),
        &[
            TensorData::raw("w.weight", Dtype::U8, &[n / 4, k], packed.clone()),
            TensorData::bf16("w.weight_scale", &[1], &[4.0]),
        ],
    )
    .unwrap();
    let f = SafetensorsFolder::open(&dir).unwrap();
    let (w, s) = (
        f.tensor("w.weight").unwrap(),
        f.tensor("w.weight_scale").unwrap(),
    );
    for (mode, scale) in [
        (bitnet::ScaleMode::Divide, 0.25),
        (bitnet::ScaleMode::Multiply, 4.0),
    ] {
        let d = bitnet::decode(&w, &s, mode, n, k).unwrap();
        let DecodedTensor::LowBit {
            codes: got,
            bits,
            group_size,
            ..
        } = &d
        else {
            panic!("not low-bit")
        };
        assert_eq!((got, *bits, *group_size), (&codes, 2, k));
        let values = d.dequantize();
        for (v, &c) in values.iter().zip(&codes) {
            assert_eq!(*v, scale * (f32::from(c) - 1.0));
        }
    }
    // Code 3 is not ternary; a wrong shape is a shape error.
    let mut bad = packed;
    bad[7] |= 3 << 4;
    write_safetensors(
        &dir.join(SINGLE_FILE),
        &[
            TensorData::raw("w.weight", Dtype::U8, &[n / 4, k], bad),
            TensorData::f32("w.weight_scale", &[], &[4.0]),
        ],
    )
    .unwrap();
    let f = SafetensorsFolder::open(&dir).unwrap();
    let (w, s) = (
        f.tensor("w.weight").unwrap(),
        f.tensor("w.weight_scale").unwrap(),
    );
    let err = bitnet::decode(&w, &s, bitnet::ScaleMode::Divide, n, k).unwrap_err();
    assert!(
        err.to_string().contains("code 3") && err.to_string().contains("w.weight"),
        "{err}"
    );
    let err = bitnet::decode(&w, &s, bitnet::ScaleMode::Divide, 2 * n, k).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}
