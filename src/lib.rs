//! Run ChatGLM-family chat models (ChatGLM2-6B, ChatGLM3-6B, GLM-4: glm-4-9b-chat, its -hf
//! layout and GLM-4-9B-0414) in-process on [candle].
//!
//! `chathub` loads a model directory exactly as THUDM publishes it on Hugging Face
//! (`config.json`, sharded safetensors or PyTorch weights, the tokenizer files, the chat
//! template), or a GGUF file (its own or llama.cpp's), turns OpenAI-style chat history and tools
//! into the prompt each model expects, token for token as the official Python code builds it,
//! and generates replies with streaming, cancellation and per-request key/value caches, so one
//! loaded [`Engine`] serves many threads at once, batching their steps into shared forward
//! passes. Replies come back as the official `chat()`
//! returns them ([`Reply`]): text, or a parsed tool call.
//!
//! [candle]: https://github.com/huggingface/candle
//!
//! # Examples
//!
//! The built-in demo model needs no download (its replies are meaningless noise):
//!
//! ```
//! # fn main() -> chathub::Result<()> {
//! use chathub::{ChatRequest, Engine, FinishReason, Message};
//!
//! let engine = Engine::load(chathub::demo_model_dir()?)?;
//! let request = ChatRequest::new("你好")
//!     .history(vec![Message::system("You are a helpful assistant.")])
//!     .max_new_tokens(8)
//!     .greedy();
//! let outcome = engine.chat(&request)?;
//! assert!(outcome.completion_token_ids.len() <= 8);
//! assert!(matches!(outcome.finish_reason, FinishReason::Length | FinishReason::Stop));
//! # Ok(())
//! # }
//! ```
//!
//! # Feature Flags
//!
//! - `grpc` (off by default): the gRPC server in the `grpc` module and `chathub serve --listen`,
//!   speaking AIHub's `aihub.ChatHub` protocol, with health and reflection services. Built
//!   without a system `protoc`.
//! - `http` (off by default): the OpenAI-compatible HTTP server in the `http` module and
//!   `chathub serve --http` (`/v1/chat/completions`, `/v1/models`, `/health`, `/metrics` and a
//!   web chat page at `/`).
//! - `server`: both of them (what `chathub serve` is usually built with).
//! - `cuda` (off by default): run on an NVIDIA GPU through candle's CUDA backend; pass a CUDA
//!   [`candle_core::Device`] in [`ModelOptions`]. Needs the CUDA toolkit at build time.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod ffi;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;
#[cfg(any(feature = "grpc", feature = "http"))]
pub mod server;

// The core, in layers; each imports only those below it (README, "Layout"): engine, families,
// chat (the shared vocabulary), nn, tokenizer, formats, kernels, then huge_pages and error.
mod chat;
mod engine;
mod error;
mod families;
mod formats;
mod kernels;
mod nn;
mod tokenizer;

#[cfg(fuzzing)]
#[doc(hidden)] // entry points for `cargo fuzz` (fuzz/), built only with `--cfg fuzzing`
pub mod fuzzing;

#[doc(hidden)] // for `chathub bench`'s bandwidth probe, which reads what weights are read from
pub mod huge_pages;

pub use crate::chat::generation::{GenerationDefaults, TokenIds};
pub use crate::chat::message::{messages_to_tuple_history, parse_history, Message, Role};
pub use crate::chat::reply::{Reply, ReplyKind};
pub use crate::chat::request::{
    ChatOutcome, ChatRequest, FinishReason, SpecialText, Timings, Usage,
};
pub use crate::chat::tools::{Tool, ToolCall};
pub use crate::engine::batcher::BatchCounts;
pub use crate::engine::sampling::Sampling;
pub use crate::engine::synthetic::{
    bench_config, chatglm3_6b_config, demo_config, demo_model_dir, glm4_9b_config,
    glm4_tokenizer_model, write_model_dir,
};
pub use crate::engine::{Engine, ModelOptions};
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::families::chatglm::config::ChatGlmConfig;
pub use crate::families::{load_tokenizer, ModelFamily};
pub use crate::nn::quantization::Quantization;
pub use crate::nn::spec::ArchSpec;
pub use crate::tokenizer::{TextDecoder, Tokenizer};

/// The candle crate this library computes with, for building a [`candle_core::Device`].
pub use candle_core;
