//! Reading llama.cpp's own GGUF files of ChatGLM3 (architecture `chatglm` with a
//! sentencepiece tokenizer, as its `convert_hf_to_gguf.py` writes them).
//!
//! Such a file carries no `config.json` and no `tokenizer.model`: the config is rebuilt from
//! the `chatglm.*` keys, the sentencepiece model from `tokenizer.ggml.tokens`, `.scores` and
//! `.token_type` (whose type numbers are sentencepiece's own), and the tensors keep llama.cpp's
//! names ([`super::LLAMA_CPP_NAMES`]). The math needs no change: the converter neither permutes
//! nor splits anything, and llama.cpp's "normal" RoPE over the first `rope.dimension_count`
//! dimensions is ChatGLM's rotation of adjacent pairs in the first half of each head.
//!
//! GLM-4 files of the same architecture (`tokenizer.ggml.model = "gpt2"`) belong to
//! [`crate::families::glm4`].

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use prost::Message as _;

use super::SPECIAL_TOKENS;
use crate::error::Result;
use crate::families::source::Imported;
use crate::families::ModelFamily;
use crate::formats::gguf::Metadata;
use crate::tokenizer::model_proto::{
    ModelProto, NormalizerSpec, SentencePiece, TrainerSpec, MODEL_TYPE_BPE,
};

/// `general.architecture` of llama.cpp's ChatGLM files.
pub(crate) const ARCHITECTURE: &str = "chatglm";

/// Rebuilds the `config.json` and `tokenizer.model` of a llama.cpp ChatGLM3 file; `None` when
/// it is another architecture or tokenizer.
pub(crate) fn import(meta: &Metadata<'_>, architecture: &str) -> Result<Option<Imported>> {
    if architecture != ARCHITECTURE || meta.text("tokenizer.ggml.model")? != "llama" {
        return Ok(None);
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
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
                "ChatGLM rotates half of each head",
            ));
        }
    }
    let freq_base = meta.float("chatglm.rope.freq_base").unwrap_or(10_000.0);
    let tensors = &meta.content.tensor_infos;
    let config = serde_json::json!({
        "_name_or_path": meta_name(meta),
        "model_type": "chatglm",
        "num_layers": meta.count("chatglm.block_count")?,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "kv_channels": head_dim,
        "multi_query_attention": true,
        "multi_query_group_num": meta.count("chatglm.attention.head_count_kv")?,
        "ffn_hidden_size": meta.count("chatglm.feed_forward_length")?,
        "padded_vocab_size": tokens.len(),
        "seq_length": meta.count("chatglm.context_length")?,
        "layernorm_epsilon": meta.float("chatglm.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rmsnorm": true,
        "add_qkv_bias": tensors.contains_key("blk.0.attn_qkv.bias"),
        "add_bias_linear": false,
        "post_layer_norm": true,
        "original_rope": true,
        "rope_ratio": freq_base / 10_000.0,
        // llama.cpp ties the output layer to the embedding when the file has none.
        "tie_word_embeddings": !tensors.contains_key("output.weight"),
        "eos_token_id": meta.count("tokenizer.ggml.eos_token_id").unwrap_or(2),
    });
    let tokenizer_model = sentencepiece_model(meta, tokens)?;
    let files = HashMap::from([
        ("config.json".to_string(), config.to_string().into_bytes()),
        ("tokenizer.model".to_string(), tokenizer_model),
    ]);
    Ok(Some(Imported {
        family: ModelFamily::ChatGlm3,
        layout: super::LLAMA_CPP_NAMES.id.to_string(),
        files,
    }))
}

fn meta_name(meta: &Metadata<'_>) -> String {
    match meta.find("general.name") {
        Some(Value::String(name)) => name.clone(),
        _ => "chatglm3 (llama.cpp GGUF)".into(),
    }
}

