//! Tests of the GGUF writer and of lutra files: bit-for-bit round trips, whole-model
//! conversions, and the errors of corrupted files.

use lutra_kernels::measure::SplitMix64;
use lutra_kernels::{
    ActivationTables, Cpu, Grouping, PackedMatrix, PlaneScales, QuantSpec, QuantizedWeights,
    SuperBlockWeights,
};

use super::*;
use crate::fixtures::{requantized_lutra_file, tiny_llama_gguf, TempDir, TinyModelSpec};
use crate::gguf::lutra::LUTRA_TYPE_BASE;
use crate::llama::{LoadOptions, Model};
use crate::quantize::Requantize;

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A random packed matrix: codes, scales and offsets drawn from `rng`.
fn random_matrix(rng: &mut SplitMix64, spec: QuantSpec, offsets: bool) -> PackedMatrix {
    let bits = usize::from(spec.bits);
    let groups = match spec.grouping {
        Grouping::Size(g) => spec.rows * spec.cols / g,
        Grouping::PerRow => spec.rows,
        Grouping::PerTensor => 1,
    };
    let nps = match spec.plane_scales {
        PlaneScales::PerPlane => bits,
        PlaneScales::Uniform => 1,
    };
    let codes: Vec<u8> = (0..spec.rows * spec.cols)
        .map(|_| (rng.next_u64() % (1 << bits)) as u8)
        .collect();
    let scales: Vec<f32> = (0..groups * nps)
        .map(|_| rng.uniform() * 0.1 + 0.01)
        .collect();
    let offs: Vec<f32> = (0..groups).map(|_| rng.uniform() - 0.5).collect();
    PackedMatrix::pack(&QuantizedWeights {
        spec,
        codes: &codes,
        scales: &scales,
        offsets: offsets.then_some(&offs[..]),
    })
    .unwrap()
}

fn info(bits: u8, group_size: usize) -> TensorQuantInfo {
    TensorQuantInfo {
        method: "gptq+hlq".into(),
        bits,
        group_size,
        calibration: "64x256 tokens of calibration.txt".into(),
        rotated: false,
    }
}

/// The cases of the round trip: every form a lutra type stores, rows not a multiple of 64.
fn cases() -> Vec<(QuantSpec, bool, usize)> {
    let spec = |rows, cols, bits, grouping, plane_scales| QuantSpec {
        rows,
        cols,
        bits,
        grouping,
        plane_scales,
    };
    vec![
        (
            spec(100, 128, 2, Grouping::Size(32), PlaneScales::Uniform),
            true,
            32,
        ),
        (
            spec(64, 256, 3, Grouping::Size(64), PlaneScales::PerPlane),
            true,
            64,
        ),
        (
            spec(70, 96, 4, Grouping::PerRow, PlaneScales::Uniform),
            false,
            96,
        ),
        (
            spec(130, 256, 2, Grouping::Size(128), PlaneScales::PerPlane),
            false,
            128,
        ),
        (
            spec(5, 64, 1, Grouping::PerTensor, PlaneScales::Uniform),
            true,
            0,
        ),
    ]
}

/// Writes the matrices of [`cases`] (and a ggml tensor between them) to `path`.
fn write_matrices(path: &Path) -> Vec<PackedMatrix> {
    let mut rng = SplitMix64::new(7);
    let mut w = GgufWriter::create(path).unwrap();
    w.set_metadata("general.architecture", MetaValue::String("llama".into()));
    let mut mats = Vec::new();
    for (i, (spec, offsets, group)) in cases().into_iter().enumerate() {
        let m = random_matrix(&mut rng, spec, offsets);
        w.put_packed(&format!("m{i}.weight"), &m, &info(spec.bits, group))
            .unwrap();
        let norm: Vec<u8> = (0..4 * 3).map(|b| b as u8).collect();
        w.put_raw(&format!("n{i}.weight"), GgmlType::F32.id(), &[3], &norm)
            .unwrap();
        mats.push(m);
    }
    w.finish().unwrap();
    mats
}

