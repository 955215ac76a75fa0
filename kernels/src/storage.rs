//! Read-only buffers of packed weights: owned in memory, or a range of a memory-mapped file.
//!
//! A file written in the kernels' own layout (lutra's tensor types) is used where it lies: its
//! tensors become [`Storage::mapped`] ranges of one [`MappedFile`], kept alive by an [`Arc`], and
//! nothing is copied or repacked. No `unsafe` is needed here: the mapping itself is made (with its
//! SAFETY argument) in [`MappedFile::map`], and the bytes are viewed as `T` through
//! [`bytemuck::try_cast_slice`], which checks the alignment and length of the range. The checked
//! address cannot change afterwards (a mapping does not move), so a range accepted once stays
//! valid. Many threads may read one mapping at once: it is read-only and `MappedFile` is
//! `Send + Sync`, like `&[u8]`.
//!
//! Values are read in the machine's byte order; files store them little-endian, so mapping a
//! multi-byte `T` is refused on a big-endian machine.

use std::ops::{Deref, Range};
use std::sync::Arc;

use bytemuck::Pod;

use crate::error::{KernelError, Result};
use crate::mapped::MappedFile;

/// A read-only buffer of `T`, dereferencing to `[T]`.
pub struct Storage<T: Pod> {
    inner: Inner<T>,
}

enum Inner<T> {
    Owned(Vec<T>),
    Mapped {
        file: Arc<MappedFile>,
        /// Byte range in the file, checked to hold whole, aligned `T`s.
        range: Range<usize>,
    },
}

impl<T: Pod> Storage<T> {
    /// A buffer that owns `values`.
    pub fn owned(values: Vec<T>) -> Storage<T> {
        Storage {
            inner: Inner::Owned(values),
        }
    }

    /// Bytes `range` of `file`, read as `T`s in place. Errors when the range is not inside the
    /// file, is not a whole number of `T`s, or does not start at an address aligned for `T`.
    pub fn mapped(file: Arc<MappedFile>, range: Range<usize>) -> Result<Storage<T>> {
        let err = |reason| KernelError::BadMappedRange {
            start: range.start,
            end: range.end,
            file_len: file.len(),
            reason,
        };
        if cfg!(target_endian = "big") && std::mem::size_of::<T>() > 1 {
            return Err(err(
                "the file stores little-endian values; this machine is big-endian",
            ));
        }
        let Some(bytes) = file.get(range.clone()) else {
            return Err(err("the range is not inside the file"));
        };
        if let Err(e) = bytemuck::try_cast_slice::<u8, T>(bytes) {
            return Err(err(match e {
                bytemuck::PodCastError::TargetAlignmentGreaterAndInputNotAligned => {
                    "the range is not aligned for its element type"
                }
                _ => "the range is not a whole number of elements",
            }));
        }
        Ok(Storage {
            inner: Inner::Mapped { file, range },
        })
    }

    /// Whether the values are read from a mapped file rather than owned.
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }
}

impl<T: Pod> Deref for Storage<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Owned(values) => values,
            // `mapped` checked that the range lies in the file and casts (length and
            // alignment); neither the mapping's address nor its length changes, so the cast
            // succeeds again. The fallback is never taken.
            Inner::Mapped { file, range } => file
                .get(range.clone())
                .and_then(|b| bytemuck::try_cast_slice(b).ok())
                .unwrap_or(&[]),
        }
    }
}

impl<T: Pod> From<Vec<T>> for Storage<T> {
    fn from(values: Vec<T>) -> Storage<T> {
        Storage::owned(values)
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for Storage<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("len", &self.len())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapped::tests::TempFile;

    /// A map of `bytes` (its file is removed once mapped).
    fn mapped_file(bytes: &[u8]) -> Arc<MappedFile> {
        Arc::new(TempFile::new(bytes).map())
    }

    #[test]
    fn mapped_ranges_read_in_place_and_are_checked() {
        let bytes: Vec<u8> = (0..64u8).collect();
        let file = mapped_file(&bytes);
        let words = Storage::<u16>::mapped(file.clone(), 8..16).unwrap();
        assert!(words.is_mapped());
        assert_eq!(&words[..], &[0x0908, 0x0b0a, 0x0d0c, 0x0f0e]);
        let whole = Storage::<u8>::mapped(file.clone(), 0..64).unwrap();
        assert_eq!(&whole[..], &bytes[..]);
        assert!(
            Storage::<u16>::mapped(file.clone(), 1..5).is_err(),
            "misaligned"
        );
        assert!(
            Storage::<u16>::mapped(file.clone(), 2..5).is_err(),
            "odd length"
        );
        assert!(
            Storage::<u8>::mapped(file.clone(), 60..65).is_err(),
            "past the end"
        );
        let owned = Storage::owned(vec![1u16, 2]);
        assert!(!owned.is_mapped());
        assert_eq!(&owned[..], &[1, 2]);
    }
}
