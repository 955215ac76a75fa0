//! Building a [`Model`] from a GGUF file: every tensor is checked against the configuration,
//! decoded exactly, and converted to its kernel form (or requantized, or dequantized for
//! reference mode). Tensors in lutra's packed types are already in kernel form: they are used
//! in place from the file's mapping ([`GgufFile::lutra_matrix`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::architecture::{ArchitectureSpec, TensorName};
use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorType};
use crate::linear::Linear;
use crate::quantize::requantize;
use crate::rotation::InputRotation;
use crate::tokenizer::Tokenizer;
use crate::weights::DecodedTensor;

use super::block::{load_block, BlockSource};
use super::{count_tensor, LayerWeights, LoadOptions, Model, ModelParts, TensorForm};

/// Reads tensors of one file, checking shapes and keeping the per-kind counts.
struct TensorLoader<'a> {
    file: &'a GgufFile,
    opts: &'a LoadOptions,
    types: Vec<TensorForm>,
}

impl TensorLoader<'_> {
    /// The type of tensor `name`, after checking it is `[rows][cols]` (GGUF dims `[cols, rows]`).
    fn check_shape(&self, name: &str, rows: usize, cols: usize) -> Result<String> {
        let info = self
            .file
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.file.path().to_path_buf(),
                tensor: name.to_string(),
            })?;
        let vector = rows == 1;
        let ok = if vector {
            info.elements() == cols
        } else {
            info.cols() == cols && info.rows() == rows
        };
        if !ok {
            return Err(Error::ShapeMismatch {
                path: self.file.path().to_path_buf(),
                tensor: name.to_string(),
                found: info.dims.clone(),
                expected: if vector { vec![cols] } else { vec![cols, rows] },
            });
        }
        Ok(info.ty.name())
    }

    /// Decodes `name` after checking it is `[rows][cols]` (GGUF dims `[cols, rows]`).
    fn decode(&self, name: &str, rows: usize, cols: usize) -> Result<(DecodedTensor, String)> {
        let source = self.check_shape(name, rows, cols)?;
        let tensor = self.file.decode_tensor(name)?;
        // The decoded copy is all that is read from here on: the file's pages can go.
        self.file.release_tensor(name);
        Ok((tensor, source))
    }

    /// The LUT form of `name` built a block of rows at a time, when it is stored as low-bit codes
    /// that load as they are (no per-tensor scale, no requantization, no per-row form); `None`
    /// otherwise.
    fn lut_by_row_blocks(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        requantizable: bool,
    ) -> Result<Option<Linear>> {
        let source = self.check_shape(name, rows, cols)?;
        let scaled = requantizable
            && name
                .strip_suffix(".weight")
                .is_some_and(|base| self.file.tensor_info(&format!("{base}.scale")).is_some());
        let requantized = requantizable && self.opts.requantize.is_some();
        if self.opts.reference || scaled || requantized || rows < 2 {
            return Ok(None);
        }
        // Each block's file pages go as soon as it is decoded.
        let decode_rows = |range: std::ops::Range<usize>| {
            let rows = self.file.decode_rows(name, range.clone());
            self.file.release_rows(name, range);
            rows
        };
        let zero_point = match self.file.tensor_info(name).map(|t| t.ty) {
            Some(TensorType::Ggml(ty)) => ty.zero_point(),
            _ => None,
        };
        let m = Linear::lut_by_row_blocks(rows, cols, zero_point, decode_rows, has_no_per_row_form)
            .map_err(|e| match e {
                Error::Kernel(_) => self.form_error(name, &source, e),
                e => e,
            })?;
        if let Some(m) = &m {
            self.file.release_tensor(name);
            count_tensor(&mut self.types, name, source, m.kind(), m.bytes());
        }
        Ok(m)
    }

    /// The matrix `name` read in place from the file's mapping, when it has a lutra packed type
    /// and is used as it is (not requantized, not dequantized for reference mode, no `.scale`
    /// to fold in); `None` otherwise (it is then dequantized like any other type).
    fn lutra_in_place(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        requantizable: bool,
    ) -> Result<Option<Linear>> {
        let Some(TensorType::Lutra(_)) = self.file.tensor_info(name).map(|t| t.ty) else {
            return Ok(None);
        };
        let source = self.check_shape(name, rows, cols)?;
        let scaled = requantizable
            && name
                .strip_suffix(".weight")
                .is_some_and(|base| self.file.tensor_info(&format!("{base}.scale")).is_some());
        let requantized = requantizable && self.opts.requantize.is_some();
        if self.opts.reference || scaled || requantized {
            return Ok(None);
        }
        let quantization = self.file.lutra_quant_info(name)?;
        let m = Linear::Lut(self.file.lutra_matrix(name)?);
        self.types.push(TensorForm {
            name: name.to_string(),
            source,
            kernel: m.kind(),
            bytes: m.bytes(),
            mapped: true,
            quantization,
        });
        Ok(Some(m))
    }

    /// A matrix; `requantizable` marks linear layers (not the embedding or LM head). A linear
    /// layer `X.weight` may come with a one-value `X.scale` (BitNet converters that keep the
    /// ternary codes and the tensor's scale apart): the scale is folded into the weights.
    fn linear(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        requantizable: bool,
    ) -> Result<Linear> {
        if let Some(m) = self.lutra_in_place(name, rows, cols, requantizable)? {
            return Ok(m);
        }
        if let Some(m) = self.lut_by_row_blocks(name, rows, cols, requantizable)? {
            return Ok(m);
        }
        let (tensor, source) = self.decode_scaled(name, rows, cols, requantizable)?;
        self.kernel_form(name, tensor, source, requantizable)
    }

    /// [`TensorLoader::decode`] with a linear layer's `.scale` folded in.
    fn decode_scaled(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        requantizable: bool,
    ) -> Result<(DecodedTensor, String)> {
        let (mut tensor, source) = self.decode(name, rows, cols)?;
        if let Some(base) = name.strip_suffix(".weight").filter(|_| requantizable) {
            if let Some(scale) = self.tensor_scale(&format!("{base}.scale"))? {
                scale_tensor(&mut tensor, scale);
            }
        }
        Ok((tensor, source))
    }

    /// A decoded matrix `name` in its kernel form (requantized if asked), counted.
    fn kernel_form(
        &mut self,
        name: &str,
        tensor: DecodedTensor,
        source: String,
        requantizable: bool,
    ) -> Result<Linear> {
        let tensor = per_row_if_uniform(tensor);
        let (tensor, source) = match self.opts.requantize {
            Some(spec) if requantizable => (
                requantize(&tensor, spec).map_err(|e| self.form_error(name, &source, e))?,
                format!("{source}→q{}g{}", spec.bits, spec.group_size),
            ),
            _ => (tensor, source),
        };
        let m = Linear::from_decoded_owned(tensor, self.opts.reference)
            .map_err(|e| self.form_error(name, &source, e))?;
        count_tensor(&mut self.types, name, source, m.kind(), m.bytes());
        Ok(m)
    }

    /// `error`, raised while putting tensor `name` of type `ty` into its kernel form, with the
    /// file and the tensor named.
    fn form_error(&self, name: &str, ty: &str, error: Error) -> Error {
        Error::TensorForm {
            path: self.file.path().to_path_buf(),
            tensor: name.to_string(),
            ty: ty.to_string(),
            error: Box::new(error),
        }
    }

    /// A vector of `len` values, kept as f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (tensor, source) = self.decode(name, 1, len)?;
        count_tensor(&mut self.types, name, source, "f32".into(), 4 * len);
        Ok(tensor.dequantize())
    }

    /// The single value of an optional per-tensor scale tensor.
    fn tensor_scale(&mut self, name: &str) -> Result<Option<f32>> {
        if self.file.tensor_info(name).is_none() {
            return Ok(None);
        }
        let (tensor, _) = self.decode(name, 1, 1)?;
        let value = tensor.dequantize()[0];
        if !value.is_finite() {
            return Err(Error::BadFile {
                path: self.file.path().to_path_buf(),
                reason: format!("tensor '{name}': scale {value} is not finite"),
            });
        }
        Ok(Some(value))
    }

    /// A vector that only some architectures have.
    fn optional_vector(&mut self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        match self.file.tensor_info(name) {
            Some(_) => self.vector(name, len).map(Some),
            None => Ok(None),
        }
    }
}

