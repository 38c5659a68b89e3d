//! Model directories with random weights in the official file layout.
//!
//! The built-in demo model and the benchmark's mid-size model are written by this module and
//! then loaded through the same code path as a real download, so a fresh machine exercises
//! everything without fetching weights. Their text is meaningless.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::chat::generation::TokenIds;
use crate::engine::sampling::SplitMix64;
use crate::error::{Error, Result};
use crate::families::chatglm::config::ChatGlmConfig;
use crate::families::chatglm::{NAMES, SPECIAL_TOKENS};
use crate::nn::names::{QkvNames, TensorNames};
use crate::nn::spec::ArchSpec;
use crate::tokenizer::{sniff, ModelFileKind, GLM4_SPECIAL_TOKENS};

/// The sentencepiece model of the demo (the 1000-piece BPE test tokenizer, ChatGLM-shaped).
const DEMO_TOKENIZER: &[u8] = include_bytes!("../../assets/demo-tokenizer.model");

/// A GLM-4 tiktoken `tokenizer.model` (1200 ranks trained with GLM-4's pre-tokenizer).
const GLM4_TOKENIZER: &[u8] = include_bytes!("../../assets/glm4-tiny-tokenizer.model");

/// glm-4-9b-chat's chat template.
const GLM4_TEMPLATE: &str = include_str!("../../assets/glm4-chat-template.jinja");

/// Bumped whenever the demo's weights or layout change, so stale copies are not reused.
const DEMO_VERSION: u32 = 1;

/// The demo model's architecture: ChatGLM3 in miniature.
pub fn demo_config() -> ChatGlmConfig {
    ChatGlmConfig {
        num_layers: 2,
        hidden_size: 128,
        num_attention_heads: 4,
        kv_channels: Some(32),
        multi_query_attention: true,
        multi_query_group_num: 2,
        ffn_hidden_size: 256,
        padded_vocab_size: 1009,
        seq_length: 2048,
        layernorm_epsilon: 1e-5,
        rmsnorm: true,
        add_qkv_bias: true,
        add_bias_linear: false,
        apply_residual_connection_post_layernorm: false,
        post_layer_norm: true,
        rope_ratio: 1.0,
        name_or_path: Some("chathub/demo-chatglm3-tiny".into()),
        eos_token_id: Some(TokenIds::One(2)),
        tie_word_embeddings: false,
    }
}

/// The benchmark's mid-size ChatGLM3 architecture (about 785M parameters).
pub fn bench_config() -> ChatGlmConfig {
    ChatGlmConfig {
        num_layers: 12,
        hidden_size: 2048,
        num_attention_heads: 16,
        kv_channels: Some(128),
        ffn_hidden_size: 5504,
        padded_vocab_size: 65024,
        seq_length: 8192,
        name_or_path: Some("chathub/bench-chatglm3-785m".into()),
        ..demo_config()
    }
}

/// ChatGLM3-6B's architecture (about 6.2B parameters): what `chathub bench --synthetic 6b`
/// measures memory and speed at without a download.
pub fn chatglm3_6b_config() -> ChatGlmConfig {
    ChatGlmConfig {
        num_layers: 28,
        hidden_size: 4096,
        num_attention_heads: 32,
        ffn_hidden_size: 13696,
        name_or_path: Some("chathub/bench-chatglm3-6b-shape".into()),
        ..bench_config()
    }
}

/// A byte-level BPE tokenizer in GLM-4's tiktoken format (the 1200-rank test tokenizer), for
/// [`write_model_dir`] with [`glm4_9b_config`].
pub fn glm4_tokenizer_model() -> &'static [u8] {
    GLM4_TOKENIZER
}

/// GLM-4-9B's architecture in glm-4-9b-chat's layout (about 9.4B parameters: hidden 4096, 40
/// layers, 2 key/value groups, vocabulary 151552): what `chathub bench --synthetic glm4-9b`
/// measures memory and speed at without a download. Write it with
/// [`glm4_tokenizer_model`].
pub fn glm4_9b_config() -> ChatGlmConfig {
    ChatGlmConfig {
        num_layers: 40,
        hidden_size: 4096,
        num_attention_heads: 32,
        kv_channels: Some(128),
        multi_query_group_num: 2,
        ffn_hidden_size: 13696,
        padded_vocab_size: 151552,
        seq_length: 131072,
        layernorm_epsilon: 1.5625e-07,
        rope_ratio: 500.0,
        name_or_path: Some("chathub/bench-glm-4-9b-shape".into()),
        eos_token_id: None,
        ..demo_config()
    }
}

/// Writes (once) and returns the directory of the built-in demo model, under the system's
/// temporary directory. Safe to call from several processes at once.
///
/// # Errors
///
/// [`Error::Io`] when the directory cannot be written.
pub fn demo_model_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("chathub-demo-v{DEMO_VERSION}"));
    if !dir.join("complete").is_file() {
        write_model_dir(&dir, &demo_config(), DEMO_TOKENIZER, 42, usize::MAX)?;
    }
    Ok(dir)
}

