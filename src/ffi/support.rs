//! The plumbing behind the C ABI: panic guards, the per-thread last error, string conversion,
//! and translating the C structs into the core's request.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{
    ChathubMessage, ChathubParams, ChathubReply, ChathubStats, CHATHUB_ERR_INVALID_ARGUMENT,
    CHATHUB_ERR_PANIC, CHATHUB_OK,
};
use crate::{ChatOutcome, ChatRequest, Error, FinishReason, Message, Reply, Tool, ToolCall};

/// A failure on its way to C: a status code and a message.
pub(super) struct FfiError {
    code: i32,
    message: String,
}

impl FfiError {
    pub(super) fn invalid(message: impl Into<String>) -> Self {
        FfiError {
            code: CHATHUB_ERR_INVALID_ARGUMENT,
            message: message.into(),
        }
    }
}

impl FfiError {
    /// The failure a nested call on this thread has just recorded.
    pub(super) fn from_last(code: i32) -> Self {
        let message = LAST_ERROR.with(|e| {
            e.borrow()
                .as_ref()
                .map(|(_, m)| m.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        FfiError { code, message }
    }
}

impl From<Error> for FfiError {
    fn from(err: Error) -> Self {
        FfiError {
            code: err.kind() as i32,
            message: err.to_string(),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<(i32, CString)>> = const { RefCell::new(None) };
}

fn set_last_error(code: i32, message: &str) {
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some((code, message)));
}

/// The last failure's code on this thread (`CHATHUB_OK` when none).
pub(super) fn last_error_code() -> i32 {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(CHATHUB_OK, |(c, _)| *c))
}

/// The last failure's message on this thread, valid until the next failure on this thread.
pub(super) fn last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| {
        e.borrow()
            .as_ref()
            .map_or(std::ptr::null(), |(_, m)| m.as_ptr())
    })
}

/// Runs an FFI body: every `Err` and every panic becomes a status code plus a stored message.
/// This is the single funnel from Rust results to C status codes.
pub(super) fn guard(body: impl FnOnce() -> Result<(), FfiError>) -> i32 {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CHATHUB_OK,
        Ok(Err(err)) => {
            set_last_error(err.code, &err.message);
            err.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(
                CHATHUB_ERR_PANIC,
                &format!("internal error (a bug in chathub, please report it): {what}"),
            );
            CHATHUB_ERR_PANIC
        }
    }
}

/// Borrows a NUL-terminated UTF-8 string from C.
///
/// # Safety
///
/// `ptr` is NULL or points to a NUL-terminated string that outlives the returned borrow (`'a`)
/// and is not modified during it.
pub(super) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, FfiError> {
    if ptr.is_null() {
        return Err(FfiError::invalid(format!("{name} is NULL")));
    }
    // SAFETY: `ptr` is non-null (checked above), and the caller promises it is NUL-terminated,
    // readable up to the NUL and left unchanged for `'a`, what `CStr::from_ptr` asks.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|e| {
        FfiError::invalid(format!(
            "{name} is not valid UTF-8 (bad byte at offset {})",
            e.valid_up_to()
        ))
    })
}

/// Reads the history array.
///
/// # Safety
///
/// `history` is NULL (an error unless `len` is 0) or points to `len` initialised messages
/// (aligned, readable, unchanged for the call) whose `role`, `content`, `tool_calls_json` and
/// `tool_call_id` are each NULL or a NUL-terminated string valid for the call.
pub(super) unsafe fn history_arg(
    history: *const ChathubMessage,
    len: usize,
) -> Result<Vec<Message>, FfiError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if history.is_null() {
        return Err(FfiError::invalid(format!(
            "history is NULL but history_len is {len}"
        )));
    }
    // SAFETY: `history` is non-null (checked above) and `len > 0`; the caller promises `len`
    // initialised, aligned messages there, unchanged while `messages` is used (this call).
    let messages = unsafe { std::slice::from_raw_parts(history, len) };
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // SAFETY: the caller promises each message's strings are NULL (`str_arg` reports
            // it) or NUL-terminated and valid for this call, longer than `role` is used.
            let role = unsafe { str_arg(m.role, &format!("history[{i}].role")) }?;
            // SAFETY: as for `role`: NULL or NUL-terminated, valid for this call.
            let content = unsafe { str_arg(m.content, &format!("history[{i}].content")) }?;
            let role = role.parse().map_err(|_| {
                FfiError::from(Error::UnknownRole {
                    index: i,
                    role: role.to_string(),
                })
            })?;
            let mut message = Message::with_role(role, content);
            if !m.tool_calls_json.is_null() {
                // SAFETY: non-null, so NUL-terminated and valid for this call, as the caller
                // promises.
                let text = unsafe {
                    str_arg(m.tool_calls_json, &format!("history[{i}].tool_calls_json"))
                }?;
                message.tool_calls = json_list(
                    text,
                    &format!("history[{i}].tool_calls_json"),
                    ToolCall::from_json,
                )?;
            }
            if !m.tool_call_id.is_null() {
                // SAFETY: non-null, so NUL-terminated and valid for this call, as the caller
                // promises.
                let id = unsafe { str_arg(m.tool_call_id, &format!("history[{i}].tool_call_id")) }?;
                message.tool_call_id = Some(id.to_string());
            }
            Ok(message)
        })
        .collect()
}

