//! Tokenizers of the supported families, behind one type: ids from text and text from ids,
//! streamed.
//!
//! Three file formats are read: sentencepiece's `tokenizer.model` (ChatGLM2/3, read natively),
//! GLM-4's tiktoken-style `tokenizer.model` (base64 token and rank per line, read natively) and
//! Hugging Face's `tokenizer.json` (GLM-4's -hf and 0414 layouts, through the `tokenizers`
//! crate). Special tokens (`[gMASK]`, `<|user|>`, ...) are numbered after the ordinary
//! vocabulary; which ones exist is the caller's (the family's) to say where the file does not.
//!
//! This layer knows nothing of prompts: families decide which text is encoded how.

mod byte_bpe;
pub(crate) mod model_proto;
mod sentencepiece;

use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use byte_bpe::any::Glm4Tokenizer;
use byte_bpe::decode::StreamDecoder;
use byte_bpe::specials::{Segment, SpecialToken, SpecialTokens};
use sentencepiece::{PieceBytes, SentencePiece};

pub(crate) use byte_bpe::specials::GLM4_SPECIAL_TOKENS;
pub(crate) use byte_bpe::tiktoken::{sniff, ModelFileKind};

/// The bytes a GPT-2 byte-level token string stands for (`None` for a character outside the
/// byte alphabet), to rebuild a vocabulary from GGUF's token strings.
pub(crate) fn byte_level_token_bytes(token: &str) -> Option<Vec<u8>> {
    byte_bpe::bytelevel::token_to_bytes(token)
}

/// The GPT-2 byte-level character standing for `byte` (tests write GGUF vocabularies with it).
#[cfg(test)]
pub(crate) fn byte_level_char(byte: u8) -> char {
    byte_bpe::bytelevel::byte_to_char(byte)
}

/// Number of pieces in a serialized sentencepiece model.
pub(crate) fn sentencepiece_size(model: &[u8]) -> std::result::Result<usize, String> {
    SentencePiece::from_bytes(model).map(|sp| sp.vocab_size())
}

/// The ordinary vocabulary, its encoder and the special tokens.
#[derive(Debug, Clone)]
enum Backend {
    SentencePiece {
        sp: Box<SentencePiece>,
        specials: SpecialTokens,
    },
    ByteBpe(Box<Glm4Tokenizer>),
}

/// Turns text into token ids and back, for one model.
///
/// Cheap to share: generation borrows it immutably. Get one from a loaded
/// [`Engine`](crate::Engine) or with [`load_tokenizer`](crate::load_tokenizer).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    backend: Backend,
}