/// Rebuilds the sentencepiece model the converter read: the pieces before `[MASK]` with their
/// scores and types, BPE with byte fallback, identity normalization and a dummy prefix (what
/// ChatGLM3's `tokenizer.model` holds). The special tokens after them must be ChatGLM3's.
fn sentencepiece_model(meta: &Metadata<'_>, tokens: Vec<String>) -> Result<Vec<u8>> {
    let scores = meta.array("tokenizer.ggml.scores")?;
    let types = meta.array("tokenizer.ggml.token_type")?;
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(meta.invalid(
            "tokenizer.ggml.scores",
            format!("{} scores, {} types", scores.len(), types.len()),
            "needs one score and one type per token",
        ));
    }
    let vocab = tokens
        .iter()
        .position(|t| t == SPECIAL_TOKENS[0])
        .ok_or_else(|| {
            meta.invalid(
                "tokenizer.ggml.tokens",
                "no [MASK]",
                "not ChatGLM3's vocabulary",
            )
        })?;
    if tokens.get(vocab..vocab + SPECIAL_TOKENS.len())
        != Some(&SPECIAL_TOKENS.map(String::from)[..])
    {
        return Err(meta.invalid(
            "tokenizer.ggml.tokens",
            tokens[vocab..]
                .iter()
                .take(9)
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
            "ChatGLM3's special tokens are not where expected",
        ));
    }
    let mut pieces = Vec::with_capacity(vocab);
    for (id, piece) in tokens.into_iter().take(vocab).enumerate() {
        let score = match &scores[id] {
            Value::F32(s) => *s,
            _ => {
                return Err(meta.invalid("tokenizer.ggml.scores", "not f32", "expected f32 scores"))
            }
        };
        let kind = match &types[id] {
            Value::I32(t) => *t,
            Value::U32(t) => *t as i32,
            _ => {
                return Err(meta.invalid(
                    "tokenizer.ggml.token_type",
                    "not i32",
                    "expected i32 types",
                ))
            }
        };
        // The converter renames sentencepiece's <s> and </s>; their text is never matched.
        let piece = match (id, piece.as_str()) {
            (1, "<bos>") => "<s>".to_string(),
            (2, "<eos>") => "</s>".to_string(),
            _ => piece,
        };
        pieces.push(SentencePiece {
            piece: Some(piece),
            score: Some(score),
            r#type: Some(kind),
        });
    }
    let proto = ModelProto {
        pieces,
        trainer_spec: Some(TrainerSpec {
            model_type: Some(MODEL_TYPE_BPE),
            byte_fallback: Some(true),
            ..TrainerSpec::default()
        }),
        normalizer_spec: Some(NormalizerSpec {
            name: Some("identity".into()),
            add_dummy_prefix: Some(true),
            remove_extra_whitespaces: Some(false),
            escape_whitespaces: Some(true),
            ..NormalizerSpec::default()
        }),
    };
    Ok(proto.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};

    use std::fs::File;
    use std::path::Path;

    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::{ChatRequest, Engine, Message, Quantization};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// Writes the tiny ChatGLM3 fixture the way llama.cpp's `convert_hf_to_gguf.py` does
    /// (`ChatGLMModel`: names, keys, vocabulary arrays), weights in `dtype`.
    fn write_llama_cpp_file(path: &Path, dtype: GgmlDType) {
        let dir = fixtures().join("chatglm3-tiny");
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for shard in [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            tensors.extend(candle_core::safetensors::load(dir.join(shard), &Device::Cpu).unwrap());
        }
        let mut named = Vec::new();
        for (name, tensor) in tensors {
            // The rotary frequencies checkpoints carry are not written.
            let Some(gguf) = super::super::NAMES.translate(&name, &super::super::LLAMA_CPP_NAMES)
            else {
                continue;
            };
            let tensor = tensor.to_dtype(candle_core::DType::F32).unwrap();
            // As the converter does: matrices in the chosen type, vectors in f32.
            let dtype = if tensor.rank() == 2 {
                dtype
            } else {
                GgmlDType::F32
            };
            named.push((gguf, QTensor::quantize(&tensor, dtype).unwrap()));
        }
        let proto =
            ModelProto::decode(&std::fs::read(dir.join("tokenizer.model")).unwrap()[..]).unwrap();
        let mut tokens = Vec::new();
        let mut scores = Vec::new();
        let mut types = Vec::new();
        for (id, piece) in proto.pieces.iter().enumerate() {
            let text = match id {
                0 => "<unk>".to_string(),
                1 => "<bos>".to_string(),
                2 => "<eos>".to_string(),
                _ => piece.piece.clone().unwrap(),
            };
            tokens.push(Value::String(text));
            scores.push(Value::F32(piece.score.unwrap_or(0.0)));
            types.push(Value::I32(piece.r#type.unwrap_or(1)));
        }
        for special in SPECIAL_TOKENS {
            tokens.push(Value::String(special.into()));
            scores.push(Value::F32(0.0));
            types.push(Value::I32(3));
        }
        let metadata = vec![
            ("general.architecture", Value::String("chatglm".into())),
            ("general.name", Value::String("chatglm3-tiny".into())),
            ("chatglm.context_length", Value::U32(2048)),
            ("chatglm.embedding_length", Value::U32(64)),
            ("chatglm.feed_forward_length", Value::U32(128)),
            ("chatglm.block_count", Value::U32(2)),
            ("chatglm.attention.head_count", Value::U32(4)),
            ("chatglm.attention.head_count_kv", Value::U32(2)),
            ("chatglm.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("chatglm.rope.dimension_count", Value::U32(8)),
            ("chatglm.rope.freq_base", Value::F32(10_000.0)),
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.pre", Value::String("chatglm-spm".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.scores", Value::Array(scores)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut file = File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    }

    fn case(name: &str) -> (ChatRequest, Vec<u32>, Vec<u32>) {
        let text = std::fs::read_to_string(fixtures().join("expected").join(name)).unwrap();
        let case: serde_json::Value = serde_json::from_str(&text).unwrap();
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
            .max_new_tokens(case["max_new_tokens"].as_u64().unwrap() as usize)
            .greedy();
        (
            request,
            ids("prompt_token_ids"),
            ids("greedy_token_ids_until_stop"),
        )
    }

    #[test]
    fn a_llama_cpp_chatglm3_file_reproduces_the_reference() {
        let dir = std::env::temp_dir().join(format!("chathub-llama-cpp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chatglm3-tiny-f32.gguf");
        write_llama_cpp_file(&path, GgmlDType::F32);
        let engine = Engine::load(&path).expect("llama.cpp file loads");
        assert_eq!(engine.family(), ModelFamily::ChatGlm3);
        for name in [
            "chatglm3_conv1_en.json",
            "chatglm3_conv2_zh.json",
            "chatglm3_conv3_mixed.json",
        ] {
            let (request, prompt, greedy) = case(name);
            let outcome = engine.chat(&request).unwrap();
            assert_eq!(outcome.prompt_token_ids, prompt, "{name}: prompt ids");
            assert_eq!(outcome.completion_token_ids, greedy, "{name}: greedy ids");
        }

        // Quantized files keep their blocks (and say so).
        let path = dir.join("chatglm3-tiny-q8_0.gguf");
        write_llama_cpp_file(&path, GgmlDType::Q8_0);
        let engine = Engine::load(&path).expect("q8_0 file loads");
        assert_eq!(engine.quantization(), Some(Quantization::Q8_0));
        let (request, prompt, _) = case("chatglm3_conv1_en.json");
        assert_eq!(engine.chat(&request).unwrap().prompt_token_ids, prompt);
        std::fs::remove_dir_all(&dir).ok();
    }
}
