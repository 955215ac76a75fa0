//! End-to-end tests of the `lutra` binary: each runs the built executable the way a user would.
//! Real-model tests use the fetched SmolLM2-135M-Instruct Q4_1 file (`models/fetch.sh`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use lutra_runtime::fixtures::TempDir;

mod common;

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn lutra(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lutra"))
        .args(args)
        .output()
        .expect("the lutra binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn help_lists_every_subcommand() {
    let out = lutra(&["--help"]);
    assert_success(&out);
    let help = text(&out.stdout);
    for sub in [
        "generate",
        "chat",
        "tokenize",
        "perplexity",
        "info",
        "bench",
        "bench-kernels",
        "serve",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(sub)),
            "--help does not list {sub}:\n{help}"
        );
    }
}

#[test]
fn tokenize_matches_llama_cpp() {
    let model = model_path();
    let case = &common::reference().tokenization.cases[0];
    let out = lutra(&["tokenize", "-m", model.to_str().unwrap(), "-p", &case.text]);
    assert_success(&out);
    let ids: Vec<u32> =
        serde_json::from_str(text(&out.stdout).trim()).expect("a JSON array of ids");
    assert_eq!(ids, case.ids, "token ids of {:?}", case.text);
}

#[test]
fn greedy_generate_prints_only_the_reference_continuation() {
    let model = model_path();
    // llama.cpp's greedy completion of this prompt starts " not just a random choice". Its first
    // token is a near tie for the fast path (the exact model ranks " a" 0.088 below " not", inside
    // the fast path's rounding noise; tests/model_reference.rs checks such ties), and its fourth
    // one for every engine (" random", " choice", " product"). So the text before the fourth token
    // is checked on the exact model (`--reference`, f32 weights and cache); the fast path must
    // print a continuation of the same form.
    let case = &common::reference().greedy.cases[0];
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            &case.prompt,
            "-n",
            "8",
            "--temp",
            "0",
            "-t",
            "2",
        ];
        args.extend_from_slice(extra);
        let out = lutra(&args);
        assert_success(&out);
        out
    };
    let before_tie: String = case
        .completion
        .split_whitespace()
        .take(3)
        .map(|w| format!(" {w}"))
        .collect();
    let exact = text(&generate(&["--reference"]).stdout);
    assert!(
        exact.split_whitespace().count() >= 5 && exact.starts_with(&before_tie),
        "stdout does not continue {before_tie:?} as the reference completion {:?} does: {exact:?}",
        case.completion
    );
    let out = generate(&[]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(' ') && stdout.split_whitespace().count() >= 5,
        "the fast path printed {stdout:?}, not an 8-token continuation"
    );
    // Diagnostics go to stderr, never into the text.
    assert!(text(&out.stderr).contains("t/s"));
    assert!(!stdout.contains("t/s"));
}

