//! What a caller asks for, and what it gets back.

use serde::{Deserialize, Serialize};

use crate::chat::generation::GenerationDefaults;
use crate::chat::message::{Message, Role};
use crate::chat::reply::Reply;
use crate::chat::tools::Tool;
use crate::error::{Error, Result};

/// One chat turn to generate: the proto's fields plus extras the proto cannot carry.
///
/// `None` means "the model's default" (from `generation_config.json`, else ChatGLM's
/// max_length 8192, top_p 0.8, temperature 0.8). Serialises to the JSON that
/// `chathub generate --request` reads.
///
/// # Examples
///
/// ```
/// use chathub::{ChatRequest, Message};
/// let request = ChatRequest::new("What is the capital of France?")
///     .history(vec![Message::system("Answer briefly.")])
///     .max_new_tokens(64)
///     .greedy();
/// assert!(request.greedy);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The new message: the user's question, or a tool's result (see `prompt_role`).
    pub prompt: String,
    /// Who wrote `prompt`: [`Role::User`] (the default) or [`Role::Observation`] for a tool's
    /// result the model answers from (the official `chat(..., role="observation")`).
    #[serde(default, skip_serializing_if = "is_user")]
    pub prompt_role: Role,
    /// Earlier messages, oldest first.
    #[serde(default)]
    pub history: Vec<Message>,
    /// Functions the model may call (OpenAI-shaped); its calls come back as
    /// [`Reply::ToolCall`].
    #[serde(default)]
    pub tools: Vec<Tool>,
    /// Prompt plus reply tokens, as in ChatGLM's `model.chat`. `None` or 0: model default.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Nucleus sampling threshold in (0, 1]. `None` or 0: model default.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Softmax temperature, > 0. `None` or 0: model default.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Sample only among this many most likely tokens.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Hugging Face-style repetition penalty (1.0 = off).
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// At most this many reply tokens, on top of `max_length`.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Seed for sampling; a random one when `None`.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Pick the most likely token every step, ignoring temperature and top_p.
    #[serde(default)]
    pub greedy: bool,
    /// Text that ends the reply when generated (not included in the reply; the token that
    /// completes it is in `completion_token_ids`).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Extra token ids that end the reply, besides the model's own stop tokens.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Compute the whole prompt even when an earlier request's cache covers part of it
    /// (benchmarks of cold prefill; like llama.cpp's `cache_prompt: false`).
    #[serde(default)]
    pub skip_prefix_cache: bool,
    /// Keep generating past stop tokens until the length limit (benchmarks; like llama.cpp's
    /// `ignore_eos`).
    #[serde(default)]
    pub ignore_stop: bool,
    /// How special-token text inside messages is encoded (GLM-4; see [`SpecialText`]).
    #[serde(default)]
    pub special_text: SpecialText,
}

fn is_user(role: &Role) -> bool {
    *role == Role::User
}

impl ChatRequest {
    /// A request with no history and model defaults.
    pub fn new(prompt: impl Into<String>) -> Self {
        ChatRequest {
            prompt: prompt.into(),
            prompt_role: Role::User,
            ..Default::default()
        }
    }

    /// A request answering a tool's result: `result` is the new message, in the
    /// observation role, after the assistant's tool call in `history`.
    ///
    /// ```
    /// let r = chathub::ChatRequest::tool_result("{\"temperature\": 21}");
    /// assert_eq!(r.prompt_role, chathub::Role::Observation);
    /// ```
    pub fn tool_result(result: impl Into<String>) -> Self {
        ChatRequest {
            prompt_role: Role::Observation,
            ..ChatRequest::new(result)
        }
    }

    /// Encodes special-token text in messages as plain text ([`SpecialText::Text`]), for
    /// untrusted input; the default follows the official tokenizer ([`SpecialText::Tokens`]).
    ///
    /// ```
    /// let r = chathub::ChatRequest::new("<|user|>").special_text(chathub::SpecialText::Text);
    /// assert_eq!(r.special_text, chathub::SpecialText::Text);
    /// ```
    #[must_use]
    pub fn special_text(mut self, special_text: SpecialText) -> Self {
        self.special_text = special_text;
        self
    }

