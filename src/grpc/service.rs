//! The `aihub.ChatHub` service: proto requests to the core's [`ChatRequest`] and back.

use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::proto::{self, chat_hub_server::ChatHub};
use crate::server::{
    reply_text, Admission, CancelOnDrop, Gate, MetricsSnapshot, Refusal, ServeOptions,
};
use crate::{parse_history, ChatRequest, Engine, Error, ErrorKind};

/// Replies a stream may run ahead of a slow client before generation waits for it.
const STREAM_BUFFER: usize = 8;

/// Our own deadline fires this much before tonic's, so the client gets DEADLINE_EXCEEDED rather
/// than the transport's generic CANCELLED.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// The `aihub.ChatHub` implementation. Cheap to clone: clones share the model and the limits.
#[derive(Clone, Debug)]
pub struct ChatHubService {
    gate: Gate,
}

impl ChatHubService {
    /// A service with no model yet: calls get UNAVAILABLE until [`ChatHubService::set_engine`].
    pub fn new(options: ServeOptions) -> Self {
        Self::from_gate(Gate::new(&options))
    }

    /// A service over a gate other front-ends share (their requests count against the same
    /// limits).
    pub fn from_gate(gate: Gate) -> Self {
        ChatHubService { gate }
    }

    /// The model and limits this service admits requests through.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Installs the loaded model; later calls are ignored.
    pub fn set_engine(&self, engine: Engine) {
        self.gate.set_engine(engine);
    }

    /// Current counters (of every front-end sharing the gate).
    pub fn metrics(&self) -> MetricsSnapshot {
        self.gate.metrics()
    }

    /// Everything a call needs before it may generate: a valid request, a slot, the prompt
    /// checked against the context.
    async fn admit(
        &self,
        request: Request<proto::ChatRequest>,
    ) -> Result<(Admission, ChatRequest, Option<Instant>), Status> {
        let deadline = grpc_deadline(request.metadata());
        // Field checks cost nothing: a malformed request is refused even when the queue is full.
        let core =
            to_core_request(request.into_inner()).inspect_err(|_| self.gate.count_failed())?;
        self.gate.check_size(&core)?;
        let admission = self.gate.admit().await.map_err(refusal_status)?;
        // Tokenizing a long prompt takes a while: off the async threads.
        let gate = self.gate.clone();
        let (mut admission, core) = tokio::task::spawn_blocking(move || {
            let mut admission = admission;
            let checked = admission.validate(&gate, &core);
            checked.map(|()| (admission, core))
        })
        .await
        .map_err(|e| Status::internal(format!("validation task failed: {e}")))??;
        admission.reserve_kv(&self.gate).await?;
        Ok((admission, core, deadline))
    }
}

/// The status a refused admission gets.
fn refusal_status(refusal: Refusal) -> Status {
    match refusal {
        Refusal::Loading => Status::unavailable("the model is still loading"),
        Refusal::Busy => Status::resource_exhausted(
            "server busy: every generation slot is taken and the queue is full",
        ),
        Refusal::ShuttingDown => Status::unavailable("server shutting down"),
    }
}

/// A deadline error after `tokens` reply tokens.
fn deadline_status(tokens: usize) -> Status {
    Status::deadline_exceeded(format!("deadline passed after {tokens} reply tokens"))
}

