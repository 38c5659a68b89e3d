//! OpenAI's chat-completions request and response shapes, and their mapping to the core's.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::{
    ChatOutcome, ChatRequest, Error, ErrorKind, FinishReason, Message, Reply, Role, Tool, ToolCall,
};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its
/// status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A client's mistake unless the status says otherwise.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// A 400 about one field.
    fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message).param(param)
    }

    /// A body that is not JSON.
    pub(crate) fn bad_json(err: &serde_json::Error) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {err}"),
        )
        .code("invalid_json")
    }

    pub(crate) fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    pub(crate) fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The core's error: the caller's mistakes are 400s, the rest 500s.
    pub(crate) fn from_core(err: &Error) -> Self {
        let message = err.to_string();
        match (err.kind(), err) {
            (ErrorKind::PromptTooLong, _) => ApiError::new(StatusCode::BAD_REQUEST, message)
                .param("messages")
                .code("context_length_exceeded"),
            (ErrorKind::InvalidArgument, Error::InvalidArgument { field, .. }) => {
                ApiError::field(field, message)
            }
            (ErrorKind::InvalidArgument, _) => ApiError::new(StatusCode::BAD_REQUEST, message),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).kind("server_error"),
        }
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body().to_string(),
        )
            .into_response()
    }
}

/// A parsed `POST /v1/chat/completions` body.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    /// The model name the client asked for (echoed back).
    pub model: Option<String>,
    pub request: ChatRequest,
    pub stream: bool,
    pub include_usage: bool,
}

fn number(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::field(key, format!("invalid {key}: not a finite number"))),
        Some(other) => Err(ApiError::field(
            key,
            format!("invalid {key}: expected a number, got {other}"),
        )),
    }
}

fn count(body: &Map<String, Value>, key: &str) -> Result<Option<usize>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
            None => Err(ApiError::field(
                key,
                format!("invalid {key} {n}: expected a non-negative integer"),
            )),
        },
        Some(other) => Err(ApiError::field(
            key,
            format!("invalid {key}: expected an integer, got {other}"),
        )),
    }
}

fn boolean(body: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::field(
            key,
            format!("invalid {key}: expected true or false, got {other}"),
        )),
    }
}

/// A message's `content`: a string, or a list of text parts (joined), or null.
fn content(value: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some(kind), _) if kind != "text" => {
                        return Err(ApiError::field(
                            &format!("{param}[{i}]"),
                            format!("content parts of type {kind:?} are not supported: text only"),
                        ))
                    }
                    _ => {
                        return Err(ApiError::field(
                            &format!("{param}[{i}]"),
                            "a content part needs \"type\": \"text\" and a \"text\" string",
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(other) => Err(ApiError::field(
            param,
            format!("content must be a string or a list of text parts, got {other}"),
        )),
    }
}

fn message(value: &Value, i: usize) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(m) = value else {
        return Err(ApiError::field(&param, "each message must be an object"));
    };
    let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
        ApiError::field(
            &format!("{param}.role"),
            "each message needs a string \"role\"",
        )
    })?;
    let text = content(m.get("content"), &format!("{param}.content"))?;
    let role = match role {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" | "function" | "observation" => Role::Observation,
        other => {
            return Err(ApiError::field(
                &format!("{param}.role"),
                format!(
                    "unknown role {other:?}: expected system, developer, user, assistant or tool"
                ),
            ))
        }
    };
    if role == Role::Assistant {
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            let calls = calls
                .iter()
                .map(ToolCall::from_json)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiError::field(&format!("{param}.tool_calls"), e.to_string()))?;
            return Ok(Message::assistant_tool_calls(text, calls));
        }
    }
    if role == Role::Observation {
        let id = m
            .get("tool_call_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        return Ok(Message::tool_result(text, id));
    }
    Message::new(role.as_str(), text).map_err(|e| ApiError::field(&param, e.to_string()))
}

