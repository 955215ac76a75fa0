//! Fuzz targets for lutra's parsers of untrusted files. The entry points live in [`drivers`],
//! which the stable regression test (`tests/fuzz_regressions.rs`) includes as well, so every
//! saved crash input runs through exactly what the fuzzer ran.

pub mod drivers;
