//! GGUF (llama.cpp's model file): header, typed metadata, tensor infos and tensor data, read
//! straight from a memory map.
//!
//! Every read is bounds-checked: a truncated or corrupt file is an [`Error::BadFile`] that names
//! the file and says what is wrong, never a panic. Tensor data is decoded through the one type
//! table in [`crate::weights`]; lutra's own packed tensor types ([`lutra`]) are read in place.
//! [`writer`] writes GGUF files.
//!
//! ```no_run
//! # fn main() -> lutra_runtime::Result<()> {
//! use lutra_runtime::gguf::GgufFile;
//! let file = GgufFile::open("model.gguf".as_ref())?;
//! let layers = file.require_usize("llama.block_count")?;
//! let embeddings = file.decode_tensor("token_embd.weight")?;
//! println!("{layers} blocks, vocabulary of {}", embeddings.rows());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lutra_kernels::{MappedFile, PackedMatrix};

use crate::weights::{decode_ggml, decode_ggml_rows, DecodeError, DecodedTensor, GgmlType};
use crate::{Error, Result};

pub mod lutra;
pub mod writer;

use lutra::{is_lutra_id, LutraType, TensorQuantInfo, FILE_VERSION, FILE_VERSION_KEY};

/// The four bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most this many dimensions.
const MAX_DIMS: usize = 4;

