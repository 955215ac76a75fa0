//! One decode step (one token through the whole model) on synthetic weights of real shapes:
//! SmolLM2-135M at 4 bits and Llama-2-7B at 2 bits, on 1 and 2 threads.
//!
//! Run with `cargo bench --bench decode`. Weights are random; decode speed depends only on the
//! shapes and bit widths. A 7B step takes 0.1–0.3 s here, hence the small sample sizes.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lutra::llama::LoadOptions;
use lutra_runtime::fixtures::synthetic_model;
use lutra_tooling::synthetic;

/// Position the measured step is decoded at: a short prompt's worth of cache.
const POSITION: usize = 16;

fn decode_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for (name, bits) in [("smollm2-135m", 4u8), ("llama2-7b", 2u8)] {
        let shape = synthetic::shape(name).expect("a known synthetic shape");
        for threads in [1usize, 2] {
            let opts = LoadOptions {
                threads,
                context_length: Some(POSITION + 1),
                ..LoadOptions::default()
            };
            let model = synthetic_model(
                shape.benchmark_config(),
                bits,
                shape.default_group_size,
                &opts,
                7,
            )
            .expect("synthetic model");
            let vocab = model.config().vocab_size;
            let mut logits = vec![0.0f32; vocab];
            let mut cache = model.new_cache();
            let prompt: Vec<u32> = (0..POSITION as u32).map(|i| i * 7 % vocab as u32).collect();
            model
                .forward(&prompt, &mut cache, &mut logits)
                .expect("prefill");
            let id = BenchmarkId::new(format!("{name}-{bits}bit"), format!("{threads}t"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    // Decode at the same position every time: drop the previous step's entry.
                    cache.truncate(POSITION);
                    model
                        .forward(&[42], &mut cache, &mut logits)
                        .expect("decode step");
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
