//! glm-4-9b-chat's `tokenizer.model`: a tiktoken BPE file, read natively.
//!
//! Format: UTF-8 text, one token per line, `"<base64 of the token bytes> <rank>"`; ranks are
//! `0..n` (GLM-4: ranks 0..255 are the single bytes). The special tokens are not in the file:
//! they get ids `n + i` in the order of [`GLM4_SPECIAL_TOKENS`](super::specials::GLM4_SPECIAL_TOKENS).
//! Encoding is [`pretokenize`](super::pretokenize) + tiktoken BPE ([`super::bpe`]); decoding
//! uses the slow tokenizer's [`Spacing::Spaced`](super::decode::Spacing::Spaced) convention.
//!
//! Loading is strict where tiktoken's Python loader is lenient or would panic later: bad
//! base64, missing or extra fields, duplicate ranks or token bytes, rank gaps, a missing single
//! byte and an empty file are errors with the 1-based line number. ChatGLM2/3 also ship a file
//! called `tokenizer.model`, but as a binary sentencepiece protobuf; [`sniff`] tells them apart
//! from the first bytes.

use std::ops::Range;
#[cfg(test)]
use std::path::Path;

use base64::Engine;

use super::bpe::BytePairEncoder;
#[cfg(test)]
use super::decode::{self, Spacing};
use super::decode::{TokenLookup, TokenPiece};
use super::error::TokenizerError;
use super::pretokenize::pieces;
use super::specials::{Segment, SpecialTokens};

/// What a `tokenizer.model` file is, judged from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFileKind {
    /// Text lines `"<base64> <rank>"`: GLM-4's tiktoken format.
    Tiktoken,
    /// Binary data starting like a protobuf message (`0x0A`, field 1 bytes): sentencepiece,
    /// as used by ChatGLM2/3 and LLaMA-style models.
    SentencePiece,
    /// Empty or only blank lines.
    Empty,
    /// Anything else.
    Unknown,
}

/// Classifies `data` cheaply (looks at the first non-empty line, at most 4 KiB).
pub fn sniff(data: &[u8]) -> ModelFileKind {
    let head = &data[..data.len().min(4096)];
    if head.first() == Some(&0x0A) && head.iter().take(256).any(|&b| is_binary_byte(b)) {
        return ModelFileKind::SentencePiece;
    }
    let first_line = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .find(|l| !l.is_empty());
    match first_line {
        None if data.iter().all(|b| b.is_ascii_whitespace()) => ModelFileKind::Empty,
        Some(line) if parse_line(line).is_ok() => ModelFileKind::Tiktoken,
        _ if head.iter().any(|&b| is_binary_byte(b)) && head.first() == Some(&0x0A) => {
            ModelFileKind::SentencePiece
        }
        _ => ModelFileKind::Unknown,
    }
}

/// Control bytes that do not occur in a text file.
fn is_binary_byte(b: u8) -> bool {
    b < 0x09 || (0x0E..0x20).contains(&b)
}

/// Parses one non-empty line into (token bytes, rank).
fn parse_line(line: &[u8]) -> Result<(Vec<u8>, u32), String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8 text".to_string())?;
    let mut fields = text.split_ascii_whitespace();
    let (token, rank) = match (fields.next(), fields.next(), fields.next()) {
        (Some(t), Some(r), None) => (t, r),
        (Some(_), None, _) => return Err("missing rank (expected \"<base64> <rank>\")".into()),
        _ => return Err("expected exactly two fields \"<base64> <rank>\"".into()),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|e| format!("bad base64 {token:?}: {e}"))?;
    if bytes.is_empty() {
        return Err("empty token".into());
    }
    let rank = rank
        .parse::<u32>()
        .map_err(|e| format!("bad rank {rank:?}: {e}"))?;
    Ok((bytes, rank))
}

