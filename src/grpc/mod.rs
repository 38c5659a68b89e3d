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

pub mod codec;
mod service;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

pub use crate::server::{MetricsSnapshot, ServeOptions};
pub use service::ChatHubService;

use crate::server::accept::{self, ConnectionLimits};
use crate::server::{Gate, LoadState};
use crate::Engine;

/// Code generated from `proto/chat.proto` by tonic: messages, server and client.
#[allow(missing_docs)]
pub mod proto {
    tonic::include_proto!("aihub");

    /// The encoded descriptors of `chat.proto`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/aihub_descriptor.bin"));
}

/// A connection's write that makes no progress for this long closes it: HTTP/2's own flow
/// control normally keeps writes from blocking, so this only catches a dead peer.
const WRITE_STALL: Duration = Duration::from_secs(60);

/// HTTP/2 pings on a connection idle this long, and closes it when the peer does not answer:
/// a client that vanished without a FIN frees its slot.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The model failed to load (the message says why).
    #[error("model failed to load: {0}")]
    Load(String),
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
    service.gate().load_in_background(load);
    serve_gate(listener, service.gate().clone(), grace, shutdown).await
}

/// Serves `aihub.ChatHub` over a [`Gate`] shared with other front-ends (the HTTP server): the
/// caller loads the model into the gate. Stops when `shutdown` completes or loading fails.
///
/// # Errors
///
/// As for [`serve`].
pub async fn serve_gate<S>(
    listener: TcpListener,
    gate: Gate,
    grace: Duration,
    shutdown: S,
) -> Result<(), ServeError>
where
    S: Future<Output = ()> + Send + 'static,
{
    use proto::chat_hub_server::ChatHubServer;

    let service = ChatHubService::from_gate(gate.clone());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<ChatHubServer<ChatHubService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // One signal, observed by the accept loop, the transport and the grace timer.
    let (stop_tx, stop_rx) = watch::channel(false);
    let external_stop = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: no new gRPC connections, running requests may finish");
        let _ = external_stop.send(true);
    });
    let mut load_state = gate.load_state();
    let load_reporter = reporter.clone();
    let load_stop = stop_tx.clone();
    tokio::spawn(async move {
        let state = load_state
            .wait_for(|s| *s != LoadState::Loading)
            .await
            .map(|s| s.clone());
        match state {
            Ok(LoadState::Ready) => {
                load_reporter
                    .set_serving::<ChatHubServer<ChatHubService>>()
                    .await;
            }
            _ => {
                let _ = load_stop.send(true);
            }
        }
    });

    let limits = ConnectionLimits {
        max_connections: gate.options().max_connections,
        write_stall: WRITE_STALL,
        // A connection that never sends HTTP/2's preface holds a slot and would hold up a
        // graceful shutdown.
        handshake: Some(gate.options().handshake_timeout),
    };
    let incoming = ReceiverStream::new(accept::incoming(listener, limits, stop_rx.clone()))
        .map(Ok::<_, std::io::Error>);
    let mut transport_stop = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(reflection)
        .add_service(ChatHubServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = transport_stop.wait_for(|stop| *stop).await;
        });
    let mut grace_stop = stop_rx;
    let grace_timer = async move {
        let _ = grace_stop.wait_for(|stop| *stop).await;
        reporter
            .set_not_serving::<ChatHubServer<ChatHubService>>()
            .await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result?,
        () = grace_timer => {
            tracing::warn!(seconds = grace.as_secs_f64(), "grace period over: closing the remaining gRPC requests");
        }
    }
    if let LoadState::Failed(reason) = &*gate.load_state().borrow() {
        return Err(ServeError::Load(reason.clone()));
    }
    Ok(())
}