#[test]
fn packed_matrices_round_trip_bit_for_bit_and_load_in_place() {
    let dir = TempDir::new("writer-round-trip");
    let path = dir.join("m.lutra.gguf");
    let written = write_matrices(&path);
    assert_eq!(
        files_in(&dir),
        ["m.lutra.gguf"],
        "no temporary file is left"
    );
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(
        file.metadata(FILE_VERSION_KEY),
        Some(&MetaValue::U32(FILE_VERSION))
    );
    let cpu = Cpu::new(1).unwrap();
    for (i, (w, (spec, offsets, group))) in written.iter().zip(cases()).enumerate() {
        let name = format!("m{i}.weight");
        let t = file.tensor_info(&name).unwrap();
        assert!(t.offset.is_multiple_of(file.alignment()));
        assert_eq!(t.dims, [spec.cols, spec.rows]);
        let loaded = file.lutra_matrix(&name).unwrap();
        assert!(loaded.is_mapped(), "{name} is read in place");
        assert_eq!(loaded.spec(), w.spec());
        let (a, b) = (w.raw_parts().unwrap(), loaded.raw_parts().unwrap());
        assert_eq!(a.weights, b.weights, "{name}");
        assert_eq!(a.scales, b.scales, "{name}");
        assert_eq!(a.offsets, b.offsets, "{name}");
        assert_eq!(b.offsets.is_some(), offsets);
        assert_eq!(
            file.lutra_quant_info(&name).unwrap(),
            Some(info(spec.bits, group))
        );
        // The products agree bit for bit, for one token and for a batch.
        for tokens in [1, 3] {
            let x: Vec<f32> = (0..tokens * spec.cols)
                .map(|k| (k * 37 % 101) as f32 / 50.0 - 1.0)
                .collect();
            let mut tables = ActivationTables::new(spec.cols);
            tables.build(&cpu, &x, tokens).unwrap();
            let mut out_a = vec![0.0f32; tokens * spec.rows];
            let mut out_b = vec![1.0f32; tokens * spec.rows];
            w.matmul(&cpu, &tables, &mut out_a).unwrap();
            loaded.matmul(&cpu, &tables, &mut out_b).unwrap();
            assert_eq!(out_a, out_b, "{name}");
            assert!(out_a.iter().any(|&v| v != 0.0));
        }
        // Decoding a lutra tensor dequantizes it.
        let decoded = file.decode_tensor(&name).unwrap().dequantize();
        let mut row = vec![0.0f32; spec.cols];
        w.dequantize_row(spec.rows - 1, &mut row).unwrap();
        assert_eq!(&decoded[(spec.rows - 1) * spec.cols..], &row[..]);
    }
    // The matrix outlives the file handle: it holds the mapping.
    let kept = file.lutra_matrix("m0.weight").unwrap();
    drop(file);
    let mut row = vec![0.0f32; 128];
    kept.dequantize_row(0, &mut row).unwrap();
}

