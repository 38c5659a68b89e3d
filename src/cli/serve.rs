//! `chathub serve`: the gRPC server, the OpenAI-compatible HTTP server, or both over one model.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chathub::server::{shutdown_signal, Gate, ServeOptions};
use clap::Args;
use tokio::sync::watch;

use super::ModelArgs;

/// Flags of `chathub serve`; each can also be set through its environment variable.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Address for the gRPC server (aihub.ChatHub). Loopback by default: binding another address
    /// (e.g. 0.0.0.0:50051 in a container) must be asked for explicitly. Without `--http`, the
    /// gRPC server listens on 127.0.0.1:50051.
    #[cfg(feature = "grpc")]
    #[arg(long, env = "CHATHUB_LISTEN")]
    listen: Option<SocketAddr>,

    /// Address for the OpenAI-compatible HTTP server and its chat page (e.g. 127.0.0.1:8000).
    #[cfg(feature = "http")]
    #[arg(long, env = "CHATHUB_HTTP")]
    http: Option<SocketAddr>,

    /// Name the HTTP API reports for the model (`GET /v1/models`); by default the model
    /// directory's or file's name.
    #[cfg(feature = "http")]
    #[arg(long, env = "CHATHUB_MODEL_NAME")]
    model_name: Option<String>,

    /// Generations that run at once (gRPC and HTTP together), batched into shared forward
    /// passes; each holds its own key/value cache.
    #[arg(long, env = "CHATHUB_MAX_CONCURRENT", default_value_t = 4)]
    max_concurrent: usize,

    /// Key/value cache the running generations may hold in all, in bytes (0: no limit beyond
    /// --max-concurrent). Each request reserves its prompt plus every reply token it may
    /// produce and waits until that much is free; one that could never fit is refused.
    #[arg(long, env = "CHATHUB_KV_CACHE_BYTES", default_value_t = 0)]
    kv_cache_bytes: u64,

    /// Requests that may wait for a slot; more are turned away at once (gRPC
    /// RESOURCE_EXHAUSTED, HTTP 429 with Retry-After).
    #[arg(long, env = "CHATHUB_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,

    /// Longest request text accepted, in bytes (prompt, history and tools together).
    #[arg(long, env = "CHATHUB_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    max_prompt_bytes: usize,

    /// Open connections per protocol; more wait in the kernel's backlog.
    #[arg(long, env = "CHATHUB_MAX_CONNECTIONS", default_value_t = 256)]
    max_connections: usize,

    /// Seconds running requests may take to finish after SIGTERM or Ctrl+C.
    #[arg(long, env = "CHATHUB_GRACE_PERIOD", default_value_t = 30)]
    grace_period: u64,

    /// Log each prompt's text (off by default: prompts are user data).
    #[arg(long, env = "CHATHUB_LOG_PROMPTS")]
    log_prompts: bool,

    /// Require `Authorization: Bearer KEY` on the HTTP API (not on /health or the page).
    #[cfg(feature = "http")]
    #[arg(long, env = "CHATHUB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Origins whose web pages may call the HTTP API (CORS), comma-separated; `*` for any.
    #[cfg(feature = "http")]
    #[arg(long, env = "CHATHUB_CORS_ORIGIN", value_delimiter = ',')]
    cors_origin: Vec<String>,

    /// Largest HTTP request body, in bytes (413 beyond).
    #[cfg(feature = "http")]
    #[arg(long, env = "CHATHUB_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,

    /// Seconds an HTTP client has to send a request's headers, and again its body; also how
    /// long a kept-alive connection may sit idle.
    #[cfg(feature = "http")]
    #[arg(long, env = "CHATHUB_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout: u64,

    /// Seconds a connection's writes may make no progress (a client that stopped reading its
    /// stream) before it is closed and its generation stopped.
    #[cfg(feature = "http")]
    #[arg(long, env = "CHATHUB_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
}

/// Runs the servers until SIGTERM or Ctrl+C (or the model fails to load).
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let options = ServeOptions::default()
        .max_concurrent(args.max_concurrent)
        .kv_cache_bytes(args.kv_cache_bytes)
        .max_queue(args.max_queue)
        .max_prompt_bytes(args.max_prompt_bytes)
        .max_connections(args.max_connections)
        .grace_period(Duration::from_secs(args.grace_period))
        .log_prompts(args.log_prompts);
    let gate = Gate::new(&options);
    gate.set_model_name(args.model.name());
    #[cfg(feature = "http")]
    if let Some(name) = &args.model_name {
        gate.set_model_name(name.clone());
    }

    // One signal stops every server.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();

    #[cfg(feature = "http")]
    let http = args.http;
    #[cfg(not(feature = "http"))]
    let http: Option<SocketAddr> = None;

    #[cfg(feature = "grpc")]
    {
        let listen = match (args.listen, http) {
            (Some(address), _) => Some(address),
            (None, None) => Some(SocketAddr::from(([127, 0, 0, 1], 50051))),
            (None, Some(_)) => None,
        };
        if let Some(address) = listen {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {address} for gRPC"))?;
            tracing::info!(address = %listener.local_addr()?, "gRPC listening (aihub.ChatHub, grpc.health.v1, reflection)");
            let gate = gate.clone();
            let grace = options.grace_period;
            let stopped = stopped();
            servers.spawn(async move {
                chathub::grpc::serve_gate(listener, gate, grace, stopped)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
    }
    #[cfg(feature = "http")]
    if let Some(address) = http {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address} for HTTP"))?;
        tracing::info!(address = %listener.local_addr()?, "HTTP listening (OpenAI API at /v1, chat page at /)");
        let mut http_options = chathub::http::HttpOptions::default()
            .max_body_bytes(args.max_body_bytes)
            .header_timeout(Duration::from_secs(args.header_timeout))
            .idle_timeout(Duration::from_secs(args.idle_timeout));
        if let Some(key) = args.api_key.filter(|k| !k.is_empty()) {
            http_options = http_options.api_key(key);
        }
        for origin in args.cors_origin.into_iter().filter(|o| !o.is_empty()) {
            http_options = http_options.cors_origin(origin);
        }
        let gate = gate.clone();
        let stopped = stopped();
        servers.spawn(async move {
            chathub::http::serve(listener, gate, http_options, stopped)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    if servers.is_empty() {
        anyhow::bail!("nothing to serve: give --listen or --http");
    }

    let model = args.model;
    gate.load_in_background(move || model.load());
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut first_error = None;
    while let Some(joined) = servers.join_next().await {
        let result = joined.context("a server task failed")?;
        if let Err(err) = result {
            first_error.get_or_insert(err);
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => {
            tracing::info!("server stopped");
            Ok(())
        }
    }
}
