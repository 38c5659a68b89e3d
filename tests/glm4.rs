//! GLM-4 in its three published layouts against the official Python code, token for token
//! (`tests/fixtures/glm4/`, see its README).

mod common;

use chathub::{Engine, FinishReason, ModelFamily};

fn glm4_dir(model: &str) -> std::path::PathBuf {
    common::fixtures().join("glm4").join(model)
}

#[test]
fn every_layout_reproduces_prompt_greedy_ids_and_text() {
    let cases = common::cases_in("glm4/expected");
    assert_eq!(cases.len(), 12, "all GLM-4 cases are present");
    let mut engines = std::collections::HashMap::new();
    for case in cases {
        let engine = engines
            .entry(case.model.clone())
            .or_insert_with(|| Engine::load(glm4_dir(&case.model)).expect("fixture loads"));
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
            outcome.text, case.greedy_text_until_stop,
            "{}: text equals the official decode",
            case.id
        );
    }
}
