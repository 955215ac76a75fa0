//! The real SmolLM2 GGUF with its header mutated at random (fixed seed): byte flips, counts and
//! lengths overwritten with huge or off-by-one values, bytes inserted, the file cut short. Every
//! mutant goes through `lutra info -m FILE`, which must exit 0 or with a clean error (not a
//! panic's 101, not a signal, not a hang) whose message names the file.
//!
//! Most mutants are the header plus a short cut of the tensor data (the loader stops at the first
//! tensor past the end); one in eight is the whole mutated file, so that mutants whose header
//! still parses are loaded all the way. `LUTRA_HOSTILE_MUTANTS` sets the number of mutants
//! (default 48) and `LUTRA_HOSTILE_SEED` the seed.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lutra_runtime::fixtures::TempDir;
use lutra_runtime::gguf::GgufFile;

const REAL_MODEL: &str = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Longest one `lutra info` may take before it counts as a hang.
const TIMEOUT: Duration = Duration::from_secs(120);

/// splitmix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The values a corrupt count or length is overwritten with.
fn hostile_u64(rng: &mut Rng, old: u64, file_len: u64) -> u64 {
    match rng.below(10) {
        0 => u64::MAX,
        1 => 1 << 60,
        2 => 1 << 32,
        3 => old.wrapping_add(1),
        4 => old.wrapping_sub(1),
        5 => file_len,
        6 => file_len + 1,
        7 => 0,
        8 => old.wrapping_mul(1 << 20),
        _ => rng.next(),
    }
}

/// One mutant of `header` (the file's bytes up to the tensor data) and a description of it.
fn mutate(rng: &mut Rng, header: &[u8], file_len: u64) -> (Vec<u8>, String) {
    let mut h = header.to_vec();
    // Half of the positions in the first 64 KiB (counts, keys, value types) or the last 64 KiB
    // (tensor infos); the rest anywhere in the header (mostly vocabulary strings).
    let pick = |rng: &mut Rng, len: usize| -> usize {
        let window = 64 << 10;
        match rng.below(4) {
            0 => rng.below(window.min(len)),
            1 => len - 1 - rng.below(window.min(len)),
            _ => rng.below(len),
        }
    };
    let what = match rng.below(4) {
        0 => {
            let flips = 1 + rng.below(8);
            for _ in 0..flips {
                let at = pick(rng, h.len());
                h[at] ^= 1 << rng.below(8);
            }
            format!("{flips} bit flips")
        }
        1 => {
            let at = pick(rng, h.len() - 8);
            // Counts and lengths are 8-byte little-endian words; overwrite one at an aligned-ish
            // position half of the time, at any byte otherwise.
            let at = if rng.below(2) == 0 { at & !7 } else { at };
            let old = u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
            let new = hostile_u64(rng, old, file_len);
            h[at..at + 8].copy_from_slice(&new.to_le_bytes());
            format!("u64 at {at}: {old} -> {new}")
        }
        2 => {
            let at = pick(rng, h.len());
            let n = 1 + rng.below(16);
            let inserted: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            h.splice(at..at, inserted);
            format!("{n} bytes inserted at {at}")
        }
        _ => {
            let at = pick(rng, h.len());
            h.truncate(at);
            format!("cut at {at}")
        }
    };
    (h, what)
}

/// Runs `lutra info -m path`; returns the exit code (None: killed by a signal) and stderr.
fn lutra_info(path: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lutra"))
        .args(["info", "-t", "1", "-m"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lutra runs");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for lutra") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lutra info -m {} hung for {TIMEOUT:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), reader.join().unwrap_or_default())
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_real_gguf_headers_get_clean_errors() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join(REAL_MODEL);
    assert!(
        model.exists(),
        "{} is missing: run models/fetch.sh to download it",
        model.display()
    );
    let original = std::fs::read(&model).unwrap();
    let data_offset = GgufFile::open(&model).unwrap().data_offset();
    let header = &original[..data_offset];
    let data = &original[data_offset..];
    let mutants = env_or("LUTRA_HOSTILE_MUTANTS", 48);
    let mut rng = Rng(env_or("LUTRA_HOSTILE_SEED", 0x006c_7574_7261));
    // Up to a whole model file per mutant: written in memory where there is a tmpfs.
    let dir = TempDir::in_memory("hostile-files");
    let path = dir.join("mutant.gguf");
    let (mut ok, mut refused, mut full_ok) = (0, 0, 0);
    for i in 0..mutants {
        let (mut bytes, what) = mutate(&mut rng, header, original.len() as u64);
        let full = i % 8 == 7;
        let cut = if full { data.len() } else { rng.below(4096) };
        bytes.extend_from_slice(&data[..cut]);
        std::fs::write(&path, &bytes).unwrap();
        let (code, stderr) = lutra_info(&path);
        let context = format!("mutant {i} ({what}, {cut} data bytes)");
        match code {
            Some(0) => {
                ok += 1;
                full_ok += usize::from(full);
            }
            Some(1) => {
                refused += 1;
                assert!(
                    stderr.contains(&path.display().to_string()),
                    "{context}: the error does not name the file:\n{stderr}"
                );
                assert!(
                    !stderr.contains("panicked"),
                    "{context}: lutra panicked:\n{stderr}"
                );
            }
            other => panic!("{context}: lutra info exited with {other:?}:\n{stderr}"),
        }
    }
    eprintln!(
        "{mutants} mutants: {ok} loaded ({full_ok} of them whole files), {refused} refused with a \
         clean error"
    );
    assert_eq!(ok + refused, mutants);
    assert!(
        refused > 0,
        "no mutant was refused: the mutations do nothing"
    );
}