pub(super) fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
    let file = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&file)?;
    super::check_config(&config)?;
    let architecture = config.architecture;
    // The tokenizer needs only metadata: build it while the weights are repacked.
    let (parts, text) = std::thread::scope(|scope| {
        let text = scope.spawn(|| -> Result<(Tokenizer, ChatTemplate)> {
            let tokenizer = Tokenizer::from_gguf(&file)?;
            let chat_template = match ArchitectureSpec::of(architecture).default_chat_template {
                Some(source) if file.metadata("tokenizer.chat_template").is_none() => {
                    let text = |id: Option<u32>| id.and_then(|id| tokenizer.token_str(id));
                    ChatTemplate::new(
                        source,
                        text(tokenizer.bos_id()).unwrap_or(""),
                        text(tokenizer.eos_id()).unwrap_or(""),
                    )?
                }
                _ => ChatTemplate::from_gguf(&file, &tokenizer)?,
            };
            Ok((tokenizer, chat_template))
        });
        let parts = load_weights(&file, config, opts);
        let text = text
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (parts, text)
    });
    // Weight errors first, as when loading was sequential.
    let parts = parts?;
    let (tokenizer, chat_template) = text?;
    let parts = ModelParts {
        tokenizer: Some(tokenizer),
        chat_template: Some(chat_template),
        ..parts
    };
    Model::from_parts(parts, opts)
}

