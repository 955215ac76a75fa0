#![no_main]

libfuzzer_sys::fuzz_target!(
    init: lutra_fuzz::drivers::report_panics_without_aborting(),
    |data: &[u8]| lutra_fuzz::drivers::tokenizer_template(data)
);
