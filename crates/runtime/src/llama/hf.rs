//! Building a [`Model`] from a Hugging Face folder: `config.json`, `tokenizer.json`,
//! `tokenizer_config.json` and `model.safetensors` (or shards with an index).
//!
//! What each stored form becomes:
//! - F32/F16/BF16 linear layers: round-to-nearest requantized at load with
//!   `LoadOptions::requantize`, or [`HF_DEFAULT_REQUANTIZE`] (4-bit, groups of 32, asymmetric:
//!   what `--bits 4 --group-size 32` does) when none is given;
//! - F32/F16/BF16 embedding and LM head: int8 with an f16 scale per 32 (Q8_0-like), or f32 when
//!   a row is not a multiple of 32;
//! - GPTQ layers: their own codes, scales and zero points, exactly; act-order layers (groups not
//!   contiguous along K) with their columns sorted by group and the input gathered to match
//!   (matrices of one input with the same order share one gathered copy), or, when the groups are
//!   uneven, dequantized exactly and stored as int8;
//! - BitNet layers: ternary codes with the tensor's scale, exactly;
//! - `--reference`: everything dequantized to f32.
//!
//! The source and memory forms of every tensor are listed by `lutra info` (e.g. `f16→q4g32` →
//! `lut4 g32`), so the default requantization is visible there.

use std::path::Path;
use std::sync::Arc;

use crate::architecture::{ArchitectureSpec, TensorName};
use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::quantize::{requantize, Requantize};
use crate::safetensors::{bitnet, gptq, Dtype, SafetensorsFolder};
use crate::tokenizer::Tokenizer;
use crate::weights::DecodedTensor;

use super::block::{load_block, BlockSource};
use super::{count_tensor, LoadOptions, Model, ModelParts, TensorForm};

#[cfg(test)]
mod tests;

/// The requantization of f16/bf16/f32 linear layers when `LoadOptions::requantize` is `None`.
pub const HF_DEFAULT_REQUANTIZE: Requantize = Requantize {
    bits: 4,
    group_size: 32,
};

/// How the checkpoint's linear layers are stored (`config.json`'s `quantization_config`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Quantization {
    None,
    Gptq(gptq::GptqConfig),
    BitNet(bitnet::ScaleMode),
}

impl Quantization {
    fn from_config(json: &serde_json::Value, path: &Path) -> Result<Quantization> {
        let Some(q) = json.get("quantization_config").filter(|q| !q.is_null()) else {
            return Ok(Quantization::None);
        };
        match q.get("quant_method").and_then(|m| m.as_str()) {
            Some("gptq") => Ok(Quantization::Gptq(gptq::GptqConfig::from_json(q, path)?)),
            Some("bitnet") => Ok(Quantization::BitNet(bitnet::ScaleMode::from_json(q, path)?)),
            other => Err(Error::Metadata {
                path: path.to_path_buf(),
                key: "quantization_config.quant_method".into(),
                reason: format!("{other:?} is not supported (gptq and bitnet are)"),
            }),
        }
    }
}

/// A matrix as stored, decoded exactly.
struct Decoded {
    tensor: DecodedTensor,
    /// Source kind for `lutra info` (`f16`, `gptq4 g128`, `bitnet ternary`, ...).
    source: String,
    /// Dense values (F32/F16/BF16 in the file, or a GPTQ act-order layer).
    dense: bool,
    /// A GPTQ act-order layer: values on a low-bit grid whose groups are scattered along K.
    act_order: bool,
    /// Column `i` of `tensor` is input feature `perm[i]` (GPTQ act-order sorted by group).
    perm: Option<Vec<u32>>,
}

/// What a matrix is for: linear layers are requantized, the embedding and LM head are not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Layer,
    Table,
}

/// Reads tensors of one folder, checking shapes and keeping the per-kind counts.
struct HfLoader<'a> {
    folder: &'a SafetensorsFolder,
    quant: Quantization,
    opts: &'a LoadOptions,
    types: Vec<TensorForm>,
    /// The column order of the last permuted matrix, shared by the next ones that have the same
    /// (q/k/v, gate/up) so that they share one gathered input.
    last_order: Option<Arc<[u32]>>,
}