/// Parses a JSON array whose items `item` reads, naming `field` in errors.
fn json_list<T>(
    text: &str,
    field: &str,
    item: impl Fn(&serde_json::Value) -> Result<T, Error>,
) -> Result<Vec<T>, FfiError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| FfiError::invalid(format!("{field} is not valid JSON: {e}")))?;
    let serde_json::Value::Array(items) = value else {
        return Err(FfiError::invalid(format!("{field} must be a JSON array")));
    };
    items
        .iter()
        .map(|v| item(v).map_err(FfiError::from))
        .collect()
}

/// Builds the core's request: zero fields mean "model default", as in the proto.
///
/// # Safety
///
/// `params`' `stop` is NULL (an error unless `stop_count` is 0) or points to `stop_count`
/// pointers, each NULL or NUL-terminated, and `tools_json` and `prompt_role` are NULL or
/// NUL-terminated, all valid for the call.
pub(super) unsafe fn request_from(
    prompt: &str,
    history: Vec<Message>,
    params: Option<&ChathubParams>,
) -> Result<ChatRequest, FfiError> {
    let mut request = ChatRequest::new(prompt).history(history);
    let Some(p) = params else {
        return Ok(request);
    };
    let count = |value: i32, name: &str| -> Result<Option<usize>, FfiError> {
        match value {
            0 => Ok(None),
            v if v < 0 => Err(FfiError::invalid(format!(
                "invalid {name} {v}: must not be negative (0 means the model default)"
            ))),
            v => Ok(Some(v as usize)),
        }
    };
    let real = |value: f32| (value != 0.0).then_some(value as f64);
    request.max_length = count(p.max_length, "max_length")?;
    request.max_new_tokens = count(p.max_new_tokens, "max_new_tokens")?;
    request.top_k = count(p.top_k, "top_k")?;
    request.top_p = real(p.top_p);
    request.temperature = real(p.temperature);
    request.repetition_penalty = real(p.repetition_penalty);
    request.seed = (p.has_seed != 0).then_some(p.seed);
    request.greedy = p.greedy != 0;
    if !p.tools_json.is_null() {
        // SAFETY: non-null, so NUL-terminated and valid for this call, as the caller promises.
        let text = unsafe { str_arg(p.tools_json, "tools_json") }?;
        request.tools = json_list(text, "tools_json", Tool::from_json)?;
    }
    if !p.prompt_role.is_null() {
        // SAFETY: non-null, so NUL-terminated and valid for this call, as the caller promises.
        let role = unsafe { str_arg(p.prompt_role, "prompt_role") }?;
        request.prompt_role = role.parse().map_err(|_| {
            FfiError::invalid(format!(
                "invalid prompt_role {role:?}: must be \"user\", \"tool\" or \"observation\""
            ))
        })?;
    }
    if p.stop_count > 0 {
        if p.stop.is_null() {
            return Err(FfiError::invalid(format!(
                "stop is NULL but stop_count is {}",
                p.stop_count
            )));
        }
        // SAFETY: `stop` is non-null (checked above) and `stop_count > 0`; the caller promises
        // `stop_count` initialised, aligned pointers there, unchanged for this call.
        let texts = unsafe { std::slice::from_raw_parts(p.stop, p.stop_count) };
        request.stop = texts
            .iter()
            .enumerate()
            // SAFETY: each is NULL (`str_arg` reports it) or NUL-terminated and valid for this
            // call, as the caller promises; the text is copied into a `String` at once.
            .map(|(i, &text)| unsafe { str_arg(text, &format!("stop[{i}]")) }.map(String::from))
            .collect::<Result<_, _>>()?;
    }
    Ok(request)
}

