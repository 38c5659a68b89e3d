//! What the network front-ends share: the model loaded in the background, admission (slots and
//! a bounded queue), metrics, connection hygiene and the generation run on a blocking thread.
//!
//! The gRPC server ([`crate::grpc`], feature `grpc`) and the OpenAI-compatible HTTP server
//! ([`crate::http`], feature `http`) are thin translations over one [`Gate`]: it holds the
//! model and the limits for both, so `--max-concurrent` and `--max-queue` count their requests
//! together and `/metrics` reports both.
//!
//! # Examples
//!
//! ```no_run
//! # async fn docs() -> Result<(), Box<dyn std::error::Error>> {
//! use chathub::server::{Gate, ServeOptions};
//!
//! let gate = Gate::new(&ServeOptions::default());
//! gate.load_in_background(|| chathub::Engine::load("chatglm3-6b"));
//! // Hand `gate.clone()` to `grpc::serve_gate` and `http::serve`.
//! # Ok(())
//! # }
//! ```

pub(crate) mod accept;
pub(crate) mod metrics;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::{ChatOutcome, ChatRequest, Engine, Reply};
pub(crate) use metrics::Metrics;

/// How a server runs, for every protocol it speaks.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Generations that run at once; each holds its own KV cache. They share the model's
    /// forward passes (continuous batching), so up to a handful they cost each other little:
    /// decoding on a CPU is bound by reading the weights, which one pass does for all.
    pub max_concurrent: usize,
    /// Requests that may wait for a free slot; beyond this they are turned away at once
    /// (gRPC RESOURCE_EXHAUSTED, HTTP 429).
    pub max_queue: usize,
    /// After a shutdown signal, how long running requests may take to finish.
    pub grace_period: Duration,
    /// Log prompt text (off by default: prompts are user data).
    pub log_prompts: bool,
    /// Longest request text accepted, in bytes (prompt, history and tools together): a
    /// request's text is tokenized before it is checked against the context, so this bounds
    /// the work a single request can cost before it is refused.
    pub max_prompt_bytes: usize,
    /// Open connections at once, per protocol; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a new gRPC connection has to send HTTP/2's preface before it is closed.
    pub handshake_timeout: Duration,
    /// Key/value cache the running generations may hold in all, in bytes (0: no limit beyond
    /// `max_concurrent`). A request reserves its prompt plus every reply token it may produce
    /// (see [`Engine::kv_cache_bytes_for`]) after it takes its slot and waits until that much
    /// is free; one that could never fit is refused as an invalid argument.
    pub kv_cache_bytes: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_concurrent: 4,
            max_queue: 16,
            grace_period: Duration::from_secs(30),
            log_prompts: false,
            max_prompt_bytes: 1 << 20,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            kv_cache_bytes: 0,
        }
    }
}

impl ServeOptions {
    /// Sets the generations that run at once.
    ///
    /// ```
    /// let options = chathub::server::ServeOptions::default().max_concurrent(8);
    /// assert_eq!(options.max_concurrent, 8);
    /// ```
    #[must_use]
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }

    /// Sets how many requests may wait for a slot.
    ///
    /// ```
    /// assert_eq!(chathub::server::ServeOptions::default().max_queue(0).max_queue, 0);
    /// ```
    #[must_use]
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n;
        self
    }

    /// Sets the grace period after a shutdown signal.
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = chathub::server::ServeOptions::default().grace_period(Duration::ZERO);
    /// assert_eq!(options.grace_period, Duration::ZERO);
    /// ```
    #[must_use]
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = grace;
        self
    }

    /// Logs each prompt's text (off by default: prompts are user data).
    ///
    /// ```
    /// assert!(chathub::server::ServeOptions::default().log_prompts(true).log_prompts);
    /// ```
    #[must_use]
    pub fn log_prompts(mut self, log: bool) -> Self {
        self.log_prompts = log;
        self
    }

    /// Sets the key/value cache budget of the running generations, in bytes (0: none).
    ///
    /// ```
    /// let options = chathub::server::ServeOptions::default().kv_cache_bytes(1 << 30);
    /// assert_eq!(options.kv_cache_bytes, 1 << 30);
    /// ```
    #[must_use]
    pub fn kv_cache_bytes(mut self, bytes: u64) -> Self {
        self.kv_cache_bytes = bytes;
        self
    }

    /// Sets how many connections each protocol keeps open at once.
    ///
    /// ```
    /// assert_eq!(chathub::server::ServeOptions::default().max_connections(8).max_connections, 8);
    /// ```
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets the longest request text accepted, in bytes.
    ///
    /// ```
    /// assert_eq!(chathub::server::ServeOptions::default().max_prompt_bytes(10).max_prompt_bytes, 10);
    /// ```
    #[must_use]
    pub fn max_prompt_bytes(mut self, bytes: usize) -> Self {
        self.max_prompt_bytes = bytes;
        self
    }
}

