//! The compute context: which ISA to run and on how many threads.

use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::pool::SpinPool;

/// The ISA and worker threads every kernel call runs with.
///
/// The caller owns it (no global pool is used implicitly). With one thread no pool is created and
/// work runs on the calling thread.
///
/// A `Cpu` may be shared between threads (it is `Sync`):
/// - dispatches ([`Cpu::for_each_index`], [`Cpu::for_each_chunk`] and every kernel call) made from
///   several threads at once take turns on the worker threads; each one runs every index (chunk)
///   exactly once;
/// - a dispatch made from inside a dispatched job, on a worker thread or on the dispatching thread
///   (on this or any other `Cpu`), runs inline on the calling thread, one index after another. It
///   cannot deadlock and does not disturb the job it is nested in.
pub struct Cpu {
    isa: Isa,
    threads: usize,
    pool: Option<SpinPool>,
}

impl Cpu {
    /// The ISA from `LUTRA_ISA` (or the best supported one) and `threads` worker threads
    /// (0 means one per available core).
    pub fn new(threads: usize) -> Result<Cpu> {
        Cpu::with_isa(Isa::from_env()?, threads)
    }

    /// A context for an explicit ISA; fails if this CPU does not support it.
    pub fn with_isa(isa: Isa, threads: usize) -> Result<Cpu> {
        if !isa.is_supported() {
            return Err(KernelError::IsaUnsupported(isa.name()));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = if threads > 1 {
            let pool = SpinPool::new(threads).map_err(|e| KernelError::ThreadPool {
                threads,
                reason: e.to_string(),
            })?;
            Some(pool)
        } else {
            None
        };
        Ok(Cpu { isa, threads, pool })
    }

    /// The instruction set kernels run on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Splits `out` into chunks of `chunk` elements (the last may be shorter) and calls
    /// `work(first_index, chunk)` for each, spread over the worker threads. See [`Cpu`] for
    /// concurrent and nested calls.
    pub fn for_each_chunk<T, F>(&self, out: &mut [T], chunk: usize, work: F)
    where
        T: Send,
        F: Fn(usize, &mut [T]) + Sync + Send,
    {
        let chunk = chunk.max(1);
        match &self.pool {
            Some(pool) if out.len() > chunk => {
                let len = out.len();
                let base = SendPtr(out.as_mut_ptr());
                let base = &base;
                pool.run(len.div_ceil(chunk), &|i| {
                    let start = i * chunk;
                    let end = (start + chunk).min(len);
                    // SAFETY: `start..end` lies inside `out` (i < ⌈len/chunk⌉, so start < len).
                    // `run` hands out every index of this dispatch exactly once, also while other
                    // threads dispatch on the same pool (each dispatch has its own counter) or
                    // when this call is nested in a job (it then runs inline), so the chunks are
                    // disjoint; `out` stays mutably borrowed until `run` returns after the last call.
                    let part =
                        unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
                    work(start, part);
                });
            }
            _ => {
                for (i, part) in out.chunks_mut(chunk).enumerate() {
                    work(i * chunk, part);
                }
            }
        }
    }

    /// Runs `work(i)` for `i in 0..count`, spread over the worker threads. See [`Cpu`] for
    /// concurrent and nested calls.
    pub fn for_each_index<F>(&self, count: usize, work: F)
    where
        F: Fn(usize) + Sync + Send,
    {
        match &self.pool {
            Some(pool) if count > 1 => pool.run(count, &work),
            _ => (0..count).for_each(work),
        }
    }
}

/// A raw pointer that may cross threads; `for_each_chunk` guarantees disjoint use.
struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only used to build disjoint sub-slices of a `&mut [T]` with `T: Send`
// (one per index of one dispatch, each index run once), so sharing it hands each `&mut [T]` chunk
// to exactly one thread.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("isa", &self.isa)
            .field("threads", &self.threads)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_index_runs_once_on_any_thread_count() {
        for threads in [1, 2, 3] {
            let cpu = Cpu::with_isa(Isa::Scalar, threads).unwrap();
            for count in [0, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                // Many dispatches in a row exercise the spin/park hand-over.
                for _ in 0..50 {
                    cpu.for_each_index(count, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                }
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
            }
        }
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let cpu = Cpu::with_isa(Isa::Scalar, 2).unwrap();
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (1000, 64), (64, 64)] {
            let mut out = vec![0usize; len];
            cpu.for_each_chunk(&mut out, chunk, |first, part| {
                assert!(part.len() <= chunk);
                for (k, v) in part.iter_mut().enumerate() {
                    *v += first + k + 1;
                }
            });
            assert!(out.iter().enumerate().all(|(i, &v)| v == i + 1));
        }
    }

    #[test]
    fn workers_share_a_long_dispatch() {
        let cpu = Cpu::with_isa(Isa::Scalar, 3).unwrap();
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        cpu.for_each_index(200, |_| {
            std::thread::sleep(std::time::Duration::from_micros(200));
            threads.lock().unwrap().insert(std::thread::current().id());
        });
        assert!(
            threads.into_inner().unwrap().len() > 1,
            "only the caller ran the job"
        );
    }

    #[test]
    fn workers_park_and_wake_again() {
        let cpu = Cpu::with_isa(Isa::Scalar, 2).unwrap();
        let sum = AtomicUsize::new(0);
        cpu.for_each_index(4, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        // Longer than the spin window, so the worker parks and must be woken.
        std::thread::sleep(std::time::Duration::from_millis(20));
        cpu.for_each_index(4, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_panicking_job_reaches_the_caller() {
        let cpu = Cpu::with_isa(Isa::Scalar, 2).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cpu.for_each_index(8, |i| assert!(i != 5, "boom"));
        }));
        assert!(result.is_err());
        // The pool still works afterwards.
        let n = AtomicUsize::new(0);
        cpu.for_each_index(8, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