/// Fills the C stats struct.
pub(super) fn stats_from(outcome: &ChatOutcome) -> ChathubStats {
    let saturate = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    ChathubStats {
        finish_reason: match outcome.finish_reason {
            FinishReason::Stop => super::CHATHUB_FINISH_STOP,
            FinishReason::Length => super::CHATHUB_FINISH_LENGTH,
            FinishReason::Cancelled => super::CHATHUB_FINISH_CANCELLED,
            FinishReason::ToolCalls => super::CHATHUB_FINISH_TOOL_CALLS,
        },
        prompt_tokens: saturate(outcome.usage.prompt_tokens),
        completion_tokens: saturate(outcome.usage.completion_tokens),
        dropped_history_messages: saturate(outcome.dropped_history_messages),
        ttft_ms: outcome.timings.ttft_ms,
        prefill_tokens_per_s: outcome.timings.prefill_tokens_per_s,
        decode_tokens_per_s: outcome.timings.decode_tokens_per_s,
        total_ms: outcome.timings.total_ms,
        cached_prompt_tokens: saturate(outcome.usage.cached_prompt_tokens),
        reply_kind: reply_kind(&outcome.reply),
    }
}

fn reply_kind(reply: &Reply) -> i32 {
    match reply {
        Reply::ToolCall { .. } => super::CHATHUB_REPLY_TOOL_CALL,
        Reply::Metadata { .. } => super::CHATHUB_REPLY_METADATA,
        Reply::Text(_) => super::CHATHUB_REPLY_TEXT,
    }
}

/// A C string of `text`, NUL bytes inside shown as `\0` (C strings cannot hold them).
fn c_string(text: &str) -> CString {
    CString::new(text.replace('\0', "\\0")).unwrap_or_default()
}

/// The C reply object of an outcome.
pub(super) fn reply_from(outcome: &ChatOutcome) -> ChathubReply {
    let (text, tool_name, arguments_json) = match &outcome.reply {
        Reply::ToolCall { name, arguments } => (
            String::new(),
            Some(name.as_str()),
            Some(serde_json::Value::Object(arguments.clone()).to_string()),
        ),
        Reply::Metadata { name, content } => (content.clone(), Some(name.as_str()), None),
        Reply::Text(_) => (outcome.text.clone(), None, None),
    };
    ChathubReply {
        kind: reply_kind(&outcome.reply),
        text: c_string(&text),
        tool_name: tool_name.map(c_string),
        arguments_json: arguments_json.as_deref().map(c_string),
        json: c_string(&outcome.reply.to_official_json().to_string()),
        raw_text: c_string(&outcome.raw_text),
    }
}

/// Size of the length header in front of every string handed to C.
const HEADER: usize = std::mem::size_of::<usize>();

/// Copies `text` into a NUL-terminated buffer owned by C until `chathub_string_free`.
///
/// The buffer carries its length in a header, so text with NUL bytes in it is still freed
/// correctly.
pub(super) fn string_to_c(text: &str) -> *mut c_char {
    let mut buffer = Vec::with_capacity(HEADER + text.len() + 1);
    buffer.extend_from_slice(&text.len().to_ne_bytes());
    buffer.extend_from_slice(text.as_bytes());
    buffer.push(0);
    let raw = Box::into_raw(buffer.into_boxed_slice()) as *mut u8;
    // SAFETY: `raw` is the start of the boxed slice of `HEADER + text.len() + 1` bytes, so
    // offset `HEADER` stays inside that allocation.
    unsafe { raw.add(HEADER) as *mut c_char }
}

/// Frees a buffer from [`string_to_c`].
///
/// # Safety
///
/// `ptr` is NULL or came from [`string_to_c`] and was not freed before (nor is it used after).
pub(super) unsafe fn free_c_string(ptr: *mut c_char) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: the caller promises `ptr` came from `string_to_c` and was not freed: it is
    // `HEADER` bytes into a `Box<[u8]>` whose first `HEADER` bytes hold the text's length
    // (read unaligned, as written), so `start` and `HEADER + len + 1` are that box's pointer
    // and length, and `Box::from_raw` frees it with the layout it was allocated with.
    unsafe {
        let start = (ptr as *mut u8).sub(HEADER);
        let len = usize::from_ne_bytes(std::ptr::read_unaligned(start as *const [u8; HEADER]));
        let slice = std::ptr::slice_from_raw_parts_mut(start, HEADER + len + 1);
        drop(Box::from_raw(slice));
    }
}
