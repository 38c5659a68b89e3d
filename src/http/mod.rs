//! The OpenAI-compatible HTTP server (feature `http`): `POST /v1/chat/completions` (JSON and
//! server-sent events), `GET /v1/models`, `/health`, `/metrics` and a web chat page at `/`.
//!
//! It runs over the same [`Gate`] as the gRPC server, so both count against one set of limits
//! and one model. Connections are HTTP/1.1 (what the `openai` SDKs, curl and browsers use).
//!
//! # Examples
//!
//! ```no_run
//! # async fn docs() -> Result<(), Box<dyn std::error::Error>> {
//! use chathub::http::{serve, HttpOptions};
//! use chathub::server::{Gate, ServeOptions};
//!
//! let gate = Gate::new(&ServeOptions::default());
//! gate.load_in_background(|| chathub::Engine::load("chatglm3-6b"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! serve(listener, gate, HttpOptions::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```

mod api;
mod routes;

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::server::accept::{self, ConnectionLimits};
use crate::server::{Gate, LoadState};

/// How the HTTP server runs, besides the [`Gate`]'s limits.
#[derive(Clone)]
#[non_exhaustive]
pub struct HttpOptions {
    /// Requests must carry `Authorization: Bearer <key>` (everything but `/health` and the
    /// page itself, which asks for the key).
    pub api_key: Option<String>,
    /// Origins whose pages may call the API from a browser (CORS); `*` allows any.
    pub cors_origins: Vec<String>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers (counted from when the connection waits
    /// for one, so it also closes kept-alive connections left idle) and, separately, its body.
    pub header_timeout: Duration,
    /// A connection whose writes make no progress for this long (a client that stopped
    /// reading its stream) is closed, which stops its generation.
    pub idle_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            api_key: None,
            cors_origins: Vec::new(),
            max_body_bytes: 4 << 20,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.debug_struct("HttpOptions")
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("cors_origins", &self.cors_origins)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl HttpOptions {
    /// Requires `Authorization: Bearer <key>`.
    ///
    /// ```
    /// let options = chathub::http::HttpOptions::default().api_key("secret");
    /// assert!(options.api_key.is_some());
    /// ```
    #[must_use]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Lets pages from `origin` call the API (`*` for any).
    ///
    /// ```
    /// let options = chathub::http::HttpOptions::default().cors_origin("https://example.com");
    /// assert_eq!(options.cors_origins, ["https://example.com"]);
    /// ```
    #[must_use]
    pub fn cors_origin(mut self, origin: impl Into<String>) -> Self {
        self.cors_origins.push(origin.into());
        self
    }

    /// Sets the largest body accepted.
    ///
    /// ```
    /// assert_eq!(chathub::http::HttpOptions::default().max_body_bytes(1024).max_body_bytes, 1024);
    /// ```
    #[must_use]
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets the header (and body) read timeout.
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = chathub::http::HttpOptions::default().header_timeout(Duration::from_secs(1));
    /// assert_eq!(options.header_timeout, Duration::from_secs(1));
    /// ```
    #[must_use]
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// Sets the stalled-write timeout.
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = chathub::http::HttpOptions::default().idle_timeout(Duration::from_secs(5));
    /// assert_eq!(options.idle_timeout, Duration::from_secs(5));
    /// ```
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }
}

/// Why the HTTP server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The model failed to load (the message says why).
    #[error("model failed to load: {0}")]
    Load(String),
}

/// Serves the HTTP API on `listener` until `shutdown` completes (or the gate's model fails to
/// load). After `shutdown`, no new connection is accepted, idle connections close, and running
/// requests get the gate's grace period to finish.
///
/// # Errors
///
/// [`HttpError::Load`] when the model failed to load.
pub async fn serve<S>(
    listener: TcpListener,
    gate: Gate,
    options: HttpOptions,
    shutdown: S,
) -> Result<(), HttpError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let external_stop = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: no new HTTP connections, running requests may finish");
        let _ = external_stop.send(true);
    });
    let mut load_state = gate.load_state();
    let load_stop = stop_tx.clone();
    tokio::spawn(async move {
        if let Ok(state) = load_state.wait_for(|s| *s != LoadState::Loading).await {
            if matches!(*state, LoadState::Failed(_)) {
                let _ = load_stop.send(true);
            }
        }
    });

    let limits = ConnectionLimits {
        max_connections: gate.options().max_connections,
        write_stall: options.idle_timeout,
        // hyper's header timeout covers HTTP/1.1 clients that never send a request.
        handshake: None,
    };
    let mut incoming = accept::incoming(listener, limits, stop_rx.clone());
    let router = routes::router(gate.clone(), options.clone());
    let mut connections = JoinSet::new();
    while let Some(conn) = incoming.recv().await {
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        let header_timeout = options.header_timeout;
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024);
            let connection = builder.serve_connection(TokioIo::new(conn), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "HTTP connection ended with an error");
                    }
                    return;
                }
                _ = stop.wait_for(|stop| *stop) => {}
            }
            // Finishes the request in flight (a stream included), then closes.
            connection.as_mut().graceful_shutdown();
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "HTTP connection ended with an error");
            }
        });
        // Reap finished connections so the set does not grow with every one ever accepted.
        while connections.try_join_next().is_some() {}
    }
    // The accept loop ended: shutting down. Running requests get the grace period.
    let grace = gate.options().grace_period;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            seconds = grace.as_secs_f64(),
            "grace period over: closing the remaining HTTP requests"
        );
        connections.shutdown().await;
    }
    if let LoadState::Failed(reason) = &*gate.load_state().borrow() {
        return Err(HttpError::Load(reason.clone()));
    }
    Ok(())
}
