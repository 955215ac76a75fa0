//! The key/value cache of a decoding session: every layer's keys and values for every position seen
//! so far, preallocated to the context length so that decoding never allocates.
//!
//! Layout: `[layer][kv_head][position][head_dim]` for keys and values separately. Attention reads
//! one KV head's positions in order, so each head's rows are contiguous: with a position-major
//! layout (`[position][kv_heads·head_dim]`) the rows of one head sit `kv_dim` elements apart, which
//! for 7B shapes (16 KiB) maps them onto a handful of cache sets and makes a long prompt's
//! attention re-read the cache from memory for every query token.

use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use lutra_kernels::{vector, Cpu};

/// Element storage of a cache: f32 (exact) or f16 (half the memory, as llama.cpp uses by default).
#[derive(Clone, Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Store {
    fn zeros(len: usize, f16: bool) -> Store {
        // `vec![0; n]` maps zeroed pages lazily, so a long context costs memory only as it fills.
        if f16 {
            // Zeroed u16s (a zeroed allocation), reinterpreted: `vec![f16::ZERO; n]` would write
            // every element and so touch the whole cache up front.
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

    fn element_bytes(&self) -> usize {
        match self {
            Store::F32(_) => 4,
            Store::F16(_) => 2,
        }
    }
}

/// Keys and values of every layer for positions `0..len()`, with room for `capacity()` positions.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    keys: Store,
    values: Store,
}

impl KvCache {
    /// An empty cache for `layers` layers of `kv_heads` heads of `head_dim` values per position,
    /// holding `capacity` positions, stored as f16 when `f16` is set (f32 otherwise).
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        f16: bool,
    ) -> KvCache {
        let len = layers * kv_heads * head_dim * capacity;
        KvCache {
            layers,
            kv_heads,
            head_dim,
            capacity,
            len: 0,
            keys: Store::zeros(len, f16),
            values: Store::zeros(len, f16),
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

    /// Bytes of the preallocated keys and values.
    pub fn bytes(&self) -> usize {
        2 * self.layers * self.kv_dim() * self.capacity * self.keys.element_bytes()
    }

    /// Bytes a cache of these dimensions takes, without allocating one.
    pub fn bytes_for(layers: usize, kv_dim: usize, capacity: usize, f16: bool) -> usize {
        2 * layers * kv_dim * capacity * if f16 { 2 } else { 4 }
    }

    /// Stores the keys and values (`[n][kv_dim]` each) of `n` consecutive positions starting at
    /// `pos` for `layer`. The caller checked `pos + n <= capacity`; `len()` is not changed (it
    /// advances once all layers are written, see [`KvCache::advance`]).
    pub(crate) fn store(&mut self, layer: usize, pos: usize, keys: &[f32], values: &[f32]) {
        let (hd, kv_dim) = (self.head_dim, self.kv_dim());
        debug_assert_eq!(keys.len(), values.len());
        debug_assert!(pos * kv_dim + keys.len() <= self.capacity * kv_dim);
        let rows = keys.chunks_exact(kv_dim).zip(values.chunks_exact(kv_dim));
        for (t, (k, v)) in rows.enumerate() {
            for h in 0..self.kv_heads {
                let start = ((layer * self.kv_heads + h) * self.capacity + pos + t) * hd;
                self.keys.write(start, &k[h * hd..(h + 1) * hd]);
                self.values.write(start, &v[h * hd..(h + 1) * hd]);
            }
        }
    }

    /// Marks `n` more positions as stored.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }

    /// A read-only view of one layer's keys and values.
    pub(crate) fn layer(&self, layer: usize) -> LayerCache<'_> {
        let size = self.capacity * self.kv_dim();
        let range = layer * size..(layer + 1) * size;
        fn rows(store: &Store, range: std::ops::Range<usize>) -> Rows<'_> {
            match store {
                Store::F32(d) => Rows::F32(&d[range]),
                Store::F16(d) => Rows::F16(&d[range]),
            }
        }
        LayerCache {
            head_stride: self.capacity * self.head_dim,
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
    /// Elements from one KV head's rows to the next head's (`capacity · head_dim`).
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
            assert_eq!(cache.bytes(), KvCache::bytes_for(2, 4, 3, f16));
        }
    }

    #[test]
    fn truncate_and_clear_only_shrink() {
        let mut cache = KvCache::new(1, 1, 2, 8, false);
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
    }
}
