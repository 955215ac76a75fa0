//! Write access to disjoint pieces of token-major outputs `[tokens][rows]`, one piece per task.
//!
//! Kernels parallelize over rows (and token blocks), but for N > 1 tokens the rows of one task are
//! strided through the output, so `chunks_mut` cannot hand them out. The driver in
//! [`super::run_row_tasks`] gives every task a [`RowRange`] that may only write its own rows of its
//! own tokens; the bounds checks in [`RowRange::set`] and [`RowRange::write_tile`] are what keep
//! this sound.

use std::marker::PhantomData;
use std::ops::Range;

use crate::error::{KernelError, Result};

/// Most matrices one dispatch covers (a layer's q/k/v is three); callers run more in several.
pub(crate) const MAX_PARTS: usize = 4;

/// Tokens ahead of the one being written whose output lines [`RowRange::write_tile`] prefetches.
const WRITE_AHEAD: usize = 8;

/// Write access to the rows `rows` of the tokens `tokens` of one `[tokens][rows]` output.
pub(crate) struct RowRange<'a> {
    ptr: *mut f32,
    /// Rows of the whole output (the stride of a token).
    stride: usize,
    rows: Range<usize>,
    tokens: Range<usize>,
    _out: PhantomData<&'a mut [f32]>,
}

impl RowRange<'_> {
    /// First row of the range.
    pub(crate) fn start(&self) -> usize {
        self.rows.start
    }

    /// One past the last row of the range.
    pub(crate) fn end(&self) -> usize {
        self.rows.end
    }

    /// The tokens (output columns) this range may write.
    pub(crate) fn tokens(&self) -> Range<usize> {
        self.tokens.clone()
    }

    /// `out[token][row] = value`; panics if the element is not in this range (a kernel bug).
    #[inline]
    pub(crate) fn set(&mut self, token: usize, row: usize, value: f32) {
        assert!(
            self.tokens.contains(&token) && self.rows.contains(&row),
            "kernel wrote outside its row range"
        );
        // SAFETY: token < tokens of the output and row < rows.end <= stride, so the index lies
        // inside the `[tokens][stride]` output borrowed mutably for 'a; no other live range holds
        // this (token, row) (see `OutputParts::range`).
        unsafe { *self.ptr.add(token * self.stride + row) = value };
    }

    /// Writes one tile of `W` rows from `row0` for the consecutive tokens `first..first +
    /// tile.len()`: `out[first + n][row0 + i] = tile[n][i]` for the tile's rows inside this range
    /// (those past its end are left out). A token's rows lie a whole output row from the next
    /// token's, so before each write the lines of the token [`WRITE_AHEAD`] later are prefetched
    /// (x86-64): the misses overlap instead of each write waiting for its own. Panics if the
    /// tokens or `row0` are not in this range.
    pub(crate) fn write_tile<const W: usize>(
        &mut self,
        first: usize,
        row0: usize,
        tile: &[[f32; W]],
    ) {
        let len = W.min(self.rows.end.saturating_sub(row0));
        // The first token is written at once (and a lone token, as in decode, gets no prefetch).
        for n in 1..WRITE_AHEAD.min(tile.len()) {
            self.prefetch(first + n, row0, len);
        }
        for (n, values) in tile.iter().enumerate() {
            if n + WRITE_AHEAD < tile.len() {
                self.prefetch(first + n + WRITE_AHEAD, row0, len);
            }
            self.write(first + n, row0, &values[..len]);
        }
    }

    /// Asks the CPU to bring the cache lines of `out[token][row0..row0 + len]` into its cache
    /// before they are written (a prefetch on x86-64, nothing on other targets); does nothing when
    /// the elements are not all in this range. A hint only: no value changes.
    #[inline]
    fn prefetch(&self, token: usize, row0: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        if len > 0
            && self.tokens.contains(&token)
            && row0 >= self.rows.start
            && row0 + len <= self.rows.end
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: as in `write`, `token` and `row0..row0 + len` lie in the borrowed output,
            // so both offsets stay inside its allocation; a prefetch reads and writes no memory
            // (it cannot fault or race with another thread's stores), and `_mm_prefetch` needs
            // only SSE, which every x86-64 CPU has.
            unsafe {
                let first = self.ptr.add(token * self.stride + row0);
                let last = first.add(len - 1);
                let mut line = first as usize & !63;
                while line <= last as usize {
                    _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                    line += 64;
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (token, row0, len);
    }

    /// `out[token][row0 + i] = values[i]`; panics if any element is not in this range.
    #[inline]
    fn write(&mut self, token: usize, row0: usize, values: &[f32]) {
        assert!(
            self.tokens.contains(&token)
                && row0 >= self.rows.start
                && row0 + values.len() <= self.rows.end,
            "kernel wrote outside its row range"
        );
        // SAFETY: as in `set`, for every element of `row0..row0 + values.len()`, which lies in
        // this range's rows; `values` is a separate borrow, so the copy does not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.add(token * self.stride + row0),
                values.len(),
            );
        }
    }
}

