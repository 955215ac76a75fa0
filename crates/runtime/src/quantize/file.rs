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
use crate::llama::{LoadOptions, Model};

use super::ggml_types::GgmlTarget;
use super::model::{quantize_model, Progress, QuantizeOptions, QuantizedMatrix, Target};

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
    let mut writer = GgufWriter::create(out)?;
    writer.copy_metadata_from(&file);
    writer.set_metadata(
        "lutra.quantize.method",
        MetaValue::String(opts.method.name().to_string()),
    );
    writer.set_metadata(
        "lutra.quantize.calibration",
        MetaValue::String(calibration_note(opts)),
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
    let calibration = calibration_note(opts);
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
    let mut rest = 0usize;
    for info in file.tensors() {
        if written.contains(&info.name) {
            continue;
        }
        let data = file.tensor_data(&info.name)?;
        writer.put_raw(&info.name, info.ty.id(), &info.dims, data)?;
        rest += 1;
    }
    let _ = rest;
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
    if opts.method.calibrated() || matches!(opts.bits, super::model::Bits::Mixed { .. }) {
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
