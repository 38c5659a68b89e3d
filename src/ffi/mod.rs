//! The C ABI: load a model, chat, stream, free.
//!
//! Conventions, for every function here:
//!
//! - Functions return a status code (`CHATHUB_OK` = 0 on success) and write results through
//!   out-pointers. On failure, `chathub_last_error_message()` describes what went wrong; the
//!   message is per thread, so read it on the thread that made the failing call.
//! - No panic crosses the boundary: a bug inside the library returns `CHATHUB_ERR_PANIC`.
//! - Strings passed in are NUL-terminated UTF-8 and only borrowed for the call. Strings handed
//!   out are owned by the caller and freed with `chathub_string_free`.
//! - A `ChathubModel` may be used from any number of threads at once; it must be freed exactly
//!   once, after every call using it has returned. Calls running at once on one model share
//!   its forward passes (continuous batching), each getting the reply it would get alone.
//!
//! The C header `bindings/c/chathub.h` and the C# `bindings/dotnet/NativeMethods.g.cs` are
//! generated from this file by `build.rs`.

mod support;

use std::ffi::{c_char, c_void};
use std::ops::ControlFlow;

use support::{guard, request_from, str_arg, FfiError};

use crate::{Engine, ModelFamily, ModelOptions, Quantization};

/// Version of this C ABI. It changes whenever a function or struct changes incompatibly;
/// bindings check it at start-up.
pub const CHATHUB_ABI_VERSION: u32 = 5;

/// Success.
pub const CHATHUB_OK: i32 = 0;
/// An argument is invalid: NULL, not UTF-8, an unknown role, a number out of range, an empty
/// prompt.
pub const CHATHUB_ERR_INVALID_ARGUMENT: i32 = 2;
/// A model file or directory does not exist or cannot be read.
pub const CHATHUB_ERR_NOT_FOUND: i32 = 3;
/// The model files are malformed or disagree with each other.
pub const CHATHUB_ERR_INVALID_MODEL: i32 = 4;
/// The prompt does not fit in the context even without history.
pub const CHATHUB_ERR_PROMPT_TOO_LONG: i32 = 5;
/// The computation failed.
pub const CHATHUB_ERR_INTERNAL: i32 = 6;
/// A bug inside the library was caught at the boundary.
pub const CHATHUB_ERR_PANIC: i32 = 7;

/// Detect the model family from the files.
pub const CHATHUB_FAMILY_AUTO: i32 = 0;
/// ChatGLM2: `[Round N]` text prompts from (query, response) pairs.
pub const CHATHUB_FAMILY_CHATGLM2: i32 = 2;
/// ChatGLM3: role tokens, system prompts.
pub const CHATHUB_FAMILY_CHATGLM3: i32 = 3;
/// GLM-4 (glm-4-9b-chat, its -hf layout, GLM-4-9B-0414): role tokens, the model's own chat
/// template.
pub const CHATHUB_FAMILY_GLM4: i32 = 4;

/// Keep the weights dense.
pub const CHATHUB_QUANT_NONE: i32 = 0;
/// 8-bit blocks (q8_0): nearly lossless, a quarter of f32's memory.
pub const CHATHUB_QUANT_Q8_0: i32 = 1;
/// 4-bit blocks (q4_0).
pub const CHATHUB_QUANT_Q4_0: i32 = 2;
/// 4-bit k-quant (q4k), falling back to q8_0 for rows it cannot take.
pub const CHATHUB_QUANT_Q4K: i32 = 3;

/// The library's choice of weight storage: f32 (f16 read for quantizing on the CPU).
pub const CHATHUB_DTYPE_DEFAULT: i32 = 0;
/// f32 weights: exact, the most memory.
pub const CHATHUB_DTYPE_F32: i32 = 1;
/// f16 weight matrices: half of f32's memory and bytes read per token; on a CPU the
/// activations stay f32, on a GPU the whole model runs in f16.
pub const CHATHUB_DTYPE_F16: i32 = 2;
/// bf16 weight matrices, as f16 but with f32's range and fewer mantissa bits.
pub const CHATHUB_DTYPE_BF16: i32 = 3;

/// Compute on the CPU, every core.
pub const CHATHUB_DEVICE_CPU: i32 = 0;
/// Compute on an NVIDIA GPU (`device_ordinal` picks which); needs a library built with the
/// `cuda` feature, otherwise loading fails with `CHATHUB_ERR_INVALID_ARGUMENT`.
pub const CHATHUB_DEVICE_CUDA: i32 = 1;

/// The model produced a stop token.
pub const CHATHUB_FINISH_STOP: i32 = 0;
/// `max_length` or `max_new_tokens` was reached.
pub const CHATHUB_FINISH_LENGTH: i32 = 1;
/// The stream callback returned false.
pub const CHATHUB_FINISH_CANCELLED: i32 = 2;
/// The reply calls one of the request's tools (`CHATHUB_REPLY_TOOL_CALL`).
pub const CHATHUB_FINISH_TOOL_CALLS: i32 = 3;

