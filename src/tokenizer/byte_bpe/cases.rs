//! Fixture and cross-format tests: the 27 encode and 11 decode cases of
//! `encode_cases.json` (checked against the official Python tokenizers) for the tiktoken file
//! and both `tokenizer.json` layouts, plus random agreement tests between the formats and the
//! `tokenizers` crate's own encode/decode.
#![allow(clippy::single_range_in_vec_init)] // one protected range is the common case

use rand::{Rng, SeedableRng};
use serde::Deserialize;

use super::any::Glm4Tokenizer;
use super::decode::TokenLookup;
use super::hf_json::HfJsonTokenizer;
use super::tiktoken::TiktokenTokenizer;

#[derive(Deserialize)]
struct Cases {
    n_ranks: u32,
    special_token_ids: std::collections::BTreeMap<String, u32>,
    encode: Vec<EncodeCase>,
    decode: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    ids: Vec<u32>,
    pieces: Vec<String>,
    ids_ordinary: Option<Vec<u32>>,
    ids_tokenizer_json: Option<Vec<u32>>,
    decoded: Option<String>,
}

#[derive(Deserialize)]
struct DecodeCase {
    label: String,
    ids: Vec<u32>,
    text: String,
    text_tokenizer_json: Option<String>,
}

fn data(name: &str) -> String {
    fixture_path(name)
}

