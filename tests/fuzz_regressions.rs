//! Every input the fuzzers once failed on (`tests/data/fuzz/<target>/`), fed through the same
//! entry points as the fuzz targets in `crates/fuzz`: each must return — `Ok` or an error — within
//! the time limit, without a panic.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

#[allow(dead_code)]
#[path = "../crates/fuzz/src/drivers.rs"]
mod drivers;

/// Longest one input may take (the fuzzers ran with a 10 s limit in an optimized build).
const TIMEOUT: Duration = Duration::from_secs(60);

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `driver` on every saved input of `target` on its own thread; a panic or a run past
/// [`TIMEOUT`] fails the test, naming the input.
fn replay(target: &str, driver: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no saved inputs for {target}");
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let (done, wait) = mpsc::channel();
        let runner = std::thread::Builder::new()
            .name(format!("{target}: {}", path.display()))
            .spawn(move || {
                driver(&bytes);
                let _ = done.send(());
            })
            .unwrap();
        match wait.recv_timeout(TIMEOUT) {
            Ok(()) => runner.join().unwrap(),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{} panicked in the {target} entry points", path.display())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "{} ran past {TIMEOUT:?} in the {target} entry points",
                    path.display()
                )
            }
        }
    }
}

#[test]
fn gguf_regressions() {
    replay("gguf", drivers::gguf);
}

#[test]
fn hf_folder_regressions() {
    replay("hf_folder", drivers::hf_folder);
}

#[test]
fn tokenizer_template_regressions() {
    replay("tokenizer_template", drivers::tokenizer_template);
}