/// An ordinary answer: `chathub_reply_text` is the text.
pub const CHATHUB_REPLY_TEXT: i32 = 0;
/// A call of one of the request's tools: `chathub_reply_tool_name` and
/// `chathub_reply_arguments_json` say which and with what.
pub const CHATHUB_REPLY_TOOL_CALL: i32 = 1;
/// A reply with a metadata line but no tools offered (or a tool call that could not be read):
/// `chathub_reply_tool_name` is the metadata, `chathub_reply_text` the rest.
pub const CHATHUB_REPLY_METADATA: i32 = 2;

/// A loaded chat model. Opaque; safe to use from several threads at once.
pub struct ChathubModel {
    engine: Engine,
}

/// A reply as the official code returns it (text, tool call or metadata reply), from
/// `chathub_chat_reply`. Opaque; read it with the `chathub_reply_*` functions, from any thread,
/// and free it once with `chathub_reply_free`. Its strings live as long as it does.
pub struct ChathubReply {
    kind: i32,
    text: std::ffi::CString,
    tool_name: Option<std::ffi::CString>,
    arguments_json: Option<std::ffi::CString>,
    json: std::ffi::CString,
    raw_text: std::ffi::CString,
}

/// How to load a model. Zeros (from `chathub_load_options_default`) mean: detect the family,
/// dense f32 weights on the CPU, the default prefix cache, next-turn pre-fill on, key/value
/// caches in the compute dtype.
#[repr(C)]
pub struct ChathubLoadOptions {
    /// `CHATHUB_FAMILY_AUTO`, `CHATHUB_FAMILY_CHATGLM2`, `CHATHUB_FAMILY_CHATGLM3` or
    /// `CHATHUB_FAMILY_GLM4`.
    pub family: i32,
    /// `CHATHUB_QUANT_NONE`, `CHATHUB_QUANT_Q8_0`, `CHATHUB_QUANT_Q4_0` or `CHATHUB_QUANT_Q4K`.
    pub quantization: i32,
    /// `CHATHUB_DTYPE_DEFAULT`, `CHATHUB_DTYPE_F32`, `CHATHUB_DTYPE_F16` or `CHATHUB_DTYPE_BF16`.
    pub dtype: i32,
    /// `CHATHUB_DEVICE_CPU` or `CHATHUB_DEVICE_CUDA`.
    pub device: i32,
    /// Which GPU, counted from 0, when `device` is `CHATHUB_DEVICE_CUDA`.
    pub device_ordinal: u32,
    /// Bytes of key/value caches kept from finished requests, so a prompt that extends an
    /// earlier conversation only runs its new tokens: 0 for the default (512 MiB), negative to
    /// turn multi-turn reuse off.
    pub prefix_cache_bytes: i64,
    /// Nonzero turns off the next-turn pre-fill: after a reply, a background thread runs it as
    /// the next prompt will encode it, so the next turn starts at once (it costs CPU time between
    /// turns, and only helps chats whose next turn extends this one).
    pub disable_next_turn_warmup: u8,
    /// What conversations' key/value caches store: `CHATHUB_DTYPE_DEFAULT` (the compute
    /// dtype: f32 on the CPU), `CHATHUB_DTYPE_F32` or `CHATHUB_DTYPE_F16` (half the memory per
    /// token; keys and values rounded, so replies can differ slightly from f32's).
    pub kv_cache_dtype: i32,
}

/// One history message. Strings are NUL-terminated UTF-8, borrowed for the call.
#[repr(C)]
pub struct ChathubMessage {
    /// "system", "user", "assistant", "observation" or "tool" (a tool's result).
    pub role: *const c_char,
    /// The message text.
    pub content: *const c_char,
    /// For an assistant message that called tools: the calls as OpenAI's `tool_calls` JSON
    /// array (`[{"id", "type": "function", "function": {"name", "arguments"}}]`); NULL
    /// otherwise.
    pub tool_calls_json: *const c_char,
    /// For a tool's result: the id of the call it answers (NULL when unknown).
    pub tool_call_id: *const c_char,
}

