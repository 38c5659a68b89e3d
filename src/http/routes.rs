//! The routes, the front door (CORS, API key) and the handlers.

use std::convert::Infallible;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::api::{self, ApiError, Completion};
use super::HttpOptions;
use crate::server::{reply_text, CancelOnDrop, Gate, Refusal};
use crate::{ChatOutcome, FinishReason};

/// Chunks a stream may run ahead of a slow client before generation waits for it.
const STREAM_BUFFER: usize = 16;

/// What `Retry-After` says when the queue is full: a generation slot frees up within seconds.
const RETRY_AFTER_SECONDS: &str = "1";

/// What `Retry-After` says while the model loads (seconds to minutes): the `openai` SDKs retry a
/// 503 twice by default, after this long when the header says so (half a second otherwise), so
/// a client started together with the server waits out a short load instead of failing.
const RETRY_AFTER_LOADING_SECONDS: &str = "5";

/// The web chat page, compiled in: no CDN, no build step.
const PAGE: &str = include_str!("page.html");

#[derive(Clone)]
struct App {
    gate: Gate,
    options: Arc<HttpOptions>,
}

/// Every route, behind the front door.
pub(super) fn router(gate: Gate, options: HttpOptions) -> Router {
    let app = App {
        gate,
        options: Arc::new(options),
    };
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), front_door))
        .with_state(app)
}

/// CORS and the API key, before any route.
async fn front_door(State(app): State<App>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let allowed_origin = origin
        .as_deref()
        .and_then(|o| allowed_origin(&app.options.cors_origins, o));
    if request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        if let Some(allowed) = allowed_origin {
            return preflight(allowed, request.headers());
        }
    }
    let path = request.uri().path();
    let open = path == "/" || path == "/health";
    let mut response = if open || authorized(app.options.api_key.as_deref(), request.headers()) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key: send `Authorization: Bearer <key>`",
        )
        .kind("invalid_request_error")
        .code("invalid_api_key")
        .into_response()
    };
    if let Some(allowed) = allowed_origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// The `Access-Control-Allow-Origin` value for `origin`, when it may call the API.
fn allowed_origin(allowed: &[String], origin: &str) -> Option<HeaderValue> {
    if allowed.iter().any(|a| a == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/') == origin)
        .then(|| HeaderValue::from_str(origin).ok())
        .flatten()
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight(origin: HeaderValue, headers: &HeaderMap) -> Response {
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            ),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, requested),
            (
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            ),
            (header::VARY, HeaderValue::from_static("origin")),
        ],
    )
        .into_response()
}

/// Whether the request carries the key (always, when none is set).
fn authorized(key: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(key) = key else {
        return true;
    };
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    same_secret(given.trim().as_bytes(), key.as_bytes())
}

/// Compares in time that depends only on the lengths, so the key cannot be guessed byte by
/// byte from response times.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let mut diff = given.len() ^ key.len();
    for i in 0..given.len().max(key.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = key.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    std::hint::black_box(diff) == 0
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page talks only to this server; nothing is loaded from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

async fn health(State(app): State<App>) -> Response {
    if app.gate.is_loaded() {
        Json(json!({"status": "ok", "model": app.gate.model_name()})).into_response()
    } else {
        let status = match &*app.gate.load_state().borrow() {
            crate::server::LoadState::Failed(_) => "failed",
            _ => "loading",
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": status})),
        )
            .into_response()
    }
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.gate.prometheus(),
    )
        .into_response()
}

fn model_object(app: &App) -> Value {
    json!({
        "id": app.gate.model_name(),
        "object": "model",
        "created": app.gate.started_unix(),
        "owned_by": "chathub",
    })
}

async fn models(State(app): State<App>) -> Response {
    Json(json!({"object": "list", "data": [model_object(&app)]})).into_response()
}

async fn model(State(app): State<App>, Path(id): Path<String>) -> Response {
    if id == app.gate.model_name() {
        Json(model_object(&app)).into_response()
    } else {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model {id:?} does not exist: this server serves {:?}",
                app.gate.model_name()
            ),
        )
        .param("model")
        .code("model_not_found")
        .into_response()
    }
}

async fn not_found(request: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such route: {} {}",
            request.method(),
            request.uri().path()
        ),
    )
    .code("not_found")
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
    .code("method_not_allowed")
    .into_response()
}

/// A JSON response with the right content type.
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

/// `error` as a response that tells the client to retry after `seconds`.
fn retry_after(error: ApiError, seconds: &'static str) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    response
}

/// Why a request could not be admitted, as OpenAI-shaped errors.
fn refusal(refusal: Refusal) -> Response {
    match refusal {
        Refusal::Loading => retry_after(
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading",
            )
            .kind("server_error")
            .code("model_loading"),
            RETRY_AFTER_LOADING_SECONDS,
        ),
        Refusal::Busy => retry_after(
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server busy: every generation slot is taken and the queue is full; retry shortly",
            )
            .kind("rate_limit_error")
            .code("server_busy"),
            RETRY_AFTER_SECONDS,
        ),
        Refusal::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
        .kind("server_error")
        .code("shutting_down")
        .into_response(),
    }
}

/// Reads the body up to the limit and within the timeout.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let read = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the body: {e}"),
                )
            })?;
            if bytes.len() + chunk.len() > limit {
                return Err(too_large(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(bytes))
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )
            .code("request_timeout"))
        })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than this server accepts ({limit} bytes)"),
    )
    .code("request_too_large")
}

