//! The gRPC server (feature `grpc`): AIHub's `aihub.ChatHub` protocol over the core.
//!
//! `proto/chat.proto` is the article's proto, unchanged, so AIHub's generated C# client talks to
//! this server exactly as it talked to the Python one: `Chat` returns the whole reply, and
//! `StreamingChat` streams the full text so far on every step (ChatGLM's `stream_chat`).
//! The standard `grpc.health.v1.Health` service (NOT_SERVING while the model loads) and server
//! reflection are served alongside.
//!
//! # Examples
//!
//! ```no_run
//! # async fn docs() -> Result<(), Box<dyn std::error::Error>> {
//! use chathub::grpc::{serve, ServeOptions};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let load = || chathub::Engine::load("chatglm3-6b");
//! serve(listener, load, ServeOptions::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```

mod service;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

pub use service::{ChatHubService, MetricsSnapshot};

use crate::Engine;

/// Code generated from `proto/chat.proto` by tonic: messages, server and client.
#[allow(missing_docs)]
pub mod proto {
    tonic::include_proto!("aihub");

    /// The encoded descriptors of `chat.proto`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/aihub_descriptor.bin"));
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Generations that run at once; each holds its own KV cache and competes for the cores.
    pub max_concurrent: usize,
    /// Requests that may wait for a free slot; beyond this they get RESOURCE_EXHAUSTED at once.
    pub max_queue: usize,
    /// After a shutdown signal, how long running requests may take to finish.
    pub grace_period: Duration,
    /// Log prompt text (off by default: prompts are user data).
    pub log_prompts: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_concurrent: 1,
            max_queue: 16,
            grace_period: Duration::from_secs(30),
            log_prompts: false,
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The model failed to load.
    #[error("model failed to load: {0}")]
    Load(#[from] crate::Error),
    /// The transport failed (the listener broke).
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Server reflection could not be set up from the descriptors.
    #[error("server reflection failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves `aihub.ChatHub`, health and reflection on `listener` until `shutdown` completes.
///
/// The model is loaded by `load` on a blocking thread while the server already answers: health
/// says NOT_SERVING and chat calls get UNAVAILABLE until it is ready. After `shutdown`, no new
/// connection is accepted and running requests get `grace_period` to finish.
///
/// # Errors
///
/// [`ServeError::Load`] when `load` fails (the server then stops), and transport errors.
pub async fn serve<L, S>(
    listener: TcpListener,
    load: L,
    options: ServeOptions,
    shutdown: S,
) -> Result<(), ServeError>
where
    L: FnOnce() -> crate::Result<Engine> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let grace = options.grace_period;
    serve_service(
        listener,
        ChatHubService::new(options),
        load,
        grace,
        shutdown,
    )
    .await
}

/// [`serve`] with a service the caller keeps a handle on (to read its
/// [`ChatHubService::metrics`]).
///
/// # Errors
///
/// As for [`serve`].
pub async fn serve_service<L, S>(
    listener: TcpListener,
    service: ChatHubService,
    load: L,
    grace: Duration,
    shutdown: S,
) -> Result<(), ServeError>
where
    L: FnOnce() -> crate::Result<Engine> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    use proto::chat_hub_server::ChatHubServer;

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<ChatHubServer<ChatHubService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // One signal, observed by the transport (stop accepting), the grace timer and the loader.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let (failed_tx, mut failed_rx) = oneshot::channel::<crate::Error>();
    let external_stop = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: no new connections, running requests may finish");
        let _ = external_stop.send(true);
    });

    let slot = service.clone();
    let load_reporter = reporter.clone();
    let load_stop = stop_tx.clone();
    tokio::spawn(async move {
        match tokio::task::spawn_blocking(load).await {
            Ok(Ok(engine)) => {
                slot.set_engine(engine);
                load_reporter
                    .set_serving::<ChatHubServer<ChatHubService>>()
                    .await;
                tracing::info!("model loaded: serving");
            }
            Ok(Err(err)) => {
                let _ = failed_tx.send(err);
                let _ = load_stop.send(true);
            }
            Err(join) => {
                tracing::error!(error = %join, "model loader panicked");
                let _ = load_stop.send(true);
            }
        }
    });

    // Replies stream one small message per token: without TCP_NODELAY, Nagle's algorithm holds
    // each one back waiting for an acknowledgement.
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    });
    let mut transport_stop = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(ChatHubServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = transport_stop.wait_for(|stop| *stop).await;
        });
    let grace_timer = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
        reporter
            .set_not_serving::<ChatHubServer<ChatHubService>>()
            .await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result?,
        () = grace_timer => {
            tracing::warn!(seconds = grace.as_secs_f64(), "grace period over: closing the remaining requests");
        }
    }
    if let Ok(err) = failed_rx.try_recv() {
        return Err(ServeError::Load(err));
    }
    Ok(())
}