/// Generation parameters. Zero in any field means "the model's default", as in AIHub's proto;
/// negative counts and out-of-range numbers are rejected with `CHATHUB_ERR_INVALID_ARGUMENT`.
#[repr(C)]
pub struct ChathubParams {
    /// Prompt plus reply tokens (ChatGLM default 8192).
    pub max_length: i32,
    /// Nucleus sampling threshold in (0, 1] (ChatGLM default 0.8).
    pub top_p: f32,
    /// Softmax temperature > 0 (ChatGLM default 0.8).
    pub temperature: f32,
    /// Sample among the k most likely tokens only (0: no limit).
    pub top_k: i32,
    /// Repetition penalty (0: off).
    pub repetition_penalty: f32,
    /// At most this many reply tokens (0: limited by max_length only).
    pub max_new_tokens: i32,
    /// Sampling seed, used when `has_seed` is nonzero.
    pub seed: u64,
    /// Nonzero when `seed` is set (otherwise a random seed is drawn). A byte rather than a
    /// `bool` keeps the struct blittable for .NET, whose CoreCLR refuses pointers to structs
    /// with marshalled `bool` fields.
    pub has_seed: u8,
    /// Nonzero to always pick the most likely token (deterministic).
    pub greedy: u8,
    /// `stop_count` texts that end the reply when it produces one (the text is not included):
    /// NUL-terminated UTF-8, non-empty, borrowed for the call. NULL when `stop_count` is 0.
    pub stop: *const *const c_char,
    /// Number of strings at `stop`.
    pub stop_count: usize,
    /// Functions the model may call, as OpenAI's `tools` JSON array (`[{"type": "function",
    /// "function": {"name", "description", "parameters"}}]`); NULL for none.
    pub tools_json: *const c_char,
    /// Who wrote `prompt`: NULL or `"user"` for a question; `"tool"` or `"observation"` for a
    /// tool's result answering the assistant's last call, as the official
    /// `chat(role="observation")` (ChatGLM3 and GLM-4; ChatGLM2 has no tools). Borrowed for the
    /// call.
    pub prompt_role: *const c_char,
}

/// What a chat call did.
#[repr(C)]
pub struct ChathubStats {
    /// `CHATHUB_FINISH_STOP`, `CHATHUB_FINISH_LENGTH` or `CHATHUB_FINISH_CANCELLED`.
    pub finish_reason: i32,
    /// Prompt tokens run (after trimming old history).
    pub prompt_tokens: u32,
    /// Reply tokens generated.
    pub completion_tokens: u32,
    /// History messages left out to fit the context.
    pub dropped_history_messages: u32,
    /// Milliseconds until the first reply token.
    pub ttft_ms: f64,
    /// Prompt tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Reply tokens per second after the first.
    pub decode_tokens_per_s: f64,
    /// Milliseconds for the whole call.
    pub total_ms: f64,
    /// Prompt tokens taken from an earlier request's cache instead of being computed.
    pub cached_prompt_tokens: u32,
    /// `CHATHUB_REPLY_TEXT`, `CHATHUB_REPLY_TOOL_CALL` or `CHATHUB_REPLY_METADATA`.
    pub reply_kind: i32,
}

/// Receives each new piece of reply text: `len` bytes of whole UTF-8 characters at `utf8`
/// (not NUL-terminated, valid only during the call). Called after every token; `len` is 0 when
/// the token showed nothing (half a character, a metadata line, a tool call being written), so
/// that returning false still stops generation within one token. Return true to continue,
/// false to stop. Called on the thread that called `chathub_chat_stream`; it must not free the
/// model it is streaming from. Keep it short: calls on the same model batch their steps, and
/// each step waits for a generation whose callback is still running (at most 20 ms).
pub type ChathubStreamCallback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, utf8: *const u8, len: usize) -> bool>;

/// The ABI version this library implements (`CHATHUB_ABI_VERSION`). Any thread.
#[no_mangle]
pub extern "C" fn chathub_abi_version() -> u32 {
    CHATHUB_ABI_VERSION
}

/// The library's version as a static NUL-terminated string (never freed). Any thread.
#[no_mangle]
pub extern "C" fn chathub_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The status code of the last failed call on this thread, `CHATHUB_OK` if none failed yet.
#[no_mangle]
pub extern "C" fn chathub_last_error_code() -> i32 {
    support::last_error_code()
}

/// The message of the last failed call on this thread, or NULL if none failed yet.
///
/// The string is owned by the library and stays valid until the next failing call on the same
/// thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn chathub_last_error_message() -> *const c_char {
    support::last_error_message()
}

/// Fills `*out_params` with zeros: every parameter at the model's default.
///
/// # Safety
///
/// `out_params` is NULL (an error) or points to writable memory for one `ChathubParams`.
#[no_mangle]
pub unsafe extern "C" fn chathub_params_default(out_params: *mut ChathubParams) -> i32 {
    guard(|| {
        if out_params.is_null() {
            return Err(FfiError::invalid("out_params is NULL"));
        }
        let params = ChathubParams {
            max_length: 0,
            top_p: 0.0,
            temperature: 0.0,
            top_k: 0,
            repetition_penalty: 0.0,
            max_new_tokens: 0,
            seed: 0,
            has_seed: 0,
            greedy: 0,
            stop: std::ptr::null(),
            stop_count: 0,
            tools_json: std::ptr::null(),
            prompt_role: std::ptr::null(),
        };
        // SAFETY: `out_params` was checked non-null above, and the caller promises it points to
        // writable memory for one `ChathubParams` (see `# Safety`); `write` neither reads nor drops
        // what was there.
        unsafe { out_params.write(params) };
        Ok(())
    })
}

