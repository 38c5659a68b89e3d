//! Reading llama.cpp's own GGUF files of ChatGLM3 (architecture `chatglm`, as its
//! `convert_hf_to_gguf.py` writes them).
//!
//! Such a file carries no `config.json` and no `tokenizer.model`: the config comes from the
//! `chatglm.*` keys, the sentencepiece vocabulary from `tokenizer.ggml.tokens`, `.scores` and
//! `.token_type` (whose type numbers are sentencepiece's own), and the tensors have llama.cpp's
//! names (`blk.N.attn_qkv.weight`...), renamed to the checkpoint's when the file is read. The
//! math needs no change: the converter neither permutes nor splits anything, and llama.cpp's
//! "normal" RoPE over the first `rope.dimension_count` dimensions is ChatGLM's rotation of
//! adjacent pairs in the first half of each head.
//!
//! GLM-4 files (`tokenizer.ggml.model = "gpt2"`) are refused with a clear error: chathub has no
//! GLM-4 tokenizer yet.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use prost::Message as _;

use crate::error::{Error, Result};
use crate::families::config::{GenerationDefaults, ModelConfig};
use crate::families::ModelFamily;
use crate::formats::gguf::GgufModel;
use crate::nn::quantization::Quantization;
use crate::tokenizer::model_proto::{
    ModelProto, NormalizerSpec, SentencePiece, TrainerSpec, MODEL_TYPE_BPE,
};
use crate::tokenizer::SPECIAL_TOKENS;

/// `general.architecture` of llama.cpp's ChatGLM files.
pub(crate) const ARCHITECTURE: &str = "chatglm";

/// Whether `content` is a llama.cpp ChatGLM file.
pub(crate) fn is_llama_cpp(content: &Content) -> bool {
    matches!(
        content.metadata.get("general.architecture"),
        Some(Value::String(arch)) if arch == ARCHITECTURE
    )
}

/// Reads the model description of a llama.cpp ChatGLM3 file whose header is `content`, and
/// renames its tensors to the checkpoint's names.
pub(crate) fn read(path: &Path, mut content: Content, file: File) -> Result<GgufModel> {
    let meta = Metadata {
        path,
        content: &content,
    };
    let tokenizer = meta.text("tokenizer.ggml.model")?;
    if tokenizer != "llama" {
        return Err(meta.invalid(
            "tokenizer.ggml.model",
            tokenizer,
            "only ChatGLM3 files (sentencepiece, \"llama\") are supported; GLM-4's tokenizer is not",
        ));
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
    let has_bias = content.tensor_infos.contains_key("blk.0.attn_qkv.bias");
    let config = serde_json::json!({
        "_name_or_path": meta_name(&content),
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
        "add_qkv_bias": has_bias,
        "add_bias_linear": false,
        "post_layer_norm": true,
        "original_rope": true,
        "rope_ratio": freq_base / 10_000.0,
        "eos_token_id": meta.count("tokenizer.ggml.eos_token_id").unwrap_or(2),
    });
    let config: ModelConfig = serde_json::from_value(config).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    config.validate(path)?;
    let tokenizer_model = sentencepiece_model(&meta, tokens)?;
    let quantization =
        content
            .tensor_infos
            .get("blk.0.attn_qkv.weight")
            .and_then(|info| match info.ggml_dtype {
                GgmlDType::Q8_0 => Some(Quantization::Q8_0),
                GgmlDType::Q4_0 => Some(Quantization::Q4_0),
                GgmlDType::Q4K => Some(Quantization::Q4K),
                _ => None,
            });
    rename_tensors(&mut content);
    Ok(GgufModel {
        content,
        file,
        config,
        defaults: GenerationDefaults::default(),
        family: ModelFamily::ChatGlm3,
        quantization,
        tokenizer_model,
    })
}

fn meta_name(content: &Content) -> String {
    match content.metadata.get("general.name") {
        Some(Value::String(name)) => name.clone(),
        _ => "chatglm3 (llama.cpp GGUF)".into(),
    }
}

/// Metadata lookups that name the file and key when something is missing.
struct Metadata<'a> {
    path: &'a Path,
    content: &'a Content,
}

