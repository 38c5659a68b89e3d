//! GLM-4 in its three published layouts against the official Python code, token for token
//! (`tests/fixtures/glm4/`, see its README).

mod common;

use chathub::{Engine, FinishReason, ModelFamily};

#[test]
fn every_layout_reproduces_prompt_greedy_ids_and_text() {
    let cases = common::cases_in("glm4/expected");
    assert_eq!(cases.len(), 12, "all GLM-4 cases are present");
    let mut engines = std::collections::HashMap::new();
    for case in cases {
        let engine = engines.entry(case.model.clone()).or_insert_with(|| {
            Engine::load(common::model_dir(&case.model)).expect("fixture loads")
        });
        assert_eq!(engine.family(), ModelFamily::Glm4, "{}", case.id);
        let mut stops = engine.stop_ids().to_vec();
        stops.sort();
        let mut expected_stops = case.stop_ids.clone();
        expected_stops.sort();
        assert_eq!(stops, expected_stops, "{}: stop ids", case.id);
        let outcome = engine.chat(&case.request()).expect("chat runs");
        assert_eq!(
            outcome.prompt_token_ids, case.prompt_token_ids,
            "{}: prompt ids",
            case.id
        );
        assert_eq!(
            outcome.completion_token_ids, case.greedy_token_ids_until_stop,
            "{}: greedy ids",
            case.id
        );
        assert_eq!(outcome.finish_reason, FinishReason::Length, "{}", case.id);
        assert_eq!(
            outcome.raw_text, case.greedy_text_until_stop,
            "{}: text equals the official decode",
            case.id
        );
    }
}

#[derive(serde::Deserialize)]
struct TokenizerCases {
    encode: Vec<EncodeCase>,
    decode: Vec<DecodeCase>,
}

#[derive(serde::Deserialize)]
struct EncodeCase {
    text: String,
    ids: Vec<u32>,
    #[serde(default)]
    ids_ordinary: Option<Vec<u32>>,
    #[serde(default)]
    ids_tokenizer_json: Option<Vec<u32>>,
}

#[derive(serde::Deserialize)]
struct DecodeCase {
    label: String,
    ids: Vec<u32>,
    text: String,
    #[serde(default)]
    text_tokenizer_json: Option<String>,
}

/// Both tokenizer formats, loaded as the engine loads them, against the official tokenizers:
/// encoding (special-token text as ids, and as text) and decoding, whole and streamed.
#[test]
fn both_tokenizer_formats_match_the_official_tokenizers() {
    let cases: TokenizerCases = serde_json::from_slice(
        &std::fs::read(common::fixtures().join("glm4/tokenizer/encode_cases.json")).expect("read"),
    )
    .expect("parses");
    for model in ["glm4-chat-tiny", "glm4-hf-tiny", "glm4-0414-tiny"] {
        let tokenizer = chathub::load_tokenizer(common::model_dir(model)).expect("loads");
        let json = model != "glm4-chat-tiny";
        assert_eq!(tokenizer.special_id("<|user|>"), Some(1207), "{model}");
        assert_eq!(tokenizer.special_id("<|endoftext|>"), Some(1200), "{model}");
        assert_eq!(tokenizer.ordinary_vocab_size(), 1200, "{model}");
        for case in &cases.encode {
            let expected = match (&case.ids_tokenizer_json, json) {
                (Some(ids), true) => ids,
                _ => &case.ids,
            };
            let ids = tokenizer
                .encode_with_special_text(&case.text, &[])
                .expect("encodes");
            assert_eq!(&ids, expected, "{model} encode {:?}", case.text);
            let ordinary = case.ids_ordinary.as_ref().unwrap_or(expected);
            assert_eq!(
                &tokenizer.encode(&case.text).expect("encodes"),
                ordinary,
                "{model} plain encode {:?}",
                case.text
            );
        }
        for case in &cases.decode {
            let expected = match (&case.text_tokenizer_json, json) {
                (Some(text), true) => text,
                _ => &case.text,
            };
            assert_eq!(
                &tokenizer.decode(&case.ids),
                expected,
                "{model} decode {}",
                case.label
            );
            let mut decoder = tokenizer.decoder();
            let mut streamed = String::new();
            for &id in &case.ids {
                decoder.push(id, &mut streamed);
            }
            decoder.finish(&mut streamed);
            assert_eq!(&streamed, expected, "{model} stream {}", case.label);
        }
    }
}

