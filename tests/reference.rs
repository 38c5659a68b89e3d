//! The engine against the official THUDM Python implementation, token for token.

mod common;

use chathub::{messages_to_tuple_history, FinishReason, ModelFamily};

#[test]
fn every_expected_case_reproduces_prompt_and_greedy_ids() {
    let cases = common::cases();
    assert_eq!(cases.len(), 5, "all reference cases are present");
    for case in cases {
        let engine = common::load(&case.model);
        assert_eq!(
            engine.family().as_str(),
            case.family,
            "{}: family detected",
            case.id
        );
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
        assert_eq!(outcome.usage.prompt_tokens, case.prompt_token_ids.len());
        assert_eq!(
            outcome.raw_text, case.greedy_text_until_stop,
            "{}: text equals the official decode",
            case.id
        );
        if let Some(tuples) = &case.history_tuples {
            assert_eq!(
                &messages_to_tuple_history(&case.request.history),
                tuples,
                "{}",
                case.id
            );
        }
    }
}

#[test]
fn family_can_be_overridden() {
    let dir = common::model_dir("chatglm3-tiny");
    let options = chathub::ModelOptions::default().family(ModelFamily::ChatGlm2);
    let engine = chathub::Engine::load_with(dir, &options).expect("loads");
    assert_eq!(engine.family(), ModelFamily::ChatGlm2);
    // ChatGLM2's own stop id is </s>; generation_config.json still adds ChatGLM3's role tokens.
    assert_eq!(engine.stop_ids(), &[2, 1006, 1008]);
}