#[tonic::async_trait]
impl ChatHub for ChatHubService {
    async fn chat(
        &self,
        request: Request<proto::ChatRequest>,
    ) -> Result<Response<proto::ChatReply>, Status> {
        let (admission, core, deadline) = self.admit(request).await?;
        let cancel = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let gate = self.gate.clone();
        let task = tokio::task::spawn_blocking(move || {
            admission.generate(&gate, "Chat", &core, &cancel, deadline, |_| true)
        });
        let joined = match deadline {
            Some(deadline) => {
                let wake = tokio::time::Instant::from_std(deadline);
                match tokio::time::timeout_at(wake, task).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        return Err(Status::deadline_exceeded(
                            "deadline passed while generating",
                        ))
                    }
                }
            }
            None => task.await,
        };
        let (result, expired) =
            joined.map_err(|e| Status::internal(format!("generation task failed: {e}")))?;
        let outcome = result?;
        if expired {
            return Err(deadline_status(outcome.usage.completion_tokens));
        }
        Ok(Response::new(proto::ChatReply {
            response: reply_text(&outcome),
        }))
    }

    type StreamingChatStream =
        Pin<Box<dyn Stream<Item = Result<proto::ChatReply, Status>> + Send + 'static>>;

    async fn streaming_chat(
        &self,
        request: Request<proto::ChatRequest>,
    ) -> Result<Response<Self::StreamingChatStream>, Status> {
        let (admission, core, deadline) = self.admit(request).await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let gate = self.gate.clone();
        tokio::task::spawn_blocking(move || {
            let cancel = AtomicBool::new(false);
            let mut text = String::new();
            // A failed send means the client is gone: stop generating.
            let send = |text: &str| {
                tx.blocking_send(Ok(proto::ChatReply {
                    response: text.to_string(),
                }))
                .is_ok()
            };
            let (result, expired) =
                admission.generate(&gate, "StreamingChat", &core, &cancel, deadline, |delta| {
                    if delta.is_empty() {
                        return !tx.is_closed();
                    }
                    text.push_str(delta);
                    send(&text)
                });
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(err) => {
                    let _ = tx.blocking_send(Err(err.into()));
                    return;
                }
            };
            if expired {
                let _ = tx.blocking_send(Err(deadline_status(outcome.usage.completion_tokens)));
                return;
            }
            // The official stream yields the processed reply each time, so it may drop text it
            // showed (a reply that turns into a tool call): the last message is the final
            // reply's text.
            let final_text = reply_text(&outcome);
            if final_text != text && outcome.finish_reason != crate::FinishReason::Cancelled {
                send(&final_text);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The proto's request as the core's: 0 means "model default", as proto3 sends unset fields.
fn to_core_request(message: proto::ChatRequest) -> Result<ChatRequest, Status> {
    if message.max_length < 0 {
        return Err(Status::invalid_argument(format!(
            "invalid max_length {}: must not be negative (0 means the model default)",
            message.max_length
        )));
    }
    // Proto3 sends an unset field as 0: 0 is "the model default", then the core's own ranges
    // and wording apply.
    if message.top_p.is_nan() || !(0.0..=1.0).contains(&message.top_p) {
        return Err(Status::invalid_argument(format!(
            "invalid top_p {}: must be in (0, 1] (0 means the model default)",
            message.top_p
        )));
    }
    if !message.temperature.is_finite() || message.temperature < 0.0 {
        return Err(Status::invalid_argument(format!(
            "invalid temperature {}: must be a finite number > 0 (0 means the model default)",
            message.temperature
        )));
    }
    let top_p = (message.top_p != 0.0).then_some(f64::from(message.top_p));
    let temperature = (message.temperature != 0.0).then_some(f64::from(message.temperature));
    let history = parse_history(
        message
            .history
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str())),
    )
    .map_err(Status::from)?;
    let mut request = ChatRequest::new(message.prompt).history(history);
    request.max_length = (message.max_length > 0).then_some(message.max_length as usize);
    request.top_p = top_p;
    request.temperature = temperature;
    Ok(request)
}

/// When the client's `grpc-timeout` runs out (minus a margin), if it sent one.
fn grpc_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN))
}

/// The one place core errors become gRPC statuses.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err.kind() {
            ErrorKind::InvalidArgument | ErrorKind::PromptTooLong => {
                Status::invalid_argument(message)
            }
            ErrorKind::NotFound | ErrorKind::InvalidModel => Status::failed_precondition(message),
            _ => Status::internal(message),
        }
    }
}