#[test]
fn chat_with_piped_stdin_answers_each_line_and_exits() {
    let model = model_path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lutra"))
        .args([
            "chat",
            "-m",
            model.to_str().unwrap(),
            "-n",
            "6",
            "--temp",
            "0",
            "-c",
            "512",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lutra chat starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(b"What is the capital of France?\nAnd of Italy?\n")
        .expect("write the turns");
    let out = child.wait_with_output().expect("lutra chat exits");
    assert_success(&out);
    let stderr = text(&out.stderr);
    let turns = stderr
        .lines()
        .filter(|l| l.starts_with("lutra: reply "))
        .count();
    assert_eq!(turns, 2, "stderr:\n{stderr}");
    let stdout = text(&out.stdout);
    assert!(stdout.trim().len() > 4, "replies: {stdout:?}");
    // No prompt marker on stdout, and none at all when stdin is not a terminal.
    assert!(!stdout.contains("> ") && !stderr.contains("> "));
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let out = lutra(&["generate", "-m", "/nonexistent/dir/nope.gguf", "-p", "hi"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/nonexistent/dir/nope.gguf"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// How many tokens `lutra tokenize` makes of `prompt`.
fn token_count(prompt: &str) -> usize {
    let model = model_path();
    let out = lutra(&["tokenize", "-m", model.to_str().unwrap(), "-p", prompt]);
    assert_success(&out);
    let ids: Vec<u32> =
        serde_json::from_str(text(&out.stdout).trim()).expect("a JSON array of ids");
    ids.len()
}

/// The `N` of `generated N tokens` in the timings line of `lutra generate`.
fn generated_tokens(stderr: &str) -> usize {
    stderr
        .split("generated ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no timings line:\n{stderr}"))
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let model = model_path();
    let prompt = "one two three four five six seven eight nine ten eleven twelve";
    let tokens = token_count(prompt);
    assert!(tokens > 8, "{tokens} tokens");
    let out = lutra(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        prompt,
        "-c",
        "8",
        "-n",
        "4",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    // The prompt's own token count, not the prompt plus -n.
    assert!(
        stderr.contains(&format!(
            "the prompt has {tokens} tokens and the context holds 8"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn generate_stops_when_the_context_is_full() {
    let model = model_path();
    // 51 tokens: with -c 64 there is room for 13 of the 20 tokens asked for.
    let prompt = "The GNU General Public License is a free, copyleft license for software and other \
                  kinds of works. It was written by Richard Stallman of the Free Software Foundation \
                  in 1989, and it guarantees the freedom to run and share software.";
    assert_eq!(token_count(prompt), 51);
    let out = lutra(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        prompt,
        "-c",
        "64",
        "-n",
        "20",
        "--temp",
        "0",
        "-t",
        "2",
    ]);
    assert_success(&out);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("lutra: stopped: the context of 64 tokens is full"),
        "{stderr}"
    );
    assert!(stderr.contains("prompt 51 tokens"), "{stderr}");
    assert_eq!(generated_tokens(&stderr), 64 - 51, "{stderr}");
    assert!(!text(&out.stdout).trim().is_empty());
}

#[test]
fn bench_json_rows_parse_with_positive_rates() {
    let out = lutra(&[
        "bench",
        "-m",
        "synthetic:smollm2-135m",
        "-p",
        "16",
        "-n",
        "4",
        "-d",
        "0,8",
        "-r",
        "2",
        "-t",
        "1",
        "-o",
        "json",
    ]);
    assert_success(&out);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let rows = rows.as_array().expect("an array of rows");
    let tests: Vec<&str> = rows.iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["pp16", "pp16 @ d8", "tg4", "tg4 @ d8"]);
    for row in rows {
        let tps = row["tokens_per_sec"].as_f64().unwrap();
        assert!(tps > 0.0 && tps.is_finite(), "{row}");
        assert_eq!(row["samples"].as_array().unwrap().len(), 2);
        assert!(row["size_bytes"].as_u64().unwrap() > 10_000_000);
        assert_eq!(row["synthetic"], true);
    }
    assert!(rows[2]["effective_gb_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_markdown_table_and_plot() {
    let dir = TempDir::new("cli-bench");
    let svg_path = dir.join("sweep.svg");
    let out = lutra(&[
        "bench",
        "-m",
        "synthetic:smollm2-135m",
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
        "-t",
        "1,2",
        "-o",
        "md",
        "--plot",
        svg_path.to_str().unwrap(),
    ]);
    assert_success(&out);
    let md = text(&out.stdout);
    assert!(md.contains("CPU: ") && md.contains("ISA: "), "{md}");
    assert!(md.contains("synthetic weights: random values of the real shapes"));
    let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    // Header, separator, and (pp8, tg2) × (1, 2 threads).
    assert_eq!(table.len(), 2 + 4, "{md}");
    assert!(table[0].contains("t/s"));
    let svg = std::fs::read_to_string(&svg_path).expect("the SVG was written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2, "one line per test");
}

/// Starts `lutra ARGS` with stdin, stdout and stderr piped.
fn spawn_lutra(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lutra"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the lutra binary runs")
}

/// Sends SIGINT (what Ctrl-C sends) to `child`.
fn interrupt(child: &std::process::Child) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
}

/// All that `child` wrote to stderr (call after it exited).
fn stderr_of(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr is piped")
        .read_to_string(&mut stderr)
        .expect("stderr is readable");
    stderr
}

#[test]
fn ctrl_c_stops_a_chat_reply_and_the_chat_goes_on() {
    use std::io::Read;
    use std::time::{Duration, Instant};

    let model = model_path();
    let model = model.to_str().unwrap();
    let mut child = spawn_lutra(&["chat", "-m", model, "-n", "200", "--temp", "0"]);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "Write a very long story about a cat.").unwrap();
    stdin.flush().unwrap();
    // Read the reply as it streams; interrupt once some of it (about 10 of its up to 200 tokens)
    // has arrived.
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            let _ = tx.send(all.len());
        }
        all
    });
    let start = Instant::now();
    let mut received = 0;
    while received < 40 {
        let left = Duration::from_secs(120).saturating_sub(start.elapsed());
        received = rx
            .recv_timeout(left)
            .expect("the first reply streams some text");
    }
    interrupt(&child);
    writeln!(stdin, "Say hi.").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let stdout = reader.join().unwrap();
    let stderr = stderr_of(&mut child);
    assert!(
        status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        status.code(),
        text(&stdout)
    );
    assert!(
        stderr.contains("reply 1 interrupted"),
        "the first reply was not interrupted:\n{stderr}"
    );
    // The second turn was answered after the interruption.
    assert!(stderr.contains("lutra: reply 2:"), "{stderr}");
    assert!(!stderr.contains("reply 2 interrupted"), "{stderr}");
}

#[test]
fn ctrl_c_stops_generate_which_prints_its_timings_and_exits_130() {
    use std::io::Read;
    use std::time::{Duration, Instant};

    let model = model_path();
    let model = model.to_str().unwrap();
    let mut child = spawn_lutra(&[
        "generate",
        "-m",
        model,
        "-p",
        "Once upon a time",
        "-n",
        "2000",
        "--ignore-eos",
        "--temp",
        "0",
    ]);
    drop(child.stdin.take()); // no input
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    let start = Instant::now();
    stdout
        .read_exact(&mut first)
        .expect("generation streams text");
    assert!(start.elapsed() < Duration::from_secs(120));
    interrupt(&child);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(130), "stderr:\n{stderr}");
    assert!(stderr.contains("lutra: interrupted"), "{stderr}");
    // Timings are printed for the tokens made before the interruption (far fewer than 2000).
    let generated = stderr
        .split("generated ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no timings line:\n{stderr}"));
    assert!(
        generated > 0 && generated < 2000,
        "{generated} tokens:\n{stderr}"
    );
}

#[test]
fn info_lists_every_tensor_with_its_type_form_and_bytes() {
    let model = model_path();
    let out = lutra(&[
        "info",
        "-m",
        model.to_str().unwrap(),
        "-t",
        "1",
        "--tensors",
    ]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.ends_with(" bytes"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    // SmolLM2-135M: the embedding, 30 blocks of 9 tensors, the final norm (tied LM head).
    assert_eq!(rows.len(), 1 + 30 * 9 + 1, "{stdout}");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("{name} is not listed:\n{stdout}"))
    };
    assert_eq!(&row("token_embd.weight")[1..4], ["Q8_0", "→", "int8"]);
    assert_eq!(
        &row("blk.29.ffn_down.weight")[1..5],
        ["Q4_1", "→", "lut4", "g32"]
    );
    assert_eq!(&row("output_norm.weight")[1..4], ["F32", "→", "f32"]);
    // The per-tensor bytes add up to the weights line.
    let total: usize = rows
        .iter()
        .map(|r| r[r.len() - 2].parse::<usize>().unwrap())
        .sum();
    let weights_line = stdout.lines().find(|l| l.starts_with("weights:")).unwrap();
    let mib: f64 = weights_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (total as f64 / (1 << 20) as f64 - mib).abs() < 0.01,
        "{total} vs {weights_line}"
    );
}

