//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use chathub::{ChatRequest, Engine, Message};
use serde::Deserialize;

/// `tests/fixtures`, the copy of the reference fixtures made with the official Python code.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture model directory by name (`chatglm3-tiny`, `glm4-hf-tiny`, ...).
pub fn model_dir(name: &str) -> PathBuf {
    if name.starts_with("glm4-") {
        fixtures().join("glm4").join(name)
    } else {
        fixtures().join(name)
    }
}

pub fn load(name: &str) -> Engine {
    Engine::load(model_dir(name)).expect("fixture model loads")
}

/// One `expected/*.json` case.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub id: String,
    pub model: String,
    pub family: String,
    pub request: CaseRequest,
    pub max_new_tokens: usize,
    pub prompt_token_ids: Vec<u32>,
    pub greedy_token_ids_until_stop: Vec<u32>,
    pub stop_ids: Vec<u32>,
    pub greedy_text_until_stop: String,
    #[serde(default)]
    pub history_tuples: Option<Vec<(String, String)>>,
}

#[derive(Debug, Deserialize)]
pub struct CaseRequest {
    pub prompt: String,
    pub history: Vec<Message>,
}

impl Case {
    pub fn request(&self) -> ChatRequest {
        ChatRequest::new(self.request.prompt.clone())
            .history(self.request.history.clone())
            .max_new_tokens(self.max_new_tokens)
            .greedy()
    }
}

pub fn cases() -> Vec<Case> {
    cases_in("expected")
}

/// The ChatGLM2/3 and the GLM-4 cases.
pub fn all_cases() -> Vec<Case> {
    let mut cases = cases();
    cases.extend(cases_in("glm4/expected"));
    cases
}

/// The cases of `tests/fixtures/{dir}` (`expected`, `glm4/expected`).
pub fn cases_in(dir: &str) -> Vec<Case> {
    let mut paths: Vec<_> = std::fs::read_dir(fixtures().join(dir))
        .expect("the cases' directory exists")
        .map(|e| e.expect("readable").path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).expect("readable")).expect("case parses"))
        .collect()
}
