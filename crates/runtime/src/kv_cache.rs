//! The key/value cache of a decoding session: every layer's keys and values for every position seen
//! so far. Memory is allocated as positions fill (doubling, up to the context length), so a short
//! conversation with a long context costs what it uses; decoding allocates only when the cache
//! grows, a logarithmic number of times.
//!
//! Layout: `[layer][kv_head][position][head_dim]` for keys and values separately, with room for
//! `allocated()` positions per head. Attention reads one KV head's positions in order, so each
//! head's rows are contiguous: with a position-major layout (`[position][kv_heads·head_dim]`) the
//! rows of one head sit `kv_dim` elements apart, which for 7B shapes (16 KiB) maps them onto a
//! handful of cache sets and makes a long prompt's attention re-read the cache from memory for
//! every query token.

use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use lutra_kernels::{vector, Cpu};

use crate::error::{Error, Result};

/// Positions allocated by the first store into an empty cache (fewer when the context is shorter).
const FIRST_ALLOCATION: usize = 64;

/// Element storage of a cache: f32 (exact) or f16 (half the memory, as llama.cpp uses by default).
#[derive(Clone, Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Store {
    fn zeros(len: usize, f16: bool) -> Store {
        // `vec![0; n]` maps zeroed pages lazily, so the room ahead of the filled positions costs
        // memory only as it fills.
        if f16 {
            // Zeroed u16s (a zeroed allocation), reinterpreted: `vec![f16::ZERO; n]` would write
            // every element and so touch the whole allocation up front.
            Store::F16(vec![0u16; len].reinterpret_into())
        } else {
            Store::F32(vec![0.0; len])
        }
    }

    fn write(&mut self, start: usize, values: &[f32]) {
        match self {
            Store::F32(data) => data[start..start + values.len()].copy_from_slice(values),
            Store::F16(data) => data[start..start + values.len()].convert_from_f32_slice(values),
        }
    }

    /// A store with room for `new_rows` rows per block, holding the first `keep` rows of each of
    /// the `blocks` blocks of `old_rows` rows of `row_len` elements of `self`.
    fn regrow(
        &self,
        blocks: usize,
        row_len: usize,
        old_rows: usize,
        new_rows: usize,
        keep: usize,
    ) -> Store {
        fn copy<T: Copy>(old: &[T], new: &mut [T], old_block: usize, new_block: usize, n: usize) {
            if old_block == 0 || n == 0 {
                return;
            }
            let pairs = old
                .chunks_exact(old_block)
                .zip(new.chunks_exact_mut(new_block));
            for (from, to) in pairs {
                to[..n].copy_from_slice(&from[..n]);
            }
        }
        let (old_block, new_block) = (old_rows * row_len, new_rows * row_len);
        let mut grown = Store::zeros(blocks * new_block, matches!(self, Store::F16(_)));
        match (self, &mut grown) {
            (Store::F32(old), Store::F32(new)) => {
                copy(old, new, old_block, new_block, keep * row_len);
            }
            (Store::F16(old), Store::F16(new)) => {
                copy(old, new, old_block, new_block, keep * row_len);
            }
            // `zeros` made the same variant as `self`.
            _ => {}
        }
        grown
    }
}

/// Bytes per stored value.
fn element_bytes(f16: bool) -> usize {
    if f16 {
        2
    } else {
        4
    }
}

/// Keys and values of every layer for positions `0..len()`, with room for up to `capacity()`
/// positions (memory for `allocated()` of them).
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    allocated: usize,
    len: usize,
    keys: Store,
    values: Store,
}