#[test]
fn info_shows_bitnet_cpp_i2_s_matrices_on_the_ternary_kernel() {
    use lutra_runtime::{config::Architecture, weights::GgmlType};
    let dir = TempDir::new("cli-i2s");
    let file = dir.join("tiny-bitnet-i2_s.gguf");
    let spec = lutra_runtime::fixtures::TinyModelSpec {
        hidden: 256,
        ffn: 512,
        architecture: Architecture::BitNet,
        ternary_type: GgmlType::I2_S,
        ..Default::default()
    };
    lutra_runtime::fixtures::tiny_llama_gguf(&file, &spec, 3).unwrap();
    let out = lutra(&["info", "-m", file.to_str().unwrap(), "-t", "1", "--tensors"]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    for matrix in ["attn_q", "attn_output", "ffn_gate", "ffn_down"] {
        let name = format!("blk.1.{matrix}.weight ");
        let row: Vec<&str> = stdout
            .lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("no {name}row:\n{stdout}"))
            .split_whitespace()
            .collect();
        assert_eq!(&row[1..5], ["I2_S", "→", "ternary", "1.67b"], "{stdout}");
    }
}

#[test]
fn a_lutra_file_loads_in_place_and_info_shows_how_it_was_quantized() {
    let dir = TempDir::new("cli-lutra");
    let file = dir.join("smollm2-2bit.lutra.gguf");
    let spec = lutra_runtime::quantize::Requantize {
        bits: 2,
        group_size: 32,
    };
    let packed =
        lutra_runtime::fixtures::requantized_lutra_file(&model_path(), &file, spec).unwrap();
    assert_eq!(packed, 30 * 7);
    let path = file.to_str().unwrap();
    let out = lutra(&["info", "-m", path, "-t", "1", "--tensors"]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("210 lutra matrices read in place from the file (mmap, no repack)"),
        "{stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("blk.29.ffn_down.weight "))
        .unwrap_or_else(|| panic!("no ffn_down row:\n{stdout}"));
    let row: Vec<&str> = lines[at].split_whitespace().collect();
    assert_eq!(&row[1..6], ["LUT2_G32_OFF", "→", "lut2", "g32", "mapped"]);
    assert_eq!(
        lines[at + 1].trim(),
        "method rtn, 2 bits, group size 32, calibration: none"
    );
    // Other commands take the file with -m too.
    let tokens = |m: &str| text(&lutra(&["tokenize", "-m", m, "-p", "Hello there"]).stdout);
    assert_eq!(tokens(path), tokens(model_path().to_str().unwrap()));
    let out = lutra(&[
        "generate", "-m", path, "-p", "Hi", "-n", "4", "--temp", "0", "-t", "2",
    ]);
    assert_success(&out);
}
