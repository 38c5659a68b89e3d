//! Special tokens (`[gMASK]`, `<|user|>`, ...): their ids, and finding their text in a string.
//!
//! The official GLM-4 tokenizers (HF added-token splitting in front of tiktoken, and the fast
//! tokenizer) turn special-token *text* into special ids, so a chat template can be rendered as
//! text and encoded in one go. This module does that splitting (leftmost, longest match, like
//! the `tokenizers` crate's Aho-Corasick and transformers' trie), optionally refusing matches
//! that touch caller-protected byte ranges (user content that must stay plain text).
//!
//! The tiktoken `tokenizer.model` does not list its special tokens: they are numbered after the
//! ranks, in the fixed order [`GLM4_SPECIAL_TOKENS`]. A `tokenizer.json` lists them as
//! `added_tokens`.

use std::collections::HashMap;
use std::ops::Range;

use super::error::TokenizerError;

/// GLM-4's special tokens in id order: token `i` has id `n_ranks + i` in the tiktoken layout
/// (`ChatGLM4Tokenizer` numbers them this way; they are not in `tokenizer.model`).
pub const GLM4_SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
];

/// One special (added) token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    /// Its id.
    pub id: u32,
    /// Its text, which encoding recognises and decoding prints.
    pub text: String,
    /// `tokenizer.json`'s `special` flag (always true for the tiktoken layout); kept so callers
    /// can tell control tokens from merely added ones.
    pub special: bool,
}

/// A piece of a text after special-token splitting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Ordinary text, as a byte range of the input, to be pre-tokenized and BPE-encoded as one
    /// unit.
    Text(Range<usize>),
    /// A recognised special token.
    Special(u32),
}

/// A byte trie node: sorted children and, if a token ends here, that token's index.
#[derive(Clone, Debug, Default)]
struct Node {
    children: Vec<(u8, usize)>,
    token: Option<usize>,
}

/// The special tokens of a tokenizer, with lookups both ways and a matcher for their text.
#[derive(Clone, Debug)]
pub struct SpecialTokens {
    tokens: Vec<SpecialToken>,
    by_id: HashMap<u32, usize>,
    by_text: HashMap<String, usize>,
    trie: Vec<Node>,
}

