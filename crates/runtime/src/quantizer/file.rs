//! `lutra quantize` as a library call: a model file in, a quantized GGUF file out.
//!
//! The output keeps every metadata key of the source (architecture, tokenizer, chat template)
//! and every tensor that is not a block matrix as the source stores it; the block matrices are
//! written in lutra's tensor types, already in the kernels' tile layout, so loading the file
//! maps them without repacking. `lutra.quantize.*` keys say how the file was made.

use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::writer::{GgufWriter, TensorQuantInfo};
use crate::gguf::{GgufFile, MetaValue};
use crate::linear::Linear;
use crate::llama::calibrate::MatrixInput;
use crate::llama::{LoadOptions, Model};
use crate::weights::GgmlType;

use super::blocks::{quantize_model, Progress, QuantizeOptions, QuantizedMatrix, Target};
use crate::quantize::ggml_types::GgmlTarget;

/// What [`quantize`] made.
#[derive(Clone, Debug)]
pub struct QuantizeSummary {
    /// Block matrices quantized.
    pub matrices: usize,
    /// Average bits per weight over them.
    pub average_bits: f64,
    /// Bytes of the output file.
    pub file_bytes: u64,
}

/// Quantizes the model at `src` (a GGUF file of any type lutra reads) as `opts` says and writes
/// the result to `out`, using `threads` worker threads (0 = one per core) and reporting
/// `progress` after each block.
pub fn quantize(
    src: &Path,
    out: &Path,
    opts: &QuantizeOptions,
    threads: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<QuantizeSummary> {
    if src.is_dir() {
        return Err(Error::InvalidOption(format!(
            "{}: lutra quantize writes GGUF files and reads its source's metadata from a GGUF \
             file; convert the Hugging Face folder to GGUF first (llama.cpp's \
             convert_hf_to_gguf.py)",
            src.display()
        )));
    }
    let file = GgufFile::open(src)?;
    let load = LoadOptions {
        threads,
        context_length: Some(opts.calibration.tokens.max(1)),
        kv_f16: false,
        ..LoadOptions::default()
    };
    let mut model = Model::load(src, &load)?;
    let calibration = calibration_note(opts);
    let mut writer = GgufWriter::create(out)?;
    writer.copy_metadata_from(&file);
    writer.set_metadata(
        "lutra.quantize.method",
        MetaValue::String(opts.method.name().to_string()),
    );
    writer.set_metadata(
        "lutra.quantize.calibration",
        MetaValue::String(calibration.clone()),
    );
    match opts.target {
        Target::Lut => {
            writer.set_metadata(
                "lutra.quantize.bits",
                MetaValue::String(opts.bits.to_string()),
            );
            writer.set_metadata(
                "lutra.quantize.group_size",
                MetaValue::U32(opts.group_size as u32),
            );
        }
        Target::Ggml(t) => {
            writer.set_metadata("lutra.quantize.type", MetaValue::String(format!("{t:?}")));
            // llama.cpp's file type of a file whose block matrices are all of this type.
            writer.set_metadata("general.file_type", MetaValue::U32(llama_file_type(t)));
        }
    }
    let mut written = std::collections::HashSet::new();
    let (mut weights, mut bits_sum) = (0usize, 0.0f64);
    quantize_model(
        &mut model,
        opts,
        &mut |m: QuantizedMatrix<'_>| {
            let dims = [m.linear.cols(), m.linear.rows()];
            match (m.ggml, m.linear) {
                (Some((ty, bytes)), _) => writer.put_raw(&m.name, ty.id(), &dims, bytes)?,
                (None, Linear::Lut(packed)) => {
                    let info = TensorQuantInfo {
                        method: opts.method.name().to_string(),
                        bits: m.bits,
                        group_size: opts.group_size,
                        calibration: calibration.clone(),
                        rotated: m.rotated,
                    };
                    writer.put_packed(&m.name, packed, &info)?
                }
                (None, other) => {
                    return Err(Error::InvalidOption(format!(
                        "{}: quantized to a form ({}) lutra files do not store",
                        m.name,
                        other.kind()
                    )))
                }
            }
            let n = m.linear.rows() * m.linear.cols();
            weights += n;
            bits_sum += f64::from(m.bits) * n as f64;
            written.insert(m.name);
            Ok(())
        },
        progress,
    )?;
    for layer in 0..model.block_count() {
        for input in MatrixInput::ALL {
            if let Some(r) = model.input_rotation(layer, input) {
                let values = r.values();
                let name = input.rotation_tensor(layer);
                writer.put_raw(
                    &name,
                    GgmlType::F32.id(),
                    &[values.len()],
                    bytemuck::cast_slice(&values),
                )?;
            }
        }
    }
    for info in file.tensors() {
        if written.contains(&info.name) {
            continue;
        }
        let data = file.tensor_data(&info.name)?;
        writer.put_raw(&info.name, info.ty.id(), &info.dims, data)?;
    }
    writer.finish()?;
    let file_bytes = std::fs::metadata(out)
        .map_err(|e| Error::Io {
            path: out.to_path_buf(),
            source: e,
        })?
        .len();
    Ok(QuantizeSummary {
        matrices: written.len(),
        average_bits: bits_sum / weights.max(1) as f64,
        file_bytes,
    })
}

