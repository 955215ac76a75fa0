//! Safetensors files and Hugging Face model folders: `model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`, each memory-mapped (never read whole) and looked up by name.
//!
//! Tensors are borrowed from the maps ([`TensorRef`]); [`TensorRef::to_f32`] widens F32/F16/BF16,
//! and the packed low-bit formats decode exactly to [`crate::weights::DecodedTensor`]:
//! - [`gptq`]: AutoGPTQ `qweight`/`qzeros`/`scales`/`g_idx` (2, 3, 4 bits, v1 and v2 zeros);
//! - [`bitnet`]: BitNet b1.58 `weight` (2-bit codes in four row blocks) + `weight_scale`.

pub mod bitnet;
pub mod gptq;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::Metadata;
pub use ::safetensors::Dtype;
use half::{bf16, f16};
use lutra_kernels::MappedFile;

use crate::error::{Error, Result};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: MappedFile,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let map = MappedFile::map(&file).map_err(io)?;
        // `read_metadata` checks every tensor's offsets against its dtype, shape and the file size.
        let (header, metadata) =
            ::safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::BadFile {
                path: path.to_path_buf(),
                reason: format!("not a valid safetensors file: {e:?}"),
            })?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header,
            metadata,
        })
    }
}

/// A tensor borrowed from a mapped safetensors file.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    /// The file holding it.
    pub path: &'a Path,
    /// Its name.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, slowest-varying first (PyTorch order: a linear weight is `[out, in]`).
    pub shape: &'a [usize],
    /// Raw little-endian bytes.
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn unsupported(&self) -> Error {
        Error::UnsupportedTensorType {
            path: self.path.to_path_buf(),
            tensor: self.name.to_string(),
            ty: format!("{:?}", self.dtype),
        }
    }

    /// The values widened to f32 (F32, F16, BF16 only).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = self.data;
        Ok(match self.dtype {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => return Err(self.unsupported()),
        })
    }

    /// The values as i32 (I32 only).
    pub fn to_i32(&self) -> Result<Vec<i32>> {
        match self.dtype {
            Dtype::I32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            _ => Err(self.unsupported()),
        }
    }

    /// The bytes (U8 or I8 only).
    pub fn to_u8(&self) -> Result<&[u8]> {
        match self.dtype {
            Dtype::U8 | Dtype::I8 => Ok(self.data),
            _ => Err(self.unsupported()),
        }
    }

    /// Checks that the shape is `expected`, else [`Error::ShapeMismatch`].
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            path: self.path.to_path_buf(),
            tensor: self.name.to_string(),
            found: self.shape.to_vec(),
            expected: expected.to_vec(),
        })
    }

    /// A [`Error::BadFile`] about this tensor.
    pub fn error(&self, reason: &str) -> Error {
        Error::BadFile {
            path: self.path.to_path_buf(),
            reason: format!("tensor '{}': {reason}", self.name),
        }
    }
}

/// The safetensors checkpoint of a Hugging Face folder (one file or a sharded set), mapped.
pub struct SafetensorsFolder {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFolder")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl SafetensorsFolder {
    /// Maps `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<SafetensorsFolder> {
        let index_path = dir.join(INDEX_FILE);
        if !index_path.exists() {
            return Self::from_files(dir, &[dir.join(SINGLE_FILE)], None);
        }
        let text = std::fs::read_to_string(&index_path).map_err(|source| Error::Io {
            path: index_path.clone(),
            source,
        })?;
        let bad = |reason: String| Error::BadFile {
            path: index_path.clone(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no 'weight_map' object".into()))?;
        let mut files: Vec<String> = Vec::new();
        let mut listed: Vec<(String, String)> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map['{name}'] is not a file name")))?;
            // Shards live beside the index; a path that leaves the folder is refused.
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(bad(format!("shard name '{file}' is not a plain file name")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            listed.push((name.clone(), file.to_string()));
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        Self::from_files(dir, &paths, Some((&index_path, &listed)))
    }

    /// Maps `paths`; with an index, checks that each listed tensor is in its listed shard.
    fn from_files(
        dir: &Path,
        paths: &[PathBuf],
        listed: Option<(&Path, &[(String, String)])>,
    ) -> Result<SafetensorsFolder> {
        let mut shards = Vec::with_capacity(paths.len());
        for path in paths {
            if !path.exists() {
                let reason = match listed {
                    Some((index, _)) => format!(
                        "shard listed in {} is missing",
                        index.file_name().map_or("".into(), |n| n.to_string_lossy())
                    ),
                    None => format!("no {SINGLE_FILE} or {INDEX_FILE} in the folder"),
                };
                return Err(Error::BadFile {
                    path: path.clone(),
                    reason,
                });
            }
            shards.push(Shard::open(path)?);
        }
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.metadata.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(Error::BadFile {
                        path: shard.path.clone(),
                        reason: format!(
                            "tensor '{name}' is also in {}",
                            shards[prev].path.display()
                        ),
                    });
                }
            }
        }
        if let Some((index_path, listed)) = listed {
            for (name, file) in listed {
                let found = index.get(name).map(|&i| &shards[i].path);
                if found.is_none_or(|p| p.file_name() != Some(std::ffi::OsStr::new(file))) {
                    return Err(Error::BadFile {
                        path: dir.join(file),
                        reason: format!(
                            "tensor '{name}' is listed in {} but not stored in this shard",
                            index_path.display()
                        ),
                    });
                }
            }
        }
        Ok(SafetensorsFolder {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The tensor called `name`, or [`Error::MissingTensor`] naming the folder.
    pub fn tensor<'a>(&'a self, name: &'a str) -> Result<TensorRef<'a>> {
        let missing = || Error::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
        };
        let shard = &self.shards[*self.index.get(name).ok_or_else(missing)?];
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        let (start, end) = info.data_offsets;
        // `read_metadata` validated the offsets against the file length.
        let data = shard
            .map
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| Error::BadFile {
                path: shard.path.clone(),
                reason: format!("tensor '{name}' lies outside the file"),
            })?;
        Ok(TensorRef {
            path: &shard.path,
            name,
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }
}