impl HfLoader<'_> {
    /// The matrix `prefix` (`prefix.weight`, or GPTQ/BitNet tensors) of `[rows][cols]`, exactly.
    fn decode(&self, prefix: &str, rows: usize, cols: usize) -> Result<Decoded> {
        let name = |s: &str| format!("{prefix}.{s}");
        if let Quantization::Gptq(cfg) = self.quant {
            if self.folder.contains(&name("qweight")) {
                let (qw, qz, sc, gi) = (
                    name("qweight"),
                    name("qzeros"),
                    name("scales"),
                    name("g_idx"),
                );
                let tensors = gptq::GptqTensors {
                    qweight: self.folder.tensor(&qw)?,
                    qzeros: self.folder.tensor(&qz)?,
                    scales: self.folder.tensor(&sc)?,
                    g_idx: match self.folder.contains(&gi) {
                        true => Some(self.folder.tensor(&gi)?),
                        false => None,
                    },
                };
                let d = gptq::decode(&cfg, &tensors, rows, cols)?;
                let group = match cfg.group_size {
                    Some(g) => format!("g{g}"),
                    None => "per-row".into(),
                };
                let order = if d.act_order { " act-order" } else { "" };
                let source = format!("gptq{} {group}{order}", cfg.bits);
                let dense = matches!(d.tensor, DecodedTensor::Dense { .. });
                return Ok(Decoded {
                    tensor: d.tensor,
                    source,
                    dense,
                    act_order: d.act_order,
                    perm: d.perm,
                });
            }
        }
        let wname = name("weight");
        let weight = self.folder.tensor(&wname)?;
        if let Quantization::BitNet(mode) = self.quant {
            if weight.dtype == Dtype::U8 {
                let sname = name("weight_scale");
                let scale = self.folder.tensor(&sname)?;
                let t = bitnet::decode(&weight, &scale, mode, rows, cols)?;
                return Ok(Decoded {
                    tensor: t,
                    source: "bitnet ternary".into(),
                    dense: false,
                    act_order: false,
                    perm: None,
                });
            }
        }
        weight.expect_shape(&[rows, cols])?;
        let values = weight.to_f32()?;
        let source = format!("{:?}", weight.dtype).to_lowercase();
        Ok(Decoded {
            tensor: DecodedTensor::Dense { rows, cols, values },
            source,
            dense: true,
            act_order: false,
            perm: None,
        })
    }

    fn linear(&mut self, prefix: &str, rows: usize, cols: usize, role: Role) -> Result<Linear> {
        let Decoded {
            tensor,
            mut source,
            dense,
            act_order,
            perm,
        } = self.decode(prefix, rows, cols)?;
        let tensor = if self.opts.reference {
            tensor
        } else {
            match role {
                // GPTQ act-order values with uneven groups are on a low-bit grid, but on groups
                // scattered along K: requantizing them to contiguous groups of 32 loses much more
                // than int8 does.
                Role::Layer
                    if act_order
                        && dense
                        && self.opts.requantize.is_none()
                        && cols.is_multiple_of(32) =>
                {
                    source = format!("{source}→int8");
                    quantize_int8(&tensor)
                }
                Role::Layer => {
                    let spec = match (self.opts.requantize, dense) {
                        (Some(spec), _) => Some(spec),
                        (None, true) => Some(HF_DEFAULT_REQUANTIZE),
                        (None, false) => None,
                    };
                    match spec {
                        Some(spec) => {
                            source = format!("{source}→q{}g{}", spec.bits, spec.group_size);
                            requantize(&tensor, spec)?
                        }
                        None => tensor,
                    }
                }
                Role::Table if dense && cols.is_multiple_of(32) => {
                    source = format!("{source}→int8");
                    quantize_int8(&tensor)
                }
                Role::Table => tensor,
            }
        };
        let m = match perm {
            Some(perm) => {
                let order = match self.last_order.take() {
                    Some(last) if last[..] == perm[..] => last,
                    _ => Arc::from(perm),
                };
                self.last_order = Some(Arc::clone(&order));
                Linear::from_decoded_permuted(&tensor, order, self.opts.reference)?
            }
            None => Linear::from_decoded(&tensor, self.opts.reference)?,
        };
        count_tensor(&mut self.types, prefix, source, m.kind(), m.bytes());
        Ok(m)
    }

    /// A vector of `len` values, kept as f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.folder.tensor(name)?;
        t.expect_shape(&[len])?;
        let values = t.to_f32()?;
        count_tensor(
            &mut self.types,
            name,
            format!("{:?}", t.dtype).to_lowercase(),
            "f32".into(),
            4 * len,
        );
        Ok(values)
    }

    /// Refuses a bias the forward pass has no place for, unless it is all zeros (AutoGPTQ writes
    /// zero biases for every projection).
    fn no_bias(&self, name: &str) -> Result<()> {
        if !self.folder.contains(name) {
            return Ok(());
        }
        let t = self.folder.tensor(name)?;
        if t.to_f32()?.iter().any(|&v| v != 0.0) {
            return Err(t.error("a non-zero bias on this projection is not supported"));
        }
        Ok(())
    }

    /// A vector that only some architectures have.
    fn optional_vector(&mut self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        match self.folder.contains(name) {
            true => self.vector(name, len).map(Some),
            false => Ok(None),
        }
    }
}

