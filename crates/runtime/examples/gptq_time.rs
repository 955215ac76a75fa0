//! Times GPTQ (act-order, lazy blocks of 128) on random matrices with a random correlated
//! Hessian: `cargo run --release -p lutra-runtime --example gptq_time -- [ROWSxCOLS ...]`
//! (default: SmolLM2's 1536x576 and 576x1536), and the asymmetric calibration's source shift in
//! its forms, at 2 bits in groups of 32 (`lutra quantize`'s default). Threads: `RAYON_NUM_THREADS`
//! (default 2). Time it in the release profile: the test profile's lower optimization leaves the
//! vector kernels several times slower, which misstates where the time goes.

use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use lutra_kernels::measure::SplitMix64;
use lutra_kernels::Cpu;
use lutra_runtime::quantize::{
    gptq_prepared, rtn, GptqOptions, PlaneGrid, PreparedHessian, SourcePairs, UniformGrid,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let mut shapes: Vec<(usize, usize)> = Vec::new();
    for arg in std::env::args().skip(1) {
        let (r, c) = arg.split_once('x').ok_or("shapes are ROWSxCOLS")?;
        shapes.push((r.parse()?, c.parse()?));
    }
    if shapes.is_empty() {
        shapes = vec![(1536, 576), (576, 1536)];
    }
    let mut rng = SplitMix64::new(11);
    for (rows, cols) in shapes {
        // X: 2048 rows with 16 shared factors; H = XᵀX.
        let samples = 2048;
        let loadings = Mat::<f64>::from_fn(16, cols, |_, _| f64::from(rng.gaussian()));
        let latent = Mat::<f64>::from_fn(samples, 16, |_, _| f64::from(rng.gaussian()));
        let mut x = Mat::<f64>::from_fn(samples, cols, |_, _| 0.5 * f64::from(rng.gaussian()));
        matmul(
            x.as_mut(),
            Accum::Add,
            &latent,
            &loadings,
            1.0,
            Par::rayon(threads),
        );
        let mut h = Mat::<f64>::zeros(cols, cols);
        matmul(
            h.as_mut(),
            Accum::Replace,
            x.transpose(),
            &x,
            1.0,
            Par::rayon(threads),
        );
        let hessian: Vec<f64> = (0..cols * cols).map(|i| h[(i / cols, i % cols)]).collect();
        let weights = rng.gaussians(rows * cols);
        let cpu = Cpu::new(threads)?;
        let opts = GptqOptions {
            threads,
            ..GptqOptions::default()
        };
        let uniform = UniformGrid {
            bits: 2,
            group_size: 32,
        };
        let plane = PlaneGrid {
            bits: 2,
            group_size: 32,
        };
        let t = Instant::now();
        rtn(&plane, rows, cols, &weights, None)?;
        let t_rtn = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let prepared = PreparedHessian::new(hessian.clone(), cols, &opts)?;
        let t_prepare = t.elapsed().as_secs_f64();
        // The source shift's two forms: `C·H⁻¹` once, or `(W·C)·H⁻¹` for this matrix alone.
        let cross: Vec<f64> = rng
            .gaussians(cols * cols)
            .iter()
            .zip(&hessian)
            .map(|(&g, &h)| 0.01 * h + 1e-3 * f64::from(g))
            .collect();
        let mut t_shift = [0.0f64; 2];
        for (time, served) in t_shift.iter_mut().zip([usize::MAX, rows]) {
            let t = Instant::now();
            prepared
                .source_shift(SourcePairs::Sums(cross.clone()), served)?
                .target(&weights, &cpu)?;
            *time = t.elapsed().as_secs_f64();
        }
        // From 8192 pairs of rows: their sums `C = Dᵀ·X` first, or `(W·Dᵀ)·X` from the rows.
        let n = 8192;
        let (diff, inputs) = (rng.gaussians(n * cols), rng.gaussians(n * cols));
        let t = Instant::now();
        let mut c = Mat::<f32>::zeros(cols, cols);
        matmul(
            c.as_mut(),
            Accum::Replace,
            MatRef::from_row_major_slice(&diff, n, cols).transpose(),
            MatRef::from_row_major_slice(&inputs, n, cols),
            1.0,
            Par::rayon(threads),
        );
        let sums = (0..cols * cols)
            .map(|i| f64::from(c[(i / cols, i % cols)]))
            .collect();
        prepared
            .source_shift(SourcePairs::Sums(sums), rows)?
            .target(&weights, &cpu)?;
        let t_sums = t.elapsed().as_secs_f64();
        let t = Instant::now();
        prepared
            .source_shift(
                SourcePairs::Rows {
                    diff,
                    inputs: vec![inputs],
                    rotation: None,
                },
                rows,
            )?
            .target(&weights, &cpu)?;
        let t_rows = t.elapsed().as_secs_f64();
        println!(
            "{rows}x{cols}, {threads} threads: source shift C·H⁻¹ then W·(C·H⁻¹) {:.2} s, \
             (W·C)·H⁻¹ {:.2} s; from {n} pairs of rows: C then (W·C)·H⁻¹ {t_sums:.2} s, \
             ((W·Dᵀ)·X)·H⁻¹ {t_rows:.2} s",
            t_shift[0], t_shift[1]
        );
        let t = Instant::now();
        gptq_prepared(&uniform, rows, cols, &weights, &prepared, &opts)?;
        let t_uniform = t.elapsed().as_secs_f64();
        let t = Instant::now();
        gptq_prepared(&plane, rows, cols, &weights, &prepared, &opts)?;
        let t_plane = t.elapsed().as_secs_f64();
        println!(
            "{rows}x{cols}, {threads} threads: Hessian factor {t_prepare:.2} s, then gptq uniform \
             2b g32 {t_uniform:.2} s, gptq hlq 2b g32 {t_plane:.2} s (rtn hlq {t_rtn:.2} s)"
        );
    }
    Ok(())
}
