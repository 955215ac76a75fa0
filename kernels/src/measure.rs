//! Kernel measurement: random weights of a given shape, packed, multiplied and timed.
//!
//! Used by `lutra bench-kernels` and the criterion benches. [`measure_cases`] runs a list of
//! [`KernelCase`]s ([`default_cases`] is the full grid, [`CaseFilter`] picks a subset) and returns
//! one [`KernelRecord`] per case: the median time of one matmul and the effective weight bandwidth
//! (weight bytes / median time). [`read_bandwidth`] measures what memory can deliver, the bound a
//! memory-bound GEMV is judged against.
//!
//! ```
//! use lutra_kernels::measure::{measure_case, KernelCase, KernelKind, MeasureOptions};
//!
//! let case = KernelCase { kind: KernelKind::Int8, rows: 64, cols: 256, threads: 1, tokens: 1 };
//! let record = measure_case(&case, &MeasureOptions { warmup: 1, repetitions: 3, ..Default::default() }).unwrap();
//! assert_eq!(record.kernel, "int8");
//! assert!(record.median_us > 0.0 && record.weight_bytes == 64 * 256 / 32 * 34);
//! ```

use std::time::{Duration, Instant};

use crate::cpu::Cpu;
use crate::error::{KernelError, Result};
use crate::int8::{Int8Activations, Int8Matrix};
use crate::isa::Isa;
use crate::packed::{
    Grouping, PackedMatrix, PlaneScales, QuantSpec, QuantizedWeights, SuperBlockWeights,
    SUPER_BLOCK,
};
use crate::tables::ActivationTables;
use crate::ternary::{TernaryMatrix, TernaryTables, TernaryWeights};

mod cases;
mod dequant;

pub use crate::rng::SplitMix64;
pub use cases::{
    default_cases, kinds_for, CaseFilter, DEFAULT_SHAPES, DEFAULT_THREADS, DEFAULT_TOKENS,
};
pub use dequant::DequantMatrix;

/// What is multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// LUT kernel, uniform planes, `bits` ∈ 1..=4, scale and offset per group of `group_size`.
    Lut {
        /// Bits per weight.
        bits: u8,
        /// Elements per scale group.
        group_size: usize,
    },
    /// LUT kernel on ternary weights (2-bit codes {0, 1, 2}, offset −s).
    Ternary {
        /// Elements per scale group.
        group_size: usize,
    },
    /// The 1.67-bit ternary kernel ([`TernaryMatrix`], one scale per row).
    Ternary167,
    /// The int8 kernel (Q8_0 weights and activations).
    Int8,
    /// The int8 dot GEMM over the LUT-packed matrix ([`PackedMatrix::matmul_dot`]), uniform
    /// planes, `bits` ∈ 1..=6, scale and offset per group of `group_size`.
    Dot {
        /// Bits per weight.
        bits: u8,
        /// Elements per scale group.
        group_size: usize,
    },
    /// LUT kernel on the two-level scales of llama.cpp's K-quant of `bits` bits (2 to 6: Q2_K
    /// .. Q6_K; [`KQUANT_FORMS`]), as lutra packs GGUF files of that type.
    KQuant {
        /// Bits per weight.
        bits: u8,
    },
    /// The dequantize-then-dot baseline ([`DequantMatrix`], `bits` ∈ {1, 2, 4}, groups of 32).
    Dequant {
        /// Bits per weight.
        bits: u8,
    },
}

impl KernelKind {
    /// Short name used in records and filters: `lut1`..`lut4`, `ternary` (2-bit planes),
    /// `ternary1.67`, `int8`, `dequant2`, ...
    pub fn name(&self) -> String {
        match self {
            KernelKind::Lut { bits, .. } => format!("lut{bits}"),
            KernelKind::Ternary { .. } => "ternary".to_string(),
            KernelKind::Ternary167 => "ternary1.67".to_string(),
            KernelKind::Int8 => "int8".to_string(),
            KernelKind::Dot { bits, .. } => format!("dot{bits}"),
            KernelKind::KQuant { bits } => format!("q{bits}k"),
            KernelKind::Dequant { bits } => format!("dequant{bits}"),
        }
    }