/// Counters of a running server (both protocols), for tests and monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Requests received.
    pub requests: u64,
    /// Requests turned away because the queue was full.
    pub rejected: u64,
    /// Generations running now.
    pub active: usize,
    /// Requests waiting for a slot now.
    pub queued: usize,
    /// Reply tokens generated by finished generations.
    pub generated_tokens: u64,
    /// Generations stopped early (client gone, deadline, shutdown).
    pub cancelled: u64,
    /// Generations that ran to their end.
    pub completed: u64,
    /// Requests that failed (bad arguments, prompt too long, compute errors).
    pub failed: u64,
}

/// The model and the admission state every front-end shares. Cheap to clone: clones share
/// everything.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("loaded", &self.is_loaded())
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

struct GateInner {
    engine: OnceLock<Arc<Engine>>,
    /// The model's name as the servers report it (HTTP's `model`).
    model_name: Mutex<String>,
    slots: Arc<Semaphore>,
    /// The key/value budget in KiB permits, when there is one.
    kv_budget: Option<Arc<Semaphore>>,
    waiting: AtomicUsize,
    options: ServeOptions,
    next_id: AtomicU64,
    metrics: Metrics,
    state: watch::Sender<LoadState>,
    /// When the gate was made, in Unix seconds (the model's `created`).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    started_unix: u64,
}

/// Where the model's loading stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    /// Still loading: requests get UNAVAILABLE / 503.
    Loading,
    /// Loaded: requests are served.
    Ready,
    /// Loading failed (the message says why); the server should stop.
    Failed(String),
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The model is still loading.
    Loading,
    /// The queue is full.
    Busy,
    /// The server is shutting down.
    ShuttingDown,
}

/// An admitted request: the model and a generation slot, held until dropped.
pub(crate) struct Admission {
    pub id: u64,
    pub engine: Arc<Engine>,
    _permit: OwnedSemaphorePermit,
    queued: Duration,
    /// Key/value cache the generation may hold (known once validated).
    kv_bytes: usize,
    /// Its share of the key/value budget, once reserved.
    _kv_permit: Option<OwnedSemaphorePermit>,
}

