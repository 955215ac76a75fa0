//! sampler (to be written)
