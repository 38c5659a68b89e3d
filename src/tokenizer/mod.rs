//! The ChatGLM tokenizer: sentencepiece ids plus special tokens appended after them.
//!
//! Follows THUDM's `tokenization_chatglm.py`: plain text always goes through sentencepiece (so
//! text that merely looks like `<|user|>` stays text), and the special tokens get the ids right
//! after the sentencepiece vocabulary, in a fixed order.

pub(crate) mod model_proto;
mod sentencepiece;

use std::path::Path;

use crate::error::Result;
use sentencepiece::{PieceBytes, SentencePiece};

/// Special tokens in the order the official tokenizer appends them.
pub(crate) const SPECIAL_TOKENS: [&str; 9] = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
];

/// Number of pieces in a serialized sentencepiece model.
pub(crate) fn sentencepiece_size(model: &[u8]) -> std::result::Result<usize, String> {
    SentencePiece::from_bytes(model).map(|sp| sp.vocab_size())
}

/// A special token of the ChatGLM vocabulary, inserted by id, never by encoding its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialToken {
    /// `[MASK]`.
    Mask = 0,
    /// `[gMASK]`: starts every chat prompt.
    GMask = 1,
    /// `[sMASK]`.
    SMask = 2,
    /// `sop`: start of piece, right after `[gMASK]`.
    Sop = 3,
    /// `eop`: end of piece.
    Eop = 4,
    /// `<|system|>` (ChatGLM3).
    System = 5,
    /// `<|user|>` (ChatGLM3).
    User = 6,
    /// `<|assistant|>` (ChatGLM3).
    Assistant = 7,
    /// `<|observation|>` (ChatGLM3).
    Observation = 8,
}

impl SpecialToken {
    /// The token's text, as the official tokenizer renders it.
    pub fn text(self) -> &'static str {
        SPECIAL_TOKENS[self as usize]
    }
}

/// Turns text into ChatGLM token ids and back.
///
/// Cheap to share: generation borrows it immutably.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    sp: SentencePiece,
    /// How many of [`SPECIAL_TOKENS`] this model has (5 for ChatGLM2, 9 for ChatGLM3).
    special_count: usize,
}

impl Tokenizer {
    /// Loads `tokenizer.model` and appends `special_count` special tokens (5 for ChatGLM2,
    /// 9 for ChatGLM3).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Io`] when the file cannot be read, [`crate::Error::Tokenizer`] when it is not
    /// a BPE sentencepiece model.
    pub fn from_file(path: &Path, special_count: usize) -> Result<Self> {
        let sp = SentencePiece::from_file(path)?;
        Ok(Tokenizer {
            sp,
            special_count: special_count.min(SPECIAL_TOKENS.len()),
        })
    }

    /// Parses a `tokenizer.model` already in memory; `path` names it in errors.
    pub(crate) fn from_model_bytes(
        bytes: &[u8],
        special_count: usize,
        path: &Path,
    ) -> Result<Self> {
        let sp = SentencePiece::from_bytes(bytes).map_err(|reason| crate::Error::Tokenizer {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Tokenizer {
            sp,
            special_count: special_count.min(SPECIAL_TOKENS.len()),
        })
    }

    /// Number of sentencepiece pieces; special ids start here.
    pub fn sentencepiece_size(&self) -> usize {
        self.sp.vocab_size()
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.sp.vocab_size() + self.special_count
    }

    /// The id of a special token, or `None` when this model has no such token (ChatGLM2 has no
    /// role tokens).
    pub fn special_id(&self, token: SpecialToken) -> Option<u32> {
        let index = token as usize;
        (index < self.special_count).then(|| (self.sp.vocab_size() + index) as u32)
    }

    /// The id of `</s>`, the end-of-sequence token.
    pub fn eos_id(&self) -> u32 {
        self.sp.piece_id("</s>").unwrap_or(2)
    }

    /// Encodes plain text the way `sp_model.encode(text)` does: with the dummy-prefix `▁`,
    /// byte fallback and split digits, and never producing a special id.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> chathub::Result<()> {
    /// let tokenizer = chathub::Tokenizer::from_file("chatglm3-6b/tokenizer.model".as_ref(), 9)?;
    /// assert_eq!(tokenizer.encode("你好"), vec![30910, 34607]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.sp.encode(text)
    }

    /// Decodes ids to text, like the official tokenizer's `decode`: invalid byte sequences become
    /// one U+FFFD per byte.
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
            tokenizer: self,
            pending: Vec::new(),
            at_start: true,
        }
    }
}

/// Decodes ids one at a time into text deltas that are always valid UTF-8.
///
/// A character split across byte-fallback tokens is held back until its last byte arrives;
/// bytes that can never form a character come out as U+FFFD, one per byte, as sentencepiece
/// decodes them. The concatenated deltas equal [`Tokenizer::decode`] of all ids.
#[derive(Debug)]
pub struct TextDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
    at_start: bool,
}

impl TextDecoder<'_> {
    /// Adds one id; appends whatever text is now complete to `out`.
    pub fn push(&mut self, id: u32, out: &mut String) {
        let sp = &self.tokenizer.sp;
        let sp_size = sp.vocab_size();
        if (id as usize) >= sp_size {
            // A special token: the official tokenizer hands its text to sentencepiece's
            // DecodePieces along with the ordinary pieces, where it comes out verbatim and ends
            // any run of byte pieces.
            self.finish(out);
            if let Some(text) = SPECIAL_TOKENS.get(id as usize - sp_size) {
                out.push_str(text);
            }
            self.at_start = false;
            return;
        }
        match sp.piece_bytes(id) {
            PieceBytes::Empty => return,
            PieceBytes::Byte(b) => self.pending.push(b),
            PieceBytes::Text(text) => {
                let mut text = text;
                if self.at_start && sp.strips_dummy_prefix() {
                    text = text.strip_prefix('\u{2581}').unwrap_or(text);
                }
                for ch in text.chars() {
                    let ch = if ch == '\u{2581}' { ' ' } else { ch };
                    let mut buf = [0u8; 4];
                    self.pending
                        .extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        self.at_start = false;
        self.drain(out, false);
    }

    /// Ends the stream: bytes still waiting for the rest of a character become U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        self.drain(out, true);
    }

    fn drain(&mut self, out: &mut String, end: bool) {
        let mut pos = 0;
        while pos < self.pending.len() {
            match std::str::from_utf8(&self.pending[pos..]) {
                Ok(text) => {
                    out.push_str(text);
                    pos = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // from_utf8 has just validated this prefix, so this never falls back.
                    out.push_str(
                        std::str::from_utf8(&self.pending[pos..pos + valid]).unwrap_or_default(),
                    );
                    pos += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.extend(std::iter::repeat_n('\u{FFFD}', bad));
                            pos += bad;
                        }
                        None if end => {
                            let rest = self.pending.len() - pos;
                            out.extend(std::iter::repeat_n('\u{FFFD}', rest));
                            pos = self.pending.len();
                        }
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..pos);
    }
}