/// `bytes` in whole KiB (rounded up), as the budget's permits count them.
fn kib_permits(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

impl Gate {
    /// A gate with no model yet: requests are refused as loading until
    /// [`Gate::set_engine`] or [`Gate::load_in_background`] installs one.
    pub fn new(options: &ServeOptions) -> Self {
        let (state, _) = watch::channel(LoadState::Loading);
        Gate {
            inner: Arc::new(GateInner {
                engine: OnceLock::new(),
                model_name: Mutex::new("chathub".to_string()),
                slots: Arc::new(Semaphore::new(options.max_concurrent.max(1))),
                kv_budget: (options.kv_cache_bytes > 0).then(|| {
                    Arc::new(Semaphore::new(kib_permits(options.kv_cache_bytes) as usize))
                }),
                waiting: AtomicUsize::new(0),
                options: options.clone(),
                next_id: AtomicU64::new(1),
                metrics: Metrics::default(),
                state,
                started_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            }),
        }
    }

    /// Installs the loaded model; later calls are ignored.
    pub fn set_engine(&self, engine: Engine) {
        if self.inner.engine.set(Arc::new(engine)).is_ok() {
            self.inner.state.send_replace(LoadState::Ready);
        }
    }

    /// Sets the name the servers report for the model (default `chathub`).
    pub fn set_model_name(&self, name: impl Into<String>) {
        *self
            .inner
            .model_name
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = name.into();
    }

    /// The name the servers report for the model.
    pub fn model_name(&self) -> String {
        self.inner
            .model_name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `load` on a blocking thread and installs its model; a failure moves the state to
    /// [`LoadState::Failed`]. Must be called within a tokio runtime.
    pub fn load_in_background<L>(&self, load: L) -> tokio::task::JoinHandle<()>
    where
        L: FnOnce() -> crate::Result<Engine> + Send + 'static,
    {
        let gate = self.clone();
        tokio::spawn(async move {
            match tokio::task::spawn_blocking(load).await {
                Ok(Ok(engine)) => {
                    gate.set_engine(engine);
                    tracing::info!("model loaded: serving");
                }
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "model failed to load");
                    gate.inner
                        .state
                        .send_replace(LoadState::Failed(err.to_string()));
                }
                Err(join) => {
                    tracing::error!(error = %join, "model loader panicked");
                    gate.inner
                        .state
                        .send_replace(LoadState::Failed(format!("loader panicked: {join}")));
                }
            }
        })
    }

    /// Whether the model is loaded.
    pub fn is_loaded(&self) -> bool {
        self.inner.engine.get().is_some()
    }

    /// Follows the loading state (to flip health checks, or to stop on a failure).
    pub fn load_state(&self) -> watch::Receiver<LoadState> {
        self.inner.state.subscribe()
    }

    /// The model, once loaded.
    pub(crate) fn engine(&self) -> Option<Arc<Engine>> {
        self.inner.engine.get().cloned()
    }

    /// The options the gate was made with.
    pub fn options(&self) -> &ServeOptions {
        &self.inner.options
    }

    pub(crate) fn counters(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Current counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.inner.metrics;
        MetricsSnapshot {
            requests: m.requests.load(Ordering::Relaxed),
            rejected: m.rejected.load(Ordering::Relaxed),
            active: m.active.load(Ordering::Relaxed),
            queued: self.waiting(),
            generated_tokens: m.generated_tokens.load(Ordering::Relaxed),
            cancelled: m.cancelled.load(Ordering::Relaxed),
            completed: m.completed.load(Ordering::Relaxed),
            failed: m.failed.load(Ordering::Relaxed),
        }
    }

    /// Every counter and histogram in Prometheus' text format (what `GET /metrics` serves).
    pub fn prometheus(&self) -> String {
        let batching = self
            .engine()
            .map(|engine| engine.batch_counts())
            .unwrap_or_default();
        self.inner
            .metrics
            .prometheus(self.waiting(), self.is_loaded(), batching)
    }

    /// When the server started, in Unix seconds.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn started_unix(&self) -> u64 {
        self.inner.started_unix
    }

    /// Counts a request refused for its content before it was admitted.
    pub(crate) fn count_failed(&self) {
        self.inner.metrics.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Refuses a request whose text is over the size limit: costs a sum of lengths, so it runs
    /// before the request queues (a flood of huge prompts is refused without tokenizing any).
    pub(crate) fn check_size(&self, request: &ChatRequest) -> crate::Result<()> {
        let bytes = request_bytes(request);
        if bytes > self.inner.options.max_prompt_bytes {
            self.count_failed();
            return Err(crate::Error::InvalidArgument {
                field: "prompt",
                value: format!("{bytes} bytes of text"),
                reason: "more than the server accepts (--max-prompt-bytes)",
            });
        }
        Ok(())
    }

    /// What [`Gate::admit`] would refuse at once now, if anything: lets a front-end answer
    /// before it reads a request.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn refuses_now(&self) -> Option<Refusal> {
        if !self.is_loaded() {
            self.inner.metrics.requests.fetch_add(1, Ordering::Relaxed);
            return Some(Refusal::Loading);
        }
        if self.inner.slots.is_closed() {
            return Some(Refusal::ShuttingDown);
        }
        let full = self.inner.slots.available_permits() == 0
            && self.waiting() >= self.inner.options.max_queue;
        if full {
            self.inner.metrics.requests.fetch_add(1, Ordering::Relaxed);
            self.inner.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Some(Refusal::Busy);
        }
        None
    }

    /// Requests waiting for a slot now.
    fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Takes a generation slot, waiting in the bounded queue for one. Nothing about the request
    /// is looked at before this, so a flood of huge prompts is turned away before any of them
    /// is read. Dropping the future leaves the queue (a client that hangs up while waiting).
    pub(crate) async fn admit(&self) -> Result<Admission, Refusal> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let engine = self.engine().ok_or(Refusal::Loading)?;
        let start = Instant::now();
        let permit = match self.inner.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Refusal::ShuttingDown),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if self.inner.waiting.fetch_add(1, Ordering::SeqCst) >= self.inner.options.max_queue
                {
                    self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.inner.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(Refusal::Busy);
                }
                // Leaves the queue however the wait ends, the client hanging up included.
                struct Waiting<'a>(&'a AtomicUsize);
                impl Drop for Waiting<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _waiting = Waiting(&self.inner.waiting);
                self.inner
                    .slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Refusal::ShuttingDown)?
            }
        };
        Ok(Admission {
            id,
            engine,
            _permit: permit,
            queued: start.elapsed(),
            kv_bytes: 0,
            _kv_permit: None,
        })
    }

    /// Stops admitting: queued and new requests are refused as shutting down; running ones
    /// go on.
    pub fn close(&self) {
        self.inner.slots.close();
    }
}