/// Where the test files the cases name live in the repository's GLM-4 fixtures.
pub(super) fn fixture_path(name: &str) -> String {
    let relative = match name {
        "encode_cases.json" => "tokenizer/encode_cases.json",
        "tokenizer.model" => "glm4-chat-tiny/tokenizer.model",
        "hf_tokenizer.json" => "glm4-hf-tiny/tokenizer.json",
        "0414_tokenizer.json" => "glm4-0414-tiny/tokenizer.json",
        other => other,
    };
    format!(
        "{}/tests/fixtures/glm4/{relative}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn cases() -> Cases {
    serde_json::from_str(&std::fs::read_to_string(data("encode_cases.json")).unwrap()).unwrap()
}

const JSON_FILES: [&str; 2] = ["hf_tokenizer.json", "0414_tokenizer.json"];

fn tiktoken() -> TiktokenTokenizer {
    TiktokenTokenizer::from_file(data("tokenizer.model")).unwrap()
}

/// The fixture's notation for token bytes: valid UTF-8 as is, invalid bytes as `\xNN`.
fn show(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        s.push_str(chunk.valid());
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

fn stream_concat(lookup: &Glm4Tokenizer, ids: &[u32]) -> String {
    let mut d = lookup.stream_decoder();
    let mut out: String = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    out.push_str(&d.finish());
    out
}

#[test]
fn specials_match_fixture() {
    let c = cases();
    let t = tiktoken();
    assert_eq!(t.n_ranks(), c.n_ranks);
    for (text, id) in &c.special_token_ids {
        assert_eq!(t.specials().id(text), Some(*id), "{text}");
        for name in JSON_FILES {
            let h = HfJsonTokenizer::from_file(data(name)).unwrap();
            assert_eq!(h.specials().id(text), Some(*id), "{name} {text}");
        }
    }
}

#[test]
fn encode_cases_tiktoken() {
    let c = cases();
    let t = tiktoken();
    assert_eq!(c.encode.len(), 27);
    for case in &c.encode {
        let text = &case.text;
        let ordinary = case.ids_ordinary.as_ref().unwrap_or(&case.ids);
        assert_eq!(t.encode(text), case.ids, "{text:?}");
        assert_eq!(&t.encode_ordinary(text), ordinary, "{text:?}");
        assert_eq!(t.encode_protected(text, &[]), case.ids, "{text:?}");
        assert_eq!(
            &t.encode_protected(text, &[0..text.len()]),
            ordinary,
            "{text:?}"
        );
        let shown: Vec<String> = case
            .ids
            .iter()
            .map(|&id| show(t.token_bytes(id).unwrap()))
            .collect();
        assert_eq!(shown, case.pieces, "{text:?}");
        if let Some(decoded) = &case.decoded {
            assert_eq!(&t.decode(&case.ids).unwrap(), decoded);
        }
    }
}

#[test]
fn encode_cases_tokenizer_json() {
    let c = cases();
    for name in JSON_FILES {
        let h = HfJsonTokenizer::from_file(data(name)).unwrap();
        let mut official = tokenizers::Tokenizer::from_file(data(name)).unwrap();
        official.set_encode_special_tokens(false);
        for case in &c.encode {
            let text = &case.text;
            let expected = case.ids_tokenizer_json.as_ref().unwrap_or(&case.ids);
            let ordinary = case.ids_ordinary.as_ref().unwrap_or(&case.ids);
            assert_eq!(&h.encode(text).unwrap(), expected, "{name} {text:?}");
            let crate_ids = official.encode(text.as_str(), false).unwrap();
            assert_eq!(crate_ids.get_ids(), &expected[..], "{name} crate {text:?}");
            assert_eq!(
                &h.encode_ordinary(text).unwrap(),
                ordinary,
                "{name} {text:?}"
            );
            assert_eq!(
                &h.encode_protected(text, &[0..text.len()]).unwrap(),
                ordinary,
                "{name} {text:?}"
            );
            let shown: Vec<String> = expected
                .iter()
                .map(|&id| show(h.token_bytes(id).unwrap()))
                .collect();
            assert_eq!(shown, case.pieces, "{name} {text:?}");
        }
    }
}

#[test]
fn decode_cases_both_formats() {
    let c = cases();
    assert_eq!(c.decode.len(), 11);
    let t = Glm4Tokenizer::from_file(data("tokenizer.model")).unwrap();
    for case in &c.decode {
        assert_eq!(t.decode(&case.ids).unwrap(), case.text, "{}", case.label);
        assert_eq!(stream_concat(&t, &case.ids), case.text, "{}", case.label);
    }
    for name in JSON_FILES {
        let h = Glm4Tokenizer::from_file(data(name)).unwrap();
        let official = tokenizers::Tokenizer::from_file(data(name)).unwrap();
        for case in &c.decode {
            let expected = case.text_tokenizer_json.as_ref().unwrap_or(&case.text);
            assert_eq!(&h.decode(&case.ids).unwrap(), expected, "{}", case.label);
            assert_eq!(&stream_concat(&h, &case.ids), expected, "{}", case.label);
            assert_eq!(&official.decode(&case.ids, false).unwrap(), expected);
        }
    }
}

/// Protecting user content inside a rendered template changes nothing unless the content
/// contains special-token text, which then stays plain text.
#[test]
fn protected_template_encoding() {
    let c = cases();
    let t = Glm4Tokenizer::from_file(data("tokenizer.model")).unwrap();
    let h = Glm4Tokenizer::from_file(data(JSON_FILES[0])).unwrap();
    for tok in [&t, &h] {
        for case in &c.encode {
            let prefix = "[gMASK]<sop><|user|>\n";
            let rendered = format!("{prefix}{}<|assistant|>", case.text);
            let content = prefix.len()..prefix.len() + case.text.len();
            let protected = tok.encode_protected(&rendered, &[content]).unwrap();
            let has_special = tok
                .specials()
                .tokens()
                .iter()
                .any(|s| case.text.contains(&s.text));
            if has_special {
                let mut expected = tok.encode("[gMASK]<sop><|user|>").unwrap();
                expected.extend(tok.encode_ordinary(&format!("\n{}", case.text)).unwrap());
                expected.extend(tok.encode("<|assistant|>").unwrap());
                assert_eq!(protected, expected, "{:?}", case.text);
            } else {
                assert_eq!(protected, tok.encode(&rendered).unwrap(), "{:?}", case.text);
            }
        }
    }
}

const ALPHABET: &[&str] = &[
    " ",
    " ",
    "  ",
    "\t",
    "\r",
    "\n",
    "\u{a0}",
    "\u{3000}",
    "a",
    "e",
    "s",
    "re",
    "ll",
    "'",
    "'S",
    "Hello",
    " world",
    "你好",
    "晚上",
    "，",
    "！",
    "é",
    "e\u{301}",
    "ж",
    "한",
    "٣",
    "1",
    "23",
    "456",
    "😀",
    "👋",
    "\u{200d}",
    "(",
    ")",
    "{",
    "}",
    ".",
    "<",
    "|",
    ">",
    "<|user|>",
    "[gMASK]",
    "<sop>",
    "<|endoftext|>",
    "<|assistant",
    "|>",
    "[MASK",
    "\u{fffd}",
];

fn random_text(rng: &mut impl Rng) -> String {
    let len = rng.random_range(0..30);
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
        .collect()
}

/// The tiktoken file and both tokenizer.json files give the same ids, and this module's
/// tokenizer.json encoding equals the crate's own on random texts.
#[test]
fn formats_agree_on_random_texts() {
    let t = tiktoken();
    let hs: Vec<HfJsonTokenizer> = JSON_FILES
        .iter()
        .map(|n| HfJsonTokenizer::from_file(data(n)).unwrap())
        .collect();
    let official = tokenizers::Tokenizer::from_file(data(JSON_FILES[0])).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..1500 {
        let text = random_text(&mut rng);
        let ids = t.encode(&text);
        let ordinary = t.encode_ordinary(&text);
        for h in &hs {
            assert_eq!(h.encode(&text).unwrap(), ids, "{text:?}");
            assert_eq!(h.encode_ordinary(&text).unwrap(), ordinary, "{text:?}");
        }
        let crate_ids = official.encode(text.as_str(), false).unwrap();
        assert_eq!(crate_ids.get_ids(), &ids[..], "{text:?}");
        // Round trip: decoding ordinary ids gives the text back (Joined, no specials).
        assert_eq!(hs[0].decode(&ordinary).unwrap(), text);
    }
}

/// The crate's own pipeline (used for unrecognised pre-tokenizers) agrees with the native split
/// path; and a whitespace run beyond `fancy-regex`'s backtrack limit, where the crate's splitter
/// gives up, is still encoded like tiktoken.
#[test]
fn native_split_equals_crate_pipeline() {
    let native = HfJsonTokenizer::from_file(data(JSON_FILES[0])).unwrap();
    assert!(native.uses_native_split());
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data(JSON_FILES[0])).unwrap()).unwrap();
    // Same regex, written differently, so it is not recognised.
    json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] =
        format!("(?:{})", super::pretokenize::GLM4_PATTERN).into();
    let generic = HfJsonTokenizer::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap();
    assert!(!generic.uses_native_split());
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..500 {
        let text = random_text(&mut rng);
        assert_eq!(
            native.encode(&text).unwrap(),
            generic.encode(&text).unwrap()
        );
    }
    let t = tiktoken();
    let text = " ".repeat(1_100_000) + "x";
    assert_eq!(native.encode(&text).unwrap(), t.encode(&text));
    // (`generic` differs here with tokenizers 0.22 / fancy-regex 0.14: its splitter stops at
    // the backtrack limit. Not asserted, so a crate upgrade that fixes it does not fail.)
}