impl Tokenizer {
    /// A sentencepiece `tokenizer.model` (ChatGLM2/3) with `specials` appended after its pieces
    /// in that order, as THUDM's tokenizer numbers them. `path` names the file in errors.
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] when the bytes are not a BPE sentencepiece model.
    pub fn sentencepiece(model: &[u8], specials: &[&str], path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let sp = SentencePiece::from_bytes(model).map_err(bad)?;
        let first = sp.vocab_size() as u32;
        let specials = SpecialTokens::new(
            specials
                .iter()
                .enumerate()
                .map(|(i, text)| SpecialToken {
                    id: first + i as u32,
                    text: text.to_string(),
                    special: true,
                })
                .collect(),
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(Tokenizer {
            backend: Backend::SentencePiece {
                sp: Box::new(sp),
                specials,
            },
        })
    }

    /// GLM-4's tiktoken-style `tokenizer.model` (one `base64 rank` line per token) with
    /// `specials` numbered after the ranks in that order, or a Hugging Face `tokenizer.json`
    /// (whose own added tokens are the specials; `specials` is then ignored). The format is
    /// told from the bytes. `path` names the file in errors.
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] when the bytes are neither format, or malformed.
    pub fn byte_level_bpe(data: &[u8], specials: &[&str], path: &Path) -> Result<Self> {
        let tokenizer = Glm4Tokenizer::from_bytes_with_specials(data, specials).map_err(|e| {
            Error::Tokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(Tokenizer {
            backend: Backend::ByteBpe(Box::new(tokenizer)),
        })
    }

    fn specials(&self) -> &SpecialTokens {
        match &self.backend {
            Backend::SentencePiece { specials, .. } => specials,
            Backend::ByteBpe(t) => t.specials(),
        }
    }

    /// Number of ordinary (non-special) tokens; special ids usually start here.
    pub fn ordinary_vocab_size(&self) -> usize {
        match &self.backend {
            Backend::SentencePiece { sp, .. } => sp.vocab_size(),
            Backend::ByteBpe(t) => t.ordinary_vocab_size() as usize,
        }
    }

    /// Number of ids, special tokens included (one more than the largest id).
    pub fn vocab_size(&self) -> usize {
        let specials = self.specials().max_id().map_or(0, |id| id as usize + 1);
        self.ordinary_vocab_size().max(specials)
    }

    /// The id of the special token written `text` (`"[gMASK]"`, `"<|user|>"`), or `None` when
    /// this model has no such token.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.specials().id(text)
    }

    /// The text of special token `id`, or `None` when `id` is not a special token.
    pub fn special_text(&self, id: u32) -> Option<&str> {
        self.specials().text(id)
    }

    /// The id of an ordinary vocabulary entry written `piece` (`"</s>"` in sentencepiece).
    pub(crate) fn piece_id(&self, piece: &str) -> Option<u32> {
        match &self.backend {
            Backend::SentencePiece { sp, .. } => sp.piece_id(piece),
            Backend::ByteBpe(_) => None,
        }
    }

    /// Encodes plain text: text that looks like a special token stays text.
    ///
    /// Sentencepiece models add their dummy-prefix `▁`, as `sp_model.encode(text)` does.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> chathub::Result<()> {
    /// let tokenizer = chathub::load_tokenizer(chathub::demo_model_dir()?)?;
    /// let ids = tokenizer.encode("<|user|>")?;
    /// assert!(!ids.contains(&tokenizer.special_id("<|user|>").unwrap()));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] if the `tokenizers` crate fails on a `tokenizer.json` model.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::SentencePiece { sp, .. } => Ok(sp.encode(text)),
            Backend::ByteBpe(t) => t.encode_ordinary(text).map_err(encode_error),
        }
    }

    /// Encodes text in which special-token text becomes the special id, as Hugging Face
    /// tokenizers do, except inside the `protected` byte ranges (content that must stay
    /// text). Text between two special tokens is encoded as one piece, so protecting a range
    /// that holds no special-token text changes nothing.
    ///
    /// # Errors
    ///
    /// As [`Tokenizer::encode`].
    pub fn encode_with_special_text(
        &self,
        text: &str,
        protected: &[Range<usize>],
    ) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::SentencePiece { sp, specials } => {
                let mut ids = Vec::new();
                for segment in specials.split(text, protected) {
                    match segment {
                        Segment::Special(id) => ids.push(id),
                        Segment::Text(range) => {
                            ids.extend(sp.encode(text.get(range).unwrap_or_default()))
                        }
                    }
                }
                Ok(ids)
            }
            Backend::ByteBpe(t) => t.encode_protected(text, protected).map_err(encode_error),
        }
    }

    /// Decodes ids to text as the official tokenizer's `decode` does (special ids as their
    /// text; invalid UTF-8 as U+FFFD; ids outside the vocabulary contribute nothing).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut decoder = self.decoder();
        let mut text = String::new();
        for &id in ids {
            decoder.push(id, &mut text);
        }
        decoder.finish(&mut text);
        text
    }

    /// A streaming decoder that emits only whole UTF-8 characters.
    pub fn decoder(&self) -> TextDecoder<'_> {
        TextDecoder {
            inner: match &self.backend {
                Backend::SentencePiece { sp, specials } => Inner::SentencePiece {
                    sp,
                    specials,
                    pending: Vec::new(),
                    at_start: true,
                },
                Backend::ByteBpe(t) => Inner::ByteBpe(t.stream_decoder()),
            },
        }
    }
}

