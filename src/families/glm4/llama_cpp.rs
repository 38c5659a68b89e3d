//! Reading llama.cpp's own GGUF files of GLM-4, as its `convert_hf_to_gguf.py` writes them:
//! glm-4-9b-chat (and -hf) as architecture `chatglm` with a `gpt2` tokenizer, GLM-4-9B-0414 as
//! architecture `glm4`.
//!
//! Such a file carries no `config.json` and no tokenizer file. The config is rebuilt from the
//! `<arch>.*` keys in the layout the family reads (ChatGLM's keys for `chatglm`, transformers'
//! for `glm4`); the tokenizer is rebuilt as a tiktoken `tokenizer.model`: the converter wrote
//! each rank's bytes as a GPT-2 byte-level string at the rank's id, then the special tokens
//! (CONTROL or USER_DEFINED), then padding (UNUSED), and its merges were derived from the ranks,
//! so merging by rank is the same BPE. The chat template travels in `tokenizer.chat_template`.
//! Tensors keep llama.cpp's names ([`super::LLAMA_CPP_0414_NAMES`],
//! [`crate::families::chatglm::LLAMA_CPP_NAMES`]); the converter permutes nothing, and
//! llama.cpp's "normal" RoPE over `rope.dimension_count` dimensions is GLM-4's interleaved one.

use std::collections::HashMap;
use std::fmt::Write as _;

use base64::Engine as _;
use candle_core::quantized::gguf_file::Value;

use crate::error::Result;
use crate::families::source::Imported;
use crate::families::ModelFamily;
use crate::formats::gguf::Metadata;
use crate::tokenizer::byte_level_token_bytes;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// Rebuilds the files of a llama.cpp GLM-4 file; `None` when it is another architecture or
/// tokenizer.
pub(crate) fn import(meta: &Metadata<'_>, architecture: &str) -> Result<Option<Imported>> {
    let tokenizer = meta.text("tokenizer.ggml.model")?;
    let config = match (architecture, tokenizer) {
        ("chatglm", "gpt2") => chat_config(meta)?,
        ("glm4", "gpt2") => v0414_config(meta)?,
        _ => return Ok(None),
    };
    let (tokenizer_model, specials) = tiktoken_model(meta)?;
    let mut tokenizer_config = serde_json::json!({
        "additional_special_tokens": specials,
        "tokenizer_class": "ChatGLM4Tokenizer",
    });
    if let Some(Value::String(template)) = meta.find("tokenizer.chat_template") {
        tokenizer_config["chat_template"] = template.clone().into();
    }
    let files = HashMap::from([
        ("config.json".to_string(), config.to_string().into_bytes()),
        ("tokenizer.model".to_string(), tokenizer_model),
        (
            "tokenizer_config.json".to_string(),
            tokenizer_config.to_string().into_bytes(),
        ),
    ]);
    let layout = if architecture == "glm4" {
        super::LLAMA_CPP_0414_NAMES.id
    } else {
        crate::families::chatglm::LLAMA_CPP_NAMES.id
    };
    Ok(Some(Imported {
        family: ModelFamily::Glm4,
        layout: layout.to_string(),
        files,
    }))
}

fn name(meta: &Metadata<'_>) -> String {
    match meta.find("general.name") {
        Some(Value::String(name)) => name.clone(),
        _ => "glm-4 (llama.cpp GGUF)".into(),
    }
}

fn has_tensor(meta: &Metadata<'_>, name: &str) -> bool {
    meta.content.tensor_infos.contains_key(name)
}