/// Whole-sequence decode equals the crate's decode (tokenizer.json) and the streaming
/// decoder's concatenated deltas (both formats) on random id sequences.
#[test]
fn decoders_agree_on_random_ids() {
    let t = Glm4Tokenizer::from_file(data("tokenizer.model")).unwrap();
    let h = Glm4Tokenizer::from_file(data(JSON_FILES[0])).unwrap();
    let official = tokenizers::Tokenizer::from_file(data(JSON_FILES[0])).unwrap();
    let n = t.vocab_size();
    assert_eq!(n, h.vocab_size());
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..3000 {
        let len = rng.random_range(0..24);
        let ids: Vec<u32> = (0..len)
            .map(|_| match rng.random_range(0..4) {
                0 => rng.random_range(1200..n),
                1 => rng.random_range(0x80..0x100),
                _ => rng.random_range(0..n),
            })
            .collect();
        for tok in [&t, &h] {
            assert_eq!(
                stream_concat(tok, &ids),
                tok.decode(&ids).unwrap(),
                "{ids:?}"
            );
        }
        assert_eq!(
            h.decode(&ids).unwrap(),
            official.decode(&ids, false).unwrap(),
            "{ids:?}"
        );
        for &id in &ids {
            assert_eq!(t.token_bytes(id), h.token_bytes(id), "id {id}");
            assert_eq!(t.piece(id), h.piece(id));
        }
    }
    assert!(t.decode(&[n]).is_err());
    assert!(
        super::decode::StreamDecoder::new(&t, super::decode::Spacing::Spaced)
            .push(n)
            .is_err()
    );
}

/// A hostile single-piece text (one letter repeated) encodes in O(n log n).
#[test]
fn megabyte_of_one_letter_encodes() {
    let t = tiktoken();
    let text = "a".repeat(1 << 20);
    let ids = t.encode(&text);
    let total: usize = ids.iter().map(|&id| t.token_bytes(id).unwrap().len()).sum();
    assert_eq!(total, 1 << 20);
}

/// The O(n log n) merge equals tiktoken's O(n²) loop on pieces of the real fixture vocabulary.
#[test]
fn bpe_matches_reference_with_fixture_vocab() {
    let t = tiktoken();
    let ranks: std::collections::HashMap<Vec<u8>, u32> = (0..t.n_ranks())
        .map(|id| (t.token_bytes(id).unwrap().to_vec(), id))
        .collect();
    let bpe = super::bpe::BytePairEncoder::new(
        &(0..t.n_ranks())
            .map(|id| t.token_bytes(id).unwrap().to_vec())
            .collect::<Vec<_>>(),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..3000 {
        let text = random_text(&mut rng);
        let piece = text.as_bytes();
        let mut ours = Vec::new();
        bpe.encode_piece(piece, &mut ours);
        assert_eq!(
            ours,
            super::bpe::tests::reference_encode(&ranks, piece),
            "{text:?}"
        );
    }
}