    /// Bits per weight code (2 for both ternary forms: codes 0..=2; the 1.67-bit form's exact
    /// size is in the record's `weight_bytes`).
    pub fn bits(&self) -> u8 {
        match *self {
            KernelKind::Lut { bits, .. }
            | KernelKind::Dot { bits, .. }
            | KernelKind::KQuant { bits }
            | KernelKind::Dequant { bits } => bits,
            KernelKind::Ternary { .. } | KernelKind::Ternary167 => 2,
            KernelKind::Int8 => 8,
        }
    }

    /// Elements per scale group; 0 for the per-row scales of [`KernelKind::Ternary167`] (a record
    /// says K).
    pub fn group_size(&self) -> usize {
        match *self {
            KernelKind::Lut { group_size, .. }
            | KernelKind::Dot { group_size, .. }
            | KernelKind::Ternary { group_size } => group_size,
            KernelKind::Ternary167 => 0,
            KernelKind::KQuant { bits } => kquant_form(bits).map_or(0, |(_, group, ..)| group),
            KernelKind::Int8 | KernelKind::Dequant { .. } => 32,
        }
    }
}

/// One measurement: a kernel on an `rows × cols` (M×K) matrix with `tokens` inputs (N).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelCase {
    /// Kernel and quantization.
    pub kind: KernelKind,
    /// Output features M.
    pub rows: usize,
    /// Input features K (a multiple of 32).
    pub cols: usize,
    /// Worker threads.
    pub threads: usize,
    /// Tokens N (1 = GEMV).
    pub tokens: usize,
}

/// How long to measure.
#[derive(Clone, Copy, Debug)]
pub struct MeasureOptions {
    /// Untimed runs first (page faults, caches, thread start-up).
    pub warmup: usize,
    /// Timed runs; the median is reported.
    pub repetitions: usize,
    /// Stop repeating (after at least one timed run) once this much time was spent timing.
    pub max_time: Duration,
    /// ISA to run on; `None` = `LUTRA_ISA` or the best one.
    pub isa: Option<Isa>,
    /// Evict the weights from the caches before every timed run, as in inference, where the
    /// other layers' weights pass through the caches between two uses of a matrix.
    pub cold_cache: bool,
}

impl Default for MeasureOptions {
    fn default() -> MeasureOptions {
        MeasureOptions {
            warmup: 2,
            repetitions: 9,
            max_time: Duration::from_secs(3),
            isa: None,
            cold_cache: true,
        }
    }
}

/// The result of one case, ready to print as JSON ([`KernelRecord::to_json`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRecord {
    /// [`KernelKind::name`], or `read-bandwidth` for [`read_bandwidth`].
    pub kernel: String,
    /// ISA the kernel ran on.
    pub isa: String,
    /// M.
    pub rows: usize,
    /// K.
    pub cols: usize,
    /// Bits per weight.
    pub bits: u8,
    /// Elements per scale group.
    pub group_size: usize,
    /// Worker threads.
    pub threads: usize,
    /// N.
    pub tokens: usize,
    /// Median time of one matmul in microseconds (activation tables excluded).
    pub median_us: f64,
    /// Median time to build the activation tables / quantize the activations, in microseconds.
    pub prepare_us: f64,
    /// Bytes of packed weights, scales and offsets (bytes read, for the bandwidth probe).
    pub weight_bytes: usize,
    /// Effective bandwidth: `weight_bytes / median time`, in GB/s (10^9 bytes).
    pub gb_per_s: f64,
}

impl KernelRecord {
    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"kernel\":\"{}\",\"isa\":\"{}\",\"rows\":{},\"cols\":{},\"bits\":{},\"group_size\":{},\"threads\":{},\
             \"tokens\":{},\"median_us\":{:.3},\"prepare_us\":{:.3},\"weight_bytes\":{},\"gb_per_s\":{:.3}}}",
            self.kernel,
            self.isa,
            self.rows,
            self.cols,
            self.bits,
            self.group_size,
            self.threads,
            self.tokens,
            self.median_us,
            self.prepare_us,
            self.weight_bytes,
            self.gb_per_s
        )
    }
}

