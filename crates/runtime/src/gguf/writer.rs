//! Writing GGUF files, streaming: tensors in ggml types (copied or encoded elsewhere) and lutra's
//! packed types ([`super::lutra`]).
//!
//! Tensor data goes to a temporary file beside the output as it is put, so a 7B model is never
//! held in memory; [`GgufWriter::finish`] writes the header (metadata, then tensor infos with
//! their offsets) into a second temporary file, copies the data after it (the kernel's
//! `copy_file_range` where there is one) and renames it into place. Until then the output path is
//! untouched: an error, or dropping the writer, removes the temporary files and leaves no partial
//! output. The copy needs disk room for the data twice, briefly.
//!
//! The layout is llama.cpp's: GGUF v3, tensor data aligned to `general.alignment` (32 when the
//! key is absent), each tensor (the last included) padded with zeros to the alignment. Tensors
//! are stored in the order of the source file given to [`GgufWriter::copy_metadata_from`] (then
//! the others in the order they were put), so a quantized file lists its tensors as its source
//! did whatever order they were quantized in.
//!
//! ```no_run
//! # fn main() -> lutra_runtime::Result<()> {
//! use lutra_runtime::gguf::{writer::GgufWriter, GgufFile, MetaValue};
//! let src = GgufFile::open("model.gguf".as_ref())?;
//! let mut out = GgufWriter::create("copy.gguf".as_ref())?;
//! out.copy_metadata_from(&src);
//! out.set_metadata("general.name", MetaValue::String("a copy".into()));
//! for t in src.tensors() {
//!     out.put_raw(&t.name, t.ty.id(), &t.dims, src.tensor_data(&t.name)?)?;
//! }
//! out.finish()?;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use lutra_kernels::PackedMatrix;

pub use super::lutra::TensorQuantInfo;
use super::lutra::{is_lutra_id, LutraType, FILE_VERSION, FILE_VERSION_KEY};
use super::{GgufFile, MetaValue, TensorType, DEFAULT_ALIGNMENT, MAX_DIMS};
use crate::weights::GgmlType;
use crate::{Error, Result};

/// The GGUF version written.
const VERSION: u32 = 3;

/// A GGUF file being written; see the module docs.
pub struct GgufWriter {
    out: PathBuf,
    /// Tensor data, in the order put.
    data_path: PathBuf,
    data: Option<BufWriter<File>>,
    data_len: u64,
    /// The whole file before it is renamed to `out`.
    part_path: PathBuf,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
    /// Tensor positions in the source file, when one was given.
    source_order: HashMap<String, usize>,
    /// The file was renamed into place: nothing to clean up.
    finished: bool,
}

/// A tensor whose data is in the temporary data file.
struct PendingTensor {
    name: String,
    dims: Vec<usize>,
    ty_id: u32,
    /// Where its bytes start in the data file.
    start: u64,
    size: u64,
}

/// One tensor info of a GGUF header.
pub(crate) struct TensorEntry<'a> {
    pub name: &'a str,
    pub dims: &'a [usize],
    pub ty_id: u32,
    /// Offset of the data from the start of the data section (a multiple of the alignment).
    pub offset: u64,
}

impl GgufWriter {
    /// Starts a file to be written at `out` (created or replaced by [`GgufWriter::finish`]).
    pub fn create(out: &Path) -> Result<GgufWriter> {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::InvalidOption(format!("{}: not a file path", out.display())))?;
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Unique per writer: the process id and the time, created only if new.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let temp = |what: &str| dir.join(format!(".{name}.{what}-{}-{stamp}", std::process::id()));
        let data_path = temp("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&data_path)
            .map_err(|source| Error::Io {
                path: data_path.clone(),
                source,
            })?;
        Ok(GgufWriter {
            out: out.to_path_buf(),
            data_path,
            data: Some(BufWriter::with_capacity(1 << 20, data)),
            data_len: 0,
            part_path: temp("part"),
            metadata: Vec::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            source_order: HashMap::new(),
            finished: false,
        })
    }

    /// Copies every metadata key of `src` (architecture, tokenizer, chat template, ...), in its
    /// order, and takes its tensor order for the output. lutra's own keys (`lutra.file_version`,
    /// `lutra.tensor.*`) are not copied: this writer sets them for what it writes.
    pub fn copy_metadata_from(&mut self, src: &GgufFile) {
        for (key, value) in src.metadata_entries() {
            if key != FILE_VERSION_KEY && !key.starts_with("lutra.tensor.") {
                self.set_metadata(key, value.clone());
            }
        }
        self.source_order = src
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
    }

