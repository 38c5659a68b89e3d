//! One type for either tokenizer file format, chosen from the file's contents.
//!
//! glm-4-9b-chat ships a tiktoken `tokenizer.model`; the -hf and 0414 layouts ship a
//! `tokenizer.json`. Callers that only need "the tokenizer of this model directory" use
//! [`Glm4Tokenizer`] and never branch on the format themselves.

use std::ops::Range;
#[cfg(test)]
use std::path::Path;

use super::decode::{Spacing, StreamDecoder, TokenLookup, TokenPiece};
use super::error::TokenizerError;
use super::hf_json::HfJsonTokenizer;
use super::specials::SpecialTokens;
use super::tiktoken::TiktokenTokenizer;

/// A GLM-4 tokenizer in either format (boxed: the two differ much in size).
#[derive(Clone, Debug)]
pub enum Glm4Tokenizer {
    /// From a tiktoken `tokenizer.model` (decodes with [`Spacing::Spaced`]).
    Tiktoken(Box<TiktokenTokenizer>),
    /// From a `tokenizer.json` (decodes with [`Spacing::Joined`]).
    HfJson(Box<HfJsonTokenizer>),
}

impl Glm4Tokenizer {
    #[cfg(test)]
    /// Loads `path`, telling the formats apart by content: a JSON object is a
    /// `tokenizer.json`, anything else must be a tiktoken file (a sentencepiece protobuf gives
    /// [`TokenizerError::NotTiktoken`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&data)
    }

    #[cfg(test)]
    /// Like [`from_file`](Self::from_file) for data already in memory.
    pub fn from_bytes(data: &[u8]) -> Result<Self, TokenizerError> {
        let first = data.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            HfJsonTokenizer::from_bytes(data).map(|t| Glm4Tokenizer::HfJson(Box::new(t)))
        } else {
            TiktokenTokenizer::from_bytes(data).map(|t| Glm4Tokenizer::Tiktoken(Box::new(t)))
        }
    }

    /// Like `from_bytes`, with a tiktoken file's special tokens named by
    /// `specials` (in id order after the ranks; GLM-4's own list when empty).
    pub fn from_bytes_with_specials(
        data: &[u8],
        specials: &[&str],
    ) -> Result<Self, TokenizerError> {
        let first = data.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            HfJsonTokenizer::from_bytes(data).map(|t| Glm4Tokenizer::HfJson(Box::new(t)))
        } else {
            TiktokenTokenizer::from_bytes_with_specials(data, specials)
                .map(|t| Glm4Tokenizer::Tiktoken(Box::new(t)))
        }
    }

    /// Number of ordinary (non-special) tokens.
    pub fn ordinary_vocab_size(&self) -> u32 {
        match self {
            Glm4Tokenizer::Tiktoken(t) => t.n_ranks(),
            Glm4Tokenizer::HfJson(t) => t.ordinary_vocab_size(),
        }
    }

    #[cfg(test)]
    /// Official encoding: special-token text becomes special ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Glm4Tokenizer::Tiktoken(t) => Ok(t.encode(text)),
            Glm4Tokenizer::HfJson(t) => t.encode(text),
        }
    }

    /// Encoding with special-token text as ordinary text.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Glm4Tokenizer::Tiktoken(t) => Ok(t.encode_ordinary(text)),
            Glm4Tokenizer::HfJson(t) => t.encode_ordinary(text),
        }
    }

    /// Official encoding except inside `protected` byte ranges, where special-token text
    /// stays ordinary text.
    pub fn encode_protected(
        &self,
        text: &str,
        protected: &[Range<usize>],
    ) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Glm4Tokenizer::Tiktoken(t) => Ok(t.encode_protected(text, protected)),
            Glm4Tokenizer::HfJson(t) => t.encode_protected(text, protected),
        }
    }

    #[cfg(test)]
    /// The official decoding of the format.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Glm4Tokenizer::Tiktoken(t) => t.decode(ids),
            Glm4Tokenizer::HfJson(t) => t.decode(ids),
        }
    }

    /// A streaming decoder matching `decode`.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self, self.spacing())
    }

    /// How this format's official decoder joins special tokens and text.
    pub fn spacing(&self) -> Spacing {
        match self {
            Glm4Tokenizer::Tiktoken(_) => Spacing::Spaced,
            Glm4Tokenizer::HfJson(_) => Spacing::Joined,
        }
    }

    #[cfg(test)]
    /// Raw bytes of an ordinary token, or the text of a special one.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        match self {
            Glm4Tokenizer::Tiktoken(t) => t.token_bytes(id),
            Glm4Tokenizer::HfJson(t) => t.token_bytes(id),
        }
    }

    /// The special tokens (ids of `<|user|>`, stop tokens, ...).
    pub fn specials(&self) -> &SpecialTokens {
        match self {
            Glm4Tokenizer::Tiktoken(t) => t.specials(),
            Glm4Tokenizer::HfJson(t) => t.specials(),
        }
    }

    #[cfg(test)]
    /// Number of ids the tokenizer can produce.
    pub fn vocab_size(&self) -> u32 {
        match self {
            Glm4Tokenizer::Tiktoken(t) => t.vocab_size(),
            Glm4Tokenizer::HfJson(t) => t.vocab_size(),
        }
    }
}

impl TokenLookup for Glm4Tokenizer {
    fn piece(&self, id: u32) -> Option<TokenPiece<'_>> {
        match self {
            Glm4Tokenizer::Tiktoken(t) => t.piece(id),
            Glm4Tokenizer::HfJson(t) => t.piece(id),
        }
    }
}