/// The calibration as recorded in the file ("none" for methods that read none).
fn calibration_note(opts: &QuantizeOptions) -> String {
    if opts.method.calibrated() || matches!(opts.bits, super::blocks::Bits::Mixed { .. }) {
        opts.calibration.describe()
    } else {
        "none".into()
    }
}

/// llama.cpp's `llama_ftype` of a file whose quantized matrices are all `t` (the `_S` mix for
/// K-quants, which quantizes everything to the named type).
fn llama_file_type(t: GgmlTarget) -> u32 {
    match t {
        GgmlTarget::Q4_0 => 2,
        GgmlTarget::Q8_0 => 7,
        GgmlTarget::Q5_0 => 8,
        GgmlTarget::Q2_K => 10,
        GgmlTarget::Q3_K => 11,
        GgmlTarget::Q4_K => 14,
        GgmlTarget::Q5_K => 16,
        GgmlTarget::Q6_K => 18,
        GgmlTarget::IQ4_NL => 25,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{tiny_llama_gguf, TempDir, TinyModelSpec};
    use crate::gguf::TensorType;
    use crate::llama::calibrate::BlockMatrix;
    use crate::quantize::gptq::GptqOptions;
    use crate::quantizer::blocks::{Bits, Method, Rotate};
    use crate::quantizer::calibration::Calibration;

    fn options(method: Method, bits: Bits, target: Target) -> QuantizeOptions {
        QuantizeOptions {
            method,
            bits,
            group_size: 32,
            calibration: Calibration::builtin(6, 96),
            gptq: GptqOptions::default(),
            target,
            rotate: Rotate::Never,
        }
    }

    /// Logits of every position of a text the calibration never saw.
    fn logits(path: &Path) -> Vec<f32> {
        let model = Model::load(
            path,
            &LoadOptions {
                threads: 1,
                kv_f16: false,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let tokens = model
            .tokenizer()
            .unwrap()
            .encode(
                "Hello there: the rain in Spain stays mainly in the plain.",
                false,
            )
            .unwrap();
        let mut out = vec![0.0; tokens.len() * model.config().vocab_size];
        model
            .forward_all(&tokens, &mut model.new_cache(), &mut out)
            .unwrap();
        out
    }

    fn rel_error(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn calibrated_files_load_in_place_and_beat_round_to_nearest() {
        let d = TempDir::new("quantize-gptq");
        let src = d.join("tiny.gguf");
        tiny_llama_gguf(&src, &TinyModelSpec::default(), 21).unwrap();
        let exact = logits(&src);
        let mut errors = Vec::new();
        for method in [Method::Rtn, Method::GptqHlq] {
            let out = d.join(format!("tiny-{}.gguf", method.name()));
            let opts = options(method, Bits::Uniform(2), Target::Lut);
            let summary = quantize(&src, &out, &opts, 1, &mut |_| {}).unwrap();
            assert_eq!(summary.matrices, 2 * 7);
            assert_eq!(summary.average_bits, 2.0);
            let file = GgufFile::open(&out).unwrap();
            assert_eq!(
                file.metadata("lutra.quantize.method")
                    .and_then(|v| v.as_str()),
                Some(method.name())
            );
            let lutra = file
                .tensors()
                .iter()
                .filter(|t| matches!(t.ty, TensorType::Lutra(_)))
                .count();
            assert_eq!(lutra, 2 * 7, "every block matrix in a lutra type");
            errors.push(rel_error(&logits(&out), &exact));
        }
        assert!(
            errors[1] < errors[0],
            "gptq+hlq logit error {} not below rtn's {}",
            errors[1],
            errors[0]
        );
    }

    #[test]
    fn calibrations_shorter_than_an_input_pair_its_rows() {
        // 96 calibration rows against the 128-wide down input: its shift multiplies the pairs
        // of rows (which are also the rows the block's last run resumes from), rotated or not;
        // 32 rows put every input in that form, the attention input's too.
        let d = TempDir::new("quantize-short-calibration");
        let src = d.join("tiny.gguf");
        tiny_llama_gguf(&src, &TinyModelSpec::default(), 27).unwrap();
        let exact = logits(&src);
        for (rotate, tokens) in [
            (Rotate::Never, 48),
            (Rotate::Always, 48),
            (Rotate::Always, 16),
        ] {
            let out = d.join("tiny-short.gguf");
            let mut opts = options(Method::GptqHlq, Bits::Uniform(4), Target::Lut);
            opts.calibration = Calibration::builtin(2, tokens);
            opts.rotate = rotate;
            quantize(&src, &out, &opts, 1, &mut |_| {}).unwrap();
            let err = rel_error(&logits(&out), &exact);
            assert!(
                err < 0.1,
                "{rotate:?}, 2 × {tokens}: 4-bit logit error {err}"
            );
        }
    }

    #[test]
    fn rotated_files_rotate_the_activations_they_were_quantized_for() {
        let d = TempDir::new("quantize-rotated");
        let src = d.join("tiny.gguf");
        tiny_llama_gguf(&src, &TinyModelSpec::default(), 25).unwrap();
        let exact = logits(&src);
        let out = d.join("tiny-rot.gguf");
        let mut opts = options(Method::GptqHlq, Bits::Uniform(4), Target::Lut);
        opts.rotate = Rotate::Always;
        quantize(&src, &out, &opts, 1, &mut |_| {}).unwrap();
        let file = GgufFile::open(&out).unwrap();
        for layer in 0..2 {
            for input in MatrixInput::ALL {
                let name = input.rotation_tensor(layer);
                assert!(file.tensor_info(&name).is_some(), "{name} missing");
            }
        }
        // The matrices are stored as W·Rᵀ: only with the activations rotated do the logits
        // stay near the source's.
        let err = rel_error(&logits(&out), &exact);
        assert!(err < 0.1, "rotated 4-bit logit error {err}");

        // A rotation tensor that is not a rotation is refused by name.
        let name = MatrixInput::Ffn.rotation_tensor(1);
        let at = file.tensor_info(&name).unwrap().offset;
        let mut bytes = std::fs::read(&out).unwrap();
        bytes[at..at + 4].copy_from_slice(&0.5f32.to_le_bytes());
        let bad = d.join("bad-rot.gguf");
        std::fs::write(&bad, &bytes).unwrap();
        let e = Model::load(&bad, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name) && e.contains("bad-rot.gguf"), "{e}");

        // Without a rotation its matrices were stored for, the file is refused.
        let missing = d.join("no-rot.gguf");
        let mut writer = GgufWriter::create(&missing).unwrap();
        writer.copy_metadata_from(&file);
        for (key, value) in file.metadata_entries() {
            if key.starts_with("lutra.tensor.") {
                writer.set_metadata(key, value.clone());
            }
        }
        for t in file.tensors().iter().filter(|t| t.name != name) {
            let data = file.tensor_data(&t.name).unwrap();
            writer.put_raw(&t.name, t.ty.id(), &t.dims, data).unwrap();
        }
        writer.finish().unwrap();
        let e = Model::load(&missing, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.1.ffn_gate") && e.contains(&name) && e.contains("no-rot.gguf"),
            "{e}"
        );

        // ggml types carry no rotations.
        let mut ggml = options(
            Method::Gptq,
            Bits::Uniform(4),
            Target::Ggml(GgmlTarget::Q4_0),
        );
        ggml.rotate = Rotate::Always;
        let e = quantize(&src, &d.join("o.gguf"), &ggml, 1, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotated"), "{e}");
    }

    #[test]
    fn a_ggml_target_writes_its_standard_type() {
        let d = TempDir::new("quantize-ggml");
        let src = d.join("tiny.gguf");
        tiny_llama_gguf(&src, &TinyModelSpec::default(), 22).unwrap();
        let out = d.join("tiny-q4_0.gguf");
        let opts = options(
            Method::Gptq,
            Bits::Uniform(4),
            Target::Ggml(GgmlTarget::Q4_0),
        );
        quantize(&src, &out, &opts, 1, &mut |_| {}).unwrap();
        let file = GgufFile::open(&out).unwrap();
        let q = file.tensor_info("blk.1.ffn_down.weight").unwrap();
        assert_eq!(q.ty, TensorType::Ggml(GgmlType::Q4_0));
        assert_eq!(
            file.metadata("general.file_type").and_then(|v| v.as_u64()),
            Some(2)
        );
        let err = rel_error(&logits(&out), &logits(&src));
        assert!(err < 0.2, "Q4_0 logit error {err}");

        // K-quant blocks of 256 do not fit rows of 64; HLQ is not a ggml grid.
        let bad = d.join("bad.gguf");
        let k = options(
            Method::Gptq,
            Bits::Uniform(4),
            Target::Ggml(GgmlTarget::Q4_K),
        );
        let e = quantize(&src, &bad, &k, 1, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("256"),
            "{e}"
        );
        let h = options(
            Method::GptqHlq,
            Bits::Uniform(4),
            Target::Ggml(GgmlTarget::Q4_0),
        );
        let e = quantize(&src, &bad, &h, 1, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("HLQ"), "{e}");
        assert!(!bad.exists(), "a failed quantization leaves no file");
    }

    #[test]
    fn mixed_bits_average_what_was_asked() {
        let d = TempDir::new("quantize-mixed");
        let src = d.join("tiny.gguf");
        tiny_llama_gguf(&src, &TinyModelSpec::default(), 23).unwrap();
        let out = d.join("tiny-mixed.gguf");
        let opts = options(Method::Rtn, Bits::Mixed { average: 2.5 }, Target::Lut);
        let summary = quantize(&src, &out, &opts, 1, &mut |_| {}).unwrap();
        assert!(
            summary.average_bits > 2.0 && summary.average_bits <= 2.5,
            "average {}",
            summary.average_bits
        );
        let file = GgufFile::open(&out).unwrap();
        let widths: std::collections::HashSet<u8> = file
            .tensors()
            .iter()
            .filter_map(|t| match t.ty {
                TensorType::Lutra(l) => Some(l.bits),
                _ => None,
            })
            .collect();
        assert_eq!(widths, [2, 3].into_iter().collect());
    }

    #[test]
    fn auto_rotation_rotates_the_inputs_read_only_by_narrow_matrices() {
        let d = TempDir::new("quantize-auto-rot");
        let src = d.join("tiny.gguf");
        tiny_llama_gguf(&src, &TinyModelSpec::default(), 26).unwrap();
        let out = d.join("tiny-3.5.gguf");
        let mut opts = options(Method::Gptq, Bits::Mixed { average: 3.5 }, Target::Lut);
        opts.rotate = Rotate::Auto;
        quantize(&src, &out, &opts, 1, &mut |_| {}).unwrap();
        let file = GgufFile::open(&out).unwrap();
        let (mut rotated, mut plain) = (0, 0);
        for layer in 0..2 {
            for input in MatrixInput::ALL {
                let readers: Vec<_> = BlockMatrix::ALL
                    .into_iter()
                    .filter(|m| m.input() == input)
                    .map(|m| {
                        let name = m.gguf_name(layer);
                        let bits = match file.tensor_info(&name).unwrap().ty {
                            TensorType::Lutra(l) => l.bits,
                            other => panic!("{name} is {other:?}"),
                        };
                        let info = file.lutra_quant_info(&name).unwrap().unwrap();
                        (bits, info.rotated)
                    })
                    .collect();
                let narrow = readers.iter().all(|&(bits, _)| bits < 4);
                assert!(
                    readers.iter().all(|&(_, r)| r == narrow),
                    "{layer} {input:?}"
                );
                let has = file.tensor_info(&input.rotation_tensor(layer)).is_some();
                assert_eq!(has, narrow, "{layer} {input:?}");
                if narrow {
                    rotated += 1;
                } else {
                    plain += 1;
                }
            }
        }
        assert!(rotated > 0 && plain > 0, "{rotated} rotated, {plain} not");
        let err = rel_error(&logits(&out), &logits(&src));
        assert!(err < 0.15, "3.5-bit logit error {err}");
    }

    #[test]
    fn sources_and_options_that_cannot_work_are_clear_errors() {
        let d = TempDir::new("quantize-errors");
        let opts = options(Method::Gptq, Bits::Uniform(2), Target::Lut);
        let e = quantize(&d, &d.join("o.gguf"), &opts, 1, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("Hugging Face folder"), "{e}");
        let src = d.join("tiny.gguf");
        tiny_llama_gguf(&src, &TinyModelSpec::default(), 24).unwrap();
        let mut long = opts.clone();
        long.calibration = Calibration::builtin(100_000, 512);
        let e = quantize(&src, &d.join("o.gguf"), &long, 1, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("calibration text"), "{e}");
        assert!("2.5".parse::<Bits>().is_ok() && "5".parse::<Bits>().is_err());
        assert!("gptq+hlq".parse::<Method>().is_ok() && "awq".parse::<Method>().is_err());
    }
}