/// A typed metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `float32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// `string` (UTF-8; invalid sequences are replaced with U+FFFD)
    String(String),
    /// `array` of values of one type
    Array(Vec<MetaValue>),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float64`
    F64(f64),
}

impl MetaValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Any integer value as i64 (u64 values above `i64::MAX` give `None`).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            _ => return None,
        })
    }

    /// Any non-negative integer value as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The type of a tensor's data: a ggml type, or one of lutra's packed types ([`lutra`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorType {
    /// A type of `ggml.h`.
    Ggml(GgmlType),
    /// A low-bit matrix in the kernels' tile layout.
    Lutra(LutraType),
}

impl TensorType {
    /// The type id in the file. (Every lutra type read from or written to a file has one.)
    pub fn id(&self) -> u32 {
        match self {
            TensorType::Ggml(t) => t.id(),
            TensorType::Lutra(t) => t.id().unwrap_or(lutra::LUTRA_TYPE_BASE),
        }
    }

    /// The type's name: ggml's spelling (`Q4_1`), or a lutra type's (`LUT2_G32_PP_OFF`).
    pub fn name(&self) -> String {
        match self {
            TensorType::Ggml(t) => t.name(),
            TensorType::Lutra(t) => t.name(),
        }
    }

    /// The ggml type, for a ggml-typed tensor.
    pub fn ggml(&self) -> Option<GgmlType> {
        match self {
            TensorType::Ggml(t) => Some(*t),
            TensorType::Lutra(_) => None,
        }
    }

    /// The bytes of data of a tensor of this type with GGUF dims `dims`, or why it cannot exist.
    pub fn data_bytes(&self, dims: &[usize]) -> std::result::Result<usize, String> {
        match self {
            TensorType::Ggml(ty) => {
                let elems = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
                if dims.first().is_some_and(|&d| d % ty.block_elems() != 0) {
                    return Err(format!(
                        "row length {} is not a multiple of the {} block size {}",
                        dims[0],
                        ty.name(),
                        ty.block_elems()
                    ));
                }
                elems.and_then(|n| ty.tensor_bytes(n)).ok_or_else(|| {
                    format!(
                        "dimensions {dims:?} are not a whole number of {} blocks",
                        ty.name()
                    )
                })
            }
            TensorType::Lutra(ty) => ty.layout(dims).map(|l| l.total_bytes()),
        }
    }
}

impl PartialEq<GgmlType> for TensorType {
    fn eq(&self, other: &GgmlType) -> bool {
        *self == TensorType::Ggml(*other)
    }
}

/// Where a tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` = ne0 is the fastest-varying (K for a matrix).
    pub dims: Vec<usize>,
    /// Element type.
    pub ty: TensorType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Bytes of data.
    pub size: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Row length (ne0).
    pub fn cols(&self) -> usize {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of all dimensions but the first.
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<MappedFile>,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: usize,
    data_offset: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses `path`. Tensor data stays in the mmap until decoded.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 24 {
            return Err(bad(
                path,
                format!("the file has {len} bytes, too few for a GGUF header"),
            ));
        }
        let mmap = MappedFile::map(&file).map_err(io)?;
        Self::parse(path, Arc::new(mmap))
    }

    fn parse(path: &Path, mmap: Arc<MappedFile>) -> Result<GgufFile> {
        let mut r = Reader {
            data: &mmap,
            pos: 0,
            path,
        };
        let magic = r.bytes(4, "magic")?;
        if magic != MAGIC {
            return Err(bad(
                path,
                format!("not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""),
            ));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(bad(
                path,
                format!("GGUF version {version} is not supported (only 2 and 3)"),
            ));
        }
        let n_tensors = r.count("tensor count")?;
        let n_kv = r.count("metadata count")?;

        // A metadata entry takes at least 13 bytes (key length, type, one byte of value), a
        // tensor info at least 28 (name length, one dimension, type, offset).
        for (count, min_bytes, what) in [(n_kv, 13, "metadata"), (n_tensors, 28, "tensor")] {
            if count
                .checked_mul(min_bytes)
                .is_none_or(|b| b > r.remaining())
            {
                return Err(bad(
                    path,
                    format!(
                        "{what} count {count} cannot fit in the {} bytes left in the file",
                        r.remaining()
                    ),
                ));
            }
        }
        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOCATED_VALUES));
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("key of metadata entry {i}"))?;
            let ty = r.u32(&format!("type of metadata '{key}'"))?;
            let value = r.value(ty, &key, 0)?;
            meta_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(bad(
                        path,
                        format!("general.alignment {v:?} is not a power of two"),
                    ))
                }
            },
        };

        let mut infos = Vec::with_capacity(n_tensors.min(PREALLOCATED_VALUES));
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("dimension count of tensor '{name}'"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(
                    path,
                    format!("tensor '{name}' has {n_dims} dimensions (1..=4 allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for d in 0..n_dims {
                dims.push(r.count(&format!("dimension {d} of tensor '{name}'"))?);
            }
            let ty_id = r.u32(&format!("type of tensor '{name}'"))?;
            let rel = r.count(&format!("offset of tensor '{name}'"))?;
            let ty = match (GgmlType::from_id(ty_id), LutraType::from_id(ty_id)) {
                (Some(t), _) => TensorType::Ggml(t),
                (None, Some(t)) => TensorType::Lutra(t),
                (None, None) => {
                    return Err(Error::UnsupportedTensorType {
                        path: path.to_path_buf(),
                        tensor: name,
                        ty: match is_lutra_id(ty_id) {
                            true => format!(
                                "lutra type id {ty_id:#x}, which this lutra (file version \
                                 {FILE_VERSION}) does not define"
                            ),
                            false => format!("ggml type id {ty_id}"),
                        },
                    })
                }
            };
            infos.push((name, dims, ty, rel));
        }
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        let file_len = mmap.len();
        let first_lutra = infos
            .iter()
            .find(|i| matches!(i.2, TensorType::Lutra(_)))
            .map(|i| i.0.as_str());
        check_lutra_version(path, &metadata, &meta_index, first_lutra)?;

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(infos.len());
        let mut tensor_index = HashMap::new();
        for (name, dims, ty, rel) in infos {
            let size = ty
                .data_bytes(&dims)
                .map_err(|reason| bad(path, format!("tensor '{name}': {reason}")))?;
            if rel % alignment != 0 {
                return Err(bad(
                    path,
                    format!("tensor '{name}' data offset {rel} is not aligned to {alignment}"),
                ));
            }
            let start = data_offset.checked_add(rel);
            let end = start.and_then(|s| s.checked_add(size));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(bad(path, format!("tensor '{name}' offset {rel} overflows")));
            };
            if end > file_len {
                return Err(bad(
                    path,
                    format!(
                        "tensor '{name}' data ends at byte {end} but the file has {file_len} bytes"
                    ),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad(path, format!("tensor '{name}' appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset: start,
                size,
            });
        }

        // Each tensor owns its bytes: data shared between tensors would let a small file
        // describe (and make the loader decode) far more weights than it holds.
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.size > 0).collect();
        by_offset.sort_by_key(|t| t.offset);
        for pair in by_offset.windows(2) {
            if pair[1].offset < pair[0].offset + pair[0].size {
                return Err(bad(
                    path,
                    format!(
                        "the data of tensors '{}' and '{}' overlap",
                        pair[0].name, pair[1].name
                    ),
                ));
            }
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data in bytes.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Byte offset where tensor data starts.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The value of metadata key `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All metadata entries, in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// A required metadata value; absent is an [`Error::Metadata`].
    pub fn require(&self, key: &str) -> Result<&MetaValue> {
        self.metadata(key)
            .ok_or_else(|| self.meta_error(key, "missing"))
    }

    /// A required non-negative integer, as usize.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        let v = self.require(key)?;
        v.as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                self.meta_error(
                    key,
                    &format!("expected a non-negative integer, found {v:?}"),
                )
            })
    }

    /// A required number, as f32.
    pub fn require_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| self.meta_error(key, &format!("expected a number, found {v:?}")))
    }

    /// A required string.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.meta_error(key, &format!("expected a string, found {v:?}")))
    }

    /// An [`Error::Metadata`] for `key` in this file.
    pub fn meta_error(&self, key: &str, reason: &str) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Tensor names, in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of tensor `name`, borrowed from the mmap.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        // Bounds were checked when the file was opened.
        Ok(&self.mmap[info.offset..info.offset + info.size])
    }

    /// Drops the file pages of tensor `name` from the process's resident memory, once its
    /// values have been copied into their kernel form: the mapping stops counting them, and a
    /// later read brings them back from the file unchanged. Only pages wholly inside the tensor
    /// are released. Advisory: an unknown name or a refusal by the OS releases nothing. Returns
    /// the bytes released.
    pub fn release_tensor(&self, name: &str) -> usize {
        match self.tensor_info(name) {
            Some(info) => self.release_rows(name, 0..info.rows()),
            None => 0,
        }
    }

    /// Like [`GgufFile::release_tensor`] for rows `range` of tensor `name` only (see
    /// [`GgufFile::decode_rows`]).
    pub fn release_rows(&self, name: &str, range: Range<usize>) -> usize {
        let Some(info) = self.tensor_info(name) else {
            return 0;
        };
        // Rows of a lutra tensor are not contiguous (row tiles), and it is read in place.
        let row = match info.ty {
            TensorType::Ggml(ty) => ty.bytes_for(info.cols()).unwrap_or(0),
            TensorType::Lutra(_) => return 0,
        };
        let start = info.offset + range.start.saturating_mul(row).min(info.size);
        let end = info.offset + range.end.saturating_mul(row).min(info.size);
        self.mmap.release_pages(start..end).unwrap_or(0)
    }

    /// Decodes tensor `name` into codes + scales (+ offsets) or dense values, exactly. A lutra
    /// packed tensor (loaded in place by [`GgufFile::lutra_matrix`]) decodes to its dequantized
    /// values.
    pub fn decode_tensor(&self, name: &str) -> Result<DecodedTensor> {
        let data = self.tensor_data(name)?;
        let info = &self.tensors[self.tensor_index[name]];
        match info.ty {
            TensorType::Ggml(ty) => decode_ggml(ty, info.rows(), info.cols(), data)
                .map_err(|e| self.decode_error(name, e)),
            TensorType::Lutra(_) => self.dequantize_lutra(name, 0..info.rows()),
        }
    }

    /// The packed matrix of lutra tensor `name`, read in place from the mapping (no copy, no
    /// repack); the matrix keeps the mapping alive. Errors name the file and the tensor.
    pub fn lutra_matrix(&self, name: &str) -> Result<PackedMatrix> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let TensorType::Lutra(ty) = info.ty else {
            return Err(bad(
                &self.path,
                format!(
                    "tensor '{name}' has type {}, not a lutra packed type",
                    info.ty.name()
                ),
            ));
        };
        ty.map(&info.dims, &self.mmap, info.offset..info.offset + info.size)
            .map_err(|reason| bad(&self.path, format!("tensor '{name}': {reason}")))
    }

    /// How lutra tensor `name` was quantized, as the file records it (`None` when it records
    /// nothing); an error when the record is malformed or contradicts the tensor's type.
    pub fn lutra_quant_info(&self, name: &str) -> Result<Option<TensorQuantInfo>> {
        let info = TensorQuantInfo::from_metadata(name, |k| self.metadata(k))
            .map_err(|(key, reason)| self.meta_error(&key, &reason))?;
        if let (Some(q), Some(TensorType::Lutra(ty))) =
            (&info, self.tensor_info(name).map(|t| t.ty))
        {
            let cols = self.tensor_info(name).map_or(0, TensorInfo::cols);
            if let Some(reason) = q.mismatch(&ty, cols) {
                return Err(bad(&self.path, format!("tensor '{name}': {reason}")));
            }
        }
        Ok(info)
    }

    /// Rows `range` of lutra tensor `name`, dequantized.
    fn dequantize_lutra(&self, name: &str, range: Range<usize>) -> Result<DecodedTensor> {
        let m = self.lutra_matrix(name)?;
        let cols = m.cols();
        let mut values = vec![0.0f32; range.len() * cols];
        for (r, row) in range.clone().zip(values.chunks_exact_mut(cols.max(1))) {
            m.dequantize_row(r, row)
                .map_err(|e| bad(&self.path, format!("tensor '{name}': {e}")))?;
        }
        Ok(DecodedTensor::Dense {
            rows: range.len(),
            cols,
            values,
        })
    }

    /// Decodes rows `range` of tensor `name` (rows of `cols()` elements, stored one after the
    /// other), exactly as [`GgufFile::decode_tensor`] decodes them.
    pub fn decode_rows(&self, name: &str, range: Range<usize>) -> Result<DecodedTensor> {
        let data = self.tensor_data(name)?;
        let info = &self.tensors[self.tensor_index[name]];
        let (rows, cols) = (info.rows(), info.cols());
        let ty = match info.ty {
            TensorType::Ggml(ty) => ty,
            TensorType::Lutra(_) if range.start <= range.end && range.end <= rows => {
                return self.dequantize_lutra(name, range)
            }
            TensorType::Lutra(_) => GgmlType::F32,
        };
        let bytes = ty
            .bytes_for(cols)
            .filter(|_| range.start <= range.end && range.end <= rows)
            .and_then(|row| data.get(range.start * row..range.end * row));
        // The tensor's tail (I2_S's scale) holds for every row.
        let tail = data
            .len()
            .checked_sub(ty.tensor_tail())
            .and_then(|at| data.get(at..));
        let (Some(bytes), Some(tail)) = (bytes, tail) else {
            return Err(bad(
                &self.path,
                format!("tensor '{name}': no rows {range:?} of {rows} rows of {cols}"),
            ));
        };
        decode_ggml_rows(ty, range.len(), cols, bytes, tail).map_err(|e| self.decode_error(name, e))
    }

    fn decode_error(&self, name: &str, e: DecodeError) -> Error {
        match e {
            DecodeError::Unsupported(ty) => Error::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: name.to_string(),
                ty: ty.name(),
            },
            DecodeError::BadShape(reason) => bad(&self.path, format!("tensor '{name}': {reason}")),
        }
    }
}

/// Refuses a `lutra.file_version` other than [`FILE_VERSION`], and lutra tensor types (the first
/// is `first_lutra`) in a file without the key.
fn check_lutra_version(
    path: &Path,
    metadata: &[(String, MetaValue)],
    meta_index: &HashMap<String, usize>,
    first_lutra: Option<&str>,
) -> Result<()> {
    let version = meta_index.get(FILE_VERSION_KEY).map(|&i| &metadata[i].1);
    match (version, first_lutra) {
        (None, None) => Ok(()),
        (None, Some(tensor)) => Err(bad(
            path,
            format!(
                "tensor '{tensor}' has a lutra packed type but the file has no \
                 {FILE_VERSION_KEY} key"
            ),
        )),
        (Some(v), _) if v.as_u64() == Some(u64::from(FILE_VERSION)) => Ok(()),
        (Some(v), tensor) => Err(bad(
            path,
            format!(
                "{FILE_VERSION_KEY} is {v:?}{}: this lutra reads lutra files of version \
                 {FILE_VERSION} only (a newer lutra wrote this file?)",
                tensor.map_or(String::new(), |t| format!(" (first lutra tensor '{t}')"))
            ),
        )),
    }
}

fn bad(path: &Path, reason: String) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// Most array values, metadata entries or tensor infos reserved before any is read.
const PREALLOCATED_VALUES: usize = 4096;

/// The fewest bytes one metadata value of type `ty` takes in the file (a string is its 8-byte
/// length, an array its element type and length); 1 for an unknown type, which fails when read.
fn min_value_bytes(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// A bounds-checked cursor over the header.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad(
                self.path,
                format!(
                    "truncated: reading {what} needs {n} bytes at offset {} but the file has {} bytes",
                    self.pos,
                    self.data.len()
                ),
            ));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A u64 count or offset that must fit in memory.
    fn count(&mut self, what: &str) -> Result<usize> {
        let v = self.u64(what)?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v <= self.data.len().max(1 << 40))
            .ok_or_else(|| bad(self.path, format!("{what} is {v}, which cannot be right")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(&format!("length of {what}"))?;
        let bytes = self.bytes(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let what = format!("value of metadata '{key}'");
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(&what)?[0]),
            1 => MetaValue::I8(self.array::<1>(&what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(self.u32(&what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(bad(self.path, format!("{what}: bool byte is {b}"))),
            },
            8 => MetaValue::String(self.string(&what)?),
            9 => {
                if depth > 0 {
                    // llama.cpp writes no nested arrays; refusing them bounds the recursion.
                    return Err(bad(
                        self.path,
                        format!("{what}: nested arrays are not supported"),
                    ));
                }
                let elem_ty = self.u32(&format!("element type of {what}"))?;
                let n = self.count(&format!("length of {what}"))?;
                let min_bytes = min_value_bytes(elem_ty);
                if n.checked_mul(min_bytes)
                    .is_none_or(|b| b > self.remaining())
                {
                    return Err(bad(
                        self.path,
                        format!(
                            "{what}: an array of {n} values of type {elem_ty} needs at least \
                             {min_bytes} bytes each, but {} bytes remain in the file",
                            self.remaining()
                        ),
                    ));
                }
                // The count is bounded by the file; the vector still grows as values are read.
                let mut items = Vec::with_capacity(n.min(PREALLOCATED_VALUES));
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(&what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => {
                return Err(bad(
                    self.path,
                    format!("{what} has unknown value type {other}"),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests;