/// The weights of a case, packed for its kernel.
enum Weights {
    Lut(PackedMatrix),
    Ternary(TernaryMatrix),
    Int8(Int8Matrix),
    Dequant(DequantMatrix),
}

/// The activations of a case, in the form its kernel consumes.
enum Inputs {
    Tables(ActivationTables),
    Ternary(TernaryTables),
    Int8(Int8Activations),
}

/// A case with random weights and inputs ready, so one matmul can be run (and timed) repeatedly.
pub struct PreparedCase {
    case: KernelCase,
    cpu: Cpu,
    weights: Weights,
    inputs: Inputs,
    x: Vec<f32>,
    out: Vec<f32>,
    /// Streamed through to push the weights out of the caches (allocated on first use).
    evict: Vec<u64>,
}

impl PreparedCase {
    /// Generates seeded random weights and inputs for `case` and packs them.
    pub fn new(case: &KernelCase, isa: Option<Isa>) -> Result<PreparedCase> {
        let cpu = match isa {
            Some(isa) => Cpu::with_isa(isa, case.threads)?,
            None => Cpu::new(case.threads)?,
        };
        let (rows, cols) = (case.rows, case.cols);
        let mut rng = SplitMix64::new(0x5EED ^ (rows * 31 + cols) as u64);
        let weights = match case.kind {
            KernelKind::Lut { bits, group_size } | KernelKind::Dot { bits, group_size } => {
                lut_weights(&mut rng, rows, cols, bits, group_size, false)?
            }
            KernelKind::Ternary { group_size } => {
                lut_weights(&mut rng, rows, cols, 2, group_size, true)?
            }
            KernelKind::KQuant { bits } => kquant_weights(&mut rng, rows, cols, bits)?,
            KernelKind::Ternary167 => {
                let codes: Vec<u8> = rng.bytes(rows * cols).into_iter().map(|b| b % 3).collect();
                let scales: Vec<f32> = (0..rows).map(|_| 0.001 + 0.01 * rng.uniform()).collect();
                Weights::Ternary(TernaryMatrix::pack(&TernaryWeights {
                    rows,
                    cols,
                    grouping: Grouping::PerRow,
                    codes: &codes,
                    scales: &scales,
                })?)
            }
            KernelKind::Int8 => {
                let codes: Vec<i8> = rng
                    .bytes(rows * cols)
                    .into_iter()
                    .map(|b| b as i8)
                    .collect();
                // f16 scales: the 34-byte blocks of GGUF Q8_0.
                let scales: Vec<half::f16> = (0..rows * cols / 32)
                    .map(|_| half::f16::from_f32(0.001 + 0.01 * rng.uniform()))
                    .collect();
                Weights::Int8(Int8Matrix::from_f16_scales(rows, cols, &codes, &scales)?)
            }
            KernelKind::Dequant { bits } => {
                let mask = (1u8 << bits.min(7)) - 1;
                let codes: Vec<u8> = rng
                    .bytes(rows * cols)
                    .into_iter()
                    .map(|b| b & mask)
                    .collect();
                let groups = rows * cols / 32;
                let scales: Vec<f32> = (0..groups).map(|_| 0.001 + 0.01 * rng.uniform()).collect();
                let mins: Vec<f32> = (0..groups).map(|_| -0.01 * rng.uniform()).collect();
                Weights::Dequant(DequantMatrix::new(
                    rows, cols, bits, &codes, &scales, &mins,
                )?)
            }
        };
        let inputs = match weights {
            Weights::Lut(_) if matches!(case.kind, KernelKind::Dot { .. }) => {
                Inputs::Int8(Int8Activations::new(cols))
            }
            Weights::Lut(_) => Inputs::Tables(ActivationTables::new(cols)),
            Weights::Ternary(_) => Inputs::Ternary(TernaryTables::new(cols)),
            Weights::Int8(_) | Weights::Dequant(_) => Inputs::Int8(Int8Activations::new(cols)),
        };
        let x = (0..cols * case.tokens).map(|_| rng.gaussian()).collect();
        let out = vec![0.0; rows * case.tokens];
        let mut prepared = PreparedCase {
            case: *case,
            cpu,
            weights,
            inputs,
            x,
            out,
            evict: Vec::new(),
        };
        prepared.prepare_inputs()?;
        Ok(prepared)
    }

