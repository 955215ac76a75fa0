//! `include/lutra.h` is what cbindgen makes of this crate now. With `LUTRA_BLESS=1` the test
//! writes the header instead of comparing.

use std::path::Path;

#[test]
fn header_matches_the_code() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("../../include/lutra.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("crates/capi/cbindgen.toml: {e}"));
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen could not read crates/capi/src: {e}"));
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("cbindgen writes UTF-8");

    if std::env::var_os("LUTRA_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&header, &generated).unwrap_or_else(|e| panic!("{}: {e}", header.display()));
        return;
    }
    let checked_in = std::fs::read_to_string(&header).unwrap_or_default();
    if checked_in != generated {
        let first_difference = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "include/lutra.h differs from what cbindgen makes of crates/capi (first at line {}).\n\
             Regenerate it with: LUTRA_BLESS=1 cargo test -p lutra-capi --test header",
            first_difference + 1
        );
    }
}