/// The outputs of one dispatch, shared by its tasks, which write them through [`RowRange`]s.
pub(crate) struct OutputParts<'a> {
    count: usize,
    ptrs: [*mut f32; MAX_PARTS],
    rows: [usize; MAX_PARTS],
    tokens: usize,
    _outs: PhantomData<&'a mut [f32]>,
}

// SAFETY: the pointers come from `&'a mut [f32]`s held for 'a, and tasks on different threads only
// write through `RowRange`s that `range`'s contract keeps disjoint.
unsafe impl Sync for OutputParts<'_> {}

impl<'a> OutputParts<'a> {
    /// Borrows `outs`, where `outs[p]` is `[tokens][rows(p)]`; panics on a wrong length (the
    /// callers check lengths first and report them as errors) or more than [`MAX_PARTS`] outputs.
    pub(super) fn new(
        outs: &'a mut [&mut [f32]],
        rows: impl Fn(usize) -> usize,
        tokens: usize,
    ) -> OutputParts<'a> {
        assert!(
            outs.len() <= MAX_PARTS,
            "at most MAX_PARTS outputs per dispatch"
        );
        let mut parts = OutputParts {
            count: outs.len(),
            ptrs: [std::ptr::null_mut(); MAX_PARTS],
            rows: [0; MAX_PARTS],
            tokens,
            _outs: PhantomData,
        };
        for (p, out) in outs.iter_mut().enumerate() {
            let r = rows(p);
            assert_eq!(out.len(), tokens * r, "output length checked by the caller");
            parts.ptrs[p] = out.as_mut_ptr();
            parts.rows[p] = r;
        }
        parts
    }

    /// Number of outputs.
    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// Rows of output `p`.
    pub(super) fn rows(&self, p: usize) -> usize {
        self.rows[p]
    }

    /// Write access to `rows` × `tokens` of output `p`; panics if that is not inside the output.
    ///
    /// # Safety
    ///
    /// While the returned range lives, no other live range of this `OutputParts` may cover any of
    /// its (token, row) elements of output `p`.
    pub(super) unsafe fn range(
        &self,
        p: usize,
        rows: Range<usize>,
        tokens: Range<usize>,
    ) -> RowRange<'_> {
        assert!(
            p < self.count
                && rows.start <= rows.end
                && rows.end <= self.rows[p]
                && tokens.start <= tokens.end
                && tokens.end <= self.tokens,
            "row range outside its output"
        );
        RowRange {
            ptr: self.ptrs[p],
            stride: self.rows[p],
            rows,
            tokens,
            _out: PhantomData,
        }
    }
}

/// Checks the arguments of a many-matrix matmul (`what` names its outputs in errors): one output
/// per matrix, every matrix's K equal to the tables' `cols`, every output `tokens · rows` long, where
/// `shape(p)` is matrix `p`'s (K, rows).
pub(crate) fn check_parts(
    what: &'static str,
    shape: impl Fn(usize) -> (usize, usize),
    matrices: usize,
    cols: usize,
    tokens: usize,
    outs: &[&mut [f32]],
) -> Result<()> {
    if matrices != outs.len() {
        return Err(KernelError::LengthMismatch {
            what: "matmul outputs (one per matrix)",
            expected: matrices,
            got: outs.len(),
        });
    }
    for (p, out) in outs.iter().enumerate() {
        let (k, rows) = shape(p);
        if k != cols {
            return Err(KernelError::ShapeMismatch {
                matrix: k,
                activations: cols,
            });
        }
        if out.len() != tokens * rows {
            return Err(KernelError::LengthMismatch {
                what,
                expected: tokens * rows,
                got: out.len(),
            });
        }
    }
    Ok(())
}