    /// Re-targets the prepared weights at another thread count and N (new random inputs), so a
    /// sweep packs each matrix once.
    pub fn set_threads_and_tokens(&mut self, threads: usize, tokens: usize) -> Result<()> {
        if threads != self.case.threads {
            self.cpu = Cpu::with_isa(self.cpu.isa(), threads)?;
        }
        let mut rng = SplitMix64::new(0xF00D ^ tokens as u64);
        self.x = (0..self.case.cols * tokens)
            .map(|_| rng.gaussian())
            .collect();
        self.out = vec![0.0; self.case.rows * tokens];
        self.case.threads = threads;
        self.case.tokens = tokens;
        self.prepare_inputs()
    }

    /// The case as currently prepared.
    pub fn case(&self) -> &KernelCase {
        &self.case
    }

    /// Builds the activation tables (LUT) or quantizes the activations (int8, baseline).
    pub fn prepare_inputs(&mut self) -> Result<()> {
        let tokens = self.case.tokens;
        match &mut self.inputs {
            Inputs::Tables(t) => t.build(&self.cpu, &self.x, tokens),
            Inputs::Ternary(t) => t.build(&self.cpu, &self.x, tokens),
            Inputs::Int8(a) => a.build(&self.cpu, &self.x, tokens),
        }
    }

    /// One matmul of the prepared inputs.
    pub fn run(&mut self) -> Result<()> {
        match (&self.weights, &self.inputs) {
            (Weights::Lut(m), Inputs::Tables(t)) => m.matmul(&self.cpu, t, &mut self.out),
            (Weights::Ternary(m), Inputs::Ternary(t)) => m.matmul(&self.cpu, t, &mut self.out),
            (Weights::Int8(m), Inputs::Int8(a)) => m.matmul(&self.cpu, a, &mut self.out),
            (Weights::Lut(m), Inputs::Int8(a)) => m.matmul_dot(&self.cpu, a, &mut self.out),
            (Weights::Dequant(m), Inputs::Int8(a)) => m.matmul(&self.cpu, a, &mut self.out),
            // `new` pairs every weight kind with its input kind.
            _ => unreachable!("weights and inputs are created together"),
        }
    }

    /// Reads a buffer of [`EVICT_BYTES`] so no weights stay cached. Reading (not writing) keeps
    /// the caches clean, so the timed run does not pay for write-backs.
    pub fn evict_caches(&mut self) {
        if self.evict.is_empty() {
            self.evict = (0..EVICT_BYTES as u64 / 8).collect();
        }
        std::hint::black_box(stream_sum(&self.evict));
    }

    /// Bytes of packed weights, scales and offsets.
    pub fn weight_bytes(&self) -> usize {
        match &self.weights {
            Weights::Lut(m) => m.bytes(),
            Weights::Ternary(m) => m.bytes(),
            Weights::Int8(m) => m.bytes(),
            Weights::Dequant(m) => m.bytes(),
        }
    }

    /// The output of the last run, `[tokens][rows]`.
    pub fn output(&self) -> &[f32] {
        &self.out
    }

    /// The ISA the case runs on.
    pub fn isa(&self) -> Isa {
        self.cpu.isa()
    }
}