/// Loads a model directory as THUDM publishes it (config.json, weights, tokenizer files), or a
/// GGUF file (from `chathub convert` or llama.cpp).
///
/// `family` is `CHATHUB_FAMILY_AUTO`, `CHATHUB_FAMILY_CHATGLM2`, `CHATHUB_FAMILY_CHATGLM3` or
/// `CHATHUB_FAMILY_GLM4`.
/// On success `*out_model` owns the new model: free it once with `chathub_model_free`. On
/// failure `*out_model` is set to NULL. Blocks while the weights load. Any thread.
///
/// # Safety
///
/// `model_dir` is NULL (an error) or NUL-terminated; `out_model` is NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn chathub_model_load(
    model_dir: *const c_char,
    family: i32,
    out_model: *mut *mut ChathubModel,
) -> i32 {
    let options = ChathubLoadOptions {
        family,
        ..LOAD_DEFAULTS
    };
    // SAFETY: `model_dir` and `out_model` come with this function's contract, which is the one
    // `chathub_model_load_with` asks for them; `options` is a local that outlives the call.
    unsafe { chathub_model_load_with(model_dir, &options, out_model) }
}

/// Fills `*out_options` with zeros: detect the family, keep the weights dense.
///
/// # Safety
///
/// `out_options` is NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn chathub_load_options_default(out_options: *mut ChathubLoadOptions) -> i32 {
    guard(|| {
        if out_options.is_null() {
            return Err(FfiError::invalid("out_options is NULL"));
        }
        // SAFETY: `out_options` was checked non-null above, and the caller promises it is writable
        // for one `ChathubLoadOptions`; `write` neither reads nor drops what was there.
        unsafe { out_options.write(LOAD_DEFAULTS) };
        Ok(())
    })
}

/// Loads a model directory with options (family, weight format, device, multi-turn reuse);
/// `options` may be NULL for the defaults. Ownership as for `chathub_model_load`. Quantizing
/// blocks a while longer.
///
/// Also loads a `.gguf` file written by `chathub convert` or llama.cpp's ChatGLM3 files, when
/// `model_dir` names one.
///
/// # Safety
///
/// As for `chathub_model_load`; `options` is NULL or points to a valid struct.
#[no_mangle]
pub unsafe extern "C" fn chathub_model_load_with(
    model_dir: *const c_char,
    options: *const ChathubLoadOptions,
    out_model: *mut *mut ChathubModel,
) -> i32 {
    guard(|| {
        if out_model.is_null() {
            return Err(FfiError::invalid("out_model is NULL"));
        }
        // SAFETY: `out_model` was checked non-null just above, and the caller promises it is
        // writable for one pointer.
        unsafe { out_model.write(std::ptr::null_mut()) };
        // SAFETY: the caller promises `model_dir` is NULL (which `str_arg` reports) or a
        // NUL-terminated string that stays valid for this call, longer than `dir` is used.
        let dir = unsafe { str_arg(model_dir, "model_dir") }?;
        // SAFETY: the caller promises `options` is NULL (`as_ref` gives `None`) or points to an
        // initialised, aligned `ChathubLoadOptions` that stays valid for this call.
        let options = unsafe { options.as_ref() }.unwrap_or(&LOAD_DEFAULTS);
        let options = model_options(options)?;
        let engine = Engine::load_with(dir, &options)?;
        let model = Box::into_raw(Box::new(ChathubModel { engine }));
        // SAFETY: `out_model` was checked non-null above and is writable, as the caller promises.
        unsafe { out_model.write(model) };
        Ok(())
    })
}

/// Every load option at its default.
const LOAD_DEFAULTS: ChathubLoadOptions = ChathubLoadOptions {
    family: CHATHUB_FAMILY_AUTO,
    quantization: CHATHUB_QUANT_NONE,
    dtype: CHATHUB_DTYPE_DEFAULT,
    device: CHATHUB_DEVICE_CPU,
    device_ordinal: 0,
    prefix_cache_bytes: 0,
    disable_next_turn_warmup: 0,
    kv_cache_dtype: CHATHUB_DTYPE_DEFAULT,
};