impl Admission {
    /// Checks `request` (roles, parameters, prompt length) the way generation will, and works
    /// out the key/value cache it may hold. Tokenizes the prompt: call it on a blocking thread.
    pub(crate) fn validate(&mut self, gate: &Gate, request: &ChatRequest) -> crate::Result<()> {
        self.kv_bytes = self
            .engine
            .kv_cache_bytes_for(request)
            .inspect_err(|_| gate.count_failed())?;
        Ok(())
    }

    /// Reserves the validated request's key/value cache from the server's budget
    /// (`ServeOptions::kv_cache_bytes`), waiting until that much is free; at once when there is
    /// no budget. Dropping the future gives up the wait (a client that hung up).
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] when the request alone needs more than the whole
    /// budget (fewer reply tokens would fit), or when the server is shutting down.
    pub(crate) async fn reserve_kv(&mut self, gate: &Gate) -> crate::Result<()> {
        let Some(budget) = &gate.inner.kv_budget else {
            return Ok(());
        };
        let total = gate.inner.options.kv_cache_bytes;
        if self.kv_bytes as u64 > total {
            gate.count_failed();
            return Err(crate::Error::InvalidArgument {
                field: "max_tokens",
                value: format!(
                    "{} bytes of key/value cache for the prompt and reply",
                    self.kv_bytes
                ),
                reason: "more than the server's whole budget (--kv-cache-bytes): ask for fewer reply tokens or a shorter prompt",
            });
        }
        let permit = budget
            .clone()
            .acquire_many_owned(kib_permits(self.kv_bytes as u64).max(1))
            .await
            .map_err(|_| crate::Error::InvalidArgument {
                field: "request",
                value: "the key/value budget".into(),
                reason: "the server is shutting down",
            })?;
        self._kv_permit = Some(permit);
        Ok(())
    }

    /// Runs the generation on the calling (blocking) thread. `on_text` gets each new piece of
    /// the reply's text (`""` after a token that showed nothing, so it can still say stop) and
    /// returns whether to go on; `cancel` and `deadline` stop it too. The second value says
    /// whether the deadline passed.
    pub(crate) fn generate(
        &self,
        gate: &Gate,
        method: &'static str,
        request: &ChatRequest,
        cancel: &AtomicBool,
        deadline: Option<Instant>,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> (crate::Result<ChatOutcome>, bool) {
        let metrics = gate.counters();
        metrics.active.fetch_add(1, Ordering::Relaxed);
        if gate.options().log_prompts {
            tracing::info!(request_id = self.id, method, prompt = %request.prompt, "request");
        }
        let mut expired = false;
        let result = self.engine.chat_stream(request, |delta| {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                expired = true;
                return ControlFlow::Break(());
            }
            if cancel.load(Ordering::Relaxed) || !on_text(delta) {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        metrics.active.fetch_sub(1, Ordering::Relaxed);
        match &result {
            Ok(outcome) => {
                metrics.record(outcome, self.queued);
                expired |= deadline.is_some_and(|d| Instant::now() >= d);
                tracing::info!(
                    request_id = self.id,
                    method,
                    prompt_tokens = outcome.usage.prompt_tokens,
                    cached_prompt_tokens = outcome.usage.cached_prompt_tokens,
                    completion_tokens = outcome.usage.completion_tokens,
                    finish_reason = ?outcome.finish_reason,
                    ttft_ms = outcome.timings.ttft_ms,
                    decode_tokens_per_s = outcome.timings.decode_tokens_per_s,
                    total_ms = outcome.timings.total_ms,
                    "request finished"
                );
            }
            Err(err) => {
                metrics.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(request_id = self.id, method, error = %err, "request failed");
            }
        }
        (result, expired)
    }
}

/// Sets its flag when dropped: a handler's future is dropped when its client goes away, and
/// the generation on the blocking thread stops at its next token.
pub(crate) struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Bytes of text a request carries (prompt, history and tools), for the size limit.
fn request_bytes(request: &ChatRequest) -> usize {
    let history: usize = request
        .history
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.name.len() + c.arguments_json().len())
                    .sum::<usize>()
        })
        .sum();
    let tools: usize = request
        .tools
        .iter()
        .map(|t| t.to_json().to_string().len())
        .sum();
    request.prompt.len() + history + tools
}

/// The text a text-only protocol carries for a reply: a text reply's text; for a reply the
/// model wrote with a metadata line (which only makes sense with tools), its content, stripped;
/// nothing for a tool call.
pub(crate) fn reply_text(outcome: &ChatOutcome) -> String {
    match &outcome.reply {
        Reply::Metadata { content, .. } => content.trim().to_string(),
        Reply::ToolCall { .. } => String::new(),
        _ => outcome.text.clone(),
    }
}

/// Completes on Ctrl+C or SIGTERM: what `chathub serve` stops on.
pub async fn shutdown_signal() {
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
