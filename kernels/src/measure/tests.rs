use super::*;

fn quick() -> MeasureOptions {
    MeasureOptions {
        warmup: 1,
        repetitions: 3,
        max_time: Duration::from_millis(200),
        isa: None,
        cold_cache: false,
    }
}

#[test]
fn default_grid_covers_the_issue_list() {
    let cases = default_cases();
    // 12 kernels on every shape, and the five K-quant forms where K is whole super-blocks.
    let kernels: usize = DEFAULT_SHAPES
        .iter()
        .map(|&(_, k)| if k % 256 == 0 { 17 } else { 12 })
        .sum();
    assert_eq!(
        cases.len(),
        kernels * DEFAULT_THREADS.len() * DEFAULT_TOKENS.len()
    );
    assert!(cases
        .iter()
        .any(|c| c.kind == KernelKind::KQuant { bits: 4 }
            && (c.rows, c.cols) == (4096, 4096)
            && c.tokens == 1));
    assert!(!cases
        .iter()
        .any(|c| matches!(c.kind, KernelKind::KQuant { .. }) && c.cols == 576));
    assert!(cases.iter().any(|c| c.kind
        == KernelKind::Dot {
            bits: 4,
            group_size: 128
        }
        && (c.rows, c.cols) == (4096, 4096)
        && c.tokens == 512));
    assert!(cases.iter().any(|c| c.kind == KernelKind::Int8
        && (c.rows, c.cols) == (49152, 576)
        && c.tokens == 512));
    assert!(cases
        .iter()
        .all(|c| c.kind == KernelKind::Ternary167 || c.cols % c.kind.group_size() == 0));
}

#[test]
fn filter_parses_and_selects() {
    let filter =
        CaseFilter::parse("kernel=lut,int8; shape=576x576; threads=2; tokens=1,8").unwrap();
    let picked = filter.apply(&default_cases());
    // lut1..lut4 and int8, one shape, one thread count, two token counts.
    assert_eq!(picked.len(), 5 * 2);
    assert!(picked
        .iter()
        .all(|c| c.threads == 2 && (c.rows, c.cols) == (576, 576)));
    assert!(CaseFilter::parse("shape=4096").is_err());
    assert!(CaseFilter::parse("color=red").is_err());
    assert!(CaseFilter::parse("tokens=x").is_err());
    assert_eq!(
        CaseFilter::parse("").unwrap().apply(&default_cases()).len(),
        default_cases().len()
    );
}

#[test]
fn int8_and_baseline_records_are_consistent() {
    for kind in [
        KernelKind::Int8,
        KernelKind::Dequant { bits: 4 },
        KernelKind::Dequant { bits: 2 },
    ] {
        let case = KernelCase {
            kind,
            rows: 96,
            cols: 576,
            threads: 2,
            tokens: 3,
        };
        let record = measure_case(&case, &quick()).unwrap();
        assert_eq!(record.kernel, kind.name());
        assert_eq!(
            (record.rows, record.cols, record.tokens, record.threads),
            (96, 576, 3, 2)
        );
        let expected_bytes = 96 * 576 / 32
            * if kind == KernelKind::Int8 {
                34
            } else {
                4 + 4 * kind.bits() as usize
            };
        assert_eq!(record.weight_bytes, expected_bytes);
        assert!(record.median_us > 0.0);
        let gbps = record.weight_bytes as f64 / (record.median_us * 1e-6) / 1e9;
        assert!((record.gb_per_s - gbps).abs() <= 1e-6 * gbps);
        let json = record.to_json();
        assert!(json.starts_with('{') && json.contains(&format!("\"kernel\":\"{}\"", kind.name())));
    }
}