/// The Rust options for C's, each field checked.
fn model_options(o: &ChathubLoadOptions) -> Result<ModelOptions, FfiError> {
    let family = match o.family {
        CHATHUB_FAMILY_AUTO => None,
        CHATHUB_FAMILY_CHATGLM2 => Some(ModelFamily::ChatGlm2),
        CHATHUB_FAMILY_CHATGLM3 => Some(ModelFamily::ChatGlm3),
        CHATHUB_FAMILY_GLM4 => Some(ModelFamily::Glm4),
        other => {
            return Err(FfiError::invalid(format!(
                "invalid family {other}: expected 0 (auto), 2 (chatglm2), 3 (chatglm3) or 4 (glm4)"
            )))
        }
    };
    let quantization = match o.quantization {
        CHATHUB_QUANT_NONE => None,
        CHATHUB_QUANT_Q8_0 => Some(Quantization::Q8_0),
        CHATHUB_QUANT_Q4_0 => Some(Quantization::Q4_0),
        CHATHUB_QUANT_Q4K => Some(Quantization::Q4K),
        other => {
            return Err(FfiError::invalid(format!(
                "invalid quantization {other}: expected 0 (none), 1 (q8_0), 2 (q4_0) or 3 (q4k)"
            )))
        }
    };
    let dtype = match o.dtype {
        CHATHUB_DTYPE_DEFAULT => None,
        CHATHUB_DTYPE_F32 => Some(candle_core::DType::F32),
        CHATHUB_DTYPE_F16 => Some(candle_core::DType::F16),
        CHATHUB_DTYPE_BF16 => Some(candle_core::DType::BF16),
        other => {
            return Err(FfiError::invalid(format!(
                "invalid dtype {other}: expected 0 (default), 1 (f32), 2 (f16) or 3 (bf16)"
            )))
        }
    };
    let kv_cache_dtype = match o.kv_cache_dtype {
        CHATHUB_DTYPE_DEFAULT => None,
        CHATHUB_DTYPE_F32 => Some(candle_core::DType::F32),
        CHATHUB_DTYPE_F16 => Some(candle_core::DType::F16),
        other => {
            return Err(FfiError::invalid(format!(
                "invalid kv_cache_dtype {other}: expected 0 (default), 1 (f32) or 2 (f16)"
            )))
        }
    };
    let device = match o.device {
        CHATHUB_DEVICE_CPU => candle_core::Device::Cpu,
        CHATHUB_DEVICE_CUDA => {
            candle_core::Device::new_cuda(o.device_ordinal as usize).map_err(|e| {
                FfiError::invalid(format!("cannot use CUDA device {}: {e}", o.device_ordinal))
            })?
        }
        other => {
            return Err(FfiError::invalid(format!(
                "invalid device {other}: expected 0 (cpu) or 1 (cuda)"
            )))
        }
    };
    let defaults = ModelOptions::default();
    let prefix_cache_bytes = match o.prefix_cache_bytes {
        0 => defaults.prefix_cache_bytes,
        n if n < 0 => 0,
        n => usize::try_from(n).unwrap_or(usize::MAX),
    };
    Ok(ModelOptions {
        family,
        quantization,
        dtype,
        device,
        prefix_cache_bytes,
        warm_next_turn: o.disable_next_turn_warmup == 0,
        kv_cache_dtype,
    })
}

/// Loads the built-in demo model (random weights: its replies are meaningless), written to the
/// system's temporary directory on first use. Same ownership as `chathub_model_load`.
///
/// # Safety
///
/// `out_model` is NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn chathub_model_load_demo(out_model: *mut *mut ChathubModel) -> i32 {
    guard(|| {
        let dir = crate::demo_model_dir()?;
        let dir = std::ffi::CString::new(dir.to_string_lossy().as_bytes())
            .map_err(|_| FfiError::invalid("temporary directory path contains NUL"))?;
        // SAFETY: `dir` is a `CString` (NUL-terminated) that lives until after the call, and
        // `out_model` comes with this function's contract (NULL or writable), which is what
        // `chathub_model_load` asks.
        match unsafe { chathub_model_load(dir.as_ptr(), CHATHUB_FAMILY_AUTO, out_model) } {
            CHATHUB_OK => Ok(()),
            code => Err(FfiError::from_last(code)),
        }
    })
}

/// Frees a model. NULL is ignored. Call once, after every call using the model returned.
///
/// # Safety
///
/// `model` is NULL or came from `chathub_model_load*` and was not freed before.
#[no_mangle]
pub unsafe extern "C" fn chathub_model_free(model: *mut ChathubModel) {
    guard(|| {
        if !model.is_null() {
            // SAFETY: non-null, so, as the caller promises, a pointer from `Box::into_raw` in
            // `chathub_model_load_with` that was not freed before and that no call is still using:
            // the box takes it back and drops it once.
            drop(unsafe { Box::from_raw(model) });
        }
        Ok(())
    });
}

