//! Ctrl-C, as llama.cpp's command line handles it: during a reply it stops the reply (the chat goes
//! on with the next turn, `generate` prints its timings); at the chat prompt, or pressed again
//! before the reply has stopped, it ends the program.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use lutra_runtime::generate::CancelToken;

/// Exit status of a program ended by SIGINT (128 + 2), as shells report it.
pub(crate) const EXIT_INTERRUPTED: i32 = 130;

/// The process's Ctrl-C handler, tied to the cancel token of the generation it may stop.
pub(crate) struct Interrupt {
    replying: Arc<AtomicBool>,
}

impl Interrupt {
    /// Installs the handler (once per process): Ctrl-C fires `cancel` while a reply is running
    /// (see [`Interrupt::reply`]) and exits with status 130 otherwise, or when `cancel` has
    /// already fired.
    pub(crate) fn install(cancel: CancelToken) -> Result<Interrupt> {
        let replying = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&replying);
        ctrlc::set_handler(move || {
            // A reply stops before its next token; a second Ctrl-C (e.g. during a long prompt,
            // which is fed before the first check) ends the program, as in llama.cpp.
            if flag.load(Ordering::SeqCst) && !cancel.is_cancelled() {
                cancel.cancel();
            } else {
                // End the prompt line so the shell's prompt starts on its own line.
                eprintln!();
                let _ = std::io::stderr().flush();
                std::process::exit(EXIT_INTERRUPTED);
            }
        })
        .context("cannot install the Ctrl-C handler")?;
        Ok(Interrupt { replying })
    }

    /// Marks a reply as running until the returned guard is dropped: Ctrl-C meanwhile stops it.
    pub(crate) fn reply(&self) -> ReplyGuard<'_> {
        self.replying.store(true, Ordering::SeqCst);
        ReplyGuard(&self.replying)
    }
}

/// While alive, Ctrl-C cancels the reply instead of ending the program.
pub(crate) struct ReplyGuard<'a>(&'a AtomicBool);

impl Drop for ReplyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
