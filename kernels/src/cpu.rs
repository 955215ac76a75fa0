//! The compute context: which ISA to run and on how many threads.

use crate::error::{KernelError, Result};
use crate::isa::Isa;

/// The ISA and worker threads every kernel call runs with.
///
/// The caller owns it (no global pool is used implicitly). With one thread no pool is created and
/// work runs on the calling thread.
pub struct Cpu {
    isa: Isa,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
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
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("lutra-{i}"))
                .build()
                .map_err(|e| KernelError::ThreadPool {
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
    /// `work(first_index, chunk)` for each, spread over the worker threads.
    pub fn for_each_chunk<T, F>(&self, out: &mut [T], chunk: usize, work: F)
    where
        T: Send,
        F: Fn(usize, &mut [T]) + Sync + Send,
    {
        let chunk = chunk.max(1);
        match &self.pool {
            Some(pool) if out.len() > chunk => pool.install(|| {
                use rayon::prelude::*;
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(i, part)| work(i * chunk, part));
            }),
            _ => {
                for (i, part) in out.chunks_mut(chunk).enumerate() {
                    work(i * chunk, part);
                }
            }
        }
    }

    /// Runs `work(i)` for `i in 0..count`, spread over the worker threads.
    pub fn for_each_index<F>(&self, count: usize, work: F)
    where
        F: Fn(usize) + Sync + Send,
    {
        match &self.pool {
            Some(pool) if count > 1 => pool.install(|| {
                use rayon::prelude::*;
                (0..count).into_par_iter().for_each(&work);
            }),
            _ => (0..count).for_each(work),
        }
    }
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("isa", &self.isa)
            .field("threads", &self.threads)
            .finish()
    }
}