    /// Sets metadata `key` to `value`, replacing an earlier value (in its place).
    pub fn set_metadata(&mut self, key: &str, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Adds tensor `name` of type id `ty_id` (a ggml type, or a lutra type) with GGUF dims `dims`
    /// (`dims[0]` fastest) and its encoded `bytes`, checked against the type and dims.
    pub fn put_raw(&mut self, name: &str, ty_id: u32, dims: &[usize], bytes: &[u8]) -> Result<()> {
        let ty = match (GgmlType::from_id(ty_id), LutraType::from_id(ty_id)) {
            (Some(t), _) => TensorType::Ggml(t),
            (None, Some(t)) => TensorType::Lutra(t),
            (None, None) => {
                let kind = if is_lutra_id(ty_id) { "lutra" } else { "ggml" };
                return Err(self.error(name, format!("unknown {kind} type id {ty_id:#x}")));
            }
        };
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(self.error(name, format!("{} dimensions (1..=4 allowed)", dims.len())));
        }
        let size = ty.data_bytes(dims).map_err(|r| self.error(name, r))?;
        if size != bytes.len() {
            return Err(self.error(
                name,
                format!(
                    "{} bytes given, but {} with dimensions {dims:?} takes {size}",
                    bytes.len(),
                    ty.name()
                ),
            ));
        }
        self.append(name, dims, ty_id, &[bytes])
    }

    /// Adds `matrix` as tensor `name` in its lutra packed type, exactly as the kernels hold it,
    /// and records `info` (`lutra.tensor.<name>.*`). Matrices with two-level (super-block) scales
    /// have no lutra type and are refused, as is an `info` that contradicts the matrix.
    pub fn put_packed(
        &mut self,
        name: &str,
        matrix: &PackedMatrix,
        info: &TensorQuantInfo,
    ) -> Result<()> {
        let parts = matrix
            .raw_parts()
            .map_err(|e| self.error(name, e.to_string()))?;
        let spec = *matrix.spec();
        let ty = LutraType::of(&spec, parts.offsets.is_some());
        let ty_id = ty.id().ok_or_else(|| {
            self.error(
                name,
                format!("{spec:?} has no lutra type (groups of 32, 64, 128, 256, per row or per tensor; 1 to 6 bits)"),
            )
        })?;
        if let Some(reason) = info.mismatch(&ty, spec.cols) {
            return Err(self.error(name, reason));
        }
        let scales = le_bytes(parts.scales);
        let offsets = parts.offsets.map(le_bytes).unwrap_or_default();
        self.append(
            name,
            &[spec.cols, spec.rows],
            ty_id,
            &[parts.weights, &scales, &offsets],
        )?;
        for (key, value) in info.to_metadata(name) {
            self.set_metadata(&key, value);
        }
        Ok(())
    }

    /// Writes the header and the data to `out`, replacing any file there in one rename.
    pub fn finish(mut self) -> Result<()> {
        self.write_out()?;
        self.finished = true;
        Ok(())
    }

