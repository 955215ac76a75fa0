//! `lutra serve`: an OpenAI-compatible HTTP server over the runtime's batching engine.
//!
//! The HTTP side runs on a small tokio runtime (two worker threads: the compute threads belong to
//! the engine and the model). Each request is submitted to the engine with a callback that pushes
//! its events into a channel; a handler reads the channel and answers with one JSON object or a
//! stream of server-sent events. A client that goes away closes the channel, which cancels its
//! generation.

mod api;
mod error;
mod generation;
mod routes;
mod stop;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use lutra_runtime::engine::Engine;

/// How long requests still running at shutdown may go on before they are cancelled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Worker threads of the HTTP runtime.
const HTTP_THREADS: usize = 2;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub(crate) struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Requests must carry `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// The model's name in `/v1/models` and in responses.
    pub model_id: String,
}

/// What every handler shares.
pub(crate) struct AppState {
    engine: Engine,
    model_id: String,
    api_key: Option<String>,
    /// When the server started (Unix seconds); also part of response ids.
    started: u64,
    /// Numbers the responses.
    next_id: AtomicU64,
}

/// Serves until SIGINT or SIGTERM, then stops taking requests, lets the running ones finish (for
/// at most [`SHUTDOWN_GRACE`], then cancels them; connections still open after twice that are
/// closed) and returns.
pub(crate) fn run(engine: Engine, opts: ServeOptions) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(HTTP_THREADS)
        .thread_name("lutra-http")
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the HTTP runtime")?;
    let state = Arc::new(AppState {
        engine,
        model_id: opts.model_id.clone(),
        api_key: opts.api_key.clone(),
        started: unix_time(),
        next_id: AtomicU64::new(0),
    });
    runtime.block_on(serve(state.clone(), &opts))?;
    // Whatever is still running (a client that never reads) is cancelled when the engine drops.
    state.engine.cancel_all();
    Ok(())
}

async fn serve(state: Arc<AppState>, opts: &ServeOptions) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    let addr: SocketAddr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    // Tests and scripts read this line to find the port (`--port 0`).
    announce(addr)?;
    let app = routes::router(state.clone());
    let signalled = Arc::new(tokio::sync::Notify::new());
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal(state, signalled.clone()));
    // A connection that outlives the grace twice over (a client that stopped reading) is closed.
    let overdue = async {
        signalled.notified().await;
        tokio::time::sleep(2 * SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served.context("the HTTP server failed")?,
        () = overdue => eprintln!("lutra serve: closing the connections still open"),
    }
    eprintln!("lutra serve: stopped");
    Ok(())
}

/// Resolves at SIGINT or SIGTERM, after telling the engine to take no more requests, notifying
/// `signalled`, and arming a timer that cancels what is still running after [`SHUTDOWN_GRACE`].
async fn shutdown_signal(state: Arc<AppState>, signalled: Arc<tokio::sync::Notify>) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // Without a SIGTERM handler, only Ctrl-C stops the server.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    eprintln!("lutra serve: shutting down; requests still running may finish");
    state.engine.shutdown();
    signalled.notify_one();
    tokio::spawn(async move {
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        state.engine.cancel_all();
    });
}

/// Prints `lutra serve: listening on http://ADDR` on stdout, flushed at once.
fn announce(addr: SocketAddr) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "lutra serve: listening on http://{addr}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
