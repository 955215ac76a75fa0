//! lutra's own tensor types in a GGUF file: low-bit matrices stored exactly in the kernels' tile
//! layout, so that loading maps them with no repacking.
//!
//! # Format (`lutra.file_version` 1)
//!
//! A lutra file is a GGUF v3 file; every key, the tokenizer and the chat template are stored as
//! llama.cpp stores them, and tensors lutra does not pack keep their ggml types. A packed matrix
//! `[rows][cols]` (GGUF dims `[cols, rows]`) has a tensor type id in `0x4C55_0000..=0x4C55_FFFF`
//! ("LU"; ggml's ids are below 64), which no ggml type uses:
//!
//! | bits of the id | meaning |
//! |---|---|
//! | 0..=3 | bits per code, 1..=6 |
//! | 4 | per-plane scales (`w = z + Σ_p s_p·q_p`) instead of one scale (`w = s·q + m`) |
//! | 5 | offsets present (`m` or `z` per group) |
//! | 6..=7 | 0 |
//! | 8..=15 | grouping: 0 per tensor, 1 per row, 2/3/4/5 groups of 32/64/128/256 along K |
//!
//! Its data is the three buffers of a `PackedMatrix` ([`lutra_kernels::PackedParts`]), one after
//! the other, little-endian: the bit-plane weights (`[tile][K/32][plane][256]` bytes), the f16
//! scales (`[tile][group][plane or 1][64 rows]`), then the f16 offsets (`[tile][group][64 rows]`)
//! when the type has them; rows are padded to a whole tile of 64 with zeros. Each buffer's length
//! is a multiple of 128 bytes, so with tensor data aligned to `general.alignment` (at least 32)
//! every f16 lies on an even byte.
//!
//! The file carries `lutra.file_version` (u32, [`FILE_VERSION`]); a file with another version, or
//! lutra types without the key, is refused. How each matrix was made is recorded under
//! `lutra.tensor.<name>.method` (string: `rtn`, `gptq`, `hlq`, `gptq+hlq`), `.bits` (u32),
//! `.group_size` (u32; the row length for per-row scales) and `.calibration` (string).

use std::ops::Range;
use std::sync::Arc;

use lutra_kernels::{
    Grouping, MappedFile, PackedLayout, PackedMatrix, PlaneScales, QuantSpec, Storage,
};

use super::MetaValue;

/// The high half of every lutra tensor type id ("LU").
pub const LUTRA_TYPE_BASE: u32 = 0x4C55_0000;
/// The version of the lutra file format written and read by this lutra.
pub const FILE_VERSION: u32 = 1;
/// The metadata key holding the format version.
pub const FILE_VERSION_KEY: &str = "lutra.file_version";

/// A lutra tensor type: how a packed matrix's buffers are laid out (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LutraType {
    /// Bits per code, 1..=6.
    pub bits: u8,
    /// Elements per scale group.
    pub grouping: Grouping,
    /// One scale per group, or one per bit plane per group.
    pub plane_scales: PlaneScales,
    /// Whether an offset per group is stored.
    pub offsets: bool,
}

/// Whether `id` lies in the range of lutra tensor type ids (known or not).
pub fn is_lutra_id(id: u32) -> bool {
    id & 0xFFFF_0000 == LUTRA_TYPE_BASE
}

impl LutraType {
    /// The type of a packed matrix with this spec.
    pub fn of(spec: &QuantSpec, offsets: bool) -> LutraType {
        LutraType {
            bits: spec.bits,
            grouping: spec.grouping,
            plane_scales: spec.plane_scales,
            offsets,
        }
    }

    /// The type with id `id`, or `None` when the id is not one this version defines.
    pub fn from_id(id: u32) -> Option<LutraType> {
        if !is_lutra_id(id) {
            return None;
        }
        let low = id & 0xFFFF;
        let bits = (low & 0xF) as u8;
        let grouping = match low >> 8 {
            0 => Grouping::PerTensor,
            1 => Grouping::PerRow,
            g @ 2..=5 => Grouping::Size(8 << g),
            _ => return None,
        };
        if !(1..=6).contains(&bits) || low & 0xC0 != 0 {
            return None;
        }
        let plane_scales = match low & 0x10 {
            0 => PlaneScales::Uniform,
            _ => PlaneScales::PerPlane,
        };
        Some(LutraType {
            bits,
            grouping,
            plane_scales,
            offsets: low & 0x20 != 0,
        })
    }