#[test]
fn a_writer_that_does_not_finish_leaves_nothing() {
    let dir = TempDir::new("writer-unfinished");
    let out = dir.join("out.gguf");
    std::fs::write(&out, b"the old file").unwrap();
    let mut w = GgufWriter::create(&out).unwrap();
    w.put_raw("a", GgmlType::F32.id(), &[2], &[0; 8]).unwrap();
    assert_eq!(
        files_in(&dir).len(),
        2,
        "the data file exists while writing"
    );
    drop(w);
    assert_eq!(files_in(&dir), ["out.gguf"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"the old file");

    // A failing finish (an alignment that is not a power of two) leaves the old file too.
    let mut w = GgufWriter::create(&out).unwrap();
    w.set_metadata("general.alignment", MetaValue::U32(48));
    w.put_raw("a", GgmlType::F32.id(), &[2], &[0; 8]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("general.alignment") && err.contains("out.gguf"),
        "{err}"
    );
    assert_eq!(files_in(&dir), ["out.gguf"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"the old file");
}

#[test]
fn the_writer_refuses_what_it_cannot_store() {
    let dir = TempDir::new("writer-refuses");
    let out = dir.join("x.gguf");
    let mut w = GgufWriter::create(&out).unwrap();
    let msg = |r: Result<()>| r.unwrap_err().to_string();
    let e = msg(w.put_raw("a", GgmlType::F32.id(), &[3], &[0; 8]));
    assert!(e.contains("tensor 'a'") && e.contains("takes 12"), "{e}");
    let e = msg(w.put_raw("b", 9999, &[3], &[0; 12]));
    assert!(e.contains("unknown ggml type"), "{e}");
    let e = msg(w.put_raw("b", LUTRA_TYPE_BASE | 0x7, &[3], &[0; 12]));
    assert!(e.contains("unknown lutra type"), "{e}");
    let e = msg(w.put_raw("c", GgmlType::Q4_0.id(), &[48], &[0; 27]));
    assert!(e.contains("block size 32"), "{e}");
    w.put_raw("d", GgmlType::F32.id(), &[3], &[0; 12]).unwrap();
    let e = msg(w.put_raw("d", GgmlType::F32.id(), &[3], &[0; 12]));
    assert!(e.contains("put twice"), "{e}");

    let mut rng = SplitMix64::new(3);
    let spec = cases()[0].0;
    let m = random_matrix(&mut rng, spec, true);
    let e = msg(w.put_packed("m", &m, &info(3, 32)));
    assert!(e.contains("recorded as 3 bits"), "{e}");
    let e = msg(w.put_packed("m", &m, &info(2, 64)));
    assert!(e.contains("groups of 64"), "{e}");
    // Two-level scales (K-quants) have no lutra type.
    let codes = vec![1u8; 256];
    let two_level = PackedMatrix::pack_super_blocks(&SuperBlockWeights {
        rows: 1,
        cols: 256,
        bits: 4,
        group: 32,
        zero_point: 0,
        codes: &codes,
        sub_scales: &[1; 8],
        sub_mins: Some(&[0; 8]),
        d: &[half::f16::from_f32(0.1).to_bits()],
        dmin: Some(&[0]),
    })
    .unwrap();
    let e = msg(w.put_packed("k", &two_level, &info(4, 32)));
    assert!(e.contains("two-level"), "{e}");
    drop(w);
}

/// Logits of every position of a short prompt.
fn logits(model: &Model) -> Vec<f32> {
    let tokens = [1u32, 40, 41, 260, 7, 2, 99];
    let vocab = model.config().vocab_size;
    let mut out = Vec::new();
    let mut cache = model.new_cache();
    for &t in &tokens {
        let mut l = vec![0.0; vocab];
        model.forward(&[t], &mut cache, &mut l).unwrap();
        out.extend(l);
    }
    out
}

#[test]
fn a_raw_copy_of_a_gguf_file_loads_identically() {
    let dir = TempDir::new("writer-raw-copy");
    let (src, copy) = (dir.join("tiny.gguf"), dir.join("copy.gguf"));
    let spec = TinyModelSpec {
        tied_embeddings: false,
        ..TinyModelSpec::default()
    };
    tiny_llama_gguf(&src, &spec, 5).unwrap();
    let file = GgufFile::open(&src).unwrap();
    let mut w = GgufWriter::create(&copy).unwrap();
    w.copy_metadata_from(&file);
    // Put in reverse: the copy keeps the source's order.
    for t in file.tensors().iter().rev() {
        w.put_raw(
            &t.name,
            t.ty.id(),
            &t.dims,
            file.tensor_data(&t.name).unwrap(),
        )
        .unwrap();
    }
    w.finish().unwrap();
    let again = GgufFile::open(&copy).unwrap();
    assert!(again.metadata_entries().eq(file.metadata_entries()));
    let infos = |f: &GgufFile| -> Vec<(String, Vec<usize>, u32)> {
        f.tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone(), t.ty.id()))
            .collect()
    };
    assert_eq!(infos(&again), infos(&file));
    for t in file.tensors() {
        assert_eq!(
            again.tensor_data(&t.name).unwrap(),
            file.tensor_data(&t.name).unwrap()
        );
    }
    let opts = LoadOptions {
        threads: 1,
        ..LoadOptions::default()
    };
    let (a, b) = (
        Model::load(&src, &opts).unwrap(),
        Model::load(&copy, &opts).unwrap(),
    );
    assert_eq!(logits(&a), logits(&b));
}

