//! GLM-4 `tokenizer.json` (glm-4-9b-chat-hf and GLM-4-0414 layouts) through the `tokenizers`
//! crate.
//!
//! The file is the same byte-level BPE vocabulary as the tiktoken `tokenizer.model`, converted
//! by transformers (merges rebuilt from the ranks, `ignore_merges: true`), with the special
//! tokens as `added_tokens`. Encoding: this module splits special-token text itself
//! ([`SpecialTokens::split`], so protected ranges work the same as for tiktoken) and encodes each
//! ordinary segment with the crate. The crate copy used for segments is built with no added
//! tokens and no post-processor, so it never recognises special text (protected content stays
//! plain) and never prepends the -hf template's `[gMASK]<sop>`.
//!
//! Decoding does not use the crate: each vocabulary token is mapped back to raw bytes through
//! GPT-2's byte table ([`super::bytelevel`]), so `token_bytes`
//! and the shared decoder work as for tiktoken, with the fast tokenizer's
//! [`Spacing::Joined`](super::decode::Spacing::Joined) convention.
//!
//! Pre-tokenization: when the file's normalizer is null and its pre-tokenizer is exactly GLM-4's
//! (`Split` on [`GLM4_PATTERN`], `Isolated`, then `ByteLevel` without regex or prefix space), the
//! linear-time scanner of [`super::pretokenize`] splits the segment and only the crate's BPE
//! model runs on each piece. This is not just speed: the crate's `fancy-regex` splitter stops
//! silently when it hits `fancy-regex`'s backtrack limit (one million steps; e.g. about 10^6
//! spaces followed by a letter) and treats the rest of the text as one piece, which changes the
//! ids. Any other pre-tokenizer goes through the crate's whole pipeline.
//!
//! Added tokens with `lstrip`, `rstrip` or `single_word` (not used by GLM-4) are rejected rather
//! than approximated.

use std::collections::HashMap;
use std::ops::Range;
#[cfg(test)]
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use tokenizers::Model;

use super::bytelevel::{byte_to_char, token_to_bytes};
#[cfg(test)]
use super::decode::{self, Spacing};
use super::decode::{TokenLookup, TokenPiece};
use super::error::TokenizerError;
use super::pretokenize::{pieces, GLM4_PATTERN};
use super::specials::{Segment, SpecialToken, SpecialTokens};

/// The fields of one `added_tokens` entry this module looks at.
#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    normalized: bool,
}

/// A GLM-4 tokenizer read from a HF `tokenizer.json`.
#[derive(Clone, Debug)]
pub struct HfJsonTokenizer {
    /// The crate tokenizer without added tokens and post-processor, for ordinary segments.
    inner: tokenizers::Tokenizer,
    /// Raw bytes of every vocabulary token, by id.
    tokens: HashMap<u32, Vec<u8>>,
    specials: SpecialTokens,
    vocab_size: u32,
    /// Whether the file's normalizer/pre-tokenizer are GLM-4's, so that segments are split by
    /// [`pieces`] and only the crate's model is used.
    native_split: bool,
}

/// Whether `root` has no normalizer and exactly GLM-4's pre-tokenizer.
fn is_glm4_pipeline(root: &serde_json::Map<String, Value>) -> bool {
    if !root.get("normalizer").is_none_or(Value::is_null) {
        return false;
    }
    let Some(pre) = root.get("pre_tokenizer") else {
        return false;
    };
    let Some([split, byte_level]) = pre
        .get("pretokenizers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    else {
        return false;
    };
    let is = |v: &Value, key: &str, want: Value| v.get(key) == Some(&want);
    is(pre, "type", "Sequence".into())
        && is(split, "type", "Split".into())
        && split.get("pattern").and_then(|p| p.get("Regex")) == Some(&GLM4_PATTERN.into())
        && is(split, "behavior", "Isolated".into())
        && is(split, "invert", false.into())
        && is(byte_level, "type", "ByteLevel".into())
        && is(byte_level, "add_prefix_space", false.into())
        && is(byte_level, "use_regex", false.into())
}

fn bad(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::BadJson(msg.into())
}

