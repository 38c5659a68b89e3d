//! A native reader and BPE encoder for sentencepiece `tokenizer.model` files.
//!
//! Follows sentencepiece's `bpe_model.cc` (`Model::SampleEncode` without sampling): the normalized
//! text is split into characters, then the adjacent pair whose concatenation is the
//! highest-scoring vocabulary piece is merged, leftmost first on ties, until no pair is in the
//! vocabulary. Characters outside the vocabulary become their UTF-8 bytes (`<0xXX>` pieces) when
//! the model was trained with byte fallback. Decoding follows `SentencePieceProcessor::Decode`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use prost::Message;

use super::model_proto::{piece_type, ModelProto, MODEL_TYPE_BPE};

/// sentencepiece's visible space, U+2581.
const SPACE_SYMBOL: char = '\u{2581}';

/// A loaded BPE sentencepiece model.
#[derive(Debug, Clone)]
pub(crate) struct SentencePiece {
    pieces: Vec<Piece>,
    /// Pieces that merges may produce (NORMAL, USER_DEFINED, UNUSED), by text.
    mergeable: HashMap<String, u32>,
    /// User-defined symbols, longest first: matched whole and never merged further.
    user_defined: Vec<String>,
    byte_ids: [Option<u32>; 256],
    unk_id: u32,
    unk_surface: String,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    byte_fallback: bool,
}

#[derive(Debug, Clone)]
struct Piece {
    text: String,
    score: f32,
    kind: i32,
}

/// What one id contributes to decoded text.
pub(crate) enum PieceBytes<'a> {
    /// A raw byte from a `<0xXX>` piece; may be part of a multi-byte character.
    Byte(u8),
    /// Text (already valid UTF-8); `▁` is to be shown as a space.
    Text(&'a str),
    /// Nothing (control pieces such as `<s>`).
    Empty,
}