/// Parses a tiktoken file into token bytes indexed by rank, validating it for BPE.
pub fn parse_tiktoken(data: &[u8]) -> Result<Vec<Vec<u8>>, TokenizerError> {
    match sniff(data) {
        ModelFileKind::SentencePiece => {
            return Err(TokenizerError::NotTiktoken(
                "binary data starting like a protobuf: a sentencepiece model (ChatGLM2/3 layout?)"
                    .into(),
            ))
        }
        ModelFileKind::Empty => return Err(TokenizerError::Empty),
        ModelFileKind::Tiktoken | ModelFileKind::Unknown => {}
    }
    let mut by_rank: Vec<Option<(Vec<u8>, usize)>> = Vec::new();
    let mut count = 0usize;
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let (bytes, rank) =
            parse_line(line).map_err(|msg| TokenizerError::BadLine { line: line_no, msg })?;
        let slot = usize::try_from(rank).map_err(|_| TokenizerError::BadLine {
            line: line_no,
            msg: format!("rank {rank} too large"),
        })?;
        if slot > data.len() {
            // A valid file has fewer ranks than bytes; this bound also caps the allocation.
            return Err(TokenizerError::BadLine {
                line: line_no,
                msg: format!("rank {rank} exceeds the number of lines"),
            });
        }
        if by_rank.len() <= slot {
            by_rank.resize(slot + 1, None);
        }
        if let Some((_, first)) = &by_rank[slot] {
            return Err(TokenizerError::BadLine {
                line: line_no,
                msg: format!("duplicate rank {rank} (first on line {first})"),
            });
        }
        by_rank[slot] = Some((bytes, line_no));
        count += 1;
    }
    if count == 0 {
        return Err(TokenizerError::Empty);
    }
    let mut tokens = Vec::with_capacity(by_rank.len());
    let mut seen = std::collections::HashMap::with_capacity(by_rank.len());
    for (rank, entry) in by_rank.into_iter().enumerate() {
        let (bytes, line) = entry.ok_or_else(|| {
            TokenizerError::BadVocab(format!(
                "ranks must be 0..{count} without gaps; rank {rank} is missing"
            ))
        })?;
        if let Some(first) = seen.insert(bytes.clone(), line) {
            return Err(TokenizerError::BadLine {
                line,
                msg: format!("token bytes {bytes:?} already given on line {first}"),
            });
        }
        tokens.push(bytes);
    }
    for b in 0..=255u8 {
        if !seen.contains_key(&[b][..]) {
            return Err(TokenizerError::BadVocab(format!(
                "single byte 0x{b:02x} has no rank, so BPE cannot encode every text"
            )));
        }
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(TokenizerError::BadVocab("too many ranks".into()));
    }
    Ok(tokens)
}

/// A GLM-4 tokenizer read from a tiktoken `tokenizer.model` (glm-4-9b-chat layout).
#[derive(Clone, Debug)]
pub struct TiktokenTokenizer {
    tokens: Vec<Vec<u8>>,
    bpe: BytePairEncoder,
    specials: SpecialTokens,
}

impl TiktokenTokenizer {
    #[cfg(test)]
    /// Reads and parses `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&data)
    }

    #[cfg(test)]
    /// Parses the contents of a `tokenizer.model`; GLM-4's 14 special tokens follow the ranks.
    pub fn from_bytes(data: &[u8]) -> Result<Self, TokenizerError> {
        Self::from_bytes_with_specials(data, &[])
    }

    /// Parses the contents of a `tokenizer.model` whose special tokens are `specials`, numbered
    /// after the ranks in that order (GLM-4's own list when empty).
    pub fn from_bytes_with_specials(
        data: &[u8],
        specials: &[&str],
    ) -> Result<Self, TokenizerError> {
        let tokens = parse_tiktoken(data)?;
        let n_ranks = u32::try_from(tokens.len())
            .map_err(|_| TokenizerError::BadVocab("too many ranks".into()))?;
        let specials = if specials.is_empty() {
            SpecialTokens::glm4(n_ranks)?
        } else {
            SpecialTokens::numbered_from(n_ranks, specials)?
        };
        let bpe = BytePairEncoder::new(&tokens);
        Ok(TiktokenTokenizer {
            tokens,
            bpe,
            specials,
        })
    }

    /// Number of BPE ranks in the file (the first special id).
    pub fn n_ranks(&self) -> u32 {
        self.tokens.len() as u32
    }

    #[cfg(test)]
    /// Number of ids (ranks + specials).
    pub fn vocab_size(&self) -> u32 {
        self.n_ranks() + self.specials.tokens().len() as u32
    }

    /// The special tokens and their ids.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    #[cfg(test)]
    /// The official encoding (`ChatGLM4Tokenizer.encode(text, add_special_tokens=False)`):
    /// special-token text becomes special ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_protected(text, &[])
    }

    /// Encoding with special-token text treated as ordinary text (tiktoken `encode` with
    /// `disallowed_special=()`), for untrusted text that must not inject control tokens.
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_segment(text, &mut out);
        out
    }

    /// Like `encode`, but special-token text overlapping a `protected` byte
    /// range stays ordinary text (e.g. user content inside a rendered chat template). Text
    /// between recognised specials is encoded as one unit, so ids equal `encode`
    /// whenever no special-token text overlaps a protected range.
    pub fn encode_protected(&self, text: &str, protected: &[Range<usize>]) -> Vec<u32> {
        let mut out = Vec::new();
        for segment in self.specials.split(text, protected) {
            match segment {
                Segment::Special(id) => out.push(id),
                Segment::Text(range) => {
                    if let Some(part) = text.get(range) {
                        self.encode_segment(part, &mut out);
                    }
                }
            }
        }
        out
    }

    fn encode_segment(&self, text: &str, out: &mut Vec<u32>) {
        for piece in pieces(text) {
            self.bpe.encode_piece(piece.as_bytes(), out);
        }
    }

    #[cfg(test)]
    /// The raw bytes of ordinary token `id`, or the UTF-8 text of special token `id`.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        match self.piece(id)? {
            TokenPiece::Bytes(b) => Some(b),
            TokenPiece::Special(t) => Some(t.as_bytes()),
        }
    }

    #[cfg(test)]
    /// `ChatGLM4Tokenizer.decode(ids)`: sub-texts joined with spaces ([`Spacing::Spaced`]).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        decode::decode(self, ids, Spacing::Spaced)
    }
}

