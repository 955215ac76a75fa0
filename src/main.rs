//! The `lutra` command-line tool; see `lutra --help`.

#![forbid(unsafe_code)]

mod cli;
mod serve;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: "loading x: y: z".
            eprintln!("lutra: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
