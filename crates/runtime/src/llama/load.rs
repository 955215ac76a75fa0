//! Building a [`Model`] from a GGUF file: every tensor is checked against the configuration,
//! decoded exactly, and converted to its kernel form (or requantized, or dequantized for
//! reference mode).

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::linear::Linear;
use crate::quantize::requantize;
use crate::tokenizer::Tokenizer;
use crate::weights::DecodedTensor;

use super::{count_tensor, LayerWeights, LoadOptions, Model, ModelParts, TensorTypeCount};

/// Reads tensors of one file, checking shapes and keeping the per-kind counts.
struct TensorLoader<'a> {
    file: &'a GgufFile,
    opts: &'a LoadOptions,
    types: Vec<TensorTypeCount>,
}

impl TensorLoader<'_> {
    /// Decodes `name` after checking it is `[rows][cols]` (GGUF dims `[cols, rows]`).
    fn decode(&self, name: &str, rows: usize, cols: usize) -> Result<(DecodedTensor, String)> {
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
        Ok((self.file.decode_tensor(name)?, info.ty.name()))
    }

    /// A matrix; `requantizable` marks linear layers (not the embedding or LM head).
    fn linear(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        requantizable: bool,
    ) -> Result<Linear> {
        let (tensor, source) = self.decode(name, rows, cols)?;
        let (tensor, source) = match self.opts.requantize {
            Some(spec) if requantizable => (
                requantize(&tensor, spec)?,
                format!("{source}→q{}g{}", spec.bits, spec.group_size),
            ),
            _ => (tensor, source),
        };
        let m = Linear::from_decoded(&tensor, self.opts.reference)?;
        count_tensor(&mut self.types, source, m.kind(), m.bytes());
        Ok(m)
    }

    /// A vector of `len` values, kept as f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (tensor, source) = self.decode(name, 1, len)?;
        count_tensor(&mut self.types, source, "f32".into(), 4 * len);
        Ok(tensor.dequantize())
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
    let config: ModelConfig = file.config()?;
    if !matches!(
        config.architecture,
        Architecture::Llama | Architecture::Qwen2
    ) {
        return Err(Error::InvalidOption(format!(
            "{}: architecture {:?} is not supported by the llama forward pass",
            path.display(),
            config.architecture
        )));
    }
    super::check_config(&config)?;
    // The tokenizer needs only metadata: build it while the weights are repacked.
    let (parts, text) = std::thread::scope(|scope| {
        let text = scope.spawn(|| -> Result<(Tokenizer, ChatTemplate)> {
            let tokenizer = Tokenizer::from_gguf(&file)?;
            let chat_template = ChatTemplate::from_gguf(&file, &tokenizer)?;
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

/// Every weight tensor of a llama-family GGUF, repacked for the kernels (no tokenizer yet).
fn load_weights(file: &GgufFile, config: ModelConfig, opts: &LoadOptions) -> Result<ModelParts> {
    let c = &config;
    let (h, q_dim, kv_dim, f) = (
        c.hidden_size,
        c.heads * c.head_dim,
        c.kv_heads * c.head_dim,
        c.ffn_size,
    );
    let mut t = TensorLoader {
        file,
        opts,
        types: Vec::new(),
    };

    let embedding = t.linear("token_embd.weight", c.vocab_size, h, false)?;
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let name = |s: &str| format!("blk.{i}.{s}");
        layers.push(LayerWeights {
            attn_norm: t.vector(&name("attn_norm.weight"), h)?,
            wq: t.linear(&name("attn_q.weight"), q_dim, h, true)?,
            wk: t.linear(&name("attn_k.weight"), kv_dim, h, true)?,
            wv: t.linear(&name("attn_v.weight"), kv_dim, h, true)?,
            bq: t.optional_vector(&name("attn_q.bias"), q_dim)?,
            bk: t.optional_vector(&name("attn_k.bias"), kv_dim)?,
            bv: t.optional_vector(&name("attn_v.bias"), kv_dim)?,
            wo: t.linear(&name("attn_output.weight"), h, q_dim, true)?,
            ffn_norm: t.vector(&name("ffn_norm.weight"), h)?,
            w_gate: t.linear(&name("ffn_gate.weight"), f, h, true)?,
            w_up: t.linear(&name("ffn_up.weight"), f, h, true)?,
            w_down: t.linear(&name("ffn_down.weight"), h, f, true)?,
        });
    }
    let output_norm = t.vector("output_norm.weight", h)?;
    // SmolLM2 and other tied models have no `output` tensor: the embedding is the LM head.
    let output = match file.tensor_info("output.weight") {
        Some(_) => Some(t.linear("output.weight", c.vocab_size, h, false)?),
        None => None,
    };
    let tensor_types = t.types;

    Ok(ModelParts {
        config,
        embedding,
        layers,
        output_norm,
        output,
        tensor_types,
        tokenizer: None,
        chat_template: None,
    })
}