impl TokenLookup for TiktokenTokenizer {
    fn piece(&self, id: u32) -> Option<TokenPiece<'_>> {
        match self.tokens.get(usize::try_from(id).ok()?) {
            Some(bytes) => Some(TokenPiece::Bytes(bytes)),
            None => self.specials.text(id).map(TokenPiece::Special),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Vec<u8> {
        std::fs::read(super::super::cases::fixture_path("tokenizer.model")).unwrap()
    }

    fn load() -> TiktokenTokenizer {
        TiktokenTokenizer::from_bytes(&fixture()).unwrap()
    }

    #[test]
    fn loads_fixture_and_derives_specials() {
        let t = load();
        assert_eq!(t.n_ranks(), 1200);
        assert_eq!(t.vocab_size(), 1214);
        assert_eq!(t.specials().id("<|user|>"), Some(1207));
        assert_eq!(t.token_bytes(97), Some(&b"a"[..]));
        assert_eq!(t.token_bytes(1207), Some(&b"<|user|>"[..]));
        assert_eq!(t.token_bytes(1214), None);
        assert_eq!(sniff(&fixture()), ModelFileKind::Tiktoken);
    }

    /// The base64 line for bytes `b` with rank `r`.
    fn line(b: &[u8], r: usize) -> String {
        format!(
            "{} {r}\n",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    }

    fn bytes_file() -> String {
        (0..=255u8).map(|b| line(&[b], b as usize)).collect()
    }

    fn err(data: &[u8]) -> TokenizerError {
        match TiktokenTokenizer::from_bytes(data) {
            Err(e) => e,
            Ok(_) => panic!("accepted bad data {:?}", String::from_utf8_lossy(data)),
        }
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        assert!(TiktokenTokenizer::from_bytes(bytes_file().as_bytes()).is_ok());
        // Blank lines and CRLF are tolerated.
        let crlf = bytes_file().replace('\n', "\r\n") + "\n\n";
        assert!(TiktokenTokenizer::from_bytes(crlf.as_bytes()).is_ok());

        assert!(matches!(err(b""), TokenizerError::Empty));
        assert!(matches!(err(b"\n \n"), TokenizerError::Empty));
        let bad_b64 = bytes_file() + "!!!! 256\n";
        assert!(matches!(
            err(bad_b64.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        let missing_rank = bytes_file() + "YWI=\n";
        assert!(matches!(
            err(missing_rank.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        let extra_field = bytes_file() + "YWI= 256 7\n";
        assert!(matches!(
            err(extra_field.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        let bad_rank = bytes_file() + "YWI= -1\n";
        assert!(matches!(
            err(bad_rank.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        let dup_rank = bytes_file() + &line(b"ab", 5);
        assert!(matches!(
            err(dup_rank.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        let dup_bytes = bytes_file() + &line(b"a", 256);
        assert!(matches!(
            err(dup_bytes.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        let gap = bytes_file() + &line(b"ab", 257);
        assert!(matches!(err(gap.as_bytes()), TokenizerError::BadVocab(_)));
        let huge = bytes_file() + &line(b"ab", 4_000_000_000);
        assert!(matches!(
            err(huge.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        let no_byte_ff: String = (0..255u8).map(|b| line(&[b], b as usize)).collect();
        assert!(matches!(
            err(no_byte_ff.as_bytes()),
            TokenizerError::BadVocab(_)
        ));
        let empty_token = bytes_file() + " 256\n";
        assert!(matches!(
            err(empty_token.as_bytes()),
            TokenizerError::BadLine { line: 257, .. }
        ));
        assert!(matches!(
            err(&[0xff, 0xfe, b' ', b'1']),
            TokenizerError::BadLine { line: 1, .. }
        ));
    }

    #[test]
    fn sentencepiece_protobuf_is_recognised() {
        // Start of a sentencepiece ModelProto: field 1 (pieces), length, field 1 (piece) ...
        let mut sp = vec![0x0A, 0x0B, 0x0A, 0x05];
        sp.extend_from_slice(b"<unk>");
        sp.extend_from_slice(&[0x15, 0, 0, 0, 0, 0x18, 0x02]);
        assert_eq!(sniff(&sp), ModelFileKind::SentencePiece);
        assert!(matches!(err(&sp), TokenizerError::NotTiktoken(_)));
        assert_eq!(sniff(b""), ModelFileKind::Empty);
        assert_eq!(sniff(b"{\"version\": \"1.0\"}"), ModelFileKind::Unknown);
    }
}
