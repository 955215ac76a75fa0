//! `lutra generate` and `lutra chat`: stream text to stdout, diagnostics to stderr.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use clap::Args;
use lutra_runtime::generate::{GenerateOptions, Generator, StopReason};

use super::interrupt::{Interrupt, EXIT_INTERRUPTED};
use super::{ModelArgs, SamplingArgs};

/// Arguments of `lutra generate`.
#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Prompt text (special tokens such as <|im_start|> are parsed)
    #[arg(short = 'p', long = "prompt")]
    pub(crate) prompt: String,
    /// Tokens to generate at most
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub(crate) n_predict: usize,
    /// Keep generating past the end-of-sequence token
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

/// Arguments of `lutra chat`.
#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt (`-sys` is accepted too)
    #[arg(long = "system-prompt")]
    pub(crate) system_prompt: Option<String>,
    /// Tokens per reply at most
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Runs `lutra generate`.
pub(crate) fn generate(args: &GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    let opts = GenerateOptions {
        max_tokens: args.n_predict,
        sampler: args.sampling.config(),
        parse_special: true,
        stop_at_eos: !args.ignore_eos,
    };
    let mut generator =
        Generator::new(&model, &args.prompt, opts).context("cannot start generation")?;
    let interrupt = Interrupt::install(generator.cancel_token())?;
    let reply = interrupt.reply();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for piece in generator.by_ref() {
        let piece = piece.context("generation failed")?;
        out.write_all(piece.text.as_bytes())
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
    }
    drop(reply);
    let stats = generator.stats();
    eprintln!();
    let interrupted = generator.stop_reason() == Some(StopReason::Cancelled);
    if interrupted {
        eprintln!("lutra: interrupted");
    }
    if generator.stop_reason() == Some(StopReason::ContextFull) {
        eprintln!("{}", context_full_note(generator.context_length()));
    }
    eprintln!(
        "lutra: prompt {} tokens in {:.3} s ({:.2} t/s); generated {} tokens in {:.3} s ({:.2} t/s)",
        stats.prompt_tokens,
        stats.prompt_secs,
        stats.prompt_tps(),
        stats.generated_tokens,
        stats.gen_secs,
        stats.gen_tps()
    );
    if interrupted {
        std::process::exit(EXIT_INTERRUPTED);
    }
    Ok(())
}

/// Runs `lutra chat`: one user turn per input line until end of input or `/exit`. Ctrl-C stops
/// the running reply (the conversation keeps what was said); at the prompt it quits.
pub(crate) fn chat(args: &ChatArgs) -> Result<()> {
    let model = args.model.load()?;
    let opts = GenerateOptions {
        max_tokens: args.n_predict,
        sampler: args.sampling.config(),
        parse_special: false,
        stop_at_eos: true,
    };
    let mut session =
        lutra_runtime::session::ChatSession::new(&model, args.system_prompt.as_deref(), opts)
            .context("cannot start the chat")?;
    let interrupt = Interrupt::install(session.cancel_token())?;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("lutra: chat started; Ctrl-C stops a reply; /exit or Ctrl-D to quit");
    }
    let mut lines = stdin.lock().lines();
    let mut replies = 0usize;
    loop {
        if interactive {
            eprint!("> ");
            // The prompt marker is cosmetic; a failed flush of stderr is not worth an error.
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin")?;
        let turn = line.trim();
        if turn == "/exit" {
            break;
        }
        if turn.is_empty() {
            continue;
        }
        let stdout = std::io::stdout();
        let mut write_error = None;
        // Re-armed here, before Ctrl-C can mean "stop the reply", not only when the turn starts.
        session.cancel_token().reset();
        let reply = interrupt.reply();
        session
            .send(turn, |piece: &str| {
                let mut out = stdout.lock();
                if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                    write_error.get_or_insert(e);
                }
            })
            .context("generation failed")?;
        drop(reply);
        if let Some(e) = write_error {
            return Err(e).context("cannot write to stdout");
        }
        writeln!(stdout.lock()).context("cannot write to stdout")?;
        replies += 1;
        let stats = session.last_stats();
        match session.last_stop_reason() {
            Some(StopReason::Cancelled) => eprintln!("lutra: reply {replies} interrupted"),
            Some(StopReason::ContextFull) => {
                eprintln!("{}", context_full_note(model.context_length()))
            }
            _ => {}
        }
        eprintln!(
            "lutra: reply {replies}: {} tokens at {:.2} t/s (prompt {} tokens at {:.2} t/s)",
            stats.generated_tokens,
            stats.gen_tps(),
            stats.prompt_tokens,
            stats.prompt_tps()
        );
    }
    Ok(())
}

/// What the CLI prints on stderr when generation stopped because the context is full.
fn context_full_note(context: usize) -> String {
    format!("lutra: stopped: the context of {context} tokens is full")
}