fn lut_weights(
    rng: &mut SplitMix64,
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    ternary: bool,
) -> Result<Weights> {
    if group == 0 || !cols.is_multiple_of(group) {
        return Err(KernelError::BadGroupSize { group, cols });
    }
    let levels = if ternary { 3 } else { 1u16 << bits.min(8) };
    let codes: Vec<u8> = rng
        .bytes(rows * cols)
        .into_iter()
        .map(|b| (u16::from(b) % levels) as u8)
        .collect();
    let groups = rows * cols / group;
    let scales: Vec<f32> = (0..groups).map(|_| 0.001 + 0.01 * rng.uniform()).collect();
    let offsets: Vec<f32> = if ternary {
        scales.iter().map(|s| -s).collect()
    } else {
        (0..groups).map(|_| -0.01 * rng.uniform()).collect()
    };
    let spec = QuantSpec {
        rows,
        cols,
        bits,
        grouping: Grouping::Size(group),
        plane_scales: PlaneScales::Uniform,
    };
    let weights = QuantizedWeights {
        spec,
        codes: &codes,
        scales: &scales,
        offsets: Some(&offsets),
    };
    Ok(Weights::Lut(PackedMatrix::pack(&weights)?))
}

/// The block form of a K-quant type, as [`SuperBlockWeights`] documents it: bits, group, zero
/// point, sub-scales `0..levels` shifted by `shift`, and sub-mins `0..levels` (with a `dmin`) where
/// the type has them.
type KQuantForm = (u8, usize, u8, (u16, i16), Option<u16>);

/// Q2_K to Q6_K.
const KQUANT_FORMS: [KQuantForm; 5] = [
    (2, 16, 0, (16, 0), Some(16)),
    (3, 16, 4, (64, -32), None),
    (4, 32, 0, (64, 0), Some(64)),
    (5, 32, 0, (64, 0), Some(64)),
    (6, 16, 32, (256, -128), None),
];

fn kquant_form(bits: u8) -> Option<KQuantForm> {
    KQUANT_FORMS.iter().find(|f| f.0 == bits).copied()
}

/// Random codes, sub-scales and super-scales of the K-quant of `bits` bits, packed as
/// [`PackedMatrix::pack_super_blocks`] packs a GGUF tensor of that type.
fn kquant_weights(rng: &mut SplitMix64, rows: usize, cols: usize, bits: u8) -> Result<Weights> {
    let (_, group, zero_point, (levels, shift), min_levels) = kquant_form(bits).ok_or(
        KernelError::UnsupportedForm("K-quant kernels have 2 to 6 bits (Q2_K to Q6_K)"),
    )?;
    let codes: Vec<u8> = rng
        .bytes(rows * cols)
        .into_iter()
        .map(|b| b & ((1u8 << bits) - 1))
        .collect();
    let groups = rows * cols / group;
    let sub_scales: Vec<i8> = rng
        .bytes(groups)
        .into_iter()
        .map(|b| (i16::from(b) % levels as i16 + shift) as i8)
        .collect();
    let sub_mins: Option<Vec<u8>> = min_levels.map(|levels| {
        rng.bytes(groups)
            .into_iter()
            .map(|b| (u16::from(b) % levels) as u8)
            .collect()
    });
    let supers = rows * cols.div_ceil(SUPER_BLOCK);
    let mut f16s = |n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| half::f16::from_f32(0.0001 + 0.001 * rng.uniform()).to_bits())
            .collect()
    };
    let d = f16s(supers);
    let dmin = sub_mins.as_ref().map(|_| f16s(supers));
    Ok(Weights::Lut(PackedMatrix::pack_super_blocks(
        &SuperBlockWeights {
            rows,
            cols,
            bits,
            group,
            zero_point,
            codes: &codes,
            sub_scales: &sub_scales,
            sub_mins: sub_mins.as_deref(),
            d: &d,
            dmin: dmin.as_deref(),
        },
    )?))
}