/// One unit of loading work: a whole matrix outside the blocks, or one block.
enum LoadJob {
    Embedding,
    Layer(usize),
    Output,
}

/// What a [`LoadJob`] produced.
enum Loaded {
    Embedding(Linear),
    Layer(Box<LayerWeights>),
    Output(Linear),
}

/// A finished [`LoadJob`]: its weights and its tensor counts.
type JobResult = Result<(Loaded, Vec<TensorForm>)>;

/// Every weight tensor of a llama-family GGUF, repacked for the kernels (no tokenizer yet).
fn load_weights(file: &GgufFile, config: ModelConfig, opts: &LoadOptions) -> Result<ModelParts> {
    let c = &config;
    let h = c.hidden_size;
    let spec = ArchitectureSpec::of(c.architecture);
    // The LM head (untied models), the embedding and every block are independent: workers take
    // them one at a time, in this order, so that the big matrices outside the blocks load beside
    // the blocks instead of before or after them, and at most one tensor per worker is held
    // decoded at once. The LM head comes first: when its type loads whole (Q6_K, Q8_0), its
    // decoded copy then exists while little else is allocated. Jobs are numbered, not listed:
    // the block count is the file's word, not yet checked by tensors.
    let has_output = file.tensor_info("output.weight").is_some();
    let first_layer = if has_output { 2 } else { 1 };
    let job_count = c.layers.saturating_add(first_layer);
    let job = |j: usize| match j {
        0 if has_output => LoadJob::Output,
        j if j + 1 == first_layer => LoadJob::Embedding,
        j => LoadJob::Layer(j - first_layer),
    };
    let workers = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .clamp(1, job_count);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let run = |job: &LoadJob| -> JobResult {
        let mut t = TensorLoader {
            file,
            opts,
            types: Vec::new(),
        };
        let loaded = match *job {
            LoadJob::Embedding => {
                Loaded::Embedding(t.linear("token_embd.weight", c.vocab_size, h, false)?)
            }
            LoadJob::Layer(i) => Loaded::Layer(Box::new(load_block(&mut t, spec, c, i)?)),
            // SmolLM2 and other tied models have no `output` tensor: the embedding is the LM head.
            LoadJob::Output => Loaded::Output(t.linear("output.weight", c.vocab_size, h, false)?),
        };
        Ok((loaded, t.types))
    };
    let mut done: Vec<(usize, JobResult)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    // Jobs are taken in order, so when one fails every earlier job has been
                    // taken and finishes: the first error in job order is always seen.
                    while !failed.load(Ordering::Relaxed) {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        if j >= job_count {
                            break;
                        }
                        let result = run(&job(j));
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        done.push((j, result));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    // Results in model order (embedding, blocks, LM head), for the tensor counts and so that the
    // first error reported is the first in the model.
    done.sort_by_key(|&(j, _)| if has_output && j == 0 { usize::MAX } else { j });
    let (mut embedding, mut output) = (None, None);
    let mut types = Vec::new();
    // Grown as blocks load: the block count is the file's word, not yet checked by tensors.
    let mut layers = Vec::new();
    for (_, result) in done {
        let (loaded, job_types) = result?;
        match loaded {
            Loaded::Embedding(m) => embedding = Some(m),
            Loaded::Layer(layer) => layers.push(*layer),
            Loaded::Output(m) => output = Some(m),
        }
        types.extend(job_types);
    }
    let embedding = embedding.ok_or_else(|| Error::MissingTensor {
        path: file.path().to_path_buf(),
        tensor: "token_embd.weight".to_string(),
    })?;
    let mut t = TensorLoader { file, opts, types };
    let output_norm = t.vector("output_norm.weight", h)?;
    let tensors = t.types;

    Ok(ModelParts {
        config,
        embedding,
        layers,
        output_norm,
        output,
        tensors,
        tokenizer: None,
        chat_template: None,
    })
}

/// GGUF names: `blk.{i}.{gguf name}.weight` / `.bias`.
impl BlockSource for TensorLoader<'_> {
    fn base_name(&self, layer: usize, tensor: &TensorName) -> String {
        format!("blk.{layer}.{}", tensor.gguf)
    }

    fn contains(&self, base: &str) -> bool {
        self.file.tensor_info(&format!("{base}.weight")).is_some()
    }

    fn matrix(&mut self, base: &str, rows: usize, cols: usize) -> Result<Linear> {
        self.linear(&format!("{base}.weight"), rows, cols, true)
    }

    fn stacked_matrices(&mut self, base: &str, rows: &[usize], cols: usize) -> Result<Vec<Linear>> {
        let name = format!("{base}.weight");
        let (tensor, source) = self.decode_scaled(&name, rows.iter().sum(), cols, true)?;
        let mut start = 0;
        let mut out = Vec::with_capacity(rows.len());
        for &count in rows {
            let part = tensor.row_range(start, count);
            out.push(self.kernel_form(&name, part, source.clone(), true)?);
            start += count;
        }
        Ok(out)
    }

    fn vector(&mut self, base: &str, len: usize) -> Result<Vec<f32>> {
        TensorLoader::vector(self, &format!("{base}.weight"), len)
    }

    fn bias(&mut self, base: &str, len: usize) -> Result<Option<Vec<f32>>> {
        self.optional_vector(&format!("{base}.bias"), len)
    }

    /// llama.cpp leaves out biases an architecture's graph has no place for; so does lutra.
    fn no_bias(&mut self, _base: &str) -> Result<()> {
        Ok(())
    }

    fn missing(&self, base: &str) -> Error {
        Error::MissingTensor {
            path: self.file.path().to_path_buf(),
            tensor: format!("{base}.weight"),
        }
    }

    fn rotation(&mut self, name: &str, cols: usize) -> Result<Option<InputRotation>> {
        let Some(len) = self.file.tensor_info(name).map(|t| t.elements()) else {
            return Ok(None);
        };
        // `len` values are in the file (the reader checked the tensor's bytes against its size).
        let values = TensorLoader::vector(self, name, len)?;
        InputRotation::from_values(cols, &values)
            .map(Some)
            .map_err(|e| Error::BadFile {
                path: self.file.path().to_path_buf(),
                reason: format!("tensor '{name}': {e}"),
            })
    }

    fn stored_rotated(&self, base: &str) -> Result<bool> {
        let info = self.file.lutra_quant_info(&format!("{base}.weight"))?;
        Ok(info.is_some_and(|q| q.rotated))
    }

    fn inconsistent(&self, reason: String) -> Error {
        Error::BadFile {
            path: self.file.path().to_path_buf(),
            reason,
        }
    }
}

