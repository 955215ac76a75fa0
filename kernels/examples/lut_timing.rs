//! Quick release-mode timing of the LUT kernels on one large shape.
//!
//! `cargo run --release -p lutra-kernels --example lut_timing -- [M] [K] [N] [threads]`
//! (defaults: 4096 14336 1 1); prints the best of several runs per bit width and the table build time.
//! `BITS=2,t` picks the bit widths; `t` is the 1.67-bit ternary kernel (`TernaryMatrix`, per-row scales).
//! `GROUP=32` sets the weight group size of the `BITS` forms (default 128).
//! `KQUANT=2,3,4,5,6` also times the super-block forms of Q2_K..Q6_K (`PackedMatrix::pack_super_blocks`).

use std::time::Instant;

use lutra_kernels::{
    ActivationTables, Cpu, Grouping, PackedMatrix, PlaneScales, QuantSpec, QuantizedWeights,
    SuperBlockWeights, TernaryMatrix, TernaryTables, TernaryWeights, SUPER_BLOCK,
};

/// CPU time of the calling thread in seconds (Linux `schedstat`), so that timings on a loaded machine
/// count only the time this thread ran; wall time where unavailable. With several threads the pool's
/// threads are not counted: use 1 thread for CPU-time figures.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(s.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
}

/// Best wall seconds of `reps` runs of `f`, and the calling thread's mean CPU seconds per run (the
/// CPU clock advances only at scheduler events, so it is read once around all runs).
fn best_of(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut wall = f64::MAX;
    let c0 = cpu_seconds();
    for _ in 0..reps {
        let t = Instant::now();
        f();
        wall = wall.min(t.elapsed().as_secs_f64());
    }
    let cpu = match (c0, cpu_seconds()) {
        (Some(c0), Some(c1)) => (c1 - c0) / reps.max(1) as f64,
        _ => f64::NAN,
    };
    (wall, cpu)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (rows, cols, tokens, threads) = (arg(0, 4096), arg(1, 14336), arg(2, 1), arg(3, 1));
    let (bits_list, ternary): (Vec<u8>, bool) = match std::env::var("BITS") {
        Ok(v) => (
            v.split(',')
                .filter(|b| *b != "t")
                .map(|b| b.parse())
                .collect::<Result<_, _>>()?,
            v.split(',').any(|b| b == "t"),
        ),
        Err(_) => (vec![1, 2, 3, 4], true),
    };
    let per_plane = std::env::var("PER_PLANE").is_ok();
    let group: usize = match std::env::var("GROUP") {
        Ok(g) => g.parse()?,
        Err(_) => 128,
    };
    let cpu = Cpu::new(threads)?;
    println!(
        "isa {} threads {} M {rows} K {cols} N {tokens}",
        cpu.isa(),
        cpu.threads()
    );

    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let mut tables = ActivationTables::new(cols);
    let reps = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if tokens > 1 { 3 } else { 30 });
    tables.build(&cpu, &x, tokens)?;
    let (wall, cpu_s) = best_of(reps, || tables.build(&cpu, &x, tokens).unwrap_or(()));
    println!(
        "table build: best wall {:.3} ms, mean thread cpu {:.3} ms",
        wall * 1e3,
        cpu_s * 1e3
    );

    for bits in bits_list {
        let codes: Vec<u8> = (0..rows * cols)
            .map(|_| (next() % (1 << bits)) as u8)
            .collect();
        let groups = rows * cols / group;
        let nps = if per_plane { usize::from(bits) } else { 1 };
        let scales: Vec<f32> = (0..groups * nps)
            .map(|i| 0.01 + (i % 7) as f32 * 0.001)
            .collect();
        let offsets: Vec<f32> = (0..groups)
            .map(|i| -0.02 - (i % 5) as f32 * 0.001)
            .collect();
        let spec = QuantSpec {
            rows,
            cols,
            bits,
            grouping: Grouping::Size(group),
            plane_scales: if per_plane {
                PlaneScales::PerPlane
            } else {
                PlaneScales::Uniform
            },
        };
        let w = QuantizedWeights {
            spec,
            codes: &codes,
            scales: &scales,
            offsets: Some(&offsets),
        };
        let m = PackedMatrix::pack(&w)?;
        let mut out = vec![0.0f32; tokens * rows];
        m.matmul(&cpu, &tables, &mut out)?;
        let (best, cpu_s) = best_of(reps, || m.matmul(&cpu, &tables, &mut out).unwrap_or(()));
        println!(
            "{bits}-bit: best wall {:.3} ms, mean thread cpu {:.3} ms ({:.1} GB/s of packed weights, {:.2} MB) checksum {:.3}",
            best * 1e3,
            cpu_s * 1e3,
            m.bytes() as f64 / best / 1e9,
            m.bytes() as f64 / 1e6,
            out.iter().map(|v| v.abs() as f64).sum::<f64>()
        );
    }
    let kquants: Vec<u8> = match std::env::var("KQUANT") {
        Ok(v) => v.split(',').map(|b| b.parse()).collect::<Result<_, _>>()?,
        Err(_) => Vec::new(),
    };
    for bits in kquants {
        // (group, zero point, mins) of Q2_K..Q6_K.
        let (group, zero_point, mins) = match bits {
            2 => (16, 0, true),
            3 => (16, 4, false),
            4 | 5 => (32, 0, true),
            _ => (16, 32, false),
        };
        let codes: Vec<u8> = (0..rows * cols)
            .map(|_| (next() % (1 << bits)) as u8)
            .collect();
        let groups = rows * cols / group;
        let supers = rows * cols / SUPER_BLOCK;
        let sub_scales: Vec<i8> = (0..groups).map(|_| (next() % 64) as i8 - 16).collect();
        let sub_mins: Vec<u8> = (0..groups).map(|_| (next() % 64) as u8).collect();
        let d: Vec<u16> = (0..supers)
            .map(|i| half::f16::from_f32(0.001 + (i % 7) as f32 * 1e-4).to_bits())
            .collect();
        let w = SuperBlockWeights {
            rows,
            cols,
            bits,
            group,
            zero_point,
            codes: &codes,
            sub_scales: &sub_scales,
            sub_mins: mins.then_some(&sub_mins[..]),
            d: &d,
            dmin: mins.then_some(&d[..]),
        };
        let m = PackedMatrix::pack_super_blocks(&w)?;
        let mut out = vec![0.0f32; tokens * rows];
        m.matmul(&cpu, &tables, &mut out)?;
        let (best, cpu_s) = best_of(reps, || m.matmul(&cpu, &tables, &mut out).unwrap_or(()));
        println!(
            "Q{bits}_K: best wall {:.3} ms, mean thread cpu {:.3} ms ({:.1} GB/s of packed weights, {:.2} MB) checksum {:.3}",
            best * 1e3,
            cpu_s * 1e3,
            m.bytes() as f64 / best / 1e9,
            m.bytes() as f64 / 1e6,
            out.iter().map(|v| v.abs() as f64).sum::<f64>()
        );
    }
    if ternary {
        let codes: Vec<u8> = (0..rows * cols).map(|_| (next() % 3) as u8).collect();
        let scales: Vec<f32> = (0..rows).map(|i| 0.01 + (i % 7) as f32 * 0.001).collect();
        let w = TernaryWeights {
            rows,
            cols,
            grouping: Grouping::PerRow,
            codes: &codes,
            scales: &scales,
        };
        let m = TernaryMatrix::pack(&w)?;
        let mut tables = TernaryTables::new(cols);
        tables.build(&cpu, &x, tokens)?;
        let (wall, cpu_s) = best_of(reps, || tables.build(&cpu, &x, tokens).unwrap_or(()));
        println!(
            "ternary table build: best wall {:.3} ms, mean thread cpu {:.3} ms",
            wall * 1e3,
            cpu_s * 1e3
        );
        let mut out = vec![0.0f32; tokens * rows];
        m.matmul(&cpu, &tables, &mut out)?;
        let (best, cpu_s) = best_of(reps, || m.matmul(&cpu, &tables, &mut out).unwrap_or(()));
        println!(
            "ternary {:.3} bpw: best wall {:.3} ms, mean thread cpu {:.3} ms ({:.1} GB/s of packed weights, {:.2} MB) checksum {:.3}",
            m.bits_per_weight(),
            best * 1e3,
            cpu_s * 1e3,
            m.bytes() as f64 / best / 1e9,
            m.bytes() as f64 / 1e6,
            out.iter().map(|v| v.abs() as f64).sum::<f64>()
        );
    }
    Ok(())
}
