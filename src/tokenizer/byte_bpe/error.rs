//! The one error type of the tokenizer modules.
//!
//! Tokenizer files come from model downloads and can be truncated, mixed up (a sentencepiece
//! `tokenizer.model` where a tiktoken one is expected) or hand-edited; every such problem must
//! surface as a message that names the file kind and, for line-based files, the line, never as a
//! panic.

#[cfg(test)]
use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer or turning ids back into text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file could not be read at all.
    #[cfg(test)]
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A tiktoken `tokenizer.model` holds no token lines.
    #[error("tokenizer.model is empty (no token lines)")]
    Empty,
    /// The data is not a tiktoken `tokenizer.model` at all (e.g. a sentencepiece protobuf);
    /// the text says what it looks like instead.
    #[error("not a tiktoken tokenizer.model: {0}")]
    NotTiktoken(String),
    /// One line of a tiktoken `tokenizer.model` is malformed (1-based line number).
    #[error("tokenizer.model line {line}: {msg}")]
    BadLine {
        /// 1-based line number in the file.
        line: usize,
        /// What is wrong with that line.
        msg: String,
    },
    /// The token lines are individually fine but do not form a usable vocabulary
    /// (rank gaps, duplicate token bytes, a missing single byte).
    #[error("tokenizer.model vocabulary: {0}")]
    BadVocab(String),
    /// A `tokenizer.json` is not valid JSON, misses a field, or uses a feature this
    /// implementation does not reproduce faithfully.
    #[error("tokenizer.json: {0}")]
    BadJson(String),
    /// The special-token list is unusable (empty text, duplicate text or id).
    #[error("special tokens: {0}")]
    BadSpecials(String),
    /// An id that is neither a vocabulary token nor a special token.
    #[error("unknown token id {0}")]
    UnknownId(u32),
    /// The `tokenizers` crate reported an error while encoding.
    #[error("tokenizers crate: {0}")]
    Backend(String),
}