/// Multiplies every weight of `t` by `factor` (a per-tensor scale stored beside the weights).
/// Low-bit codes keep their form: `factor·(s·q + m) = (factor·s)·q + factor·m`, so ternary stays
/// ternary (offset −scale); K-quant super-blocks become dense values.
pub(super) fn scale_tensor(t: &mut DecodedTensor, factor: f32) {
    match t {
        DecodedTensor::LowBit {
            scales, offsets, ..
        }
        | DecodedTensor::PlaneLowBit {
            scales, offsets, ..
        } => {
            scales.iter_mut().for_each(|s| *s *= factor);
            offsets.iter_mut().for_each(|m| *m *= factor);
        }
        DecodedTensor::Int8 { scales, .. } | DecodedTensor::Iq4 { scales, .. } => {
            scales.iter_mut().for_each(|s| *s *= factor)
        }
        DecodedTensor::Dense { values, .. } => values.iter_mut().for_each(|v| *v *= factor),
        DecodedTensor::SuperBlock { rows, cols, .. } => {
            // The f16 super-scales would round once multiplied: keep the exact product instead.
            let (rows, cols) = (*rows, *cols);
            let values = t.dequantize().into_iter().map(|v| v * factor).collect();
            *t = DecodedTensor::Dense { rows, cols, values };
        }
    }
}