    /// The type id, or `None` for a type the format cannot store (bits outside 1..=6, a group
    /// size other than 32, 64, 128 or 256).
    pub fn id(&self) -> Option<u32> {
        let grouping = match self.grouping {
            Grouping::PerTensor => 0,
            Grouping::PerRow => 1,
            Grouping::Size(32) => 2,
            Grouping::Size(64) => 3,
            Grouping::Size(128) => 4,
            Grouping::Size(256) => 5,
            Grouping::Size(_) => return None,
        };
        if !(1..=6).contains(&self.bits) {
            return None;
        }
        let per_plane = u32::from(self.plane_scales == PlaneScales::PerPlane);
        Some(
            LUTRA_TYPE_BASE
                | grouping << 8
                | u32::from(self.offsets) << 5
                | per_plane << 4
                | u32::from(self.bits),
        )
    }

    /// The type's name, e.g. `LUT2_G32_PP_OFF` (per-plane scales, offsets) or `LUT4_ROW`.
    pub fn name(&self) -> String {
        let group = match self.grouping {
            Grouping::Size(g) => format!("G{g}"),
            Grouping::PerRow => "ROW".into(),
            Grouping::PerTensor => "TENSOR".into(),
        };
        let pp = match self.plane_scales {
            PlaneScales::PerPlane => "_PP",
            PlaneScales::Uniform => "",
        };
        let off = if self.offsets { "_OFF" } else { "" };
        format!("LUT{}_{group}{pp}{off}", self.bits)
    }

    /// The matrix spec of a tensor of this type with GGUF dims `dims` (`[cols, rows]`), or why
    /// there is none.
    pub fn spec(&self, dims: &[usize]) -> Result<QuantSpec, String> {
        let &[cols, rows] = dims else {
            return Err(format!(
                "a {} tensor has 2 dimensions, not {}",
                self.name(),
                dims.len()
            ));
        };
        Ok(QuantSpec {
            rows,
            cols,
            bits: self.bits,
            grouping: self.grouping,
            plane_scales: self.plane_scales,
        })
    }

    /// The buffer lengths of a tensor of this type with GGUF dims `dims`, or why the kernels
    /// cannot hold it.
    pub fn layout(&self, dims: &[usize]) -> Result<PackedLayout, String> {
        let spec = self.spec(dims)?;
        if spec.rows == 0 {
            return Err(format!("a {} tensor needs at least one row", self.name()));
        }
        spec.packed_layout(self.offsets)
            .map_err(|e| format!("{} with dimensions {dims:?}: {e}", self.name()))
    }

    /// The packed matrix of a tensor of this type with GGUF dims `dims` whose data is bytes
    /// `data` of the mapped `file`, read in place: nothing is copied. Errors say what is wrong
    /// (without the file or tensor name, which the caller adds).
    pub fn map(
        &self,
        dims: &[usize],
        file: &Arc<MappedFile>,
        data: Range<usize>,
    ) -> Result<PackedMatrix, String> {
        let spec = self.spec(dims)?;
        let layout = self.layout(dims)?;
        if data.len() != layout.total_bytes() {
            return Err(format!(
                "{} data is {} bytes, but dimensions {dims:?} need {}",
                self.name(),
                data.len(),
                layout.total_bytes()
            ));
        }
        let weights_end = data.start + layout.weight_bytes;
        let scales_end = weights_end + 2 * layout.scales;
        let kernel = |e: lutra_kernels::KernelError| e.to_string();
        let weights = Storage::mapped(file.clone(), data.start..weights_end).map_err(kernel)?;
        let scales = Storage::mapped(file.clone(), weights_end..scales_end).map_err(kernel)?;
        let offsets = match self.offsets {
            true => Some(Storage::mapped(file.clone(), scales_end..data.end).map_err(kernel)?),
            false => None,
        };
        PackedMatrix::from_parts(spec, weights, scales, offsets).map_err(kernel)
    }
}

/// How one lutra tensor was quantized, as recorded in the file (`lutra.tensor.<name>.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorQuantInfo {
    /// `rtn`, `gptq`, `hlq` or `gptq+hlq`.
    pub method: String,
    /// Bits per weight code.
    pub bits: u8,
    /// Elements per scale group along K (the row length for one scale per row).
    pub group_size: usize,
    /// The calibration data, e.g. `64x256 tokens of calibration.txt`, or `none`.
    pub calibration: String,
    /// The matrix is stored for rotated inputs ([`crate::rotation`]; the key is absent when not).
    pub rotated: bool,
}

/// The metadata key of `field` of tensor `tensor`'s [`TensorQuantInfo`].
pub fn info_key(tensor: &str, field: &str) -> String {
    format!("lutra.tensor.{tensor}.{field}")
}

