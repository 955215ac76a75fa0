//! Criterion benches of the kernels (filled in by the kernels work).
fn main() {}