/// Generates a whole reply to `prompt` given `history`.
///
/// `history` points to `history_len` messages (NULL when `history_len` is 0). `params` may be
/// NULL for all defaults. On success `*out_reply` is the reply's text as the official code
/// returns it (no metadata line, stripped; empty when the reply is a tool call, see
/// `chathub_chat_reply`): a NUL-terminated UTF-8 string owned by the caller (free it with
/// `chathub_string_free`; if the reply itself contains NUL bytes, use `*out_reply_len`), and
/// `*out_stats` (when not NULL) is filled. On failure `*out_reply` is NULL. Blocks until the
/// reply ends. Any thread, concurrently on one model.
///
/// # Safety
///
/// Pointers are NULL where allowed above or valid for the call; strings are NUL-terminated.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // a C signature: one argument per input and output
pub unsafe extern "C" fn chathub_chat(
    model: *const ChathubModel,
    prompt: *const c_char,
    history: *const ChathubMessage,
    history_len: usize,
    params: *const ChathubParams,
    out_reply: *mut *mut c_char,
    out_reply_len: *mut usize,
    out_stats: *mut ChathubStats,
) -> i32 {
    guard(|| {
        if out_reply.is_null() {
            return Err(FfiError::invalid("out_reply is NULL"));
        }
        // SAFETY: `out_reply` was checked non-null just above, and the caller promises it is
        // writable for one pointer.
        unsafe { out_reply.write(std::ptr::null_mut()) };
        // SAFETY: `read_call`'s contract is this function's: `model` NULL or live, `prompt` NULL or
        // NUL-terminated, `history` valid for `history_len` messages, `params` NULL or valid, all
        // for the duration of this call.
        let (engine, request) = unsafe { read_call(model, prompt, history, history_len, params) }?;
        let outcome = engine.chat(&request)?;
        if !out_reply_len.is_null() {
            // SAFETY: checked non-null just above; the caller promises it is writable (`# Safety`).
            unsafe { out_reply_len.write(outcome.text.len()) };
        }
        if !out_stats.is_null() {
            // SAFETY: checked non-null just above; the caller promises it is writable (`# Safety`).
            unsafe { out_stats.write(support::stats_from(&outcome)) };
        }
        // SAFETY: `out_reply` was checked non-null at the start and is writable, as the caller
        // promises.
        unsafe { out_reply.write(support::string_to_c(&outcome.text)) };
        Ok(())
    })
}