    /// Offers the model `tools` to call.
    ///
    /// ```
    /// let weather = chathub::Tool::function("get_weather", "Weather of a city", serde_json::json!({}));
    /// let r = chathub::ChatRequest::new("Weather in Paris?").tools(vec![weather]);
    /// assert_eq!(r.tools.len(), 1);
    /// ```
    #[must_use]
    pub fn tools(mut self, tools: Vec<Tool>) -> Self {
        self.tools = tools;
        self
    }

    /// Sets the history.
    ///
    /// ```
    /// let r = chathub::ChatRequest::new("hi").history(vec![chathub::Message::system("be kind")]);
    /// assert_eq!(r.history.len(), 1);
    /// ```
    #[must_use]
    pub fn history(mut self, history: Vec<Message>) -> Self {
        self.history = history;
        self
    }

    /// Sets `max_length` (prompt plus reply).
    ///
    /// ```
    /// assert_eq!(chathub::ChatRequest::new("hi").max_length(2048).max_length, Some(2048));
    /// ```
    #[must_use]
    pub fn max_length(mut self, max_length: usize) -> Self {
        self.max_length = Some(max_length);
        self
    }

    /// Caps the reply length.
    ///
    /// ```
    /// assert_eq!(chathub::ChatRequest::new("hi").max_new_tokens(5).max_new_tokens, Some(5));
    /// ```
    #[must_use]
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = Some(n);
        self
    }

    /// Sets the temperature.
    ///
    /// ```
    /// assert_eq!(chathub::ChatRequest::new("hi").temperature(0.5).temperature, Some(0.5));
    /// ```
    #[must_use]
    pub fn temperature(mut self, temperature: f64) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets top_p.
    ///
    /// ```
    /// assert_eq!(chathub::ChatRequest::new("hi").top_p(0.9).top_p, Some(0.9));
    /// ```
    #[must_use]
    pub fn top_p(mut self, top_p: f64) -> Self {
        self.top_p = Some(top_p);
        self
    }

    /// Sets the sampling seed.
    ///
    /// ```
    /// assert_eq!(chathub::ChatRequest::new("hi").seed(7).seed, Some(7));
    /// ```
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Switches to greedy decoding (deterministic).
    ///
    /// ```
    /// assert!(chathub::ChatRequest::new("hi").greedy().greedy);
    /// ```
    #[must_use]
    pub fn greedy(mut self) -> Self {
        self.greedy = true;
        self
    }

    /// Checks every parameter and fills in defaults.
    pub(crate) fn resolve(&self, defaults: &GenerationDefaults) -> Result<ResolvedParams> {
        if self.prompt.is_empty() {
            return Err(Error::invalid("prompt", "\"\"", "must not be empty"));
        }
        if !matches!(self.prompt_role, Role::User | Role::Observation) {
            return Err(Error::invalid(
                "prompt_role",
                self.prompt_role,
                "the new message must be the user's or a tool's result (observation)",
            ));
        }
        let max_length = match self.max_length {
            None | Some(0) => defaults.max_length,
            Some(n) => n,
        };
        // Zero is proto3's "unset", so it means the default here too (never "greedy").
        let top_p = match self.top_p {
            None => defaults.top_p,
            Some(0.0) => defaults.top_p,
            Some(p) if p > 0.0 && p <= 1.0 => p,
            Some(p) => {
                return Err(Error::invalid(
                    "top_p",
                    p,
                    "must be in (0, 1] (0 means the model default)",
                ))
            }
        };
        let temperature = match self.temperature {
            None => defaults.temperature,
            Some(0.0) => defaults.temperature,
            Some(t) if t > 0.0 && t.is_finite() => t,
            Some(t) => {
                return Err(Error::invalid(
                    "temperature",
                    t,
                    "must be a finite number > 0 (0 means the model default; ask for greedy \
                     decoding to always take the most likely token)",
                ))
            }
        };
        if let Some(0) = self.top_k {
            return Err(Error::invalid("top_k", 0, "must be at least 1"));
        }
        let repetition_penalty = match self.repetition_penalty {
            None => 1.0,
            Some(r) if r > 0.0 && r.is_finite() => r as f32,
            Some(r) => {
                return Err(Error::invalid(
                    "repetition_penalty",
                    r,
                    "must be a finite number > 0",
                ))
            }
        };
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::invalid(
                "stop",
                "\"\"",
                "stop strings must not be empty",
            ));
        }
        if let Some(0) = self.max_new_tokens {
            return Err(Error::invalid("max_new_tokens", 0, "must be at least 1"));
        }
        let sampling = if self.greedy {
            Sampling::ArgMax
        } else {
            Sampling::Sample {
                temperature,
                top_p,
                top_k: self.top_k,
            }
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(ResolvedParams {
            max_length,
            max_new_tokens: self.max_new_tokens,
            sampling,
            repetition_penalty,
            seed,
        })
    }
}