fn encode_error(e: byte_bpe::error::TokenizerError) -> Error {
    Error::Tokenizer {
        path: "tokenizer.json".into(),
        reason: e.to_string(),
    }
}

/// Decodes ids one at a time into text deltas that are always valid UTF-8.
///
/// A character split across tokens is held back until its last byte arrives; bytes that can
/// never form a character come out as U+FFFD as the official decoder writes them. The
/// concatenated deltas equal [`Tokenizer::decode`] of all ids.
#[derive(Debug)]
pub struct TextDecoder<'a> {
    inner: Inner<'a>,
}

#[derive(Debug)]
enum Inner<'a> {
    SentencePiece {
        sp: &'a SentencePiece,
        specials: &'a SpecialTokens,
        pending: Vec<u8>,
        /// Nothing decoded yet (the first piece drops its dummy-prefix space).
        at_start: bool,
    },
    ByteBpe(StreamDecoder<'a>),
}

impl TextDecoder<'_> {
    /// Adds one id; appends whatever text is now complete to `out`.
    pub fn push(&mut self, id: u32, out: &mut String) {
        match &mut self.inner {
            Inner::ByteBpe(decoder) => {
                // An id outside the vocabulary (a padding row) has no text.
                if let Ok(text) = decoder.push(id) {
                    out.push_str(&text);
                }
            }
            Inner::SentencePiece {
                sp,
                specials,
                pending,
                at_start,
            } => {
                if let Some(text) = specials.text(id) {
                    // The official tokenizer hands a special token's text to sentencepiece's
                    // DecodePieces with the ordinary pieces: it comes out verbatim and ends any
                    // run of byte pieces.
                    drain_per_byte(pending, out, true);
                    out.push_str(text);
                    *at_start = false;
                    return;
                }
                if id as usize >= sp.vocab_size() {
                    return;
                }
                match sp.piece_bytes(id) {
                    PieceBytes::Empty => return,
                    PieceBytes::Byte(b) => pending.push(b),
                    PieceBytes::Text(text) => {
                        let mut text = text;
                        if *at_start && sp.strips_dummy_prefix() {
                            text = text.strip_prefix('\u{2581}').unwrap_or(text);
                        }
                        for ch in text.chars() {
                            let ch = if ch == '\u{2581}' { ' ' } else { ch };
                            let mut buf = [0u8; 4];
                            pending.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                *at_start = false;
                drain_per_byte(pending, out, false);
            }
        }
    }

    /// Ends the stream: bytes still waiting for the rest of a character become U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        match &mut self.inner {
            Inner::ByteBpe(decoder) => out.push_str(&decoder.finish()),
            Inner::SentencePiece { pending, .. } => drain_per_byte(pending, out, true),
        }
    }
}

/// Moves the complete characters of `pending` to `out`, as sentencepiece decodes bytes: one
/// U+FFFD per byte that can never be part of a character (and, at the `end`, per byte of an
/// unfinished one).
fn drain_per_byte(pending: &mut Vec<u8>, out: &mut String, end: bool) {
    let mut pos = 0;
    while pos < pending.len() {
        match std::str::from_utf8(&pending[pos..]) {
            Ok(text) => {
                out.push_str(text);
                pos = pending.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // from_utf8 has just validated this prefix, so this never falls back.
                out.push_str(std::str::from_utf8(&pending[pos..pos + valid]).unwrap_or_default());
                pos += valid;
                let bad = match e.error_len() {
                    Some(bad) => bad,
                    None if end => pending.len() - pos,
                    None => break,
                };
                out.extend(std::iter::repeat_n('\u{FFFD}', bad));
                pos += bad;
            }
        }
    }
    pending.drain(..pos);
}