impl HfJsonTokenizer {
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

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_bytes(data: &[u8]) -> Result<Self, TokenizerError> {
        let mut json: Value =
            serde_json::from_slice(data).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let root = json
            .as_object_mut()
            .ok_or_else(|| bad("top level is not an object"))?;

        let model = root.get("model").ok_or_else(|| bad("missing \"model\""))?;
        match model.get("type").and_then(Value::as_str) {
            Some("BPE") | None => {}
            Some(other) => return Err(bad(format!("model type {other:?} is not BPE"))),
        }
        let decoder_type = root
            .get("decoder")
            .and_then(|d| d.get("type"))
            .and_then(Value::as_str);
        if decoder_type != Some("ByteLevel") {
            return Err(bad(format!(
                "decoder type {decoder_type:?} is not \"ByteLevel\"; only byte-level BPE is supported"
            )));
        }
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("missing or non-object \"model.vocab\""))?;
        let mut tokens = HashMap::with_capacity(vocab.len());
        for (text, id) in vocab {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| bad(format!("vocab entry {text:?} has a non-u32 id {id}")))?;
            let bytes = token_to_bytes(text).ok_or_else(|| {
                bad(format!(
                    "vocab token {text:?} (id {id}) is not in GPT-2's byte-level alphabet"
                ))
            })?;
            if bytes.is_empty() {
                return Err(bad(format!("vocab token with id {id} is empty")));
            }
            if tokens.insert(id, bytes).is_some() {
                return Err(bad(format!("vocab id {id} used twice")));
            }
        }

        let has_normalizer = !root.get("normalizer").is_none_or(Value::is_null);
        let added: Vec<AddedToken> = match root.get("added_tokens") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => Vec::<AddedToken>::deserialize(v)
                .map_err(|e| bad(format!("bad \"added_tokens\": {e}")))?,
        };
        let mut specials = Vec::with_capacity(added.len());
        for t in added {
            if t.lstrip || t.rstrip || t.single_word || (t.normalized && has_normalizer) {
                return Err(bad(format!(
                    "added token {:?} uses lstrip/rstrip/single_word/normalized, which is not supported",
                    t.content
                )));
            }
            specials.push(SpecialToken {
                id: t.id,
                text: t.content,
                special: t.special,
            });
        }
        let specials = SpecialTokens::new(specials)?;

        let max_id = tokens
            .keys()
            .copied()
            .chain(specials.max_id())
            .max()
            .ok_or_else(|| bad("empty vocabulary"))?;
        let vocab_size = max_id
            .checked_add(1)
            .ok_or_else(|| bad("token id u32::MAX is not supported"))?;

        let native_split = is_glm4_pipeline(root);
        // The crate copy for ordinary segments: no added tokens, no post-processor.
        root.insert("added_tokens".into(), Value::Array(Vec::new()));
        root.insert("post_processor".into(), Value::Null);
        let bytes = serde_json::to_vec(&json).map_err(|e| bad(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| bad(format!("rejected by the tokenizers crate: {e}")))?;

        Ok(HfJsonTokenizer {
            inner,
            tokens,
            specials,
            vocab_size,
            native_split,
        })
    }

    #[cfg(test)]
    /// Whether segments are split by this crate's scanner (GLM-4 pre-tokenizer recognised)
    /// rather than by the `tokenizers` crate's regex.
    pub fn uses_native_split(&self) -> bool {
        self.native_split
    }

    /// Number of ordinary (non-special) tokens: the first special id, or all ids when there
    /// are none.
    pub fn ordinary_vocab_size(&self) -> u32 {
        self.specials
            .tokens()
            .iter()
            .map(|t| t.id)
            .min()
            .unwrap_or(self.vocab_size)
    }

    #[cfg(test)]
    /// One more than the largest id (vocabulary or added token).
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// The added tokens and their ids.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    #[cfg(test)]
    /// The official encoding (`PreTrainedTokenizerFast.encode(text, add_special_tokens=False)`):
    /// added-token text becomes their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_protected(text, &[])
    }

    /// Encoding with added-token text treated as ordinary text.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        self.encode_segment(text, &mut out)?;
        Ok(out)
    }

    /// Like `encode`, but added-token text overlapping a `protected` byte range
    /// stays ordinary text; text between recognised specials is encoded as one unit, so ids
    /// equal `encode` whenever no special-token text overlaps a protected range.
    pub fn encode_protected(
        &self,
        text: &str,
        protected: &[Range<usize>],
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        for segment in self.specials.split(text, protected) {
            match segment {
                Segment::Special(id) => out.push(id),
                Segment::Text(range) => {
                    if let Some(part) = text.get(range) {
                        self.encode_segment(part, &mut out)?;
                    }
                }
            }
        }
        Ok(out)
    }

    fn encode_segment(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        if text.is_empty() {
            return Ok(());
        }
        if self.native_split {
            let model = self.inner.get_model();
            let mut mapped = String::new();
            for piece in pieces(text) {
                mapped.clear();
                mapped.extend(piece.bytes().map(byte_to_char));
                let tokens = model
                    .tokenize(&mapped)
                    .map_err(|e| TokenizerError::Backend(e.to_string()))?;
                out.extend(tokens.iter().map(|t| t.id));
            }
            return Ok(());
        }
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        out.extend_from_slice(encoding.get_ids());
        Ok(())
    }

    #[cfg(test)]
    /// The raw bytes of ordinary token `id`, or the UTF-8 text of added token `id`.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        match self.piece(id)? {
            TokenPiece::Bytes(b) => Some(b),
            TokenPiece::Special(t) => Some(t.as_bytes()),
        }
    }

    #[cfg(test)]
    /// The fast tokenizer's `decode(ids)`: sub-texts concatenated ([`Spacing::Joined`]).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        decode::decode(self, ids, Spacing::Joined)
    }
}

