//! Read-only memory maps of model files.
//!
//! Mapping a file is the one `unsafe` operating-system primitive the runtime needs; it lives here so
//! that every `unsafe` block of lutra stays in this crate, behind a safe type.

use std::fs::File;
use std::ops::{Deref, Range};

/// A read-only memory map of a whole file, dereferencing to its bytes.
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `file` read-only.
    pub fn map(file: &File) -> std::io::Result<MappedFile> {
        // SAFETY: the map is only ever read, never written, and every reader bounds-checks against
        // its length. If another process truncates or rewrites the file while it is mapped, reads
        // may see changed bytes (or fault on a truncated tail): the documented mmap caveat, accepted
        // because model files must not be copied into memory.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        Ok(MappedFile { map })
    }

    /// Takes the pages that lie wholly inside bytes `range` out of the process's resident memory
    /// (`madvise(MADV_DONTNEED)`), for data that has been copied elsewhere (a tensor repacked at
    /// load time): the mapping then stops counting those pages. The bytes stay readable, with
    /// the same contents, read back from the file on the next access. Partial pages at either
    /// end are kept (a neighbour may still be in use). Returns the bytes released; 0 where the
    /// platform has no such call or the range holds no whole page. `range` is clamped to the
    /// mapping.
    pub fn release_pages(&self, range: Range<usize>) -> std::io::Result<usize> {
        let (start, end) = (
            range.start.min(self.map.len()),
            range.end.min(self.map.len()),
        );
        let Some((offset, len)) = whole_pages(self.map.as_ptr() as usize, start..end, page_size())
        else {
            return Ok(0);
        };
        self.advise_dont_need(offset, len)?;
        Ok(len)
    }

    #[cfg(unix)]
    fn advise_dont_need(&self, offset: usize, len: usize) -> std::io::Result<()> {
        // SAFETY: `offset..offset + len` lies inside the mapping (`whole_pages` keeps it within
        // `start..end`, clamped to the length) and is page-aligned. The mapping is read-only and
        // never written, so no page holds data that exists only in memory: dropping a page loses
        // nothing, and the next read of it faults it back in from the file with the bytes it had.
        // Slices borrowed from the map therefore keep their contents, as Rust requires of `&[u8]`.
        unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        }
    }

    #[cfg(not(unix))]
    fn advise_dont_need(&self, _offset: usize, _len: usize) -> std::io::Result<()> {
        Ok(())
    }
}

/// The page-aligned part of bytes `range` of a mapping that starts at address `base`, as
/// `(offset, len)` relative to `base`, or `None` when `range` holds no whole page.
fn whole_pages(base: usize, range: Range<usize>, page: usize) -> Option<(usize, usize)> {
    if page == 0 || !cfg!(unix) {
        return None;
    }
    // Mappings start on a page boundary; rounding the addresses (not the offsets) keeps the call
    // valid even if one did not.
    let first = (base + range.start).div_ceil(page) * page;
    let last = (base + range.end) / page * page;
    (last > first).then(|| (first - base, last - first))
}

/// The operating system's page size in bytes (0 when unknown).
#[cfg(unix)]
fn page_size() -> usize {
    // SAFETY: `sysconf` only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(0)
}

#[cfg(not(unix))]
fn page_size() -> usize {
    0
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.map.len())
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A file of given bytes under the temp dir, unique to the process and call, removed when
    /// dropped. On Unix a map of it stays readable after that.
    pub(crate) struct TempFile(std::path::PathBuf);

    impl TempFile {
        pub(crate) fn new(bytes: &[u8]) -> TempFile {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("lutra-kernels-{}-{n}.bin", std::process::id());
            let file = TempFile(std::env::temp_dir().join(name));
            std::fs::write(&file.0, bytes).unwrap();
            file
        }

        /// A map of the whole file.
        pub(crate) fn map(&self) -> MappedFile {
            MappedFile::map(&File::open(&self.0).unwrap()).unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn maps_the_bytes_of_a_file() {
        let file = TempFile::new(b"GGUF and more");
        assert_eq!(&file.map()[..], b"GGUF and more");
    }

    #[test]
    fn whole_pages_rounds_inward() {
        // Base on a page boundary.
        assert_eq!(
            whole_pages(8192, 0..4096, 4096),
            Some((0, 4096)).filter(|_| cfg!(unix))
        );
        assert_eq!(
            whole_pages(8192, 1..8192, 4096),
            Some((4096, 4096)).filter(|_| cfg!(unix))
        );
        assert_eq!(whole_pages(8192, 100..4200, 4096), None);
        assert_eq!(whole_pages(8192, 5000..5000, 4096), None);
        assert_eq!(whole_pages(8192, 0..4096, 0), None);
        // A base off a page boundary: the released addresses are still whole pages.
        assert_eq!(
            whole_pages(100, 0..8192, 4096),
            Some((3996, 4096)).filter(|_| cfg!(unix))
        );
    }

    #[test]
    fn released_pages_read_back_unchanged() {
        let page = page_size().max(1);
        let bytes: Vec<u8> = (0..5 * page).map(|i| (i * 7 % 251) as u8).collect();
        let file = TempFile::new(&bytes);
        let map = file.map();
        // Touch every page, release the middle of the file (not page-aligned at either end).
        let sum: u64 = map.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, bytes.iter().map(|&b| u64::from(b)).sum::<u64>());
        let released = map.release_pages(page / 2..4 * page + 1).unwrap();
        if cfg!(unix) {
            assert_eq!(released, 3 * page, "pages 1, 2 and 3 are wholly inside");
        }
        // Past the end is clamped; an empty range releases nothing.
        assert_eq!(map.release_pages(10 * page..20 * page).unwrap(), 0);
        assert_eq!(
            &map[..],
            &bytes[..],
            "the released bytes read back from the file"
        );
    }
}
