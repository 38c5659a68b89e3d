//! Ids → text, whole-sequence and streaming, shared by both tokenizer formats.
//!
//! Both official tokenizers split an id sequence into sub-texts: each special id is one
//! sub-text (its text), and each maximal run of ordinary ids is one sub-text (the run's bytes
//! concatenated and decoded as UTF-8 with replacement: one U+FFFD per maximal invalid subpart,
//! as Python's `errors="replace"` and `String::from_utf8_lossy` do; an incomplete sequence at the
//! end of a run is one U+FFFD). They differ in how sub-texts are joined, see [`Spacing`].
//! (The fast tokenizer decodes all bytes at once, which gives the same text for specials that
//! start with an ASCII character, as GLM-4's do: such a byte ends any incomplete sequence.)
//!
//! [`StreamDecoder`] produces the same text incrementally, holding back only the bytes of a
//! character that is still incomplete, so every delta is valid UTF-8 and the concatenated
//! deltas equal `decode`.

use super::error::TokenizerError;

/// What an id stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenPiece<'a> {
    /// An ordinary token: raw bytes, possibly part of a UTF-8 character.
    Bytes(&'a [u8]),
    /// A special (added) token, printed as its text.
    Special(&'a str),
}

/// Anything that can say what an id stands for; implemented by both tokenizer formats.
pub trait TokenLookup {
    /// The bytes or special text behind `id`, `None` if the id is unknown.
    fn piece(&self, id: u32) -> Option<TokenPiece<'_>>;
}

/// How sub-texts (special tokens and runs of ordinary tokens) are joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// Joined with one space: transformers' slow-tokenizer `_decode` with
    /// `spaces_between_special_tokens=True`, i.e. glm-4-9b-chat's `ChatGLM4Tokenizer`
    /// (`"<|user|> \nhi <|assistant|>"`).
    Spaced,
    /// Concatenated: the fast tokenizer of the `tokenizer.json` layouts
    /// (`"<|user|>\nhi<|assistant|>"`).
    Joined,
}

#[cfg(test)]
/// Decodes a whole id sequence; an unknown id is an error.
pub fn decode(
    lookup: &dyn TokenLookup,
    ids: &[u32],
    spacing: Spacing,
) -> Result<String, TokenizerError> {
    let mut out = String::new();
    let mut run: Vec<u8> = Vec::new();
    let mut have_sub_text = false;
    let mut push_sub_text = |out: &mut String, text: &str| {
        if spacing == Spacing::Spaced && have_sub_text {
            out.push(' ');
        }
        out.push_str(text);
        have_sub_text = true;
    };
    for &id in ids {
        match lookup.piece(id).ok_or(TokenizerError::UnknownId(id))? {
            TokenPiece::Bytes(bytes) => run.extend_from_slice(bytes),
            TokenPiece::Special(text) => {
                if !run.is_empty() {
                    push_sub_text(&mut out, &String::from_utf8_lossy(&run));
                    run.clear();
                }
                push_sub_text(&mut out, text);
            }
        }
    }
    if !run.is_empty() {
        push_sub_text(&mut out, &String::from_utf8_lossy(&run));
    }
    Ok(out)
}

/// Incremental decoder: push ids one at a time, get text deltas.
///
/// Each delta is valid UTF-8; bytes of a character split across tokens are held back until it
/// is complete, and invalid bytes become U+FFFD as soon as they are known to be invalid. Call
/// [`StreamDecoder::finish`] at the end to flush a trailing incomplete character (as U+FFFD).
pub struct StreamDecoder<'a> {
    lookup: &'a dyn TokenLookup,
    spacing: Spacing,
    /// Bytes of the current run not yet emitted (at most an incomplete character).
    pending: Vec<u8>,
    /// Whether the last id pushed was an ordinary token (a run is open).
    in_run: bool,
    /// Whether any sub-text has started (for [`Spacing::Spaced`]).
    have_sub_text: bool,
}

impl std::fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("spacing", &self.spacing)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<'a> StreamDecoder<'a> {
    /// A decoder that looks ids up in `lookup` and joins sub-texts per `spacing`.
    pub fn new(lookup: &'a dyn TokenLookup, spacing: Spacing) -> Self {
        StreamDecoder {
            lookup,
            spacing,
            pending: Vec::new(),
            in_run: false,
            have_sub_text: false,
        }
    }

