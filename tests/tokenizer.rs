//! The native sentencepiece reader against the official tokenizer's ids.

mod common;

use chathub::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    sp_vocab_size: usize,
    encode: Vec<EncodeCase>,
    decode: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct DecodeCase {
    label: String,
    ids: Vec<u32>,
    text: String,
}

fn load() -> (Tokenizer, Cases) {
    let tokenizer = chathub::load_tokenizer(common::model_dir("chatglm3-tiny")).expect("loads");
    let cases: Cases = serde_json::from_slice(
        &std::fs::read(common::fixtures().join("tokenizer/encode_cases.json")).expect("readable"),
    )
    .expect("cases parse");
    (tokenizer, cases)
}

#[test]
fn encodes_every_case_like_the_official_tokenizer() {
    let (tokenizer, cases) = load();
    assert_eq!(tokenizer.ordinary_vocab_size(), cases.sp_vocab_size);
    assert_eq!(cases.encode.len(), 25);
    for case in &cases.encode {
        assert_eq!(
            tokenizer.encode(&case.text).expect("encodes"),
            case.ids,
            "encode {:?}",
            case.text
        );
    }
}

#[test]
fn decodes_every_case_like_the_official_tokenizer() {
    let (tokenizer, cases) = load();
    assert_eq!(cases.decode.len(), 11);
    for case in &cases.decode {
        assert_eq!(
            tokenizer.decode(&case.ids),
            case.text,
            "decode {}",
            case.label
        );
    }
}

#[test]
fn streaming_deltas_are_whole_characters_and_add_up_to_the_decode() {
    let (tokenizer, cases) = load();
    for case in &cases.decode {
        let mut decoder = tokenizer.decoder();
        let mut text = String::new();
        for &id in &case.ids {
            let mut delta = String::new();
            decoder.push(id, &mut delta);
            // A split character would surface as U+FFFD in a delta while the whole decode has none.
            if !case.text.contains('\u{FFFD}') {
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "stream {}: {delta:?}",
                    case.label
                );
            }
            text.push_str(&delta);
        }
        decoder.finish(&mut text);
        assert_eq!(text, case.text, "stream {}", case.label);
    }
    // The three bytes of 龘 arrive one by one: nothing comes out until the last.
    let mut decoder = tokenizer.decoder();
    let mut out = String::new();
    decoder.push(236, &mut out);
    decoder.push(193, &mut out);
    assert_eq!(out, "", "partial character is held back");
    decoder.push(155, &mut out);
    assert_eq!(out, "龘");
}

#[test]
fn special_ids_follow_the_sentencepiece_vocabulary() {
    let (tokenizer, _) = load();
    assert_eq!(tokenizer.special_id("[gMASK]"), Some(1001));
    assert_eq!(tokenizer.special_id("sop"), Some(1003));
    assert_eq!(tokenizer.special_id("<|observation|>"), Some(1008));
    assert_eq!(tokenizer.vocab_size(), 1009);
    let chatglm2 = chathub::load_tokenizer(common::model_dir("chatglm2-tiny")).expect("loads");
    assert_eq!(chatglm2.special_id("eop"), Some(1004));
    assert_eq!(chatglm2.special_id("<|user|>"), None);
    // Special ids decode to their text, as the official tokenizer renders them; only the very
    // first piece loses its dummy-prefix space.
    assert_eq!(tokenizer.decode(&[1006, 716, 13]), "<|user|> \n");
    assert_eq!(tokenizer.decode(&[716, 13, 1006]), "\n<|user|>");
}

#[test]
fn text_that_looks_special_stays_text() {
    let (tokenizer, _) = load();
    for text in ["<|user|>", "[gMASK]", "sop", "</s>"] {
        let ids = tokenizer.encode(text).expect("encodes");
        assert!(ids.iter().all(|&id| id < 1000), "{text}");
    }
}