/// Whether [`per_row_if_uniform`] leaves `t` as it is. Checked on a tensor's first rows: when
/// they have no per-row form, neither has the whole tensor.
fn has_no_per_row_form(t: &DecodedTensor) -> bool {
    let group = |t: &DecodedTensor| match t {
        DecodedTensor::LowBit { group_size, .. } => Some(*group_size),
        _ => None,
    };
    group(&per_row_if_uniform(t.clone())) == group(t)
}

/// A low-bit tensor whose groups all share one scale and offset within each row (TQ1_0/TQ2_0 of
/// a BitNet model: every 256-block stores the tensor's one scale) rewritten exactly with one group
/// per row, so the kernels see a per-row scale (the ternary kernel packs triples of weights,
/// which 32-element groups would split). In a ternary tensor a group whose scale is 0 holds only
/// zeros and fits any scale (its codes become 1, i.e. 0). Other tensors are returned unchanged.
pub(super) fn per_row_if_uniform(t: DecodedTensor) -> DecodedTensor {
    let DecodedTensor::LowBit {
        rows,
        cols,
        bits,
        group_size,
        mut codes,
        scales,
        offsets,
    } = t
    else {
        return t;
    };
    let unchanged = |codes, scales, offsets| DecodedTensor::LowBit {
        rows,
        cols,
        bits,
        group_size,
        codes,
        scales,
        offsets,
    };
    let groups = cols / group_size.max(1);
    if groups <= 1 || group_size * groups != cols || scales.len() != rows * groups {
        return unchanged(codes, scales, offsets);
    }
    // Ternary: 2-bit codes in 0..=2 with offset −scale. The codes are scanned only when the
    // scales say a per-row form may exist, so that other tensors load without a pass over them.
    let ternary_scales = bits == 2 && offsets.iter().zip(&scales).all(|(m, s)| *m == -s);
    let per_row = |ternary: bool| -> Option<(Vec<f32>, Vec<f32>)> {
        let zero_group = |s: f32| ternary && s == 0.0;
        let mut row_scale = Vec::with_capacity(rows);
        let mut row_offset = Vec::with_capacity(rows);
        for r in 0..rows {
            let range = r * groups..(r + 1) * groups;
            let (s, m) = (&scales[range.clone()], &offsets[range]);
            // The row's scale: that of its first group with a nonzero scale (all may be zero).
            let first = (0..groups).find(|&g| !zero_group(s[g])).unwrap_or(0);
            let (s0, m0) = (s[first], m[first]);
            if !(0..groups).all(|g| (s[g] == s0 && m[g] == m0) || zero_group(s[g])) {
                return None;
            }
            row_scale.push(s0);
            row_offset.push(m0);
        }
        Some((row_scale, row_offset))
    };
    let (ternary, (row_scale, row_offset)) = match per_row(ternary_scales) {
        Some(found) if ternary_scales && codes.iter().all(|&q| q <= 2) => (true, found),
        Some(found) if !ternary_scales => (false, found),
        _ => match per_row(false) {
            Some(found) => (false, found),
            None => return unchanged(codes, scales, offsets),
        },
    };
    if ternary {
        for (g, &s) in scales.iter().enumerate() {
            if s == 0.0 {
                codes[g * group_size..(g + 1) * group_size].fill(1);
            }
        }
    }
    DecodedTensor::LowBit {
        rows,
        cols,
        bits,
        group_size: cols,
        codes,
        scales: row_scale,
        offsets: row_offset,
    }
}