impl TensorQuantInfo {
    /// The metadata entries recording this info for tensor `tensor`.
    pub fn to_metadata(&self, tensor: &str) -> Vec<(String, MetaValue)> {
        let mut entries = vec![
            (
                info_key(tensor, "method"),
                MetaValue::String(self.method.clone()),
            ),
            (info_key(tensor, "bits"), MetaValue::U32(self.bits.into())),
            (
                info_key(tensor, "group_size"),
                MetaValue::U32(u32::try_from(self.group_size).unwrap_or(u32::MAX)),
            ),
            (
                info_key(tensor, "calibration"),
                MetaValue::String(self.calibration.clone()),
            ),
        ];
        if self.rotated {
            entries.push((info_key(tensor, "rotated"), MetaValue::Bool(true)));
        }
        entries
    }

    /// The info of tensor `tensor` read from metadata through `get`: `Ok(None)` when the file
    /// records none, an error naming the key when a value has the wrong type or does not fit.
    pub fn from_metadata<'a>(
        tensor: &str,
        get: impl Fn(&str) -> Option<&'a MetaValue>,
    ) -> Result<Option<TensorQuantInfo>, (String, String)> {
        let key = |f: &str| info_key(tensor, f);
        let Some(method) = get(&key("method")) else {
            return Ok(None);
        };
        let string = |f: &str, v: Option<&MetaValue>| match v {
            Some(MetaValue::String(s)) => Ok(s.clone()),
            other => Err((key(f), format!("expected a string, found {other:?}"))),
        };
        let number = |f: &str, max: u64| match get(&key(f)).and_then(MetaValue::as_u64) {
            Some(v) if v <= max => Ok(v),
            _ => Err((
                key(f),
                format!("expected an integer up to {max}, found {:?}", get(&key(f))),
            )),
        };
        Ok(Some(TensorQuantInfo {
            method: string("method", Some(method))?,
            bits: number("bits", 8)? as u8,
            group_size: number("group_size", u64::from(u32::MAX))? as usize,
            calibration: string("calibration", get(&key("calibration")))?,
            rotated: match get(&key("rotated")) {
                None => false,
                Some(MetaValue::Bool(b)) => *b,
                Some(other) => {
                    return Err((key("rotated"), format!("expected a bool, found {other:?}")))
                }
            },
        }))
    }

    /// Why this info does not describe a matrix of type `ty` with `cols` columns, if it does
    /// not.
    pub fn mismatch(&self, ty: &LutraType, cols: usize) -> Option<String> {
        let group = match ty.grouping {
            Grouping::Size(g) => Some(g),
            Grouping::PerRow => Some(cols),
            Grouping::PerTensor => None,
        };
        if self.bits != ty.bits {
            return Some(format!(
                "recorded as {} bits but stored as {}",
                self.bits,
                ty.name()
            ));
        }
        match group {
            Some(g) if g != self.group_size => Some(format!(
                "recorded with groups of {} but stored as {}",
                self.group_size,
                ty.name()
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip_and_unknown_ids_are_refused() {
        let mut seen = std::collections::HashSet::new();
        for bits in 1..=6u8 {
            for grouping in [
                Grouping::PerTensor,
                Grouping::PerRow,
                Grouping::Size(32),
                Grouping::Size(64),
                Grouping::Size(128),
                Grouping::Size(256),
            ] {
                for plane_scales in [PlaneScales::Uniform, PlaneScales::PerPlane] {
                    for offsets in [false, true] {
                        let t = LutraType {
                            bits,
                            grouping,
                            plane_scales,
                            offsets,
                        };
                        let id = t.id().unwrap();
                        assert!(is_lutra_id(id) && id > 64);
                        assert_eq!(LutraType::from_id(id), Some(t));
                        assert!(seen.insert(id), "{} shares id {id:#x}", t.name());
                    }
                }
            }
        }
        for id in [
            0,
            2,
            39,
            LUTRA_TYPE_BASE,
            LUTRA_TYPE_BASE | 7,
            LUTRA_TYPE_BASE | 0x602,
        ] {
            assert_eq!(LutraType::from_id(id), None, "{id:#x}");
        }
        assert_eq!(LutraType::from_id(LUTRA_TYPE_BASE | 0x42), None, "bit 6");
        let odd = LutraType {
            bits: 2,
            grouping: Grouping::Size(16),
            plane_scales: PlaneScales::Uniform,
            offsets: false,
        };
        assert_eq!(odd.id(), None);
        assert_eq!(
            LutraType::from_id(LUTRA_TYPE_BASE | 0x232).map(|t| t.name()),
            Some("LUT2_G32_PP_OFF".to_string())
        );
    }
}
