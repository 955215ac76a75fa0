//! Read-only memory maps of model files.
//!
//! Mapping a file is the one `unsafe` operating-system primitive the runtime needs; it lives here so
//! that every `unsafe` block of lutra stays in this crate, behind a safe type.

use std::fs::File;
use std::ops::Deref;

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
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_the_bytes_of_a_file() {
        let path = std::env::temp_dir().join(format!("lutra-mapped-{}.bin", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(b"GGUF and more").unwrap();
        drop(f);
        let map = MappedFile::map(&File::open(&path).unwrap()).unwrap();
        assert_eq!(&map[..], b"GGUF and more");
        std::fs::remove_file(&path).unwrap();
    }
}