/// Hugging Face names: `model.layers.{i}.{hf name}` and its `.weight` (or GPTQ/BitNet parts) and
/// `.bias`.
impl BlockSource for HfLoader<'_> {
    fn base_name(&self, layer: usize, tensor: &TensorName) -> String {
        format!("model.layers.{layer}.{}", tensor.hf)
    }

    fn contains(&self, base: &str) -> bool {
        self.folder.contains(&format!("{base}.weight"))
            || self.folder.contains(&format!("{base}.qweight"))
    }

    fn matrix(&mut self, base: &str, rows: usize, cols: usize) -> Result<Linear> {
        self.linear(base, rows, cols, Role::Layer)
    }

    fn stacked_matrices(
        &mut self,
        base: &str,
        _rows: &[usize],
        _cols: usize,
    ) -> Result<Vec<Linear>> {
        Err(Error::BadFile {
            path: self.folder.dir().to_path_buf(),
            reason: format!("'{base}': stacked projections are not read from Hugging Face folders"),
        })
    }

    fn vector(&mut self, base: &str, len: usize) -> Result<Vec<f32>> {
        HfLoader::vector(self, &format!("{base}.weight"), len)
    }

    fn bias(&mut self, base: &str, len: usize) -> Result<Option<Vec<f32>>> {
        self.optional_vector(&format!("{base}.bias"), len)
    }

    fn no_bias(&mut self, base: &str) -> Result<()> {
        HfLoader::no_bias(self, &format!("{base}.bias"))
    }

    fn missing(&self, base: &str) -> Error {
        Error::MissingTensor {
            path: self.folder.dir().to_path_buf(),
            tensor: format!("{base}.weight"),
        }
    }
}

/// Int8 codes with an f16-exact scale per block of 32 (`absmax / 127`), as Q8_0 stores them.
fn quantize_int8(tensor: &DecodedTensor) -> DecodedTensor {
    let (rows, cols) = (tensor.rows(), tensor.cols());
    let values = tensor.dequantize();
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / 32);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = half::f16::from_f32(amax / 127.0).to_f32();
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        codes.extend(
            block
                .iter()
                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
        );
        scales.push(scale);
    }
    DecodedTensor::Int8 {
        rows,
        cols,
        block: 32,
        codes,
        scales,
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the Hugging Face folder `dir`.
pub(super) fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::BadFile {
            path: dir.to_path_buf(),
            reason: "a model folder must be a Hugging Face folder (config.json, tokenizer.json, \
                     model.safetensors); config.json is missing"
                .into(),
        });
    }
    let text = read_text(&config_path)?;
    let config = ModelConfig::from_hf_json(&text, &config_path)?;
    // `from_hf_json` accepted the JSON, so this parse succeeds; the error path is kept anyway.
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: config_path.clone(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let quant = Quantization::from_config(&json, &config_path)?;
    super::check_config(&config)?;
    let folder = SafetensorsFolder::open(dir)?;
    // The tokenizer is independent of the weights: build it while they are repacked.
    let (parts, text) = std::thread::scope(|scope| {
        let text = scope.spawn(|| -> Result<(Tokenizer, ChatTemplate)> {
            let tokenizer = Tokenizer::from_hf_folder(dir)?;
            let chat_template = ChatTemplate::from_hf_folder(dir, &tokenizer)?;
            Ok((tokenizer, chat_template))
        });
        let parts = load_weights(&folder, config, quant, opts);
        let text = text
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (parts, text)
    });
    let parts = parts?;
    let (tokenizer, chat_template) = text?;
    if tokenizer.vocab_size() > parts.config.vocab_size {
        return Err(Error::Tokenizer(format!(
            "{}: the tokenizer has {} tokens but the model only {}",
            dir.display(),
            tokenizer.vocab_size(),
            parts.config.vocab_size
        )));
    }
    let parts = ModelParts {
        tokenizer: Some(tokenizer),
        chat_template: Some(chat_template),
        ..parts
    };
    Model::from_parts(parts, opts)
}

/// Every weight tensor of a llama-family folder, repacked for the kernels (no tokenizer yet).
fn load_weights(
    folder: &SafetensorsFolder,
    mut config: ModelConfig,
    quant: Quantization,
    opts: &LoadOptions,
) -> Result<ModelParts> {
    let c = &config;
    let h = c.hidden_size;
    let spec = ArchitectureSpec::of(c.architecture);
    let mut t = HfLoader {
        folder,
        quant,
        opts,
        types: Vec::new(),
        last_order: None,
    };
    let embedding = t.linear("model.embed_tokens", c.vocab_size, h, Role::Table)?;
    // Grown as blocks load: the block count is the file's word, not yet checked by tensors.
    let mut layers = Vec::new();
    for i in 0..c.layers {
        layers.push(load_block(&mut t, spec, c, i)?);
    }
    let output_norm = t.vector("model.norm.weight", h)?;
    // Tied (or no `lm_head`): the embedding is the LM head.
    let output = if config.tied_embeddings || !folder.contains("lm_head.weight") {
        None
    } else {
        Some(t.linear("lm_head", config.vocab_size, h, Role::Table)?)
    };
    config.tied_embeddings = output.is_none();
    Ok(ModelParts {
        config,
        embedding,
        layers,
        output_norm,
        output,
        tensors: t.types,
        tokenizer: None,
        chat_template: None,
    })
}