/// `SpecialText::Text` keeps special-token text a user typed as text; the default follows the
/// official chat path and turns it into the role token.
#[test]
fn special_token_text_in_messages_can_stay_text() {
    use chathub::{ChatRequest, SpecialText};
    for model in ["glm4-chat-tiny", "glm4-hf-tiny", "glm4-0414-tiny"] {
        let engine = Engine::load(common::model_dir(model)).expect("loads");
        let user = engine.tokenizer().special_id("<|user|>").expect("has it");
        let request = ChatRequest::new("a <|user|> b").max_new_tokens(1).greedy();
        let official = engine.chat(&request).expect("chat").prompt_token_ids;
        assert_eq!(
            official.iter().filter(|&&id| id == user).count(),
            2,
            "{model}"
        );
        let literal = engine
            .chat(&request.clone().special_text(SpecialText::Text))
            .expect("chat")
            .prompt_token_ids;
        assert_eq!(
            literal.iter().filter(|&&id| id == user).count(),
            1,
            "{model}"
        );
        // Without special-token text in the messages both give the same prompt.
        let plain = ChatRequest::new("hello there").max_new_tokens(1).greedy();
        assert_eq!(
            engine.chat(&plain).expect("chat").prompt_token_ids,
            engine
                .chat(&plain.clone().special_text(SpecialText::Text))
                .expect("chat")
                .prompt_token_ids,
            "{model}"
        );
    }
}

/// The synthetic writer makes glm-4-9b-chat-layout directories (what `chathub bench --synthetic
/// glm4-9b` measures), which load as GLM-4 through the same path as a download.
#[test]
fn synthetic_glm4_directories_load_as_glm4() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("glm4-small");
    let config = chathub::ChatGlmConfig {
        num_layers: 2,
        hidden_size: 128,
        num_attention_heads: 4,
        kv_channels: Some(32),
        ffn_hidden_size: 256,
        padded_vocab_size: 1216,
        seq_length: 4096,
        ..chathub::glm4_9b_config()
    };
    chathub::write_model_dir(&dir, &config, chathub::glm4_tokenizer_model(), 5, 1 << 20)
        .expect("writes");
    let engine = Engine::load(&dir).expect("loads");
    assert_eq!(engine.family(), ModelFamily::Glm4);
    assert_eq!(engine.arch().rope_base, 5_000_000.0);
    let outcome = engine
        .chat(&chathub::ChatRequest::new("你好").max_new_tokens(8).greedy())
        .expect("chat");
    assert_eq!(
        &outcome.prompt_token_ids[..3],
        &[1202, 1204, 1207],
        "[gMASK]<sop><|user|>"
    );
    let parameters = chathub::glm4_9b_config().arch_spec().parameter_count();
    assert!(
        (9_300_000_000..9_500_000_000).contains(&parameters),
        "GLM-4-9B's size: {parameters}"
    );
}

/// transformers 5 writes `dtype` and `rope_parameters` where 4.x wrote `torch_dtype` and
/// `rope_theta`: both load to the same model.
#[test]
fn transformers_5_config_keys_load_the_same_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("glm4-0414-tiny");
    std::fs::create_dir(&dir).expect("mkdir");
    let source = common::model_dir("glm4-0414-tiny");
    for entry in std::fs::read_dir(&source).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("read")).expect("json");
    let config_map = config.as_object_mut().expect("object");
    let theta = config_map.remove("rope_theta").expect("rope_theta");
    let dtype = config_map.remove("torch_dtype").expect("torch_dtype");
    config_map.insert("dtype".into(), dtype);
    config_map.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5}),
    );
    std::fs::write(&config_path, config.to_string()).expect("write");
    let case = common::cases_in("glm4/expected")
        .into_iter()
        .find(|c| c.id == "glm4_0414_multi_turn")
        .expect("case");
    let outcome = Engine::load(&dir)
        .expect("loads")
        .chat(&case.request())
        .expect("chat");
    assert_eq!(outcome.prompt_token_ids, case.prompt_token_ids);
    assert_eq!(
        outcome.completion_token_ids,
        case.greedy_token_ids_until_stop
    );
}
