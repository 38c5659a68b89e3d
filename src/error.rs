//! The crate's one error type.
//!
//! Every variant carries the data a caller needs to act on (a path, a field, a value) instead
//! of a pre-formatted string, and [`Error::kind`] maps it to a stable [`ErrorKind`] that the C ABI
//! and the gRPC server turn into status codes.

use std::path::{Path, PathBuf};

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading a model or generating a reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be read (missing, unreadable, not a directory).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A model directory lacks a file it must have.
    #[error("{} has no {what} (looked for {looked_for})", dir.display())]
    MissingFile {
        /// The model directory.
        dir: PathBuf,
        /// What was missing ("config.json", "weights", "tokenizer.model").
        what: &'static str,
        /// The file names that were tried.
        looked_for: String,
    },

    /// A JSON file (config, index, request) is not valid JSON or has the wrong shape.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parser's message, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// `config.json` parsed, but a value makes no sense for this architecture.
    #[error("invalid config {}: {field} = {value}: {reason}", path.display())]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// The offending key.
        field: &'static str,
        /// Its value as found.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A weight file could not be parsed (truncated safetensors, corrupt pickle, unknown dtype).
    #[error("cannot load weights from {}: {source}", path.display())]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// candle's description of the problem.
        #[source]
        source: candle_core::Error,
    },

    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor {name} is missing from {}", path.display())]
    MissingTensor {
        /// The checkpoint key, e.g. `transformer.output_layer.weight`.
        name: String,
        /// The file (or index) where it was expected.
        path: PathBuf,
    },

    /// A tensor's stored shape disagrees with what `config.json` implies.
    #[error(
        "tensor {name} in {} has shape {found:?}, but config.json implies {expected:?}",
        path.display()
    )]
    ShapeMismatch {
        /// The checkpoint key.
        name: String,
        /// The weight file holding it.
        path: PathBuf,
        /// The shape derived from the config.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// A tokenizer file (`tokenizer.model`, `tokenizer.json`) is unreadable or of a kind this
    /// crate does not run.
    #[error("invalid tokenizer {}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The model's chat template cannot be compiled or fails to render (a template error, not
    /// the conversation's).
    #[error("chat template of {}: {reason}", path.display())]
    Template {
        /// The file holding the template (`tokenizer_config.json`, `chat_template.jinja`).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The model's chat template refused this conversation (its `raise_exception`, e.g. roles
    /// out of order) or it would take more than the rendering budget.
    #[error("the chat template rejects this conversation: {reason}")]
    ConversationRejected {
        /// The template's message.
        reason: String,
    },

    /// A request parameter is out of range (NaN, negative, `top_p > 1`, an empty prompt, ...).
    #[error("invalid {field} {value}: {reason}")]
    InvalidArgument {
        /// The parameter's name as the request spells it (`top_p`, `max_length`, ...).
        field: &'static str,
        /// The value received.
        value: String,
        /// The accepted range or rule.
        reason: &'static str,
    },

    /// A history message has a role the model does not know.
    #[error("unknown role {role:?} in history message {index}: expected system, user, assistant or observation")]
    UnknownRole {
        /// Position of the message in the history.
        index: usize,
        /// The role as received.
        role: String,
    },

    /// The prompt does not fit in the context even after dropping all droppable history.
    #[error("prompt of {prompt_tokens} tokens does not fit in max_length {limit}")]
    PromptTooLong {
        /// Tokens in the shortest prompt that could be built.
        prompt_tokens: usize,
        /// The token budget (max_length capped by the model's context).
        limit: usize,
    },

    /// A file could not be written (disk full, no permission); nothing was left behind.
    #[error("writing {}: {reason}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// An output path names something that must not be replaced (a directory, a device, a
    /// FIFO, a symbolic link).
    #[error("refusing to write {}: {reason}", path.display())]
    OutputRefused {
        /// The output path as given.
        path: PathBuf,
        /// What is there.
        reason: &'static str,
    },

    /// A tensor computation failed at run time (out of memory on a device, a backend error).
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),

    /// Any error, with the file it concerns.
    #[error("{}: {err}", path.display())]
    WithPath {
        /// The file the error concerns.
        path: PathBuf,
        /// The underlying error.
        err: Box<Error>,
    },
}

/// Coarse categories of [`Error`], stable across releases: the C ABI returns these numbers and
/// the gRPC server maps them to status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A request argument is invalid (bad number, unknown role, empty prompt).
    InvalidArgument = 2,
    /// A model file or directory does not exist or cannot be read.
    NotFound = 3,
    /// The model files exist but are malformed or inconsistent.
    InvalidModel = 4,
    /// The prompt is longer than the context allows.
    PromptTooLong = 5,
    /// Anything else: a failure inside the computation.
    Internal = 6,
}

impl Error {
    /// The category of this error, see [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::MissingFile { .. } => ErrorKind::NotFound,
            Error::Json { .. }
            | Error::InvalidConfig { .. }
            | Error::Weights { .. }
            | Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::Tokenizer { .. }
            | Error::Template { .. } => ErrorKind::InvalidModel,
            Error::InvalidArgument { .. }
            | Error::UnknownRole { .. }
            | Error::ConversationRejected { .. }
            | Error::OutputRefused { .. } => ErrorKind::InvalidArgument,
            Error::PromptTooLong { .. } => ErrorKind::PromptTooLong,
            Error::Compute(_) | Error::Write { .. } => ErrorKind::Internal,
            Error::WithPath { err, .. } => err.kind(),
        }
    }

    /// True when the error is about the caller's request rather than the model.
    pub fn is_invalid_argument(&self) -> bool {
        self.kind() == ErrorKind::InvalidArgument
    }

    /// The file this error concerns, when it concerns one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Json { path, .. }
            | Error::InvalidConfig { path, .. }
            | Error::Weights { path, .. }
            | Error::MissingTensor { path, .. }
            | Error::ShapeMismatch { path, .. }
            | Error::Tokenizer { path, .. }
            | Error::Template { path, .. }
            | Error::Write { path, .. }
            | Error::OutputRefused { path, .. }
            | Error::WithPath { path, .. } => Some(path),
            Error::MissingFile { dir, .. } => Some(dir),
            _ => None,
        }
    }

    /// Wraps this error with the file it concerns, unless it already names one.
    pub fn with_path(self, path: impl Into<PathBuf>) -> Self {
        if self.path().is_some() {
            return self;
        }
        Error::WithPath {
            path: path.into(),
            err: Box::new(self),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(field: &'static str, value: impl ToString, reason: &'static str) -> Self {
        Error::InvalidArgument {
            field,
            value: value.to_string(),
            reason,
        }
    }
}