/// Writes a model directory in ChatGLM's layout with random f16 weights drawn from `seed`:
/// `config.json`, `generation_config.json`, `tokenizer_config.json`, `tokenizer.model`, and
/// safetensors shards of at most `shard_bytes` with `model.safetensors.index.json`.
///
/// A sentencepiece `tokenizer_model` makes a ChatGLM3 directory; a GLM-4 tiktoken one (such as
/// [`glm4_tokenizer_model`]) a glm-4-9b-chat directory, with GLM-4's special tokens and chat
/// template. The directory is built beside `dir` and renamed into place, so a reader never
/// sees half of it. The tokenizer's ids must fit in `padded_vocab_size`.
///
/// # Errors
///
/// [`Error::Io`] when a file cannot be written.
pub fn write_model_dir(
    dir: &Path,
    config: &ChatGlmConfig,
    tokenizer_model: &[u8],
    seed: u64,
    shard_bytes: usize,
) -> Result<()> {
    let staging = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = staging.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(path, e))
    };
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();

    let mut config_json = serde_json::to_value(config).map_err(|source| Error::Json {
        path: staging.join("config.json"),
        source,
    })?;
    config_json["model_type"] = "chatglm".into();
    config_json["multi_query_attention"] = true.into();
    config_json["torch_dtype"] = "float16".into();
    let tokenizer_path = staging.join("tokenizer.model");
    // A ChatGLM2/3 directory gets a sentencepiece model, a glm-4-9b-chat one GLM-4's
    // tiktoken file with its special tokens and chat template.
    let (eos, used_rows, tokenizer_config) = if sniff(tokenizer_model) == ModelFileKind::Tiktoken {
        let ranks = tokenizer_model
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u32;
        let special = |text: &str| {
            ranks
                + GLM4_SPECIAL_TOKENS
                    .iter()
                    .position(|t| *t == text)
                    .unwrap_or(0) as u32
        };
        let eos = vec![
            special("<|endoftext|>"),
            special("<|user|>"),
            special("<|observation|>"),
        ];
        let tokenizer_config = serde_json::json!({
            "name_or_path": config.name_or_path,
            "additional_special_tokens": GLM4_SPECIAL_TOKENS,
            "chat_template": GLM4_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "ChatGLM4Tokenizer",
        });
        config_json["eos_token_id"] = eos.clone().into();
        (
            eos,
            ranks as usize + GLM4_SPECIAL_TOKENS.len(),
            tokenizer_config,
        )
    } else {
        let sp_size = crate::tokenizer::sentencepiece_size(tokenizer_model).map_err(|reason| {
            Error::Tokenizer {
                path: tokenizer_path.clone(),
                reason,
            }
        })? as u32;
        let tokenizer_config = serde_json::json!({
            "name_or_path": config.name_or_path,
            "remove_space": false,
            "do_lower_case": false,
            "tokenizer_class": "ChatGLMTokenizer",
        });
        (
            vec![2, sp_size + 6, sp_size + 8],
            sp_size as usize + SPECIAL_TOKENS.len(),
            tokenizer_config,
        )
    };
    write("config.json", &json(&config_json))?;
    write(
        "generation_config.json",
        &json(&serde_json::json!({
            "eos_token_id": eos,
            "pad_token_id": 0,
            "do_sample": true,
            "temperature": 0.8,
            "top_p": 0.8,
            "max_length": 8192,
        })),
    )?;
    write("tokenizer_config.json", &json(&tokenizer_config))?;
    write("tokenizer.model", tokenizer_model)?;

    let names = &NAMES;
    let specs = tensor_specs(&config.arch_spec(), names);
    let mut shards: Vec<Vec<&TensorSpec>> = Vec::new();
    let mut current = 0;
    for spec in &specs {
        let bytes = spec.shape.iter().product::<usize>() * 2;
        match shards.last_mut() {
            Some(shard) if current + bytes <= shard_bytes => shard.push(spec),
            _ => {
                shards.push(vec![spec]);
                current = 0;
            }
        }
        current += bytes;
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let mut tensors = HashMap::new();
        for spec in shard {
            let mut tensor = spec.generate(seed)?;
            if spec.name == names.global(names.output, "weight") {
                tensor = zero_padding_rows(tensor, used_rows)?;
            }
            tensors.insert(spec.name.clone(), tensor);
            weight_map.insert(spec.name.clone(), file.clone().into());
        }
        let path = staging.join(&file);
        candle_core::safetensors::save(&tensors, &path)
            .map_err(|source| Error::Weights { path, source })?;
    }
    if count > 1 {
        write(
            "model.safetensors.index.json",
            &json(&serde_json::json!({ "metadata": {}, "weight_map": weight_map })),
        )?;
    }
    write("complete", b"")?;
    // Directories appear only through this rename, so an existing one is complete (another
    // process got there first) and may be in use: keep it.
    if !dir.join("complete").is_file() {
        if let Err(e) = std::fs::rename(&staging, dir) {
            if !dir.join("complete").is_file() {
                return Err(Error::io(dir, e));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

/// How a tensor is initialised (the fixture generator's scheme).
enum Init {
    /// 1 + 0.1 N(0, 1): norm weights.
    Norm,
    /// scale * N(0, 1).
    Normal(f32),
    /// The unused rotary frequencies checkpoints carry.
    InvFreq,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl TensorSpec {
    fn generate(&self, seed: u64) -> Result<Tensor> {
        let n: usize = self.shape.iter().product();
        let name_seed = self
            .name
            .bytes()
            .fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let values: Vec<f32> = match self.init {
            Init::InvFreq => (0..n)
                .map(|i| 1.0 / 10_000f32.powf((2 * i) as f32 / (2 * n) as f32))
                .collect(),
            Init::Norm => normals(n, name_seed).map(|x| 1.0 + 0.1 * x).collect(),
            Init::Normal(scale) => normals(n, name_seed).map(|x| scale * x).collect(),
        };
        Ok(Tensor::from_vec(values, self.shape.clone(), &Device::Cpu)?.to_dtype(DType::F16)?)
    }
}

/// `n` standard normal draws, generated in parallel chunks that each have their own stream, so
/// the result depends only on `seed`.
fn normals(n: usize, seed: u64) -> impl Iterator<Item = f32> {
    const CHUNK: usize = 1 << 16;
    let chunks: Vec<Vec<f32>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut rng = SplitMix64(seed.wrapping_add((c as u64).wrapping_mul(0x9E37_79B9)));
            let len = CHUNK.min(n - c * CHUNK);
            let mut out = Vec::with_capacity(len);
            while out.len() < len {
                // Box-Muller: two uniforms give two independent normals.
                let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
                let u2 = rng.next_f64();
                let r = (-2.0 * u1.ln()).sqrt();
                let t = std::f64::consts::TAU * u2;
                out.push((r * t.cos()) as f32);
                if out.len() < len {
                    out.push((r * t.sin()) as f32);
                }
            }
            out
        })
        .collect();
    chunks.into_iter().flatten()
}

/// Zeroes the output rows of ids past the tokenizer (`padded_vocab_size` rounds the vocabulary
/// up). A trained checkpoint never produces those ids; with zero logits, greedy decoding of the
/// random model does not either (its real logits are spread around zero and their maximum is
/// positive), so its replies are text that the next prompt carries back, as a real model's are.
fn zero_padding_rows(output: Tensor, used_rows: usize) -> Result<Tensor> {
    let (rows, cols) = output.dims2()?;
    if used_rows >= rows {
        return Ok(output);
    }
    let padding = Tensor::zeros((rows - used_rows, cols), output.dtype(), output.device())?;
    Ok(Tensor::cat(
        &[&output.narrow(0, 0, used_rows)?, &padding],
        0,
    )?)
}

/// Every tensor of a ChatGLM-layout checkpoint of `spec`, named by `names`, with its init.
fn tensor_specs(spec: &ArchSpec, names: &TensorNames) -> Vec<TensorSpec> {
    let h = spec.hidden_size;
    let q = spec.num_heads * spec.head_dim;
    let ffn = spec.ffn_hidden_size;
    let tensor = |name: String, shape: Vec<usize>, init| TensorSpec { name, shape, init };
    let inv = |fan_in: usize| Init::Normal(1.0 / (fan_in as f32).sqrt());
    let mut specs = vec![
        tensor(
            names.global(names.embedding, "weight"),
            vec![spec.vocab_size, h],
            Init::Normal(1.0),
        ),
        // The unused rotary frequencies ChatGLM checkpoints carry.
        tensor(
            "transformer.rotary_pos_emb.inv_freq".into(),
            vec![spec.rotary_dims / 2],
            Init::InvFreq,
        ),
    ];
    let qkv = match names.qkv {
        QkvNames::Fused(fused) | QkvNames::Split { fused, .. } => fused,
    };
    for i in 0..spec.num_layers {
        let layer = |part: &str, suffix: &str| names.layer(i, part, suffix);
        specs.push(tensor(
            layer(names.input_norm, "weight"),
            vec![h],
            Init::Norm,
        ));
        specs.push(tensor(
            layer(qkv, "weight"),
            vec![spec.qkv_rows(), h],
            inv(h),
        ));
        if spec.qkv_bias {
            specs.push(tensor(
                layer(qkv, "bias"),
                vec![spec.qkv_rows()],
                Init::Normal(0.1),
            ));
        }
        specs.push(tensor(
            layer(names.attention_output, "weight"),
            vec![h, q],
            inv(q),
        ));
        specs.push(tensor(
            layer(names.post_attention_norm, "weight"),
            vec![h],
            Init::Norm,
        ));
        specs.push(tensor(
            layer(names.mlp_gate_up, "weight"),
            vec![2 * ffn, h],
            inv(h),
        ));
        specs.push(tensor(
            layer(names.mlp_down, "weight"),
            vec![h, ffn],
            inv(ffn),
        ));
    }
    specs.push(tensor(
        names.global(names.final_norm, "weight"),
        vec![h],
        Init::Norm,
    ));
    specs.push(tensor(
        names.global(names.output, "weight"),
        vec![spec.vocab_size, h],
        Init::Normal(2.0 / (h as f32).sqrt()),
    ));
    specs
}