/// Measures one case: warm-up runs, then timed runs until `repetitions` or `max_time`.
pub fn measure_case(case: &KernelCase, options: &MeasureOptions) -> Result<KernelRecord> {
    let mut prepared = PreparedCase::new(case, options.isa)?;
    for _ in 0..options.warmup {
        prepared.prepare_inputs()?;
        prepared.run()?;
    }
    let mut run_times = Vec::with_capacity(options.repetitions);
    let mut prep_times = Vec::with_capacity(options.repetitions);
    let started = Instant::now();
    while run_times.len() < options.repetitions.max(1)
        && (run_times.is_empty() || started.elapsed() < options.max_time)
    {
        if options.cold_cache {
            prepared.evict_caches();
        }
        let t0 = Instant::now();
        prepared.prepare_inputs()?;
        let t1 = Instant::now();
        prepared.run()?;
        let t2 = Instant::now();
        std::hint::black_box(prepared.output());
        prep_times.push((t1 - t0).as_secs_f64());
        run_times.push((t2 - t1).as_secs_f64());
    }
    let seconds = median(&mut run_times);
    let weight_bytes = prepared.weight_bytes();
    Ok(KernelRecord {
        kernel: case.kind.name(),
        isa: prepared.isa().name().to_string(),
        rows: case.rows,
        cols: case.cols,
        bits: case.kind.bits(),
        // Per-row scales: the group is the row.
        group_size: match case.kind.group_size() {
            0 => case.cols,
            g => g,
        },
        threads: case.threads,
        tokens: case.tokens,
        median_us: seconds * 1e6,
        prepare_us: median(&mut prep_times) * 1e6,
        weight_bytes,
        gb_per_s: weight_bytes as f64 / seconds.max(1e-12) / 1e9,
    })
}

/// Measures every case in order, calling `on_record` as each finishes (to print progress).
pub fn measure_cases<F>(
    cases: &[KernelCase],
    options: &MeasureOptions,
    mut on_record: F,
) -> Result<Vec<KernelRecord>>
where
    F: FnMut(&KernelRecord),
{
    let mut records = Vec::with_capacity(cases.len());
    for case in cases {
        let record = measure_case(case, options)?;
        on_record(&record);
        records.push(record);
    }
    Ok(records)
}

/// Size of the buffer [`PreparedCase::evict_caches`] reads: twice the 32 MiB L3 of the target.
pub const EVICT_BYTES: usize = 64 << 20;

/// Default buffer of the bandwidth probe: 8× the 32 MiB L3 of the target machine, so caches cannot help.
pub const BANDWIDTH_BYTES: usize = 256 << 20;

/// Memory read bandwidth: `threads` threads each sum their share of a `bytes` buffer; the median
/// of `repetitions` passes is reported as a record named `read-bandwidth`.
pub fn read_bandwidth(threads: usize, bytes: usize, repetitions: usize) -> Result<KernelRecord> {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads * 64);
    // Filled with non-zero values so every page is really backed by memory.
    let buffer: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut times = Vec::with_capacity(repetitions.max(1));
    for _ in 0..repetitions.max(1) + 1 {
        let t0 = Instant::now();
        let total = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| scope.spawn(move || stream_sum(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        times.push(t0.elapsed().as_secs_f64());
    }
    // The first pass warms the TLB and starts threads; it is not counted.
    times.remove(0);
    let seconds = median(&mut times);
    let read = words * 8;
    Ok(KernelRecord {
        kernel: "read-bandwidth".to_string(),
        isa: Isa::best().name().to_string(),
        rows: 0,
        cols: 0,
        bits: 0,
        group_size: 0,
        threads,
        tokens: 0,
        median_us: seconds * 1e6,
        prepare_us: 0.0,
        weight_bytes: read,
        gb_per_s: read as f64 / seconds.max(1e-12) / 1e9,
    })
}

/// Sums a slice with eight independent accumulators (vectorized by the compiler): one pass of reads.
fn stream_sum(data: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &v| a.wrapping_add(v));
    acc.iter().fold(tail, |a, &v| a.wrapping_add(v))
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        0.5 * (values[mid - 1] + values[mid])
    }
}

#[cfg(test)]
mod tests;