/// glm-4-9b-chat's `config.json` (ChatGLM's keys) from the `chatglm.*` keys.
fn chat_config(meta: &Metadata<'_>) -> Result<serde_json::Value> {
    let hidden = meta.count("chatglm.embedding_length")?;
    let heads = meta.count("chatglm.attention.head_count")?;
    if heads == 0 || hidden % heads != 0 {
        return Err(meta.invalid(
            "chatglm.attention.head_count",
            heads.to_string(),
            "does not divide the embedding length",
        ));
    }
    let head_dim = hidden / heads;
    if let Ok(rotated) = meta.count("chatglm.rope.dimension_count") {
        if rotated * 2 != head_dim {
            return Err(meta.invalid(
                "chatglm.rope.dimension_count",
                rotated.to_string(),
                "GLM-4 rotates half of each head",
            ));
        }
    }
    let freq_base = meta.float("chatglm.rope.freq_base").unwrap_or(10_000.0);
    Ok(serde_json::json!({
        "_name_or_path": name(meta),
        "model_type": "chatglm",
        "num_layers": meta.count("chatglm.block_count")?,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "kv_channels": head_dim,
        "multi_query_attention": true,
        "multi_query_group_num": meta.count("chatglm.attention.head_count_kv")?,
        "ffn_hidden_size": meta.count("chatglm.feed_forward_length")?,
        "padded_vocab_size": meta.array("tokenizer.ggml.tokens")?.len(),
        "seq_length": meta.count("chatglm.context_length")?,
        "layernorm_epsilon": meta.float("chatglm.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rmsnorm": true,
        "add_qkv_bias": has_tensor(meta, "blk.0.attn_qkv.bias") || has_tensor(meta, "blk.0.attn_q.bias"),
        "add_bias_linear": false,
        "post_layer_norm": true,
        "rope_ratio": freq_base / 10_000.0,
        "tie_word_embeddings": !has_tensor(meta, "output.weight"),
    }))
}

/// GLM-4-9B-0414's `config.json` (transformers' keys) from the `glm4.*` keys.
fn v0414_config(meta: &Metadata<'_>) -> Result<serde_json::Value> {
    let hidden = meta.count("glm4.embedding_length")?;
    let heads = meta.count("glm4.attention.head_count")?;
    if heads == 0 {
        return Err(meta.invalid("glm4.attention.head_count", "0", "must be positive"));
    }
    let head_dim = meta
        .count("glm4.attention.key_length")
        .unwrap_or(hidden / heads);
    let rotated = meta
        .count("glm4.rope.dimension_count")
        .unwrap_or(head_dim / 2);
    if head_dim == 0 || rotated > head_dim {
        return Err(meta.invalid(
            "glm4.rope.dimension_count",
            rotated.to_string(),
            "must be at most the head width",
        ));
    }
    Ok(serde_json::json!({
        "_name_or_path": name(meta),
        "model_type": "glm4",
        "architectures": ["Glm4ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": meta.count("glm4.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.count("glm4.attention.head_count_kv")?,
        "head_dim": head_dim,
        "intermediate_size": meta.count("glm4.feed_forward_length")?,
        "vocab_size": meta.array("tokenizer.ggml.tokens")?.len(),
        "max_position_embeddings": meta.count("glm4.context_length")?,
        "rms_norm_eps": meta.float("glm4.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rope_theta": meta.float("glm4.rope.freq_base").unwrap_or(10_000.0),
        "partial_rotary_factor": rotated as f64 / head_dim as f64,
        "attention_bias": has_tensor(meta, "blk.0.attn_q.bias") || has_tensor(meta, "blk.0.attn_qkv.bias"),
        "tie_word_embeddings": !has_tensor(meta, "output.weight"),
    }))
}

/// A tiktoken `tokenizer.model` from the vocabulary arrays, and the special tokens' texts in id
/// order (numbered right after the ranks).
fn tiktoken_model(meta: &Metadata<'_>) -> Result<(Vec<u8>, Vec<String>)> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types: Vec<i32> = meta
        .array("tokenizer.ggml.token_type")?
        .iter()
        .map(|v| match v {
            Value::I32(t) => Ok(*t),
            Value::U32(t) => Ok(*t as i32),
            _ => Err(meta.invalid(
                "tokenizer.ggml.token_type",
                "not an integer",
                "expected i32 types",
            )),
        })
        .collect::<Result<_>>()?;
    if types.len() != tokens.len() {
        return Err(meta.invalid(
            "tokenizer.ggml.token_type",
            format!("{} types for {} tokens", types.len(), tokens.len()),
            "needs one type per token",
        ));
    }
    let ranks = types.iter().take_while(|&&t| t == NORMAL).count();
    let mut model = String::new();
    for (rank, token) in tokens[..ranks].iter().enumerate() {
        let bytes = byte_level_token_bytes(token).ok_or_else(|| {
            meta.invalid(
                "tokenizer.ggml.tokens",
                token.clone(),
                "not a GPT-2 byte-level token",
            )
        })?;
        let _ = writeln!(
            model,
            "{} {rank}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
    }
    let specials: Vec<String> = tokens[ranks..]
        .iter()
        .zip(&types[ranks..])
        .take_while(|(_, t)| matches!(**t, CONTROL | USER_DEFINED))
        .map(|(token, _)| token.clone())
        .collect();
    if specials.is_empty() {
        return Err(meta.invalid(
            "tokenizer.ggml.token_type",
            format!("{ranks} normal tokens, then none special"),
            "GLM-4's special tokens must follow its ranks",
        ));
    }
    Ok((model.into_bytes(), specials))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::fs::File;
    use std::path::{Path, PathBuf};

    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use serde_json::Value as Json;

    use super::*;
    use crate::families::chatglm::{LLAMA_CPP_NAMES, NAMES};
    use crate::families::glm4::{LLAMA_CPP_0414_NAMES, V0414_NAMES};
    use crate::nn::names::TensorNames;
    use crate::tokenizer::GLM4_SPECIAL_TOKENS;
    use crate::{ChatRequest, Engine, Message, Quantization};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/glm4")
    }

    /// The vocabulary arrays llama.cpp's converter writes for GLM-4: each rank's bytes as a
    /// GPT-2 byte-level string, the special tokens (CONTROL), padding up to `rows` (UNUSED).
    fn vocabulary(rows: usize) -> (Vec<Value>, Vec<Value>) {
        let text = std::fs::read_to_string(fixtures().join("glm4-chat-tiny/tokenizer.model"))
            .expect("tokenizer.model");
        let mut tokens = Vec::new();
        for line in text.lines() {
            let (b64, _) = line.split_once(' ').expect("rank line");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            let string: String = bytes
                .iter()
                .map(|&b| crate::tokenizer::byte_level_char(b))
                .collect();
            tokens.push(Value::String(string));
        }
        let mut types = vec![Value::I32(NORMAL); tokens.len()];
        for special in GLM4_SPECIAL_TOKENS {
            tokens.push(Value::String(special.to_string()));
            types.push(Value::I32(CONTROL));
        }
        while tokens.len() < rows {
            tokens.push(Value::String(format!("[PAD{}]", tokens.len())));
            types.push(Value::I32(5));
        }
        (tokens, types)
    }

    /// Writes a tiny GLM-4 fixture as llama.cpp's converter does, weights in `dtype`.
    fn write(
        model: &str,
        shards: &[&str],
        from: &TensorNames,
        to: &TensorNames,
        keys: Vec<(&str, Value)>,
        path: &Path,
        dtype: GgmlDType,
    ) {
        let dir = fixtures().join(model);
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for shard in shards {
            tensors.extend(candle_core::safetensors::load(dir.join(shard), &Device::Cpu).unwrap());
        }
        let mut named = Vec::new();
        for (name, tensor) in tensors {
            let Some(gguf) = from.translate(&name, to) else {
                continue;
            };
            let tensor = tensor.to_dtype(candle_core::DType::F32).unwrap();
            let dtype = if tensor.rank() == 2 {
                dtype
            } else {
                GgmlDType::F32
            };
            named.push((gguf, QTensor::quantize(&tensor, dtype).unwrap()));
        }
        let config: Json =
            serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap())
                .unwrap();
        let (tokens, types) = vocabulary(1216);
        let mut metadata = keys;
        metadata.extend([
            ("general.name", Value::String(model.into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("chatglm-bpe".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1200)),
            ("tokenizer.ggml.eot_token_id", Value::U32(1207)),
            (
                "tokenizer.chat_template",
                Value::String(config["chat_template"].as_str().unwrap().into()),
            ),
        ]);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut File::create(path).unwrap(), &metadata, &tensors).unwrap();
    }

    fn write_chat(path: &Path, dtype: GgmlDType) {
        let keys = vec![
            ("general.architecture", Value::String("chatglm".into())),
            ("chatglm.context_length", Value::U32(131072)),
            ("chatglm.embedding_length", Value::U32(64)),
            ("chatglm.feed_forward_length", Value::U32(128)),
            ("chatglm.block_count", Value::U32(2)),
            ("chatglm.attention.head_count", Value::U32(4)),
            ("chatglm.attention.head_count_kv", Value::U32(2)),
            (
                "chatglm.attention.layer_norm_rms_epsilon",
                Value::F32(1.5625e-07),
            ),
            ("chatglm.rope.dimension_count", Value::U32(8)),
            ("chatglm.rope.freq_base", Value::F32(5_000_000.0)),
        ];
        write(
            "glm4-chat-tiny",
            &[
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ],
            &NAMES,
            &LLAMA_CPP_NAMES,
            keys,
            path,
            dtype,
        );
    }

    fn write_0414(path: &Path) {
        let keys = vec![
            ("general.architecture", Value::String("glm4".into())),
            ("glm4.context_length", Value::U32(32768)),
            ("glm4.embedding_length", Value::U32(64)),
            ("glm4.feed_forward_length", Value::U32(128)),
            ("glm4.block_count", Value::U32(2)),
            ("glm4.attention.head_count", Value::U32(4)),
            ("glm4.attention.head_count_kv", Value::U32(2)),
            ("glm4.attention.key_length", Value::U32(16)),
            ("glm4.attention.value_length", Value::U32(16)),
            ("glm4.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("glm4.rope.dimension_count", Value::U32(8)),
            ("glm4.rope.freq_base", Value::F32(10_000.0)),
        ];
        write(
            "glm4-0414-tiny",
            &["model.safetensors"],
            &V0414_NAMES,
            &LLAMA_CPP_0414_NAMES,
            keys,
            path,
            GgmlDType::F32,
        );
    }

    fn case(name: &str) -> (ChatRequest, Vec<u32>, Vec<u32>) {
        let text = std::fs::read_to_string(fixtures().join("expected").join(name)).unwrap();
        let case: Json = serde_json::from_str(&text).unwrap();
        let request = &case["request"];
        let history = request["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()).unwrap()
            })
            .collect();
        let ids = |key: &str| -> Vec<u32> {
            case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let request = ChatRequest::new(request["prompt"].as_str().unwrap())
            .history(history)
            .max_new_tokens(20)
            .greedy();
        (
            request,
            ids("prompt_token_ids"),
            ids("greedy_token_ids_until_stop"),
        )
    }

    #[test]
    fn llama_cpp_glm4_files_reproduce_the_reference() {
        let dir = tempfile::tempdir().unwrap();
        for (file, cases) in [
            (
                "glm4-chat-f32.gguf",
                ["glm4_chat_multi_turn.json", "glm4_chat_tricky_content.json"],
            ),
            (
                "glm4-0414-f32.gguf",
                ["glm4_0414_multi_turn.json", "glm4_0414_tricky_content.json"],
            ),
        ] {
            let path = dir.path().join(file);
            if file.contains("0414") {
                write_0414(&path);
            } else {
                write_chat(&path, GgmlDType::F32);
            }
            let engine = Engine::load(&path).expect("llama.cpp file loads");
            assert_eq!(engine.family(), ModelFamily::Glm4);
            for name in cases {
                let (request, prompt, greedy) = case(name);
                let outcome = engine.chat(&request).unwrap();
                assert_eq!(
                    outcome.prompt_token_ids, prompt,
                    "{file} {name}: prompt ids"
                );
                assert_eq!(
                    outcome.completion_token_ids, greedy,
                    "{file} {name}: greedy ids"
                );
            }
        }
        // Quantized files keep their blocks (and say so).
        let path = dir.path().join("glm4-chat-q8_0.gguf");
        write_chat(&path, GgmlDType::Q8_0);
        let engine = Engine::load(&path).expect("q8_0 file loads");
        assert_eq!(engine.quantization(), Some(Quantization::Q8_0));
        let (request, prompt, _) = case("glm4_chat_user_only_en.json");
        assert_eq!(engine.chat(&request).unwrap().prompt_token_ids, prompt);
    }
}