#[test]
fn ternary_case_records_the_packed_bytes() {
    let case = KernelCase {
        kind: KernelKind::Ternary167,
        rows: 96,
        cols: 576,
        threads: 2,
        tokens: 3,
    };
    let record = measure_case(&case, &quick()).unwrap();
    assert_eq!(record.kernel, "ternary1.67");
    assert_eq!((record.bits, record.group_size), (2, 576));
    // 2 tiles of 64 rows × 24 chunks of 320 bytes, plus an f32 scale per row.
    assert_eq!(record.weight_bytes, 2 * 24 * 320 + 4 * 96);
    assert!(record.median_us > 0.0);
    let mut prepared = PreparedCase::new(&case, None).unwrap();
    prepared.run().unwrap();
    assert!(prepared.output().iter().all(|v| v.is_finite()));
    assert!(prepared.output().iter().any(|&v| v != 0.0));
}

#[test]
fn prepared_case_computes_real_outputs() {
    let case = KernelCase {
        kind: KernelKind::Int8,
        rows: 8,
        cols: 64,
        threads: 1,
        tokens: 2,
    };
    let mut prepared = PreparedCase::new(&case, Some(Isa::Scalar)).unwrap();
    prepared.evict_caches();
    prepared.run().unwrap();
    assert_eq!(prepared.output().len(), 16);
    assert!(prepared.output().iter().any(|&v| v != 0.0));
}

#[test]
fn lut_case_records_match_packed_bytes() {
    let case = KernelCase {
        kind: KernelKind::Lut {
            bits: 2,
            group_size: 32,
        },
        rows: 64,
        cols: 576,
        threads: 1,
        tokens: 2,
    };
    let record = measure_case(&case, &quick()).unwrap();
    // 2 bits per weight plus at least one f16 scale per group of 32.
    assert!(record.weight_bytes >= 64 * 576 / 4 + 64 * 576 / 32 * 2);
    assert_eq!((record.bits, record.group_size), (2, 32));
}

#[test]
fn kquant_cases_stream_the_bytes_of_their_gguf_type() {
    // Bytes per 256 weights of Q2_K .. Q6_K in a GGUF file.
    for (bits, file_bytes) in [(2u8, 84usize), (3, 110), (4, 144), (5, 176), (6, 210)] {
        let case = KernelCase {
            kind: KernelKind::KQuant { bits },
            rows: 64,
            cols: 512,
            threads: 1,
            tokens: 1,
        };
        let mut prepared = PreparedCase::new(&case, None).unwrap();
        prepared.run().unwrap();
        assert!(prepared.output().iter().all(|v| v.is_finite()), "q{bits}k");
        assert!(prepared.output().iter().any(|&v| v != 0.0), "q{bits}k");
        let file = 64 * 512 / 256 * file_bytes;
        let packed = prepared.weight_bytes();
        assert!(
            packed <= file * 105 / 100 && packed >= 64 * 512 * usize::from(bits) / 8,
            "q{bits}k: {packed} bytes packed, {file} in the file"
        );
        assert_eq!(case.kind.name(), format!("q{bits}k"));
    }
}

#[test]
fn bad_cases_are_errors() {
    let case = KernelCase {
        kind: KernelKind::Dequant { bits: 3 },
        rows: 4,
        cols: 64,
        threads: 1,
        tokens: 1,
    };
    assert!(matches!(
        measure_case(&case, &quick()),
        Err(KernelError::UnsupportedBits(3))
    ));
    let case = KernelCase {
        kind: KernelKind::Int8,
        rows: 4,
        cols: 40,
        threads: 1,
        tokens: 1,
    };
    assert!(matches!(
        measure_case(&case, &quick()),
        Err(KernelError::KNotMultipleOf32(40))
    ));
    let case = KernelCase {
        kind: KernelKind::KQuant { bits: 7 },
        cols: 256,
        ..case
    };
    assert!(matches!(
        measure_case(&case, &quick()),
        Err(KernelError::UnsupportedForm(_))
    ));
}

#[test]
fn bandwidth_probe_reads_the_whole_buffer() {
    // A small buffer keeps the test fast; the real probe uses BANDWIDTH_BYTES.
    for threads in [1, 2] {
        let record = read_bandwidth(threads, 4 << 20, 2).unwrap();
        assert_eq!(record.weight_bytes, 4 << 20);
        assert_eq!(record.threads, threads);
        assert!(record.gb_per_s > 0.0 && record.median_us > 0.0);
    }
    assert_eq!(stream_sum(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), 66);
}