impl Metadata<'_> {
    fn invalid(
        &self,
        field: &'static str,
        value: impl Into<String>,
        reason: &'static str,
    ) -> Error {
        Error::InvalidConfig {
            path: self.path.to_path_buf(),
            field,
            value: value.into(),
            reason,
        }
    }

    fn get(&self, key: &'static str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.invalid(key, "missing", "llama.cpp ChatGLM files have this key"))
    }

    fn text(&self, key: &'static str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.invalid(key, format!("{other:?}"), "expected a string")),
        }
    }

    fn count(&self, key: &'static str) -> Result<usize> {
        let n = match self.get(key)? {
            Value::U8(n) => Some(*n as u64),
            Value::U16(n) => Some(*n as u64),
            Value::U32(n) => Some(*n as u64),
            Value::U64(n) => Some(*n),
            Value::I32(n) => u64::try_from(*n).ok(),
            Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        n.map(|n| n as usize)
            .ok_or_else(|| self.invalid(key, "not a count", "expected a non-negative integer"))
    }

    fn float(&self, key: &'static str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            other => Err(self.invalid(key, format!("{other:?}"), "expected a number")),
        }
    }

    fn array(&self, key: &'static str) -> Result<&[Value]> {
        match self.get(key)? {
            Value::Array(values) => Ok(values),
            _ => Err(self.invalid(key, "not an array", "expected an array")),
        }
    }

    fn strings(&self, key: &'static str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.invalid(key, "non-string item", "expected strings")),
            })
            .collect()
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

/// The checkpoint's name for a llama.cpp tensor name (`None` for names ChatGLM does not use).
fn checkpoint_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("transformer.embedding.word_embeddings.weight"),
        "output_norm.weight" => Some("transformer.encoder.final_layernorm.weight"),
        "output.weight" => Some("transformer.output_layer.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_qkv.weight" => "self_attention.query_key_value.weight",
        "attn_qkv.bias" => "self_attention.query_key_value.bias",
        "attn_output.weight" => "self_attention.dense.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_up.weight" => "mlp.dense_h_to_4h.weight",
        "ffn_down.weight" => "mlp.dense_4h_to_h.weight",
        _ => return None,
    };
    Some(format!("transformer.encoder.layers.{layer}.{part}"))
}

/// Renames the tensors to the checkpoint's names; without an `output.weight`, the output layer
/// is the embedding table (llama.cpp ties them in that case too).
fn rename_tensors(content: &mut Content) {
    let infos = std::mem::take(&mut content.tensor_infos);
    for (name, info) in infos {
        let name = checkpoint_name(&name).unwrap_or(name);
        content.tensor_infos.insert(name, info);
    }
    let output = "transformer.output_layer.weight";
    if !content.tensor_infos.contains_key(output) {
        if let Some(embedding) = content
            .tensor_infos
            .get("transformer.embedding.word_embeddings.weight")
        {
            let tied = TensorInfo {
                ggml_dtype: embedding.ggml_dtype,
                shape: embedding.shape.clone(),
                offset: embedding.offset,
            };
            content.tensor_infos.insert(output.to_string(), tied);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::{ChatRequest, Engine, Message};

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
            let Some(short) = name.strip_prefix("transformer.") else {
                continue;
            };
            let gguf = match short {
                "embedding.word_embeddings.weight" => "token_embd.weight".to_string(),
                "encoder.final_layernorm.weight" => "output_norm.weight".to_string(),
                "output_layer.weight" => "output.weight".to_string(),
                "rotary_pos_emb.inv_freq" => continue,
                _ => {
                    let rest = short.strip_prefix("encoder.layers.").unwrap();
                    let (layer, part) = rest.split_once('.').unwrap();
                    let part = match part {
                        "input_layernorm.weight" => "attn_norm.weight",
                        "self_attention.query_key_value.weight" => "attn_qkv.weight",
                        "self_attention.query_key_value.bias" => "attn_qkv.bias",
                        "self_attention.dense.weight" => "attn_output.weight",
                        "post_attention_layernorm.weight" => "ffn_norm.weight",
                        "mlp.dense_h_to_4h.weight" => "ffn_up.weight",
                        "mlp.dense_4h_to_h.weight" => "ffn_down.weight",
                        other => panic!("unexpected tensor {other}"),
                    };
                    format!("blk.{layer}.{part}")
                }
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

    #[test]
    fn a_glm4_file_is_refused_by_name() {
        let path = std::env::temp_dir().join(format!("chathub-glm4-{}.gguf", std::process::id()));
        let metadata = [
            ("general.architecture", Value::String("chatglm".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut File::create(&path).unwrap(), &metadata, &[]).unwrap();
        let error = Engine::load(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(
            error.contains("tokenizer.ggml.model") && error.contains("GLM-4"),
            "{error}"
        );
    }

    #[test]
    fn tensor_names_map_to_the_checkpoints() {
        assert_eq!(
            checkpoint_name("blk.27.attn_qkv.bias").as_deref(),
            Some("transformer.encoder.layers.27.self_attention.query_key_value.bias")
        );
        assert_eq!(
            checkpoint_name("output.weight").as_deref(),
            Some("transformer.output_layer.weight")
        );
        assert_eq!(checkpoint_name("blk.x.attn_qkv.weight"), None);
        assert_eq!(checkpoint_name("rope_freqs.weight"), None);
    }
}