impl SentencePiece {
    pub(crate) fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let proto = ModelProto::decode(bytes)
            .map_err(|e| format!("not a sentencepiece model protobuf: {e}"))?;
        if proto.pieces.is_empty() {
            return Err("the model has no pieces".into());
        }
        let trainer = proto.trainer_spec.unwrap_or_default();
        let model_type = trainer.model_type.unwrap_or(1);
        if model_type != MODEL_TYPE_BPE {
            return Err(format!(
                "model type {model_type} is not BPE (2); ChatGLM tokenizers are BPE"
            ));
        }
        let normalizer = proto.normalizer_spec.unwrap_or_default();
        if normalizer
            .precompiled_charsmap
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            tracing::warn!(
                name = normalizer.name.as_deref().unwrap_or(""),
                "tokenizer has a precompiled normalization map, which is not applied"
            );
        }

        let mut pieces = Vec::with_capacity(proto.pieces.len());
        let mut mergeable = HashMap::with_capacity(proto.pieces.len());
        let mut user_defined = Vec::new();
        let mut byte_ids = [None; 256];
        let mut unk_id = None;
        for (id, p) in proto.pieces.into_iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| "too many pieces".to_string())?;
            let text = p.piece.unwrap_or_default();
            let kind = p.r#type.unwrap_or(piece_type::NORMAL);
            match kind {
                piece_type::NORMAL | piece_type::UNUSED => {
                    mergeable.insert(text.clone(), id);
                }
                // An empty one would match everywhere and never advance (found by fuzzing:
                // the encoder grew its symbol list until memory ran out).
                piece_type::USER_DEFINED if text.is_empty() => {
                    return Err(format!("user-defined piece {id} is empty"));
                }
                piece_type::USER_DEFINED => {
                    mergeable.insert(text.clone(), id);
                    user_defined.push(text.clone());
                }
                piece_type::UNKNOWN => unk_id = Some(id),
                piece_type::BYTE => {
                    let byte = parse_byte_piece(&text)
                        .ok_or_else(|| format!("malformed byte piece {text:?}"))?;
                    byte_ids[byte as usize] = Some(id);
                }
                _ => {}
            }
            pieces.push(Piece {
                text,
                score: p.score.unwrap_or(0.0),
                kind,
            });
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let unk_id = unk_id.ok_or("the model has no <unk> piece")?;
        let byte_fallback = trainer.byte_fallback.unwrap_or(false);
        if byte_fallback && byte_ids.iter().any(Option::is_none) {
            return Err("byte fallback is on but some <0xXX> pieces are missing".into());
        }
        if trainer.treat_whitespace_as_suffix.unwrap_or(false) {
            return Err("treat_whitespace_as_suffix models are not supported".into());
        }
        Ok(SentencePiece {
            pieces,
            mergeable,
            user_defined,
            byte_ids,
            unk_id,
            unk_surface: trainer
                .unk_surface
                .unwrap_or_else(|| " \u{2047} ".to_string()),
            add_dummy_prefix: normalizer.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: normalizer.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: normalizer.escape_whitespaces.unwrap_or(true),
            byte_fallback,
        })
    }

    /// Number of pieces; ids at or above it are not sentencepiece's.
    pub(crate) fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a piece given by its text, if the vocabulary has it.
    pub(crate) fn piece_id(&self, piece: &str) -> Option<u32> {
        self.pieces
            .iter()
            .position(|p| p.text == piece)
            .map(|i| i as u32)
    }

    /// Applies the model's normalizer: whitespace handling and the dummy prefix.
    fn normalize(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 3);
        let collapsed;
        let text = if self.remove_extra_whitespaces {
            collapsed = text
                .split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>();
            std::borrow::Cow::Owned(collapsed.join(" "))
        } else {
            std::borrow::Cow::Borrowed(text)
        };
        if text.is_empty() {
            return out;
        }
        if self.add_dummy_prefix {
            out.push(' ');
        }
        out.push_str(&text);
        if self.escape_whitespaces {
            out = out.replace(' ', &SPACE_SYMBOL.to_string());
        }
        out
    }

    /// Encodes plain text to ids. Never produces ids of special tokens.
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        let mut symbols = self.initial_symbols(&normalized);
        self.merge(&normalized, &mut symbols);

        let mut ids = Vec::with_capacity(symbols.len());
        let mut index = if symbols.is_empty() { -1 } else { 0 };
        while index >= 0 {
            let sym = &symbols[index as usize];
            let piece = &normalized[sym.start..sym.start + sym.len];
            match self.mergeable.get(piece) {
                Some(&id) => ids.push(id),
                None if self.byte_fallback => ids.extend(
                    piece
                        .bytes()
                        .map(|b| self.byte_ids[b as usize].unwrap_or(self.unk_id)),
                ),
                // Without byte fallback, consecutive unknown characters share one <unk>.
                None if ids.last() == Some(&self.unk_id) => {}
                None => ids.push(self.unk_id),
            }
            index = sym.next;
        }
        ids
    }

    fn initial_symbols(&self, normalized: &str) -> Vec<Symbol> {
        let mut symbols = Vec::with_capacity(normalized.len());
        let mut pos = 0;
        while pos < normalized.len() {
            let rest = &normalized[pos..];
            let (len, freeze) = match self.user_defined.iter().find(|u| rest.starts_with(*u)) {
                Some(u) => (u.len(), true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            let index = symbols.len() as isize;
            symbols.push(Symbol {
                start: pos,
                len,
                prev: index - 1,
                next: if pos + len < normalized.len() {
                    index + 1
                } else {
                    -1
                },
                freeze,
            });
            pos += len;
        }
        symbols
    }

    fn merge(&self, normalized: &str, symbols: &mut [Symbol]) {
        let mut agenda = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.push_pair(
                normalized,
                symbols,
                right as isize - 1,
                right as isize,
                &mut agenda,
            );
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (top.left as usize, top.right as usize);
            // Stale entry: one side was merged away or grew since the pair was queued.
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != top.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[l].next = symbols[r].next;
            if symbols[r].next >= 0 {
                symbols[symbols[r].next as usize].prev = top.left;
            }
            symbols[r].len = 0;
            let prev = symbols[l].prev;
            self.push_pair(normalized, symbols, prev, top.left, &mut agenda);
            let next = symbols[l].next;
            self.push_pair(normalized, symbols, top.left, next, &mut agenda);
        }
    }

    fn push_pair(
        &self,
        normalized: &str,
        symbols: &[Symbol],
        left: isize,
        right: isize,
        agenda: &mut BinaryHeap<Pair>,
    ) {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (&symbols[left as usize], &symbols[right as usize]);
        if l.freeze || r.freeze {
            return;
        }
        let size = l.len + r.len;
        let Some(&id) = self.mergeable.get(&normalized[l.start..l.start + size]) else {
            return;
        };
        agenda.push(Pair {
            score: self.pieces[id as usize].score,
            left,
            right,
            size,
        });
    }

    /// What an id contributes to decoded text. Ids outside the vocabulary give [`PieceBytes::Empty`].
    pub(crate) fn piece_bytes(&self, id: u32) -> PieceBytes<'_> {
        let Some(piece) = self.pieces.get(id as usize) else {
            return PieceBytes::Empty;
        };
        match piece.kind {
            piece_type::BYTE => {
                parse_byte_piece(&piece.text).map_or(PieceBytes::Empty, PieceBytes::Byte)
            }
            piece_type::CONTROL => PieceBytes::Empty,
            piece_type::UNKNOWN => PieceBytes::Text(&self.unk_surface),
            _ => PieceBytes::Text(&piece.text),
        }
    }

    /// Whether a leading `▁` of the first decoded piece is the dummy prefix, to be dropped.
    pub(crate) fn strips_dummy_prefix(&self) -> bool {
        self.add_dummy_prefix
    }
}

/// One symbol of the text being merged; `len == 0` marks a symbol merged into its left neighbour.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
    freeze: bool,
}

/// A candidate merge. The heap pops the highest score, then the leftmost pair.
#[derive(Debug)]
struct Pair {
    score: f32,
    left: isize,
    right: isize,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pair {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Parses `<0xAB>` into `0xAB`.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_pieces_parse() {
        assert_eq!(parse_byte_piece("<0x0A>"), Some(10));
        assert_eq!(parse_byte_piece("<0xff>"), Some(255));
        assert_eq!(parse_byte_piece("<0x1>"), None);
        assert_eq!(parse_byte_piece("0x0A"), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(SentencePiece::from_bytes(b"\xff\xff\xff\xff").is_err());
        assert!(SentencePiece::from_bytes(b"").is_err());
    }
}