/// Reads a request body already parsed as JSON.
pub(crate) fn parse(body: &Value) -> Result<Completion, ApiError> {
    let Value::Object(body) = body else {
        return Err(ApiError::field(
            "body",
            "the request body must be a JSON object",
        ));
    };
    let model = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(ApiError::field("model", "model must be a string")),
    };
    let messages = match body.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => {
            return Err(ApiError::field("messages", "messages must not be empty"))
        }
        _ => {
            return Err(ApiError::field(
                "messages",
                "messages is required: a list of {role, content} objects",
            ))
        }
    };
    let mut history = messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(m, i))
        .collect::<Result<Vec<_>, _>>()?;
    // The last message is the new one: a user's question, or a tool's result to answer from.
    let last = history.pop().expect("messages is not empty");
    let prompt_role = match last.role {
        Role::User => Role::User,
        Role::Observation => Role::Observation,
        _ => {
            return Err(ApiError::field(
                &format!("messages[{}].role", messages.len() - 1),
                "the last message must be from the user or a tool",
            ))
        }
    };
    if last.content.is_empty() {
        return Err(ApiError::field(
            &format!("messages[{}].content", messages.len() - 1),
            "the last message must not be empty",
        ));
    }
    let mut request = ChatRequest::new(last.content).history(history);
    request.prompt_role = prompt_role;

    let max_tokens = match count(body, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => count(body, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::field(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    request.max_new_tokens = max_tokens;
    match number(body, "temperature")? {
        Some(t) if !(0.0..=2.0).contains(&t) => {
            return Err(ApiError::field(
                "temperature",
                format!("invalid temperature {t}: must be in [0, 2] (0 is greedy)"),
            ))
        }
        Some(0.0) => request.greedy = true,
        Some(t) => request.temperature = Some(t),
        None => {}
    }
    match number(body, "top_p")? {
        Some(p) if !(0.0..=1.0).contains(&p) => {
            return Err(ApiError::field(
                "top_p",
                format!("invalid top_p {p}: must be in [0, 1]"),
            ))
        }
        Some(0.0) => request.greedy = true,
        Some(p) => request.top_p = Some(p),
        None => {}
    }
    match body.get("seed") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => {
            request.seed = Some(
                n.as_u64()
                    .or_else(|| n.as_i64().map(|v| v as u64))
                    .ok_or_else(|| ApiError::field("seed", "seed must be an integer"))?,
            )
        }
        Some(_) => return Err(ApiError::field("seed", "seed must be an integer")),
    }
    request.stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::field("stop", "stop must be a string or strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::field("stop", "stop must be a string or strings")),
    };
    if request.stop.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", "stop strings must not be empty"));
    }
    if let Some(n) = count(body, "n")? {
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("n = {n} is not supported: only 1"),
            ));
        }
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = number(body, key)? {
            if v != 0.0 {
                return Err(ApiError::field(
                    key,
                    format!("{key} is not supported: only 0"),
                ));
            }
        }
    }
    match body.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) if map.is_empty() => {}
        Some(_) => return Err(ApiError::field("logit_bias", "logit_bias is not supported")),
    }
    if boolean(body, "logprobs")? {
        return Err(ApiError::field("logprobs", "logprobs is not supported"));
    }
    match body.get("response_format").and_then(|f| f.get("type")) {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "text" => {}
        Some(other) => {
            return Err(ApiError::field(
                "response_format",
                format!("response_format {other} is not supported: only text"),
            ))
        }
    }
    // Extensions, named as vLLM and llama.cpp's server name them.
    if let Some(k) = count(body, "top_k")? {
        if k == 0 {
            return Err(ApiError::field("top_k", "top_k must be at least 1"));
        }
        request.top_k = Some(k);
    }
    if let Some(r) = number(body, "repetition_penalty")? {
        if r <= 0.0 {
            return Err(ApiError::field(
                "repetition_penalty",
                "repetition_penalty must be > 0",
            ));
        }
        request.repetition_penalty = Some(r);
    }
    request.ignore_stop = boolean(body, "ignore_eos")?;

    let mut tools = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Tool::from_json(t)
                    .map_err(|e| ApiError::field(&format!("tools[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(ApiError::field("tools", "tools must be a list")),
    };
    match body.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => tools.clear(),
            "auto" | "required" => {}
            other => {
                return Err(ApiError::field(
                    "tool_choice",
                    format!("invalid tool_choice {other:?}: none, auto, required or a function"),
                ))
            }
        },
        Some(choice) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::field("tool_choice", "tool_choice names a function as {\"type\": \"function\", \"function\": {\"name\"}}")
                })?;
            tools.retain(|t| t.name == name);
            if tools.is_empty() {
                return Err(ApiError::field(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            }
        }
    }
    request.tools = tools;

    let stream = boolean(body, "stream")?;
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::field(
                    "stream_options.include_usage",
                    "include_usage must be true or false",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::field(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };
    Ok(Completion {
        model,
        request,
        stream,
        include_usage,
    })
}

/// OpenAI's finish reason.
pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        _ => "stop",
    }
}

/// The reply's tool calls in OpenAI's shape (ids are made up per call).
pub(crate) fn tool_calls(outcome: &ChatOutcome, id: &str) -> Option<Value> {
    match &outcome.reply {
        Reply::ToolCall { name, arguments } => Some(json!([{
            "id": format!("call_{}", id.trim_start_matches("chatcmpl-")),
            "type": "function",
            "function": {
                "name": name,
                "arguments": Value::Object(arguments.clone()).to_string(),
            },
        }])),
        _ => None,
    }
}

/// OpenAI's `usage` of an outcome.
pub(crate) fn usage(outcome: &ChatOutcome) -> Value {
    json!({
        "prompt_tokens": outcome.usage.prompt_tokens,
        "completion_tokens": outcome.usage.completion_tokens,
        "total_tokens": outcome.usage.prompt_tokens + outcome.usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.usage.cached_prompt_tokens},
    })
}