impl SpecialTokens {
    /// Builds the set; empty texts and duplicate texts or ids are errors.
    pub fn new(tokens: Vec<SpecialToken>) -> Result<Self, TokenizerError> {
        let mut by_id = HashMap::new();
        let mut by_text = HashMap::new();
        let mut trie = vec![Node::default()];
        for (i, t) in tokens.iter().enumerate() {
            if t.text.is_empty() {
                return Err(TokenizerError::BadSpecials(format!(
                    "token id {} has empty text",
                    t.id
                )));
            }
            if by_id.insert(t.id, i).is_some() {
                return Err(TokenizerError::BadSpecials(format!(
                    "id {} used twice",
                    t.id
                )));
            }
            if by_text.insert(t.text.clone(), i).is_some() {
                return Err(TokenizerError::BadSpecials(format!(
                    "text {:?} used twice",
                    t.text
                )));
            }
            let mut node = 0;
            for &b in t.text.as_bytes() {
                node = match trie[node].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(k) => trie[node].children[k].1,
                    Err(k) => {
                        trie.push(Node::default());
                        let new = trie.len() - 1;
                        trie[node].children.insert(k, (b, new));
                        new
                    }
                };
            }
            trie[node].token = Some(i);
        }
        Ok(SpecialTokens {
            tokens,
            by_id,
            by_text,
            trie,
        })
    }

    /// GLM-4's fixed specials numbered after `n_ranks` ranks (the tiktoken layout).
    pub fn glm4(n_ranks: u32) -> Result<Self, TokenizerError> {
        Self::numbered_from(n_ranks, &GLM4_SPECIAL_TOKENS)
    }

    /// `texts` numbered `first`, `first + 1`, ... in that order.
    pub fn numbered_from(first: u32, texts: &[&str]) -> Result<Self, TokenizerError> {
        let n_ranks = first;
        let tokens = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let id = n_ranks.checked_add(i as u32).ok_or_else(|| {
                    TokenizerError::BadSpecials("special ids overflow u32".to_string())
                })?;
                Ok(SpecialToken {
                    id,
                    text: (*text).to_string(),
                    special: true,
                })
            })
            .collect::<Result<Vec<_>, TokenizerError>>()?;
        Self::new(tokens)
    }

    /// The id of the special token with exactly this text.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).map(|&i| self.tokens[i].id)
    }

    /// The text of special id `id`, if it is one.
    pub fn text(&self, id: u32) -> Option<&str> {
        self.by_id.get(&id).map(|&i| self.tokens[i].text.as_str())
    }

    /// All special tokens, in the order they were given.
    pub fn tokens(&self) -> &[SpecialToken] {
        &self.tokens
    }

    /// The largest special id, to size the vocabulary.
    pub fn max_id(&self) -> Option<u32> {
        self.tokens.iter().map(|t| t.id).max()
    }

    /// Splits `text` at special-token text that does not overlap any `protected` byte range.
    ///
    /// Matching is leftmost-longest; a match that would touch a protected byte is not taken
    /// (a shorter one at the same position that stays clear still is). Ordinary text between
    /// two recognised specials is one [`Segment::Text`], whatever protected ranges it
    /// contains, so its pre-tokenization is that of the unprotected text. Protected ranges may
    /// be unsorted, overlapping, empty or out of bounds. The scan is O(n · longest special).
    pub fn split(&self, text: &str, protected: &[Range<usize>]) -> Vec<Segment> {
        let bytes = text.as_bytes();
        let mut ranges: Vec<Range<usize>> = protected
            .iter()
            .filter(|r| r.start < r.end && r.start < bytes.len())
            .map(|r| r.start..r.end.min(bytes.len()))
            .collect();
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }

        let mut out = Vec::new();
        let mut text_start = 0;
        let mut next_range = 0;
        let mut pos = 0;
        while pos < bytes.len() {
            while next_range < merged.len() && merged[next_range].end <= pos {
                next_range += 1;
            }
            // Matches must end at or before `limit`, the next protected byte.
            let limit = match merged.get(next_range) {
                Some(r) if r.start <= pos => {
                    pos = r.end;
                    continue;
                }
                Some(r) => r.start,
                None => bytes.len(),
            };
            match self.longest_match(&bytes[pos..limit]) {
                Some((len, idx)) => {
                    if text_start < pos {
                        out.push(Segment::Text(text_start..pos));
                    }
                    out.push(Segment::Special(self.tokens[idx].id));
                    pos += len;
                    text_start = pos;
                }
                None => pos += 1,
            }
        }
        if text_start < bytes.len() {
            out.push(Segment::Text(text_start..bytes.len()));
        }
        out
    }

    /// The longest special token that is a prefix of `bytes`: (byte length, token index).
    fn longest_match(&self, bytes: &[u8]) -> Option<(usize, usize)> {
        let mut node = 0;
        let mut best = None;
        for (i, &b) in bytes.iter().enumerate() {
            let children = &self.trie[node].children;
            match children.binary_search_by_key(&b, |c| c.0) {
                Ok(k) => node = children[k].1,
                Err(_) => break,
            }
            if let Some(t) = self.trie[node].token {
                best = Some((i + 1, t));
            }
        }
        best
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one protected range is the common case
mod tests {
    use super::*;

    fn glm() -> SpecialTokens {
        SpecialTokens::glm4(1200).unwrap()
    }

    #[test]
    fn ids_follow_ranks() {
        let s = glm();
        assert_eq!(s.id("<|endoftext|>"), Some(1200));
        assert_eq!(s.id("<|user|>"), Some(1207));
        assert_eq!(s.text(1213), Some("<|end_of_video|>"));
        assert_eq!(s.max_id(), Some(1213));
        assert!(SpecialTokens::glm4(u32::MAX - 3).is_err());
    }

    #[test]
    fn split_plain_and_protected() {
        let s = glm();
        let t = "[gMASK]<sop><|user|>\nhi <|user|> x<|assistant|>";
        let segs = s.split(t, &[]);
        assert_eq!(
            segs,
            vec![
                Segment::Special(1202),
                Segment::Special(1204),
                Segment::Special(1207),
                Segment::Text(20..24),
                Segment::Special(1207),
                Segment::Text(32..34),
                Segment::Special(1208),
            ]
        );
        // Protect the user content "\nhi <|user|> x": the inner special stays text and the
        // whole content is one segment.
        let segs = s.split(t, &[21..34]);
        assert_eq!(
            segs,
            vec![
                Segment::Special(1202),
                Segment::Special(1204),
                Segment::Special(1207),
                Segment::Text(20..34),
                Segment::Special(1208),
            ]
        );
        // A protected range that cuts a special in half disables just that match.
        let segs = s.split("<|user|>", &[3..4]);
        assert_eq!(segs, vec![Segment::Text(0..8)]);
        // Out-of-bounds and empty ranges are harmless.
        let segs = s.split(
            "<sop>",
            &[
                7..9,
                2..2,
                Range {
                    start: 100,
                    end: 50,
                },
            ],
        );
        assert_eq!(segs, vec![Segment::Special(1204)]);
    }

    #[test]
    fn longest_match_wins() {
        let s = SpecialTokens::new(vec![
            SpecialToken {
                id: 1,
                text: "<a>".into(),
                special: true,
            },
            SpecialToken {
                id: 2,
                text: "<a><b>".into(),
                special: true,
            },
        ])
        .unwrap();
        assert_eq!(s.split("<a><b>", &[]), vec![Segment::Special(2)]);
        // The longer match is blocked by protection, the shorter one still applies.
        assert_eq!(
            s.split("<a><b>", &[4..5]),
            vec![Segment::Special(1), Segment::Text(3..6)]
        );
    }

    #[test]
    fn bad_specials_are_errors() {
        let t = |id: u32, text: &str| SpecialToken {
            id,
            text: text.into(),
            special: true,
        };
        assert!(SpecialTokens::new(vec![t(1, "")]).is_err());
        assert!(SpecialTokens::new(vec![t(1, "a"), t(1, "b")]).is_err());
        assert!(SpecialTokens::new(vec![t(1, "a"), t(2, "a")]).is_err());
    }
}
