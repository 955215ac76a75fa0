//! `lutra serve`: the OpenAI-compatible HTTP server (see `crate::serve`).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::builder::RangedU64ValueParser;
use clap::Args;
use lutra_runtime::engine::{Engine, EngineOptions};

use super::ModelArgs;
use crate::serve::{self, ServeOptions};

/// Arguments of `lutra serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port to listen on (0 = any free port; the chosen one is printed)
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Requests generated together (each has its own KV cache of -c tokens)
    #[arg(long, default_value_t = 4, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) parallel: usize,
    /// Requests that may wait for a free slot (at least 1: every request passes the queue); more
    /// are refused with 503
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) queue: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health
    #[arg(long = "api-key")]
    pub(crate) api_key: Option<String>,
}

/// Runs `lutra serve`.
pub(crate) fn serve(args: &ServeArgs) -> Result<()> {
    if args.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        bail!("--api-key is empty");
    }
    let path = args.model.path()?;
    let model = Arc::new(args.model.load()?);
    let model_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.config().name.clone());
    let engine = Engine::new(
        model,
        EngineOptions {
            parallel: args.parallel,
            queue: args.queue,
        },
    )
    .context("cannot start the engine")?;
    serve::run(
        engine,
        ServeOptions {
            host: args.host.clone(),
            port: args.port,
            api_key: args.api_key.clone(),
            model_id,
        },
    )
}