/// Generates a reply, calling `callback(user_data, utf8, len)` with each new piece of text as
/// soon as it forms whole UTF-8 characters. The pieces add up to the text `chathub_chat`
/// returns (nothing is shown of a metadata line or a tool call). When the callback returns
/// false, generation stops before the next token and the call returns `CHATHUB_OK` with finish
/// reason `CHATHUB_FINISH_CANCELLED`.
///
/// Arguments as for `chathub_chat`. The callback runs on the calling thread, which this call
/// blocks until the reply ends. `*out_stats` (when not NULL) is filled on success.
///
/// # Safety
///
/// As for `chathub_chat`; `callback` is a valid function (NULL is an error) and `user_data` is
/// passed to it untouched.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // a C signature: one argument per input and output
pub unsafe extern "C" fn chathub_chat_stream(
    model: *const ChathubModel,
    prompt: *const c_char,
    history: *const ChathubMessage,
    history_len: usize,
    params: *const ChathubParams,
    callback: ChathubStreamCallback,
    user_data: *mut c_void,
    out_stats: *mut ChathubStats,
) -> i32 {
    guard(|| {
        let Some(callback) = callback else {
            return Err(FfiError::invalid("callback is NULL"));
        };
        // SAFETY: `read_call`'s contract is this function's, as for `chathub_chat`: `model` NULL or
        // live, `prompt` NULL or NUL-terminated, `history` valid for `history_len` messages,
        // `params` NULL or valid, all for the duration of this call.
        let (engine, request) = unsafe { read_call(model, prompt, history, history_len, params) }?;
        let outcome = engine.chat_stream(&request, |delta| {
            // SAFETY: the caller promises `callback` is a valid function taking these arguments;
            // `user_data` is passed through untouched, and `delta`'s `len` bytes stay alive for the
            // callback's duration, which is all the documented contract lets it rely on.
            if unsafe { callback(user_data, delta.as_ptr(), delta.len()) } {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })?;
        if !out_stats.is_null() {
            // SAFETY: checked non-null just above; the caller promises it is writable (`# Safety`).
            unsafe { out_stats.write(support::stats_from(&outcome)) };
        }
        Ok(())
    })
}

/// Generates a reply and returns it whole as the official code does: text, a tool call or a
/// metadata reply, with the tools in `params->tools_json` and tool calls and results in
/// `history`. `callback` may be NULL; when given it streams the reply's text as
/// `chathub_chat_stream` does (nothing of a tool call).
///
/// On success `*out_reply` owns a new reply (free it with `chathub_reply_free`) and
/// `*out_stats` (when not NULL) is filled; on failure `*out_reply` is NULL. Blocks until the
/// reply ends; the callback runs on the calling thread. Any thread, concurrently on one model.
///
/// # Safety
///
/// As for `chathub_chat_stream`, except that `callback` may be NULL; `out_reply` is NULL (an
/// error) or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // a C signature: one argument per input and output
pub unsafe extern "C" fn chathub_chat_reply(
    model: *const ChathubModel,
    prompt: *const c_char,
    history: *const ChathubMessage,
    history_len: usize,
    params: *const ChathubParams,
    callback: ChathubStreamCallback,
    user_data: *mut c_void,
    out_reply: *mut *mut ChathubReply,
    out_stats: *mut ChathubStats,
) -> i32 {
    guard(|| {
        if out_reply.is_null() {
            return Err(FfiError::invalid("out_reply is NULL"));
        }
        // SAFETY: `out_reply` was checked non-null just above, and the caller promises it is
        // writable for one pointer.
        unsafe { out_reply.write(std::ptr::null_mut()) };
        // SAFETY: `read_call`'s contract is this function's, as for `chathub_chat`: `model` NULL or
        // live, `prompt` NULL or NUL-terminated, `history` valid for `history_len` messages,
        // `params` NULL or valid, all for the duration of this call.
        let (engine, request) = unsafe { read_call(model, prompt, history, history_len, params) }?;
        let outcome = engine.chat_stream(&request, |delta| match callback {
            Some(callback) => {
                // SAFETY: the caller promises a non-NULL `callback` is a valid function taking
                // these arguments; `user_data` is passed through untouched, and `delta`'s `len`
                // bytes stay alive for the callback's duration, as documented.
                if unsafe { callback(user_data, delta.as_ptr(), delta.len()) } {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            }
            _ => ControlFlow::Continue(()),
        })?;
        if !out_stats.is_null() {
            // SAFETY: checked non-null just above; the caller promises it is writable (`# Safety`).
            unsafe { out_stats.write(support::stats_from(&outcome)) };
        }
        let reply = Box::new(support::reply_from(&outcome));
        // SAFETY: `out_reply` was checked non-null at the start and is writable, as the caller
        // promises.
        unsafe { out_reply.write(Box::into_raw(reply)) };
        Ok(())
    })
}

/// The reply's kind: `CHATHUB_REPLY_TEXT`, `CHATHUB_REPLY_TOOL_CALL` or
/// `CHATHUB_REPLY_METADATA` (-1 for NULL). Any thread.
///
/// # Safety
///
/// `reply` is NULL or a live reply from `chathub_chat_reply`.
#[no_mangle]
pub unsafe extern "C" fn chathub_reply_kind(reply: *const ChathubReply) -> i32 {
    // SAFETY: NULL or live, as the caller promises.
    unsafe { reply.as_ref() }.map_or(-1, |r| r.kind)
}

/// The reply's text: a text reply's text, a metadata reply's content, "" for a tool call.
/// Borrowed: valid until `chathub_reply_free`. NULL for a NULL reply. Any thread.
///
/// # Safety
///
/// `reply` is NULL or a live reply from `chathub_chat_reply`.
#[no_mangle]
pub unsafe extern "C" fn chathub_reply_text(reply: *const ChathubReply) -> *const c_char {
    // SAFETY: NULL or live, as the caller promises.
    unsafe { reply.as_ref() }.map_or(std::ptr::null(), |r| r.text.as_ptr())
}

/// The function a tool-call reply calls, or a metadata reply's metadata line; NULL for a text
/// reply. Borrowed: valid until `chathub_reply_free`. Any thread.
///
/// # Safety
///
/// `reply` is NULL or a live reply from `chathub_chat_reply`.
#[no_mangle]
pub unsafe extern "C" fn chathub_reply_tool_name(reply: *const ChathubReply) -> *const c_char {
    // SAFETY: NULL or live, as the caller promises.
    unsafe { reply.as_ref() }
        .and_then(|r| r.tool_name.as_ref())
        .map_or(std::ptr::null(), |s| s.as_ptr())
}

/// A tool call's arguments as a JSON object (text); NULL for other replies. Borrowed: valid
/// until `chathub_reply_free`. Any thread.
///
/// # Safety
///
/// `reply` is NULL or a live reply from `chathub_chat_reply`.
#[no_mangle]
pub unsafe extern "C" fn chathub_reply_arguments_json(reply: *const ChathubReply) -> *const c_char {
    // SAFETY: NULL or live, as the caller promises.
    unsafe { reply.as_ref() }
        .and_then(|r| r.arguments_json.as_ref())
        .map_or(std::ptr::null(), |s| s.as_ptr())
}

/// The reply as the official `chat()` value in JSON: a string for text, `{"name",
/// "parameters"}` for a tool call, `{"name", "content"}` for a metadata reply. Borrowed: valid
/// until `chathub_reply_free`. NULL for a NULL reply. Any thread.
///
/// # Safety
///
/// `reply` is NULL or a live reply from `chathub_chat_reply`.
#[no_mangle]
pub unsafe extern "C" fn chathub_reply_json(reply: *const ChathubReply) -> *const c_char {
    // SAFETY: NULL or live, as the caller promises.
    unsafe { reply.as_ref() }.map_or(std::ptr::null(), |r| r.json.as_ptr())
}

/// What the model wrote, decoded, metadata line included (for debugging). Borrowed: valid until
/// `chathub_reply_free`. NULL for a NULL reply. Any thread.
///
/// # Safety
///
/// `reply` is NULL or a live reply from `chathub_chat_reply`.
#[no_mangle]
pub unsafe extern "C" fn chathub_reply_raw_text(reply: *const ChathubReply) -> *const c_char {
    // SAFETY: NULL or live, as the caller promises.
    unsafe { reply.as_ref() }.map_or(std::ptr::null(), |r| r.raw_text.as_ptr())
}

/// Frees a reply from `chathub_chat_reply`. NULL is ignored. Call once; the strings read from
/// it are invalid afterwards.
///
/// # Safety
///
/// `reply` is NULL or came from `chathub_chat_reply` and was not freed before.
#[no_mangle]
pub unsafe extern "C" fn chathub_reply_free(reply: *mut ChathubReply) {
    guard(|| {
        if !reply.is_null() {
            // SAFETY: non-null, so, as the caller promises, a pointer from `Box::into_raw` in
            // `chathub_chat_reply` that was not freed before: the box takes it back and drops
            // it once.
            drop(unsafe { Box::from_raw(reply) });
        }
        Ok(())
    });
}

/// Frees a string returned by this library. NULL is ignored.
///
/// # Safety
///
/// `text` is NULL or a string from this library that was not freed before.
#[no_mangle]
pub unsafe extern "C" fn chathub_string_free(text: *mut c_char) {
    guard(|| {
        // SAFETY: the caller promises `text` is NULL or a string from this library (all of them
        // come from `string_to_c`) not freed before, which is `free_c_string`'s contract.
        unsafe { support::free_c_string(text) };
        Ok(())
    });
}

/// Reads the arguments every chat call shares.
///
/// # Safety
///
/// As documented on `chathub_chat`: `model` is NULL or a live model from `chathub_model_load*`
/// that stays alive (not freed) for `'a`; `prompt` is NULL or NUL-terminated UTF-8 valid for
/// `'a`; `history` is NULL (an error unless `history_len` is 0) or points to `history_len`
/// messages whose strings are NULL or NUL-terminated, valid for the call; `params` is NULL or
/// points to a valid `ChathubParams` whose `stop`, `tools_json` and `prompt_role` are as
/// `request_from` asks.
unsafe fn read_call<'a>(
    model: *const ChathubModel,
    prompt: *const c_char,
    history: *const ChathubMessage,
    history_len: usize,
    params: *const ChathubParams,
) -> Result<(&'a Engine, crate::ChatRequest), FfiError> {
    if model.is_null() {
        return Err(FfiError::invalid("model is NULL"));
    }
    // SAFETY: `model` is non-null (checked above) and, as the caller promises, a model from
    // `chathub_model_load*` that is not freed while `'a` lasts; only shared access is taken.
    let engine = unsafe { &(*model).engine };
    // SAFETY: the caller promises `prompt` is NULL (reported) or NUL-terminated and valid for
    // `'a`.
    let prompt = unsafe { str_arg(prompt, "prompt") }?;
    // SAFETY: the caller promises `history` is NULL (reported unless `history_len` is 0) or
    // points to `history_len` messages whose strings are NULL or NUL-terminated, all valid for
    // this call: `history_arg`'s contract.
    let history = unsafe { support::history_arg(history, history_len) }?;
    // SAFETY: the caller promises `params` is NULL (`None`) or points to an initialised,
    // aligned `ChathubParams` valid for this call.
    let params = unsafe { params.as_ref() };
    // SAFETY: the caller promises `params`' `stop` (`stop_count` pointers), `tools_json` and
    // `prompt_role` are as `request_from` asks: NULL or valid NUL-terminated strings for this
    // call.
    Ok((engine, unsafe { request_from(prompt, history, params) }?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each C value of `kv_cache_dtype` reaches the engine as the dtype it names.
    #[test]
    fn load_options_map_the_cache_dtype() {
        let with = |kv_cache_dtype| {
            model_options(&ChathubLoadOptions {
                kv_cache_dtype,
                ..LOAD_DEFAULTS
            })
        };
        let dtype = |c| with(c).map(|o| o.kv_cache_dtype).ok();
        assert_eq!(dtype(CHATHUB_DTYPE_DEFAULT), Some(None));
        assert_eq!(
            dtype(CHATHUB_DTYPE_F32),
            Some(Some(candle_core::DType::F32))
        );
        assert_eq!(
            dtype(CHATHUB_DTYPE_F16),
            Some(Some(candle_core::DType::F16))
        );
        assert!(with(CHATHUB_DTYPE_BF16).is_err());
    }
}