    /// Feeds one id and returns the text it completes (possibly empty). An unknown id is an
    /// error and leaves the decoder unchanged.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let piece = self.lookup.piece(id).ok_or(TokenizerError::UnknownId(id))?;
        let mut out = String::new();
        match piece {
            TokenPiece::Bytes(bytes) => {
                if !self.in_run {
                    // A run's text is never empty (tokens have at least one byte), so its
                    // separating space can be emitted now.
                    self.start_sub_text(&mut out);
                    self.in_run = true;
                }
                self.pending.extend_from_slice(bytes);
                self.drain_complete(&mut out);
            }
            TokenPiece::Special(text) => {
                self.end_run(&mut out);
                self.start_sub_text(&mut out);
                out.push_str(text);
            }
        }
        Ok(out)
    }

    /// Ends the stream: returns U+FFFD if an incomplete character was pending, else "".
    /// The decoder can be reused afterwards as if new.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        self.end_run(&mut out);
        self.have_sub_text = false;
        out
    }

    fn start_sub_text(&mut self, out: &mut String) {
        if self.spacing == Spacing::Spaced && self.have_sub_text {
            out.push(' ');
        }
        self.have_sub_text = true;
    }

    fn end_run(&mut self, out: &mut String) {
        if !self.pending.is_empty() {
            out.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
        self.in_run = false;
    }

    /// Moves everything decidable from `pending` to `out`, keeping an incomplete tail.
    fn drain_complete(&mut self, out: &mut String) {
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(valid) => {
                    out.push_str(valid);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid_end = start + e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid_end]));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid_end + n;
                        }
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A toy vocabulary: all single bytes as ids 0..256, a few multi-byte tokens, two specials.
    struct Toy {
        multi: Vec<Vec<u8>>,
    }

    impl TokenLookup for Toy {
        fn piece(&self, id: u32) -> Option<TokenPiece<'_>> {
            const SINGLE: [u8; 256] = {
                let mut t = [0u8; 256];
                let mut i = 0;
                while i < 256 {
                    t[i] = i as u8;
                    i += 1;
                }
                t
            };
            match id {
                0..=255 => Some(TokenPiece::Bytes(&SINGLE[id as usize..id as usize + 1])),
                300 => Some(TokenPiece::Special("<|user|>")),
                301 => Some(TokenPiece::Special("<sop>")),
                _ => self
                    .multi
                    .get(id.checked_sub(256)? as usize)
                    .map(|b| TokenPiece::Bytes(b)),
            }
        }
    }

    fn toy() -> Toy {
        Toy {
            multi: vec![
                "你".as_bytes().to_vec(),
                vec![0xe4, 0xbd],
                vec![0xa0, b'x'],
                vec![0xf0, 0x9f],
                vec![0x99, 0x82, 0xf0],
                "ok".as_bytes().to_vec(),
            ],
        }
    }

    fn stream(lookup: &dyn TokenLookup, ids: &[u32], spacing: Spacing) -> Vec<String> {
        let mut d = StreamDecoder::new(lookup, spacing);
        let mut deltas: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        deltas.push(d.finish());
        deltas
    }

    #[test]
    fn replacement_rules() {
        let t = toy();
        let d = |ids: &[u32]| decode(&t, ids, Spacing::Joined).unwrap();
        assert_eq!(d(&[0xe4, 0xbd]), "\u{fffd}");
        assert_eq!(d(&[0xe4, 0xbd, b'o' as u32, b'k' as u32]), "\u{fffd}ok");
        assert_eq!(d(&[0xa6]), "\u{fffd}");
        assert_eq!(d(&[0xf0, 0x80, 0x80]), "\u{fffd}\u{fffd}\u{fffd}");
        assert_eq!(d(&[0xe4, 300]), "\u{fffd}<|user|>");
        assert_eq!(
            decode(&t, &[300, 10, 104, 105, 301, 301], Spacing::Spaced).unwrap(),
            "<|user|> \nhi <sop> <sop>"
        );
        assert!(matches!(
            decode(&t, &[999], Spacing::Joined),
            Err(TokenizerError::UnknownId(999))
        ));
    }

    #[test]
    fn stream_holds_back_partial_characters() {
        let t = toy();
        // "你" as three single bytes: nothing until the last one.
        let deltas = stream(&t, &[0xe4, 0xbd, 0xa0], Spacing::Joined);
        assert_eq!(deltas, ["", "", "你", ""]);
        // An invalid byte is replaced as soon as it is known to be invalid.
        let deltas = stream(&t, &[0xe4, 0xbd, b'o' as u32], Spacing::Joined);
        assert_eq!(deltas, ["", "", "\u{fffd}o", ""]);
        let deltas = stream(&t, &[300, 0xe4], Spacing::Spaced);
        assert_eq!(deltas, ["<|user|>", " ", "\u{fffd}"]);
    }

    #[test]
    fn stream_equals_decode_on_random_sequences() {
        let t = toy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let pool: Vec<u32> = (0..256).chain(256..262).chain([300, 301]).collect();
        for _ in 0..5000 {
            let len = rng.random_range(0..20);
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        // Bias towards bytes that form or break UTF-8 sequences.
                        [0xe4, 0xbd, 0xa0, 0xf0, 0x9f, 0x80, b'a' as u32, 0xc3, 0xed]
                            [rng.random_range(0..9)]
                    } else {
                        pool[rng.random_range(0..pool.len())]
                    }
                })
                .collect();
            for spacing in [Spacing::Spaced, Spacing::Joined] {
                let whole = decode(&t, &ids, spacing).unwrap();
                assert_eq!(stream(&t, &ids, spacing).concat(), whole, "{ids:?}");
            }
        }
    }
}