async fn chat_completions(State(app): State<App>, request: Request) -> Response {
    // Refusals that need nothing from the body come first: a full queue turns a flood away
    // before any of it is read.
    if let Some(refused) = app.gate.refuses_now() {
        return refusal(refused);
    }
    let limit = app.options.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit).into_response();
    }
    let body = match read_body(request.into_body(), limit, app.options.header_timeout).await {
        Ok(body) => body,
        Err(err) => return err.into_response(),
    };
    let completion = match serde_json::from_slice::<Value>(&body)
        .map_err(|e| ApiError::bad_json(&e))
        .and_then(|value| api::parse(&value))
    {
        Ok(completion) => completion,
        Err(err) => {
            app.gate.count_failed();
            return err.into_response();
        }
    };
    if let Err(err) = app.gate.check_size(&completion.request) {
        return ApiError::from_core(&err).into_response();
    }
    let admission = match app.gate.admit().await {
        Ok(admission) => admission,
        Err(refused) => return refusal(refused),
    };
    // Tokenizing a long prompt takes a while: off the async threads.
    let gate = app.gate.clone();
    let request = completion.request.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let mut admission = admission;
        let checked = admission.validate(&gate, &request);
        checked.map(|()| admission)
    })
    .await;
    let mut admission = match checked {
        Ok(Ok(admission)) => admission,
        Ok(Err(err)) => return ApiError::from_core(&err).into_response(),
        Err(join) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("validation failed: {join}"),
            )
            .kind("server_error")
            .into_response()
        }
    };
    if let Err(err) = admission.reserve_kv(&app.gate).await {
        return ApiError::from_core(&err).into_response();
    }
    let reply = Replying {
        id: format!("chatcmpl-{:x}{:06x}", app.gate.started_unix(), admission.id),
        created: unix_now(),
        model: completion
            .model
            .clone()
            .unwrap_or_else(|| app.gate.model_name()),
    };
    if completion.stream {
        stream_reply(app.gate.clone(), admission, completion, reply)
    } else {
        whole_reply(app.gate.clone(), admission, completion, reply).await
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What every response object of one completion repeats.
struct Replying {
    id: String,
    created: u64,
    model: String,
}

impl Replying {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>, include_usage: bool) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": Value::Null,
                "finish_reason": finish_reason,
            }],
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        event(&chunk)
    }
}

/// One server-sent event carrying `value`.
fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

async fn whole_reply(
    gate: Gate,
    admission: crate::server::Admission,
    completion: Completion,
    reply: Replying,
) -> Response {
    let cancel = Arc::new(AtomicBool::new(false));
    // The handler's future is dropped when the client hangs up: stop generating then.
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let worker_gate = gate.clone();
    let request = completion.request;
    let joined = tokio::task::spawn_blocking(move || {
        admission
            .generate(
                &worker_gate,
                "chat.completions",
                &request,
                &cancel,
                None,
                |_| true,
            )
            .0
    })
    .await;
    let outcome = match joined {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(err)) => return ApiError::from_core(&err).into_response(),
        Err(join) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("generation failed: {join}"),
            )
            .kind("server_error")
            .into_response()
        }
    };
    let tool_calls = api::tool_calls(&outcome, &reply.id);
    let content = match &tool_calls {
        Some(_) => Value::Null,
        None => Value::String(reply_text(&outcome)),
    };
    let mut message = json!({"role": "assistant", "content": content});
    if let Some(calls) = tool_calls {
        message["tool_calls"] = calls;
    }
    Json(json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": Value::Null,
            "finish_reason": api::finish_reason(outcome.finish_reason),
        }],
        "usage": api::usage(&outcome),
    }))
    .into_response()
}

fn stream_reply(
    gate: Gate,
    admission: crate::server::Admission,
    completion: Completion,
    reply: Replying,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    let include_usage = completion.include_usage;
    let request = completion.request;
    tokio::task::spawn_blocking(move || {
        // A failed send means the client is gone (the body was dropped): stop generating.
        let send = |bytes: Bytes| tx.blocking_send(bytes).is_ok();
        let role = json!({"role": "assistant", "content": ""});
        let cancel = AtomicBool::new(!send(reply.chunk(role, None, include_usage)));
        let mut streamed = String::new();
        let (result, _) = admission.generate(
            &gate,
            "chat.completions",
            &request,
            &cancel,
            None,
            |delta| {
                if delta.is_empty() {
                    return !tx.is_closed();
                }
                streamed.push_str(delta);
                send(reply.chunk(json!({"content": delta}), None, include_usage))
            },
        );
        let outcome: ChatOutcome = match result {
            Ok(outcome) => outcome,
            Err(err) => {
                let error = ApiError::from_core(&err);
                send(event(&error.body()));
                return;
            }
        };
        if outcome.finish_reason == FinishReason::Cancelled {
            return;
        }
        // Text the stream has not shown yet: a metadata reply's content, shown only once the
        // reply ended.
        let text = reply_text(&outcome);
        if let Some(rest) = text.strip_prefix(streamed.as_str()) {
            if !rest.is_empty() && !send(reply.chunk(json!({"content": rest}), None, include_usage))
            {
                return;
            }
        }
        if let Some(calls) = api::tool_calls(&outcome, &reply.id) {
            let indexed: Vec<Value> = calls
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, call)| {
                    let mut call = call.clone();
                    call["index"] = json!(i);
                    call
                })
                .collect();
            if !send(reply.chunk(json!({"tool_calls": indexed}), None, include_usage)) {
                return;
            }
        }
        let finish = api::finish_reason(outcome.finish_reason);
        if !send(reply.chunk(json!({}), Some(finish), include_usage)) {
            return;
        }
        if include_usage {
            let usage = json!({
                "id": reply.id,
                "object": "chat.completion.chunk",
                "created": reply.created,
                "model": reply.model,
                "system_fingerprint": Value::Null,
                "choices": [],
                "usage": api::usage(&outcome),
            });
            if !send(event(&usage)) {
                return;
            }
        }
        send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // Tells nginx-style proxies not to buffer the stream.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response()
}
