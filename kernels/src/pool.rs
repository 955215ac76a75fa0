//! A small fork-join pool whose workers spin between jobs.
//!
//! Decoding one token runs a few hundred short kernel calls (a 576×576 GEMV takes ~20 µs). A pool
//! whose workers sleep between calls (rayon's) pays a futex wake-up per call, which costs more than
//! the second core saves. Here workers spin on an epoch counter for a short while after each job and
//! only then park on a condition variable, so back-to-back calls start within nanoseconds while an
//! idle engine (a chat waiting for input) still sleeps.
//!
//! # Concurrency contract
//!
//! [`SpinPool::run`] may be called from any number of threads at once:
//! - top-level dispatches take turns on a dispatch lock (uncontended in the usual single-caller
//!   case), and each dispatch keeps its own index counter, so every index of every dispatch runs
//!   exactly once and never out of range;
//! - a dispatch made from inside a job of any pool (by a worker thread, or by the dispatching
//!   thread during its own share) runs inline on the calling thread, index by index. A thread
//!   inside a job therefore never waits for a dispatch lock or for other workers, so nested
//!   dispatch cannot deadlock, and it does not touch the state of the job it is nested in.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_millis(2);

thread_local! {
    /// Whether this thread is running a job of some pool: set for good on worker threads, and on a
    /// dispatching thread while its dispatch lasts. A dispatch from such a thread runs inline.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// The state of one dispatch. It lives on the dispatching thread's stack for the whole dispatch.
struct Dispatch<'a> {
    work: &'a (dyn Fn(usize) + Sync),
    /// Work indices of this dispatch.
    count: usize,
    /// Next work index to hand out.
    next: AtomicUsize,
    /// A worker's share of this dispatch panicked.
    panicked: AtomicBool,
}

impl Dispatch<'_> {
    /// Runs indices of this dispatch until none are left. Every index below `count` is handed out
    /// exactly once, because all participants take them from the same `next`.
    fn take_work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                break;
            }
            (self.work)(i);
        }
    }
}

struct Shared {
    /// Bumped once per dispatch (and on shutdown); workers wait for it to change.
    epoch: AtomicU64,
    /// The open dispatch (a `Dispatch` on its dispatcher's stack), or null. Workers join only the
    /// dispatch they read here after counting themselves in `active` (see `SpinPool::run`).
    current: AtomicPtr<()>,
    /// Workers that may be using the dispatch they read from `current`.
    active: AtomicUsize,
    /// Held for the whole of a top-level dispatch: one dispatch at a time owns `current`.
    dispatch: Mutex<()>,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    parking: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Worker threads that run `Fn(index)` jobs together with the calling thread.
pub(crate) struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl SpinPool {
    /// A pool of `threads − 1` workers (the caller is the last participant).
    pub(crate) fn new(threads: usize) -> std::io::Result<SpinPool> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            current: AtomicPtr::new(std::ptr::null_mut()),
            active: AtomicUsize::new(0),
            dispatch: Mutex::new(()),
            sleepers: AtomicUsize::new(0),
            parking: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut pool = SpinPool {
            shared,
            workers: Vec::with_capacity(threads.saturating_sub(1)),
        };
        for i in 1..threads {
            let shared = Arc::clone(&pool.shared);
            // On failure `pool` is dropped, which stops the workers already started.
            let handle = std::thread::Builder::new()
                .name(format!("lutra-{i}"))
                .spawn(move || worker(&shared))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Runs `work(i)` for every `i in 0..count` on the workers and the calling thread, and returns
    /// when all calls have returned. A panic in `work` is re-raised here.
    ///
    /// Safe to call from several threads at once (they take turns) and from inside a job (the
    /// nested dispatch runs inline on the calling thread); see the module docs.
    pub(crate) fn run(&self, count: usize, work: &(dyn Fn(usize) + Sync)) {
        if IN_JOB.get() {
            (0..count).for_each(work);
            return;
        }
        let s = &*self.shared;
        let _turn = lock(&s.dispatch);
        let _in_job = JobScope::enter();
        let dispatch = Dispatch {
            work,
            count,
            next: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        // Publish the dispatch. `current` is null here: the previous holder of the dispatch lock
        // reset it before releasing the lock.
        s.current.store(
            (&dispatch as *const Dispatch<'_>).cast_mut().cast(),
            Ordering::SeqCst,
        );
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&s.parking);
            s.wake.notify_all();
        }
        // The caller works too; a worker that is not running right now (more threads than free
        // cores) simply never joins, and the caller does its share instead of waiting for it.
        let mine = catch_unwind(AssertUnwindSafe(|| dispatch.take_work()));
        // Close the dispatch, then wait for every worker that may have read it. A worker counts
        // itself in `active` before it reads `current`, and all these accesses are SeqCst: a
        // worker that read `&dispatch` did so before the store below, so its increment comes
        // before the loads below, which wait for its decrement. A worker that reads after the
        // store sees null and never touches `dispatch`.
        s.current.store(std::ptr::null_mut(), Ordering::SeqCst);
        let mut spins = 0u32;
        while s.active.load(Ordering::SeqCst) > 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if dispatch.panicked.load(Ordering::SeqCst) {
            panic!("a lutra worker thread panicked while running a kernel");
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _guard = lock(&self.shared.parking);
            self.shared.wake.notify_all();
        }
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Marks the current thread as inside a job until dropped (also when a panic unwinds).
struct JobScope {
    was: bool,
}

impl JobScope {
    fn enter() -> JobScope {
        JobScope {
            was: IN_JOB.replace(true),
        }
    }
}

impl Drop for JobScope {
    fn drop(&mut self) {
        IN_JOB.set(self.was);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a job panicked; the guarded data (nothing) is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(s: &Shared) {
    // Everything a worker runs is a job, so its own dispatches run inline.
    IN_JOB.set(true);
    let mut seen = 0u64;
    loop {
        // Spin for new work, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut guard = lock(&s.parking);
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        // Count in, then read the open dispatch (the order `SpinPool::run` relies on). The
        // dispatch read may be a later one than the epoch that woke this worker; any open one is
        // fine to help with.
        s.active.fetch_add(1, Ordering::SeqCst);
        let current = s.current.load(Ordering::SeqCst);
        if !current.is_null() {
            // SAFETY: `current` points to the `Dispatch` of a `run` call that has not yet reset
            // `current` (this load precedes that reset), and that call keeps the dispatch alive
            // until `active` drops to zero, which needs the decrement below. Only shared access is
            // taken: `work` is `Sync` and the counters are atomics, so concurrent workers are fine.
            let dispatch = unsafe { &*current.cast::<Dispatch<'_>>() };
            if catch_unwind(AssertUnwindSafe(|| dispatch.take_work())).is_err() {
                dispatch.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}