/// A request's parameters after validation and defaults.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedParams {
    pub max_length: usize,
    pub max_new_tokens: Option<usize>,
    pub sampling: Sampling,
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FinishReason {
    /// The model produced a stop token (end of sequence or a role token).
    Stop,
    /// `max_length` or `max_new_tokens` was reached.
    Length,
    /// The caller asked to stop (callback returned `Break`, stream dropped, token cancelled).
    Cancelled,
    /// The reply is a call of one of the request's tools ([`Reply::ToolCall`]).
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt (after any history trimming).
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from an earlier request's cache instead of
    /// being computed again.
    pub cached_prompt_tokens: usize,
    /// Tokens generated (stop token excluded).
    pub completion_tokens: usize,
}

/// Where the time of one request went.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// From the call to the first reply token being chosen (prompt building and prefill).
    pub ttft_ms: f64,
    /// Running the prompt through the model.
    pub prefill_ms: f64,
    /// Prompt tokens computed per second during prefill (cached ones excluded).
    pub prefill_tokens_per_s: f64,
    /// Time spent on the forward passes after the first token.
    pub decode_ms: f64,
    /// Reply tokens per second after the first one.
    pub decode_tokens_per_s: f64,
    /// Whole call.
    pub total_ms: f64,
}

/// The result of one chat request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatOutcome {
    /// The reply as the official `chat()` returns it: its text, or a tool call, or a metadata
    /// reply. ChatGLM3/GLM-4's metadata line is split off and text replies are stripped.
    /// Serialized as `response`, the official value's JSON.
    #[serde(rename = "response")]
    pub reply: Reply,
    /// The text shown to a user: a text reply's text (everything the streaming callback was
    /// given, concatenated), empty for a tool call or metadata reply.
    pub text: String,
    /// What the model wrote, decoded (metadata line included; stop tokens and stop strings
    /// never appear in it).
    pub raw_text: String,
    /// Why a tool call in the reply could not be read (it then comes back as
    /// [`Reply::Metadata`]); it is never executed.
    pub tool_call_error: Option<String>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// The prompt as the model saw it.
    pub prompt_token_ids: Vec<u32>,
    /// The reply's tokens.
    pub completion_token_ids: Vec<u32>,
    /// History messages left out so the prompt fits the context.
    pub dropped_history_messages: usize,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Sampling {
    /// Always the most likely token (deterministic; what the reference fixtures use).
    ArgMax,
    /// A random token from the softmax of `logits / temperature`, restricted to the `top_k`
    /// most likely tokens (all when `None`) and then to the smallest set whose probability
    /// reaches `top_p`.
    Sample {
        /// Softmax temperature, > 0.
        temperature: f64,
        /// Nucleus threshold, in (0, 1].
        top_p: f64,
        /// Keep only this many candidates before applying `top_p`.
        top_k: Option<usize>,
    },
}

/// How text in messages that spells a special token (`<|user|>`, `[gMASK]`) is encoded, for
/// families whose official tokenizer recognises such text (GLM-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SpecialText {
    /// As the official chat path does: the special token's id. A user who types `<|user|>`
    /// starts a new user turn, as with THUDM's code.
    #[default]
    Tokens,
    /// As plain text, so untrusted input cannot inject role tokens.
    Text,
}