impl KvCache {
    /// An empty cache for `layers` layers of `kv_heads` heads of `head_dim` values per position,
    /// holding up to `capacity` positions, stored as f16 when `f16` is set (f32 otherwise).
    /// Nothing is allocated until positions are stored.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        f16: bool,
    ) -> KvCache {
        KvCache {
            layers,
            kv_heads,
            head_dim,
            capacity,
            allocated: 0,
            len: 0,
            keys: Store::zeros(0, f16),
            values: Store::zeros(0, f16),
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold (the context length).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions the cache has memory for now (at most [`KvCache::capacity`]).
    pub fn allocated(&self) -> usize {
        self.allocated
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Forgets every position (the memory is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `n` positions (no-op when `n >= len()`), e.g. to rewind a chat turn.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Layers the cache was made for.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Key/value heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Values per head and position.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Values per position and layer (`kv_heads · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Whether entries are stored as f16.
    pub fn is_f16(&self) -> bool {
        matches!(self.keys, Store::F16(_))
    }

    /// Bytes of keys and values allocated now.
    pub fn bytes(&self) -> usize {
        2 * self.layers * self.kv_dim() * self.allocated * element_bytes(self.is_f16())
    }

    /// Bytes a cache of these dimensions takes when it holds `capacity` positions, or `None`
    /// when that overflows the address space.
    pub fn bytes_for(layers: usize, kv_dim: usize, capacity: usize, f16: bool) -> Option<usize> {
        let bytes = layers
            .checked_mul(kv_dim)?
            .checked_mul(capacity)?
            .checked_mul(2 * element_bytes(f16))?;
        // No allocation may exceed `isize::MAX` bytes; keys and values are one each.
        (bytes / 2 <= isize::MAX as usize).then_some(bytes)
    }

    /// Makes room for `positions` positions (growing to at least twice the current room, up to
    /// the capacity), keeping the stored ones. An error when `positions` exceeds the capacity or
    /// the memory needed overflows the address space.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        if positions <= self.allocated {
            return Ok(());
        }
        if positions > self.capacity {
            return Err(Error::ContextOverflow {
                tokens: positions,
                context: self.capacity,
            });
        }
        let grown = positions
            .max(self.allocated.saturating_mul(2))
            .max(FIRST_ALLOCATION)
            .min(self.capacity);
        if Self::bytes_for(self.layers, self.kv_dim(), grown, self.is_f16()).is_none() {
            return Err(Error::KvCacheTooLarge {
                positions: grown,
                layers: self.layers,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            });
        }
        let blocks = self.layers * self.kv_heads;
        let (hd, old, keep) = (self.head_dim, self.allocated, self.len);
        self.keys = self.keys.regrow(blocks, hd, old, grown, keep);
        self.values = self.values.regrow(blocks, hd, old, grown, keep);
        self.allocated = grown;
        Ok(())
    }

    /// Stores the keys and values (`[n][kv_dim]` each) of `n` consecutive positions starting at
    /// `pos` for `layer`. The caller reserved room for them ([`KvCache::reserve`]); `len()` is not
    /// changed (it advances once all layers are written, see [`KvCache::advance`]).
    pub(crate) fn store(&mut self, layer: usize, pos: usize, keys: &[f32], values: &[f32]) {
        let (hd, kv_dim) = (self.head_dim, self.kv_dim());
        debug_assert_eq!(keys.len(), values.len());
        debug_assert!(pos * kv_dim + keys.len() <= self.allocated * kv_dim);
        let rows = keys.chunks_exact(kv_dim).zip(values.chunks_exact(kv_dim));
        for (t, (k, v)) in rows.enumerate() {
            for h in 0..self.kv_heads {
                let start = ((layer * self.kv_heads + h) * self.allocated + pos + t) * hd;
                self.keys.write(start, &k[h * hd..(h + 1) * hd]);
                self.values.write(start, &v[h * hd..(h + 1) * hd]);
            }
        }
    }

    /// Marks `n` more positions as stored.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.allocated);
    }

    /// A read-only view of one layer's keys and values.
    pub(crate) fn layer(&self, layer: usize) -> LayerCache<'_> {
        let size = self.allocated * self.kv_dim();
        let range = layer * size..(layer + 1) * size;
        fn rows(store: &Store, range: std::ops::Range<usize>) -> Rows<'_> {
            match store {
                Store::F32(d) => Rows::F32(&d[range]),
                Store::F16(d) => Rows::F16(&d[range]),
            }
        }
        LayerCache {
            head_stride: self.allocated * self.head_dim,
            keys: rows(&self.keys, range.clone()),
            values: rows(&self.values, range),
        }
    }
}

/// Rows of one layer's keys or values.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    /// `len` values starting at element `at`, as f32: borrowed from an f32 cache, or widened
    /// (exactly) into `buf`, which must hold at least `len` values, from an f16 one.
    #[inline]
    pub(crate) fn read<'b>(&self, cpu: &Cpu, at: usize, len: usize, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            Rows::F32(d) => &d[at..at + len],
            Rows::F16(d) => {
                vector::widen_f16(cpu, &d[at..at + len], &mut buf[..len]);
                &buf[..len]
            }
        }
    }
}

/// One layer of a [`KvCache`], for attention.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerCache<'a> {
    /// Elements from one KV head's rows to the next head's (`allocated · head_dim`).
    pub head_stride: usize,
    /// Keys, `[kv_head][position][head_dim]`.
    pub keys: Rows<'a>,
    /// Values, `[kv_head][position][head_dim]`.
    pub values: Rows<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_read_back_both_precisions() {
        for f16 in [false, true] {
            // 2 layers, 2 KV heads of 2 values, 3 positions.
            let mut cache = KvCache::new(2, 2, 2, 3, f16);
            assert_eq!(cache.capacity(), 3);
            assert_eq!(cache.kv_dim(), 4);
            assert!(cache.is_empty());
            assert_eq!(cache.bytes(), 0, "nothing is allocated before a store");
            cache.reserve(3).unwrap();
            assert_eq!(cache.allocated(), 3, "growth stops at the capacity");
            // Positions 1 and 2, `[position][kv_dim]`.
            let k: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
            let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
            cache.store(1, 1, &k, &v);
            cache.advance(2);
            assert_eq!(cache.len(), 2);
            let layer = cache.layer(1);
            assert_eq!(layer.head_stride, 6);
            // Head 0 at position 1 is the first two keys; head 1 at position 2 the last two.
            let cpu = Cpu::new(1).unwrap();
            let mut buf = [0.0f32; 4];
            assert_eq!(layer.keys.read(&cpu, 2, 2, &mut buf), &k[..2]);
            assert_eq!(layer.keys.read(&cpu, 6 + 4, 2, &mut buf), &k[6..]);
            assert_eq!(
                layer.values.read(&cpu, 6 + 2, 4, &mut buf),
                &[v[2], v[3], v[6], v[7]]
            );
            // Layer 0 was not touched.
            let mut buf = [1.0f32; 2];
            assert_eq!(cache.layer(0).keys.read(&cpu, 2, 2, &mut buf), &[0.0; 2]);
            assert_eq!(cache.bytes(), KvCache::bytes_for(2, 4, 3, f16).unwrap());
        }
    }

    #[test]
    fn grows_as_positions_fill_and_keeps_its_contents() {
        let cpu = Cpu::new(1).unwrap();
        for f16 in [false, true] {
            // 2 layers, 3 KV heads of 4 values, up to 1000 positions.
            let (layers, heads, hd, kv_dim) = (2, 3, 4, 12);
            let mut cache = KvCache::new(layers, heads, hd, 1000, f16);
            // Quarters of integers below 1024: exact in f16 too.
            let key =
                |l: usize, p: usize, i: usize| ((l * 131 + p * 7 + i * 3) % 1024) as f32 / 4.0;
            let mut allocations = vec![];
            let mut pos = 0;
            for n in [1, 2, 61, 1, 100, 300, 535] {
                cache.reserve(pos + n).unwrap();
                if allocations.last() != Some(&cache.allocated()) {
                    allocations.push(cache.allocated());
                }
                for l in 0..layers {
                    let k: Vec<f32> = (pos..pos + n)
                        .flat_map(|p| (0..kv_dim).map(move |i| key(l, p, i)))
                        .collect();
                    let v: Vec<f32> = k.iter().map(|x| -x).collect();
                    cache.store(l, pos, &k, &v);
                }
                cache.advance(n);
                pos += n;
            }
            assert_eq!(cache.len(), 1000);
            assert_eq!(
                allocations,
                [64, 128, 256, 512, 1000],
                "doubling, capped at capacity"
            );
            assert_eq!(cache.bytes(), KvCache::bytes_for(2, 12, 1000, f16).unwrap());
            // Every position written before any growth reads back.
            let mut buf = [0.0f32; 4];
            for l in 0..layers {
                let layer = cache.layer(l);
                assert_eq!(layer.head_stride, 1000 * hd);
                for p in [0, 1, 3, 63, 64, 200, 511, 999] {
                    for h in 0..heads {
                        let at = h * layer.head_stride + p * hd;
                        let want: Vec<f32> = (0..hd).map(|i| key(l, p, h * hd + i)).collect();
                        assert_eq!(layer.keys.read(&cpu, at, hd, &mut buf), &want[..]);
                        let neg: Vec<f32> = want.iter().map(|x| -x).collect();
                        assert_eq!(layer.values.read(&cpu, at, hd, &mut buf), &neg[..]);
                    }
                }
            }
            // No room past the capacity.
            match cache.reserve(1001) {
                Err(Error::ContextOverflow { tokens, context }) => {
                    assert_eq!((tokens, context), (1001, 1000));
                }
                other => panic!("expected ContextOverflow, got {other:?}"),
            }
        }
    }

    #[test]
    fn an_overflowing_size_is_an_error_not_an_allocation() {
        assert_eq!(KvCache::bytes_for(32, 4096, 4096, true), Some(2 << 30));
        assert_eq!(KvCache::bytes_for(32, 4096, 4096, false), Some(4 << 30));
        assert_eq!(KvCache::bytes_for(usize::MAX / 2, 4096, 4096, true), None);
        assert_eq!(KvCache::bytes_for(1, 1, usize::MAX / 4 + 1, false), None);
        let mut cache = KvCache::new(1 << 30, 1 << 20, 1 << 10, usize::MAX, true);
        match cache.reserve(1 << 20) {
            Err(e @ Error::KvCacheTooLarge { .. }) => {
                assert!(
                    e.to_string().contains("lower the context length (-c)"),
                    "{e}"
                );
            }
            other => panic!("expected KvCacheTooLarge, got {other:?}"),
        }
        assert_eq!((cache.allocated(), cache.bytes()), (0, 0));
    }

    #[test]
    fn truncate_and_clear_only_shrink() {
        let mut cache = KvCache::new(1, 1, 2, 8, false);
        cache.reserve(8).unwrap();
        cache.advance(5);
        cache.truncate(7);
        assert_eq!(cache.len(), 5);
        cache.truncate(3);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.remaining(), 5);
        cache.advance(100);
        assert_eq!(cache.len(), 8);
        cache.clear();
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.allocated(), 8, "the memory is kept");
    }
}
