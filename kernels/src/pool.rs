//! A small fork-join pool whose workers spin between jobs.
//!
//! Decoding one token runs a few hundred short kernel calls (a 576×576 GEMV takes ~20 µs). A pool
//! whose workers sleep between calls (rayon's) pays a futex wake-up per call, which costs more than
//! the second core saves. Here workers spin on an epoch counter for a short while after each job and
//! only then park on a condition variable, so back-to-back calls start within nanoseconds while an
//! idle engine (a chat waiting for input) still sleeps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_millis(2);

/// The job of one dispatch, with its lifetime erased (see `SpinPool::run`).
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per dispatch; workers wait for it to change.
    epoch: AtomicU64,
    /// The current job; written by the dispatcher before `epoch` is bumped.
    job: Mutex<Option<SendJob>>,
    /// Next work index to hand out.
    next: AtomicUsize,
    /// Work indices of the current job.
    count: AtomicUsize,
    /// Workers currently inside a job (they joined it before it was closed).
    active: AtomicUsize,
    /// The epoch of the last job whose dispatcher stopped accepting late workers.
    closed: AtomicU64,
    /// A worker's job panicked.
    panicked: AtomicBool,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    parking: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is `Sync` (shared calls are fine from any thread) and is only dereferenced
// while the dispatching `run` call, which keeps it alive, waits for every worker to finish.
unsafe impl Send for SendJob {}

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
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            closed: AtomicU64::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            parking: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::with_capacity(threads.saturating_sub(1));
        for i in 1..threads {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("lutra-{i}"))
                .spawn(move || worker(&shared))?;
            workers.push(handle);
        }
        Ok(SpinPool { shared, workers })
    }

    /// Runs `work(i)` for every `i in 0..count` on the workers and the calling thread, and returns
    /// when all calls have returned. A panic in `work` is re-raised here.
    pub(crate) fn run(&self, count: usize, work: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. A worker dereferences the pointer only while it is
        // counted in `active`, having joined before the job was closed; this function closes the
        // job and then waits for `active` to drop to zero before returning, so `work` outlives every use.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(work) };
        *lock(&s.job) = Some(SendJob(job));
        s.count.store(count, Ordering::SeqCst);
        s.next.store(0, Ordering::SeqCst);
        let epoch = s.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&s.parking);
            s.wake.notify_all();
        }
        // The caller works too; a worker that is not running right now (more threads than free
        // cores) simply never joins, and the caller does its share instead of waiting for it.
        let mine = catch_unwind(AssertUnwindSafe(|| take_work(s, work)));
        s.closed.store(epoch, Ordering::SeqCst);
        let mut spins = 0u32;
        while s.active.load(Ordering::SeqCst) > 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *lock(&s.job) = None;
        let worker_panicked = s.panicked.swap(false, Ordering::SeqCst);
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if worker_panicked {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a job panicked; the data (a pointer or nothing) is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn take_work(s: &Shared, work: &(dyn Fn(usize) + Sync)) {
    let count = s.count.load(Ordering::SeqCst);
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            break;
        }
        work(i);
    }
}

fn worker(s: &Shared) {
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
        // Join the job unless its dispatcher has already closed it (see `SpinPool::run`).
        s.active.fetch_add(1, Ordering::SeqCst);
        if s.closed.load(Ordering::SeqCst) != seen {
            let job = *lock(&s.job);
            if let Some(SendJob(job)) = job {
                // SAFETY: this worker is counted in `active` and joined before the job was closed,
                // so the dispatcher keeps the job alive until the decrement below.
                let work = unsafe { &*job };
                if catch_unwind(AssertUnwindSafe(|| take_work(s, work))).is_err() {
                    s.panicked.store(true, Ordering::SeqCst);
                }
            }
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}
