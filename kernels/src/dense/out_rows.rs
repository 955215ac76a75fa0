//! Splitting a token-major output `[tokens][rows]` into disjoint row ranges, one per task.
//!
//! Kernels parallelize over rows, but for N > 1 tokens the rows of one task are strided through the
//! output, so `chunks_mut` cannot hand them out. [`split_rows`] gives every task a [`RowRange`] that
//! may only write its own rows; the bounds check in [`RowRange::set`] is what keeps this sound.

use std::marker::PhantomData;

use crate::cpu::Cpu;

/// Write access to the rows `start..end` of every token of a `[tokens][rows]` output.
pub(crate) struct RowRange<'a> {
    ptr: *mut f32,
    rows: usize,
    tokens: usize,
    start: usize,
    end: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: a RowRange only writes elements whose row lies in its own `start..end`, and `split_rows`
// hands out ranges that do not overlap, so ranges used on different threads never alias.
unsafe impl Send for RowRange<'_> {}

impl RowRange<'_> {
    /// First row of the range.
    pub(crate) fn start(&self) -> usize {
        self.start
    }

    /// One past the last row of the range.
    pub(crate) fn end(&self) -> usize {
        self.end
    }

    /// Number of tokens (columns of the output) every row has.
    pub(crate) fn tokens(&self) -> usize {
        self.tokens
    }

    /// `out[token][row] = value`; panics if the element is not in this range (a kernel bug).
    #[inline]
    pub(crate) fn set(&mut self, token: usize, row: usize, value: f32) {
        assert!(
            token < self.tokens && row >= self.start && row < self.end,
            "kernel wrote outside its row range"
        );
        // SAFETY: token < tokens and row < rows (end <= rows), so the index is inside the
        // `tokens * rows` output borrowed mutably for 'a; the row belongs to this range only.
        unsafe { *self.ptr.add(token * self.rows + row) = value };
    }
}

/// Wraps a raw pointer so the closure handed to the pool is `Sync`.
struct OutPtr(*mut f32);

// SAFETY: the pointer is only turned into RowRanges with disjoint rows (see `split_rows`).
unsafe impl Sync for OutPtr {}
// SAFETY: as above.
unsafe impl Send for OutPtr {}

/// Calls `work` with disjoint row ranges covering `0..rows`, spread over the threads of `cpu`.
///
/// `out` must hold `tokens * rows` values (checked by the callers; asserted here). Ranges start at
/// multiples of `align` so micro-tiles of that many rows stay whole.
pub(crate) fn split_rows<F>(
    cpu: &Cpu,
    out: &mut [f32],
    rows: usize,
    tokens: usize,
    align: usize,
    work: F,
) where
    F: Fn(RowRange<'_>) + Sync + Send,
{
    assert_eq!(
        out.len(),
        rows * tokens,
        "output length checked by the caller"
    );
    if rows == 0 || tokens == 0 {
        return;
    }
    let align = align.max(1);
    // A few chunks per thread balance uneven progress without per-row tasks.
    let per_task = rows.div_ceil(cpu.threads() * 4).div_ceil(align) * align;
    let chunk = if cpu.threads() == 1 {
        rows
    } else {
        per_task.max(align)
    };
    let count = rows.div_ceil(chunk);
    let base = OutPtr(out.as_mut_ptr());
    let base = &base;
    cpu.for_each_index(count, |i| {
        let start = i * chunk;
        let range = RowRange {
            ptr: base.0,
            rows,
            tokens,
            start,
            end: (start + chunk).min(rows),
            _out: PhantomData,
        };
        work(range);
    });
}
