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

/// The bits of each value, so that results compare bit for bit (NaNs included).
pub(crate) fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}
