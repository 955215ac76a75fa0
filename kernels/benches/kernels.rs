//! Criterion benches of the kernels: GEMV (N = 1) and GEMM (N = 8, 64, 512) on the shapes of
//! `measure::DEFAULT_SHAPES` for LUT 1–4 bits, ternary (2-bit planes and 1.67-bit), int8 and the
//! dequantize-then-dot baseline, on 1 and 2 threads, plus the memory read-bandwidth probe they are
//! judged against, and the repack of a 4096×4096 matrix of 4-bit codes into bit planes
//! (`pack/4096x4096/b4`, what loading a Q4_0 file spends most of its time on).
//!
//! Group names are `{M}x{K}/t{threads}/n{N}`, bench names the kernel (`lut2`, `int8`, `dequant4`,
//! ...), so `cargo bench -p lutra-kernels --features measure -- '4096x4096/t1/n1/'` runs one group. Samples are few and
//! short: the whole grid takes tens of minutes, mostly in the N = 512 cases of the 7B shapes.
//! `LUTRA_BENCH` takes a `measure::CaseFilter` string (e.g. `kernel=lut2,int8;tokens=1`) to skip
//! preparing matrices that a criterion name filter would skip anyway.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lutra_kernels::measure::{
    default_cases, measure_cases, read_bandwidth, CaseFilter, KernelCase, MeasureOptions,
    PreparedCase, BANDWIDTH_BYTES, DEFAULT_SHAPES,
};
use lutra_kernels::{Grouping, PackedMatrix, PlaneScales, QuantSpec, QuantizedWeights};

fn bench_bandwidth(c: &mut Criterion) {
    let mut group = c.benchmark_group("bandwidth");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(BANDWIDTH_BYTES as u64));
    for threads in [1, 2] {
        group.bench_function(BenchmarkId::new("read", format!("t{threads}")), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    match read_bandwidth(threads, BANDWIDTH_BYTES, 1) {
                        Ok(record) => total += Duration::from_secs_f64(record.median_us * 1e-6),
                        Err(e) => panic!("bandwidth probe failed: {e}"),
                    }
                }
                total
            })
        });
    }
    group.finish();
}

fn bench_packing(c: &mut Criterion) {
    let (rows, cols, bits) = (4096, 4096, 4u8);
    let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 13) as u8).collect();
    let scales: Vec<f32> = (0..rows * cols / 32)
        .map(|i| 0.01 + (i % 5) as f32 * 1e-3)
        .collect();
    let offsets: Vec<f32> = scales.iter().map(|s| -8.0 * s).collect();
    let weights = QuantizedWeights {
        spec: QuantSpec {
            rows,
            cols,
            bits,
            grouping: Grouping::Size(32),
            plane_scales: PlaneScales::Uniform,
        },
        codes: &codes,
        scales: &scales,
        offsets: Some(&offsets),
    };
    let mut group = c.benchmark_group("pack");
    group.sample_size(10);
    group.throughput(Throughput::Elements((rows * cols) as u64));
    group.bench_function(format!("{rows}x{cols}/b{bits}"), |b| {
        b.iter(|| PackedMatrix::pack(&weights).expect("valid codes"))
    });
    group.finish();
}

fn bench_kernels(c: &mut Criterion) {
    let filter = match std::env::var("LUTRA_BENCH") {
        Ok(text) => CaseFilter::parse(&text).unwrap_or_else(|e| panic!("LUTRA_BENCH: {e}")),
        Err(_) => CaseFilter::default(),
    };
    let cases = filter.apply(&default_cases());
    for (rows, cols) in DEFAULT_SHAPES {
        let shape_cases: Vec<KernelCase> = cases
            .iter()
            .filter(|k| (k.rows, k.cols) == (rows, cols))
            .copied()
            .collect();
        // Pack each (shape, kernel) once and sweep threads and N over it.
        let mut kinds = Vec::new();
        for case in &shape_cases {
            if !kinds.contains(&case.kind) {
                kinds.push(case.kind);
            }
        }
        for kind in kinds {
            let Some(first) = shape_cases.iter().find(|k| k.kind == kind) else {
                continue;
            };
            let mut prepared =
                PreparedCase::new(first, None).unwrap_or_else(|e| panic!("{first:?}: {e}"));
            for case in shape_cases.iter().filter(|k| k.kind == kind) {
                prepared
                    .set_threads_and_tokens(case.threads, case.tokens)
                    .unwrap_or_else(|e| panic!("{case:?}: {e}"));
                let mut group =
                    c.benchmark_group(format!("{rows}x{cols}/t{}/n{}", case.threads, case.tokens));
                group
                    .sample_size(10)
                    .sampling_mode(SamplingMode::Flat)
                    .warm_up_time(Duration::from_millis(300))
                    .measurement_time(Duration::from_secs(1))
                    .throughput(Throughput::Bytes(prepared.weight_bytes() as u64));
                group.bench_function(kind.name(), |b| {
                    // Weights start cold each time, as in inference (see MeasureOptions::cold_cache).
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            prepared.evict_caches();
                            let t0 = Instant::now();
                            prepared.run().unwrap_or_else(|e| panic!("{case:?}: {e}"));
                            total += t0.elapsed();
                        }
                        total
                    })
                });
                group.finish();
            }
        }
    }
}

/// `LUTRA_BENCH_JSON=1`: skip criterion and print one `measure` record per line (same cases).
fn print_records() {
    let filter = match std::env::var("LUTRA_BENCH") {
        Ok(text) => CaseFilter::parse(&text).unwrap_or_else(|e| panic!("LUTRA_BENCH: {e}")),
        Err(_) => CaseFilter::default(),
    };
    for threads in [1, 2] {
        match read_bandwidth(threads, BANDWIDTH_BYTES, 5) {
            Ok(record) => println!("{}", record.to_json()),
            Err(e) => panic!("bandwidth probe failed: {e}"),
        }
    }
    let options = MeasureOptions::default();
    if let Err(e) = measure_cases(&filter.apply(&default_cases()), &options, |r| {
        println!("{}", r.to_json())
    }) {
        panic!("measurement failed: {e}");
    }
}

fn main() {
    if std::env::var("LUTRA_BENCH_JSON").is_ok_and(|v| v == "1") {
        return print_records();
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_packing(&mut criterion);
    bench_bandwidth(&mut criterion);
    bench_kernels(&mut criterion);
    criterion.final_summary();
}