#[test]
fn a_model_converted_to_lutra_types_matches_requantization_at_load() {
    let dir = TempDir::new("writer-model");
    let (src, out) = (dir.join("tiny.gguf"), dir.join("tiny.lutra.gguf"));
    tiny_llama_gguf(&src, &TinyModelSpec::default(), 9).unwrap();
    let spec = Requantize {
        bits: 2,
        group_size: 32,
    };
    let packed = requantized_lutra_file(&src, &out, spec).unwrap();
    assert_eq!(packed, 2 * 7, "seven matrices in each of two blocks");
    let at_load = Model::load(
        &src,
        &LoadOptions {
            threads: 2,
            requantize: Some(spec),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let lutra = Model::load(
        &out,
        &LoadOptions {
            threads: 2,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let (a, b) = (logits(&at_load), logits(&lutra));
    assert_eq!(a, b);
    assert!(a.iter().any(|&v| v != a[0]), "the logits vary");
    let info = lutra.describe();
    let mapped: Vec<_> = info.tensors.iter().filter(|t| t.mapped).collect();
    assert_eq!(mapped.len(), packed);
    for t in &mapped {
        assert!(
            t.kernel.contains("mapped") && t.source == "LUT2_G32_OFF",
            "{t:?}"
        );
        let q = t.quantization.as_ref().unwrap();
        assert_eq!((q.method.as_str(), q.bits, q.group_size), ("rtn", 2, 32));
    }
    assert!(info.to_string().contains("no repack"));
    // The tokenizer and chat template came along.
    assert_eq!(
        lutra.tokenizer().unwrap().encode("hello", false).unwrap(),
        at_load.tokenizer().unwrap().encode("hello", false).unwrap()
    );
    // Reference mode and requantization read a lutra file too (dequantized).
    let reference = Model::load(
        &out,
        &LoadOptions {
            threads: 1,
            reference: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let reference_at_load = Model::load(
        &src,
        &LoadOptions {
            threads: 1,
            reference: true,
            requantize: Some(spec),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let (r, s) = (logits(&reference), logits(&reference_at_load));
    let worst = s
        .iter()
        .zip(&r)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-4, "reference modes differ by {worst}");
}

/// Where tensor `name`'s info (its dimension count) starts in a file's header.
fn tensor_info_at(bytes: &[u8], header_end: usize, name: &str) -> usize {
    let needle = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    let at = bytes[..header_end]
        .windows(needle.len())
        .rposition(|w| w == needle)
        .unwrap();
    at + needle.len()
}

/// Opens `bytes` as a file and loads the lutra tensor `m0.weight`, returning the error.
fn load_error(dir: &Path, file_name: &str, bytes: &[u8]) -> String {
    let path = dir.join(file_name);
    std::fs::write(&path, bytes).unwrap();
    let err = match GgufFile::open(&path) {
        Err(e) => e,
        Ok(f) => f
            .lutra_matrix("m0.weight")
            .and_then(|_| f.lutra_quant_info("m0.weight"))
            .err()
            .unwrap_or_else(|| panic!("{file_name} loads")),
    };
    let msg = err.to_string();
    assert!(msg.contains(file_name), "{msg}");
    msg
}

#[test]
fn corrupted_lutra_files_get_errors_naming_file_and_tensor() {
    let dir = TempDir::new("writer-corrupt");
    let good = dir.join("good.gguf");
    write_matrices(&good);
    let bytes = std::fs::read(&good).unwrap();
    let file = GgufFile::open(&good).unwrap();
    let header_end = file.data_offset();
    let info_at = tensor_info_at(&bytes, header_end, "m0.weight");
    // n_dims (4), dims (2 × 8), type (4), offset (8).
    let type_at = info_at + 4 + 16;
    let last = file.tensors().last().unwrap().name.clone();
    drop(file);

    // Truncated data.
    let msg = load_error(&dir, "truncated.gguf", &bytes[..bytes.len() - 300]);
    assert!(msg.contains("data ends at byte"), "{msg}");
    assert!(msg.contains(&last) || msg.contains("m4.weight"), "{msg}");

    // An unknown lutra type id.
    let mut b = bytes.clone();
    b[type_at..type_at + 4].copy_from_slice(&(LUTRA_TYPE_BASE | 0x0F).to_le_bytes());
    let msg = load_error(&dir, "unknown-type.gguf", &b);
    assert!(
        msg.contains("m0.weight") && msg.contains("lutra type id 0x4c55000f"),
        "{msg}"
    );

    // Another lutra type whose size does not match the data (3 bits instead of 2).
    let mut b = bytes.clone();
    let three = LutraType::from_id(u32::from_le_bytes(
        b[type_at..type_at + 4].try_into().unwrap(),
    ))
    .map(|t| LutraType { bits: 3, ..t })
    .and_then(|t| t.id())
    .unwrap();
    b[type_at..type_at + 4].copy_from_slice(&three.to_le_bytes());
    let msg = load_error(&dir, "wrong-bits.gguf", &b);
    assert!(msg.contains("m0.weight"), "{msg}");
    assert!(
        msg.contains("overlap") || msg.contains("data ends"),
        "{msg}"
    );

    // Dimensions that do not fit the type (K not a multiple of 32).
    let mut b = bytes.clone();
    b[info_at + 4..info_at + 12].copy_from_slice(&100u64.to_le_bytes());
    let msg = load_error(&dir, "bad-dims.gguf", &b);
    assert!(
        msg.contains("m0.weight") && msg.contains("multiple of 32"),
        "{msg}"
    );

    // A format version this lutra does not read.
    let key = find(&bytes, FILE_VERSION_KEY.as_bytes()) + FILE_VERSION_KEY.len();
    let mut b = bytes.clone();
    b[key + 4..key + 8].copy_from_slice(&2u32.to_le_bytes());
    let msg = load_error(&dir, "version.gguf", &b);
    assert!(
        msg.contains("lutra.file_version") && msg.contains("m0.weight"),
        "{msg}"
    );
    // No version at all.
    let mut b = bytes.clone();
    b[key - 1] = b'X';
    let msg = load_error(&dir, "no-version.gguf", &b);
    assert!(
        msg.contains("no lutra.file_version") && msg.contains("m0.weight"),
        "{msg}"
    );

    // A recorded quantization that contradicts the type.
    let bits_key = "lutra.tensor.m0.weight.bits";
    let at = find(&bytes, bits_key.as_bytes()) + bits_key.len() + 4;
    let mut b = bytes.clone();
    b[at..at + 4].copy_from_slice(&4u32.to_le_bytes());
    let msg = load_error(&dir, "info.gguf", &b);
    assert!(
        msg.contains("m0.weight") && msg.contains("recorded as 4 bits"),
        "{msg}"
    );
}

fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn a_misaligned_lutra_tensor_is_refused() {
    // Alignment 1 lets a tensor start on an odd byte, where its f16 scales cannot be read in
    // place: the error names the file and the tensor.
    let dir = TempDir::new("writer-misaligned");
    let mut rng = SplitMix64::new(1);
    let spec = QuantSpec {
        rows: 8,
        cols: 32,
        bits: 2,
        grouping: Grouping::PerRow,
        plane_scales: PlaneScales::Uniform,
    };
    let m = random_matrix(&mut rng, spec, false);
    let parts = m.raw_parts().unwrap();
    let mut data = parts.weights.to_vec();
    data.extend(parts.scales.iter().flat_map(|s| s.to_le_bytes()));
    let ty = LutraType::of(&spec, false).id().unwrap();
    for pad in [1usize, 2] {
        let mut w = crate::fixtures::GgufWriter::new();
        w.add_metadata("general.alignment", MetaValue::U32(1));
        w.add_metadata(FILE_VERSION_KEY, MetaValue::U32(FILE_VERSION));
        w.add_tensor_raw("pad", &[pad], GgmlType::I8.id(), vec![0; pad])
            .unwrap();
        w.add_tensor_raw("m0.weight", &[32, 8], ty, data.clone())
            .unwrap();
        let path = dir.join("odd.gguf");
        w.write(&path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        if f.tensor_info("m0.weight").unwrap().offset.is_multiple_of(2) {
            assert_eq!(f.lutra_matrix("m0.weight").unwrap().rows(), 8);
            continue;
        }
        let msg = f.lutra_matrix("m0.weight").err().unwrap().to_string();
        assert!(
            msg.contains("odd.gguf") && msg.contains("m0.weight") && msg.contains("not aligned"),
            "{msg}"
        );
    }
}
