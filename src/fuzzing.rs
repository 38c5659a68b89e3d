//! Entry points for `cargo fuzz` (built only with `--cfg fuzzing`, which cargo-fuzz sets): each
//! takes arbitrary bytes, feeds them to one reader or parser exactly as a user's file or request
//! would arrive, and checks the invariants that must hold whatever the input. A panic, an abort
//! or a sanitizer report is a finding; an `Err` is the expected answer to garbage.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::engine::stop::StopGate;
use crate::families::reply::stream::ReplyStream;
use crate::families::reply::{parse_json_arguments, parse_reply, ReplyStyle};
use crate::{ChatRequest, Engine, Tokenizer};

/// A file of this process's own holding `data`, named `name` (readers take paths).
fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chathub-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let path = dir.join(name);
    std::fs::write(&path, data).expect("scratch file");
    path
}

/// The fixtures next to the fuzz crate (`tests/fixtures`).
fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A safetensors file: the header checks, then every tensor read as f32.
pub fn safetensors(data: &[u8]) {
    let path = scratch_file("model.safetensors", data);
    crate::formats::weights::fuzz_safetensors(&path);
}

/// A PyTorch pickle checkpoint: the tensor directory.
pub fn pickle(data: &[u8]) {
    let path = scratch_file("pytorch_model.bin", data);
    crate::formats::weights::fuzz_pickle(&path);
}

/// A GGUF file, as chathub's own or llama.cpp's: header, layout checks, metadata, the family's
/// config and tokenizer (weights are not read: their sizes come from checked directories).
pub fn gguf(data: &[u8]) {
    let path = scratch_file("model.gguf", data);
    let Ok(source) = crate::families::source::ModelSource::open(&path) else {
        return;
    };
    let _ = crate::families::open(&source, None);
}

/// Encodes and decodes through a tokenizer built from `data`.
fn exercise(tokenizer: &Tokenizer) {
    for text in ["Hello, world!", "你好，世界 👋", "<|user|>\n  tabs\t", ""] {
        if let Ok(ids) = tokenizer.encode(text) {
            let whole = tokenizer.decode(&ids);
            let mut decoder = tokenizer.decoder();
            let mut streamed = String::new();
            for &id in &ids {
                decoder.push(id, &mut streamed);
            }
            decoder.finish(&mut streamed);
            let _ = whole;
        }
    }
}

/// A sentencepiece `tokenizer.model` (ChatGLM2/3).
pub fn sentencepiece(data: &[u8]) {
    if let Ok(tokenizer) = Tokenizer::sentencepiece(data, &[], Path::new("tokenizer.model")) {
        exercise(&tokenizer);
    }
}

/// A byte-level BPE tokenizer: GLM-4's tiktoken `tokenizer.model` or a `tokenizer.json`.
pub fn byte_level_bpe(data: &[u8]) {
    if let Ok(tokenizer) = Tokenizer::byte_level_bpe(data, &[], Path::new("tokenizer.json")) {
        exercise(&tokenizer);
    }
}

/// The fixture models the request target validates against, loaded once.
fn engines() -> &'static [Engine] {
    static ENGINES: OnceLock<Vec<Engine>> = OnceLock::new();
    ENGINES.get_or_init(|| {
        ["chatglm2-tiny", "chatglm3-tiny", "glm4/glm4-chat-tiny"]
            .iter()
            .map(|m| Engine::load(fixtures().join(m)).expect("fixture model"))
            .collect()
    })
}

/// A request as `generate --request`, the C ABI and the servers take it: parsed, then
/// validated (prompt built and tokenized) by each family.
pub fn request(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<ChatRequest>(data) else {
        return;
    };
    // Bounded like the servers bound it: the fuzzer's time goes to shapes, not sizes.
    if request.prompt.len() + request.history.len() * 64 > 1 << 16 {
        return;
    }
    for engine in engines() {
        let _ = engine.validate(&request);
    }
}

/// Stop strings over text split into arbitrary pieces: what is released never contains a stop
/// string, is always a prefix of the text, and at the end is the text cut before the first stop.
pub fn stop_gate(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{1}');
    let stops: Vec<String> = parts
        .next()
        .unwrap_or_default()
        .split('\u{2}')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .take(4)
        .collect();
    let mut gate = StopGate::new(&stops);
    let mut released = String::new();
    let mut stopped = false;
    for piece in parts {
        let (range, hit) = gate.push(piece);
        released.push_str(&gate.text()[range]);
        if hit {
            stopped = true;
            break;
        }
    }
    if !stopped {
        let range = gate.finish();
        released.push_str(&gate.text()[range]);
    }
    assert_eq!(released, gate.text(), "released text is the kept text");
    if stopped || !stops.is_empty() {
        for stop in &stops {
            assert!(!released.contains(stop.as_str()), "stop {stop:?} released");
        }
    }
}

/// Arbitrary ids through a streaming decoder: never panics, and the streamed text is valid
/// UTF-8 by construction.
pub fn stream_decoder(data: &[u8]) {
    static TOKENIZERS: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    let tokenizers = TOKENIZERS.get_or_init(|| {
        ["chatglm3-tiny", "glm4/glm4-chat-tiny", "glm4/glm4-hf-tiny"]
            .iter()
            .map(|m| crate::load_tokenizer(fixtures().join(m)).expect("fixture tokenizer"))
            .collect()
    });
    for tokenizer in tokenizers {
        let vocab = tokenizer.vocab_size() as u32;
        let ids: Vec<u32> = data
            .chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
            .map(|id| id % vocab.max(1))
            .collect();
        let mut decoder = tokenizer.decoder();
        let mut streamed = String::new();
        for &id in &ids {
            decoder.push(id, &mut streamed);
        }
        decoder.finish(&mut streamed);
        let _ = tokenizer.decode(&ids);
    }
}

/// A model's raw reply through the official `process_response` rules (every family, with and
/// without tools), the streaming gate, and the argument parsers.
pub fn tool_call(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    for style in [ReplyStyle::ChatGlm2, ReplyStyle::ChatGlm3, ReplyStyle::Glm4] {
        for tools in [false, true] {
            let _ = parse_reply(style, &raw, tools);
            let mut stream = ReplyStream::new(style, tools);
            let mut shown = String::new();
            for piece in raw.split_inclusive(['\n', ' ']) {
                shown.push_str(&stream.push(piece));
            }
            let _ = stream.finish();
        }
    }
    let _ = parse_json_arguments(&raw);
    let _ = crate::families::python::literal::parse_tool_call(&raw);
}
