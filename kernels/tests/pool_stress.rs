//! Concurrent and nested dispatch on one shared `Cpu`: every index of every dispatch runs exactly
//! once and never out of range, and nothing deadlocks (a watchdog fails a test that hangs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use lutra_kernels::{Cpu, Isa};

/// Longest a test may run before it counts as deadlocked.
const LIMIT: Duration = Duration::from_secs(30);

/// OS threads that dispatch on the shared `Cpu` at the same time.
const DISPATCHERS: usize = 4;

/// Runs `body` on its own thread and fails if it panics or has not finished within [`LIMIT`].
fn within_limit(what: &str, body: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        body();
        let _ = done.send(());
    });
    match finished.recv_timeout(LIMIT) {
        Ok(()) => handle.join().expect("body finished"),
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(payload) = handle.join() {
                std::panic::resume_unwind(payload);
            }
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {LIMIT:?}: the pool deadlocked")
        }
    }
}

/// A small deterministic generator for dispatch sizes.
fn next(state: &mut u64) -> usize {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 33) as usize
}

/// What one dispatch did wrong, if anything.
#[derive(Debug, Default, PartialEq)]
struct Faults {
    out_of_range: usize,
    wrong_counts: usize,
}

fn check(hits: &[AtomicUsize], out_of_range: &AtomicUsize, expected: usize) -> Faults {
    Faults {
        out_of_range: out_of_range.load(Ordering::Relaxed),
        wrong_counts: hits
            .iter()
            .filter(|h| h.load(Ordering::Relaxed) != expected)
            .count(),
    }
}

/// Several threads call `for_each_index` on one `Cpu` at once; each dispatch must see every one of
/// its indices exactly once.
#[test]
fn concurrent_index_dispatches_each_run_every_index_once() {
    within_limit("concurrent for_each_index", || {
        for threads in [2, 3, 4] {
            let cpu = Arc::new(Cpu::with_isa(Isa::Scalar, threads).unwrap());
            let faulty = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for d in 0..DISPATCHERS {
                    let (cpu, faulty) = (&cpu, &faulty);
                    scope.spawn(move || {
                        let mut state = d as u64 + 1;
                        for _ in 0..1500 {
                            let count = 1 + next(&mut state) % 97;
                            let hits: Vec<AtomicUsize> =
                                (0..count).map(|_| AtomicUsize::new(0)).collect();
                            let out_of_range = AtomicUsize::new(0);
                            cpu.for_each_index(count, |i| match hits.get(i) {
                                Some(h) => {
                                    h.fetch_add(1, Ordering::Relaxed);
                                }
                                None => {
                                    out_of_range.fetch_add(1, Ordering::Relaxed);
                                }
                            });
                            if check(&hits, &out_of_range, 1) != Faults::default() {
                                faulty.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(
                faulty.load(Ordering::Relaxed),
                0,
                "dispatches with an index run twice, skipped or out of range ({threads} threads)"
            );
        }
    });
}

/// Several threads call `for_each_chunk` on one `Cpu` at once; every element of each output is
/// written exactly once, and every chunk lies inside its slice.
#[test]
fn concurrent_chunk_dispatches_cover_each_slice_once() {
    within_limit("concurrent for_each_chunk", || {
        for threads in [2, 4] {
            let cpu = Arc::new(Cpu::with_isa(Isa::Scalar, threads).unwrap());
            let faulty = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for d in 0..DISPATCHERS {
                    let (cpu, faulty) = (&cpu, &faulty);
                    scope.spawn(move || {
                        let mut state = 100 + d as u64;
                        for _ in 0..1500 {
                            let len = 2 + next(&mut state) % 200;
                            let chunk = 1 + next(&mut state) % 9;
                            let mut out = vec![0usize; len];
                            let bad_chunks = AtomicUsize::new(0);
                            cpu.for_each_chunk(&mut out, chunk, |first, part| {
                                if part.len() > chunk
                                    || first % chunk != 0
                                    || first + part.len() > len
                                {
                                    bad_chunks.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                                for (k, v) in part.iter_mut().enumerate() {
                                    *v += first + k + 1;
                                }
                            });
                            let wrong = out.iter().enumerate().any(|(i, &v)| v != i + 1);
                            if wrong || bad_chunks.load(Ordering::Relaxed) > 0 {
                                faulty.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(
                faulty.load(Ordering::Relaxed),
                0,
                "chunk dispatches with a chunk written twice, skipped or out of bounds ({threads} threads)"
            );
        }
    });
}

/// A job that dispatches again on the same `Cpu` (from the workers' share and the caller's share
/// alike) completes, and every inner index runs exactly once per outer index.
#[test]
fn nested_dispatch_runs_every_index_once() {
    within_limit("nested dispatch", || {
        for threads in [2, 3, 4] {
            let cpu = Cpu::with_isa(Isa::Scalar, threads).unwrap();
            for round in 0..200 {
                let (outer, inner) = (1 + round % 7, 1 + round % 13);
                let hits: Vec<AtomicUsize> =
                    (0..outer * inner).map(|_| AtomicUsize::new(0)).collect();
                let out_of_range = AtomicUsize::new(0);
                cpu.for_each_index(outer, |i| {
                    cpu.for_each_index(inner, |j| {
                        match (j < inner).then(|| &hits[i * inner + j]) {
                            Some(h) => {
                                h.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {
                                out_of_range.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                });
                assert_eq!(
                    check(&hits, &out_of_range, 1),
                    Faults::default(),
                    "nested for_each_index, {threads} threads, {outer}×{inner}"
                );

                let mut out = vec![0usize; outer * inner];
                cpu.for_each_chunk(&mut out, inner, |first, part| {
                    assert_eq!(
                        part.len(),
                        inner.min(outer * inner - first),
                        "outer chunk length"
                    );
                    cpu.for_each_chunk(part, 2, |k, pair| {
                        for (e, v) in pair.iter_mut().enumerate() {
                            *v += first + k + e + 1;
                        }
                    });
                });
                assert!(
                    out.iter().enumerate().all(|(i, &v)| v == i + 1),
                    "nested for_each_chunk, {threads} threads, {outer}×{inner}"
                );
            }
        }
    });
}

/// Concurrent dispatchers whose jobs dispatch again: both rules at once.
#[test]
fn concurrent_nested_dispatches_complete() {
    within_limit("concurrent nested dispatch", || {
        let cpu = Arc::new(Cpu::with_isa(Isa::Scalar, 3).unwrap());
        let faulty = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for d in 0..DISPATCHERS {
                let (cpu, faulty) = (&cpu, &faulty);
                scope.spawn(move || {
                    let mut state = 7 + d as u64;
                    for _ in 0..300 {
                        let outer = 1 + next(&mut state) % 6;
                        let inner = 1 + next(&mut state) % 11;
                        let hits: Vec<AtomicUsize> =
                            (0..outer * inner).map(|_| AtomicUsize::new(0)).collect();
                        let out_of_range = AtomicUsize::new(0);
                        cpu.for_each_index(outer, |i| {
                            if i >= outer {
                                out_of_range.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            cpu.for_each_index(inner, |j| match hits.get(i * inner + j) {
                                Some(h) if j < inner => {
                                    h.fetch_add(1, Ordering::Relaxed);
                                }
                                _ => {
                                    out_of_range.fetch_add(1, Ordering::Relaxed);
                                }
                            });
                        });
                        if check(&hits, &out_of_range, 1) != Faults::default() {
                            faulty.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            faulty.load(Ordering::Relaxed),
            0,
            "faulty nested dispatches"
        );
    });
}
