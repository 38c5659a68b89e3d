//! `chathub serve`: the gRPC server.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chathub::grpc::{serve, ServeOptions};
use clap::Args;

use super::ModelArgs;

/// Flags of `chathub serve`; each can also be set through its environment variable.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Address to listen on. Loopback by default: binding another address (e.g. 0.0.0.0:50051
    /// in a container) must be asked for explicitly.
    #[arg(long, env = "CHATHUB_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,

    /// Generations that run at once.
    #[arg(long, env = "CHATHUB_MAX_CONCURRENT", default_value_t = 1)]
    max_concurrent: usize,

    /// Requests that may wait for a slot; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "CHATHUB_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,

    /// Seconds running requests may take to finish after SIGTERM or Ctrl+C.
    #[arg(long, env = "CHATHUB_GRACE_PERIOD", default_value_t = 30)]
    grace_period: u64,

    /// Log each prompt's text (off by default: prompts are user data).
    #[arg(long, env = "CHATHUB_LOG_PROMPTS")]
    log_prompts: bool,
}

/// Runs the server until SIGTERM or Ctrl+C.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!(address = %listener.local_addr()?, "listening (aihub.ChatHub, grpc.health.v1, reflection)");
        let options = ServeOptions {
            max_concurrent: args.max_concurrent,
            max_queue: args.max_queue,
            grace_period: Duration::from_secs(args.grace_period),
            log_prompts: args.log_prompts,
        };
        let model = args.model;
        let load = move || {
            model.load().map_err(|e| match e.downcast::<chathub::Error>() {
                Ok(err) => err,
                Err(other) => chathub::Error::Compute(chathub::candle_core::Error::Msg(format!("{other:#}"))),
            })
        };
        serve(listener, load, options, shutdown_signal()).await?;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// Completes on Ctrl+C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
