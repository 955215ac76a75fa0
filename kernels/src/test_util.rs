//! Comparisons shared by the kernels' tests.

/// Error energy of `y` relative to the energy of `exact`.
pub(crate) fn nmse(y: &[f32], exact: &[f64]) -> f64 {
    let err: f64 = y
        .iter()
        .zip(exact)
        .map(|(&a, &b)| (f64::from(a) - b).powi(2))
        .sum();
    err / exact.iter().map(|b| b * b).sum::<f64>().max(1e-30)
}

/// Asserts that the squared error of `y` against `exact` is at most `1e-3·energy`, where `energy`
/// is `Σ (w·x)²` of the product (an error scale that does not vanish when outputs are near zero).
pub(crate) fn assert_error_within_energy(y: &[f32], exact: &[f32], energy: f64, what: &str) {
    let err: f64 = y
        .iter()
        .zip(exact)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    assert!(
        err <= 1e-3 * energy,
        "{what}: scalar error {err} vs energy {energy}"
    );
}

/// The bits of each value, so that results compare bit for bit (NaNs included).
pub(crate) fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// A random matrix of `bits`-bit codes centred on `zero_point` (`w = s·(q − z)`, groups of 32,
/// f16-exact scales), packed twice: without offsets ([`crate::PackedMatrixBuilder::with_zero_point`])
/// and with the offsets `−z·s` that describe the same weights.
pub(crate) fn zero_point_pair(
    seed: u64,
    rows: usize,
    cols: usize,
    bits: u8,
    zero_point: u8,
) -> (crate::PackedMatrix, crate::PackedMatrix) {
    use crate::{
        Grouping, PackedMatrix, PackedMatrixBuilder, PlaneScales, QuantSpec, QuantizedWeights,
    };
    let mut rng = crate::rng::SplitMix64::new(seed);
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| (rng.next_u64() % (1 << bits)) as u8)
        .collect();
    let scales: Vec<f32> = (0..rows * cols / 32)
        .map(|_| {
            let s = 0.002 + 0.01 * (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            half::f16::from_f32(s).to_f32()
        })
        .collect();
    let offsets: Vec<f32> = scales.iter().map(|&s| -f32::from(zero_point) * s).collect();
    let spec = QuantSpec {
        rows,
        cols,
        bits,
        grouping: Grouping::Size(32),
        plane_scales: PlaneScales::Uniform,
    };
    let weights = QuantizedWeights {
        spec,
        codes: &codes,
        scales: &scales,
        offsets: None,
    };
    let mut builder = PackedMatrixBuilder::with_zero_point(spec, zero_point).unwrap();
    builder.push_rows(&weights).unwrap();
    let with_offsets = QuantizedWeights {
        offsets: Some(&offsets),
        ..weights
    };
    (
        builder.finish().unwrap(),
        PackedMatrix::pack(&with_offsets).unwrap(),
    )
}