    fn write_out(&mut self) -> Result<()> {
        let data_path = self.data_path.clone();
        let data_io = |source| Error::Io {
            path: data_path.clone(),
            source,
        };
        let Some(data) = self.data.take() else {
            return Err(data_io(closed()));
        };
        let mut data = data.into_inner().map_err(|e| data_io(e.into_error()))?;
        let has_lutra = self.tensors.iter().any(|t| is_lutra_id(t.ty_id));
        if has_lutra {
            self.set_metadata(FILE_VERSION_KEY, MetaValue::U32(FILE_VERSION));
        }
        let alignment = alignment_of(&self.metadata).ok_or_else(|| {
            Error::InvalidOption(format!(
                "{}: general.alignment must be a power of two up to 2^20",
                self.out.display()
            ))
        })?;
        let mut order: Vec<usize> = (0..self.tensors.len()).collect();
        order.sort_by_key(|&i| {
            let position = self.source_order.get(&self.tensors[i].name);
            (position.copied().unwrap_or(usize::MAX), i)
        });
        let sizes: Vec<u64> = order.iter().map(|&i| self.tensors[i].size).collect();
        let offsets = data_offsets(&sizes, alignment);
        let entries: Vec<TensorEntry<'_>> = order
            .iter()
            .zip(&offsets)
            .map(|(&i, &offset)| TensorEntry {
                name: &self.tensors[i].name,
                dims: &self.tensors[i].dims,
                ty_id: self.tensors[i].ty_id,
                offset,
            })
            .collect();
        let mut header = encode_header(&self.metadata, &entries);
        header.resize(align(header.len() as u64, alignment) as usize, 0);

        let part_path = self.part_path.clone();
        let part_io = |source| Error::Io {
            path: part_path.clone(),
            source,
        };
        let mut part = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.part_path)
            .map_err(part_io)?;
        part.write_all(&header).map_err(part_io)?;
        let zeros = vec![0u8; alignment as usize];
        for &i in &order {
            let t = &self.tensors[i];
            data.seek(SeekFrom::Start(t.start)).map_err(data_io)?;
            let copied =
                std::io::copy(&mut (&mut data).take(t.size), &mut part).map_err(part_io)?;
            if copied != t.size {
                return Err(data_io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "tensor '{}': {copied} of {} bytes read back",
                        t.name, t.size
                    ),
                )));
            }
            let pad = align(t.size, alignment) - t.size;
            part.write_all(&zeros[..pad as usize]).map_err(part_io)?;
        }
        part.sync_all().map_err(part_io)?;
        drop(part);
        std::fs::rename(&self.part_path, &self.out).map_err(|source| Error::Io {
            path: self.out.clone(),
            source,
        })?;
        drop(data);
        // The output is complete; a data file left behind would only waste space.
        let _ = std::fs::remove_file(&self.data_path);
        Ok(())
    }

    /// Appends the concatenation of `chunks` as tensor `name`'s data.
    fn append(&mut self, name: &str, dims: &[usize], ty_id: u32, chunks: &[&[u8]]) -> Result<()> {
        if self.names.contains(name) {
            return Err(self.error(name, "put twice".into()));
        }
        let data_path = &self.data_path;
        let Some(data) = self.data.as_mut() else {
            return Err(Error::Io {
                path: data_path.clone(),
                source: closed(),
            });
        };
        let mut size = 0u64;
        for chunk in chunks {
            data.write_all(chunk).map_err(|source| Error::Io {
                path: data_path.clone(),
                source,
            })?;
            size += chunk.len() as u64;
        }
        self.names.insert(name.to_string());
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty_id,
            start: self.data_len,
            size,
        });
        self.data_len += size;
        Ok(())
    }

    fn error(&self, tensor: &str, reason: String) -> Error {
        Error::InvalidOption(format!(
            "{}: tensor '{tensor}': {reason}",
            self.out.display()
        ))
    }
}

impl Drop for GgufWriter {
    /// Removes the temporary files of a writer that did not finish.
    fn drop(&mut self) {
        drop(self.data.take());
        let _ = std::fs::remove_file(&self.data_path);
        if !self.finished {
            let _ = std::fs::remove_file(&self.part_path);
        }
    }
}

/// The error of a data file already closed (a writer is finished once: not reachable).
fn closed() -> std::io::Error {
    std::io::Error::other("the data file was closed by an earlier finish")
}

/// f16 bits as little-endian bytes.
fn le_bytes(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `n` rounded up to a multiple of `alignment`.
pub(crate) fn align(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

/// The data alignment that `metadata` sets (`general.alignment`, a power of two up to 2^20), or
/// the default; `None` for an invalid value.
pub(crate) fn alignment_of(metadata: &[(String, MetaValue)]) -> Option<u64> {
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => Some(DEFAULT_ALIGNMENT as u64),
        Some((_, v)) => v.as_u64().filter(|a| a.is_power_of_two() && *a <= 1 << 20),
    }
}

/// The offset of each tensor of `sizes` bytes in a data section where each starts aligned.
pub(crate) fn data_offsets(sizes: &[u64], alignment: u64) -> Vec<u64> {
    let mut offset = 0;
    sizes
        .iter()
        .map(|&size| {
            let here = offset;
            offset = align(offset + size, alignment);
            here
        })
        .collect()
}

/// The GGUF v3 header: magic, version, counts, metadata entries and tensor infos (not padded to
/// the data alignment).
pub(crate) fn encode_header(
    metadata: &[(String, MetaValue)],
    tensors: &[TensorEntry<'_>],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(VERSION.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend(value.type_id().to_le_bytes());
        put_value(&mut out, value);
    }
    for t in tensors {
        put_string(&mut out, t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for &d in t.dims {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ty_id.to_le_bytes());
        out.extend(t.offset.to_le_bytes());
    }
    out
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.push(*v as u8),
        MetaValue::U16(v) => out.extend(v.to_le_bytes()),
        MetaValue::I16(v) => out.extend(v.to_le_bytes()),
        MetaValue::U32(v) => out.extend(v.to_le_bytes()),
        MetaValue::I32(v) => out.extend(v.to_le_bytes()),
        MetaValue::F32(v) => out.extend(v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as an array of u8.
            let ty = items.first().map_or(0, MetaValue::type_id);
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        MetaValue::U64(v) => out.extend(v.to_le_bytes()),
        MetaValue::I64(v) => out.extend(v.to_le_bytes()),
        MetaValue::F64(v) => out.extend(v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests;