impl TokenLookup for HfJsonTokenizer {
    fn piece(&self, id: u32) -> Option<TokenPiece<'_>> {
        // Added tokens shadow vocabulary entries with the same id, as in the crate.
        match self.specials.text(id) {
            Some(text) => Some(TokenPiece::Special(text)),
            None => self.tokens.get(&id).map(|b| TokenPiece::Bytes(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn path(name: &str) -> String {
        super::super::cases::fixture_path(name)
    }

    #[test]
    fn loads_both_layouts() {
        for name in ["hf_tokenizer.json", "0414_tokenizer.json"] {
            let t = HfJsonTokenizer::from_file(path(name)).unwrap();
            assert_eq!(t.vocab_size(), 1214);
            assert_eq!(t.specials().id("[gMASK]"), Some(1202));
            assert_eq!(t.token_bytes(32), Some(&b" "[..]));
            assert_eq!(t.token_bytes(1208), Some(&b"<|assistant|>"[..]));
            // No extra [gMASK]<sop> from the -hf post-processor.
            assert_eq!(t.encode("<sop>").unwrap(), [1204]);
        }
    }

    #[test]
    fn corrupt_files_are_clear_errors() {
        let good: Value =
            serde_json::from_slice(&std::fs::read(path("hf_tokenizer.json")).unwrap()).unwrap();
        let check = |v: Value, needle: &str| {
            let data = serde_json::to_vec(&v).unwrap();
            match HfJsonTokenizer::from_bytes(&data) {
                Err(TokenizerError::BadJson(msg)) => {
                    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
                }
                Err(e) => panic!("wrong error {e}"),
                Ok(_) => panic!("accepted corrupt file ({needle})"),
            }
        };
        let mut v = good.clone();
        v.as_object_mut().unwrap().remove("model");
        check(v, "model");
        let mut v = good.clone();
        v["model"].as_object_mut().unwrap().remove("vocab");
        check(v, "vocab");
        let mut v = good.clone();
        v["model"]["vocab"]["zz\u{4e00}"] = Value::from(5000);
        check(v, "byte-level");
        let mut v = good.clone();
        v["model"]["vocab"]["abc"] = Value::from(-3);
        check(v, "non-u32");
        let mut v = good.clone();
        v["decoder"] = Value::Null;
        check(v, "ByteLevel");
        let mut v = good.clone();
        v["added_tokens"][0]["id"] = Value::from("x");
        check(v, "added_tokens");
        let mut v = good.clone();
        v["added_tokens"][0]["lstrip"] = Value::from(true);
        check(v, "lstrip");
        let mut v = good.clone();
        v["model"]["merges"] = Value::from("nonsense");
        check(v, "tokenizers crate");
        let mut v = good.clone();
        v["model"]["type"] = Value::from("Unigram");
        check(v, "not BPE");
        assert!(matches!(
            HfJsonTokenizer::from_bytes(b"{\"model\": "),
            Err(TokenizerError::BadJson(_))
        ));
        assert!(matches!(
            HfJsonTokenizer::from_bytes(b"[1, 2]"),
            Err(TokenizerError::BadJson(_))
        ));
        assert!(matches!(
            HfJsonTokenizer::from_file(path("missing.json")),
            Err(TokenizerError::Io { .. })
        ));
    }
}
