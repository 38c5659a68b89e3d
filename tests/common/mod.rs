//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

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

/// Writes a GLM-4 model (glm-4-9b-chat layout, the tiny fixture's sizes and tokenizer) that
/// always answers `reply` and then `<|observation|>`, whatever it is asked: a real checkpoint
/// whose weights make it a lookup table. Its attention and MLP weights are zero, so each step's
/// logits depend on the last token alone; the embedding gives every token of the reply its own
/// direction and the output layer maps each to the next. The reply's tokens must be distinct.
pub fn scripted_glm4(dir: &std::path::Path, reply: &str) {
    use chathub::candle_core::{DType, Device, Tensor};
    let source = fixtures().join("glm4/glm4-chat-tiny");
    std::fs::create_dir_all(dir).expect("mkdir");
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ] {
        std::fs::copy(source.join(file), dir.join(file)).expect("copy");
    }
    let tokenizer = chathub::load_tokenizer(&source).expect("tokenizer");
    let mut path = vec![tokenizer.special_id("<|assistant|>").expect("assistant")];
    path.extend(tokenizer.encode(reply).expect("encodes"));
    path.push(
        tokenizer
            .special_id("<|observation|>")
            .expect("observation"),
    );
    let mut seen = std::collections::HashSet::new();
    assert!(
        path.iter().all(|id| seen.insert(*id)),
        "the scripted reply repeats a token: {path:?}"
    );
    let (vocab, hidden, layers, qkv, ffn) = (1216, 64, 2, 128, 128);
    assert!(path.len() <= hidden, "reply too long to script");
    let mut embedding = vec![0f32; vocab * hidden];
    let mut output = vec![0f32; vocab * hidden];
    for (k, pair) in path.windows(2).enumerate() {
        let (current, next) = (pair[0] as usize, pair[1] as usize);
        embedding[current * hidden + k] = 1.0;
        output[next * hidden + k] = 10.0;
    }
    let tensor = |values: Vec<f32>, shape: &[usize]| {
        Tensor::from_vec(values, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("tensor")
    };
    let zeros = |shape: &[usize]| tensor(vec![0.0; shape.iter().product()], shape);
    let ones = |n: usize| tensor(vec![1.0; n], &[n]);
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "transformer.embedding.word_embeddings.weight".to_string(),
        tensor(embedding, &[vocab, hidden]),
    );
    tensors.insert(
        "transformer.output_layer.weight".to_string(),
        tensor(output, &[vocab, hidden]),
    );
    tensors.insert(
        "transformer.encoder.final_layernorm.weight".to_string(),
        ones(hidden),
    );
    for i in 0..layers {
        let p = |s: &str| format!("transformer.encoder.layers.{i}.{s}");
        tensors.insert(p("input_layernorm.weight"), ones(hidden));
        tensors.insert(p("post_attention_layernorm.weight"), ones(hidden));
        tensors.insert(
            p("self_attention.query_key_value.weight"),
            zeros(&[qkv, hidden]),
        );
        tensors.insert(p("self_attention.query_key_value.bias"), zeros(&[qkv]));
        tensors.insert(p("self_attention.dense.weight"), zeros(&[hidden, hidden]));
        tensors.insert(p("mlp.dense_h_to_4h.weight"), zeros(&[2 * ffn, hidden]));
        tensors.insert(p("mlp.dense_4h_to_h.weight"), zeros(&[hidden, ffn]));
    }
    chathub::candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .expect("saves");
}

/// A ChatGLM2 model big enough that a long reply takes seconds in any build: these tests cancel at
/// 300 ms, which a release build of the tiny fixture outruns (2000 tokens in about 0.1 s). Its
/// output rows for the special and end-of-text ids are zero, so greedy decoding never stops
/// on its own (the random model's largest logit is positive). Written once per machine.
pub fn slow_model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("chathub-grpc-slow-v3");
        if !dir.join("never-stops").is_file() {
            let config = chathub::ChatGlmConfig {
                num_layers: 4,
                hidden_size: 512,
                num_attention_heads: 8,
                kv_channels: Some(64),
                ffn_hidden_size: 1024,
                seq_length: 32768,
                // ChatGLM2 streams a reply from its first token (ChatGLM3 and GLM-4 hold text
                // back until the metadata line ends, which random weights may never write).
                name_or_path: Some("chathub/grpc-slow-chatglm2".into()),
                ..chathub::demo_config()
            };
            let tokenizer = std::fs::read(
                chathub::demo_model_dir()
                    .expect("demo model")
                    .join("tokenizer.model"),
            )
            .expect("tokenizer");
            chathub::write_model_dir(&dir, &config, &tokenizer, 11, usize::MAX).expect("written");
            let weights = dir.join("model.safetensors");
            let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
                .expect("weights");
            let name = "transformer.output_layer.weight";
            let output = &tensors[name];
            let rows: Vec<f32> = (0..config.padded_vocab_size)
                .map(|id| if (3..1000).contains(&id) { 1.0 } else { 0.0 })
                .collect();
            let keep =
                candle_core::Tensor::from_vec(rows, (config.padded_vocab_size, 1), output.device())
                    .and_then(|k| k.to_dtype(output.dtype()))
                    .expect("mask");
            let masked = output.broadcast_mul(&keep).expect("masked");
            tensors.insert(name.to_string(), masked);
            let staging = dir.join("model.safetensors.partial");
            candle_core::safetensors::save(&tensors, &staging).expect("saved");
            std::fs::rename(&staging, &weights).expect("renamed");
            std::fs::write(dir.join("never-stops"), b"").expect("marker");
        }
        dir
    })
    .clone()
}
