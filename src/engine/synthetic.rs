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

/// The sentencepiece model of the demo (the 1000-piece BPE test tokenizer, ChatGLM-shaped).
const DEMO_TOKENIZER: &[u8] = include_bytes!("../../assets/demo-tokenizer.model");

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

/// Writes a ChatGLM3-layout model directory with random f16 weights drawn from `seed`:
/// `config.json`, `generation_config.json`, `tokenizer_config.json`, `tokenizer.model`, and
/// safetensors shards of at most `shard_bytes` with `model.safetensors.index.json`.
///
/// The directory is built beside `dir` and renamed into place, so a reader never sees half of
/// it. ``tokenizer_model` must have at most `padded_vocab_size - 9` pieces.
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
    write("config.json", &json(&config_json))?;
    let sp_size = crate::tokenizer::sentencepiece_size(tokenizer_model).map_err(|reason| {
        Error::Tokenizer {
            path: staging.join("tokenizer.model"),
            reason,
        }
    })? as u32;
    write(
        "generation_config.json",
        &json(&serde_json::json!({
            "eos_token_id": [2, sp_size + 6, sp_size + 8],
            "pad_token_id": 0,
            "do_sample": true,
            "temperature": 0.8,
            "top_p": 0.8,
            "max_length": 8192,
        })),
    )?;
    write(
        "tokenizer_config.json",
        &json(&serde_json::json!({
            "name_or_path": config.name_or_path,
            "remove_space": false,
            "do_lower_case": false,
            "tokenizer_class": "ChatGLMTokenizer",
        })),
    )?;
    write("tokenizer.model", tokenizer_model)?;

    let specs = tensor_specs(config);
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
            if spec.name == "transformer.output_layer.weight" {
                tensor = zero_padding_rows(
                    tensor,
                    sp_size as usize + crate::families::chatglm::SPECIAL_TOKENS.len(),
                )?;
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

fn tensor_specs(cfg: &ChatGlmConfig) -> Vec<TensorSpec> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim();
    let qkv = q + 2 * cfg.kv_heads() * cfg.head_dim();
    let ffn = cfg.ffn_hidden_size;
    let spec = |name: String, shape: Vec<usize>, init| TensorSpec { name, shape, init };
    let inv = |fan_in: usize| Init::Normal(1.0 / (fan_in as f32).sqrt());
    let mut specs = vec![
        spec(
            "transformer.embedding.word_embeddings.weight".into(),
            vec![cfg.padded_vocab_size, h],
            Init::Normal(1.0),
        ),
        spec(
            "transformer.rotary_pos_emb.inv_freq".into(),
            vec![cfg.head_dim() / 4],
            Init::InvFreq,
        ),
    ];
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("transformer.encoder.layers.{i}.{s}");
        specs.push(spec(p("input_layernorm.weight"), vec![h], Init::Norm));
        specs.push(spec(
            p("self_attention.query_key_value.weight"),
            vec![qkv, h],
            inv(h),
        ));
        if cfg.add_qkv_bias {
            specs.push(spec(
                p("self_attention.query_key_value.bias"),
                vec![qkv],
                Init::Normal(0.1),
            ));
        }
        specs.push(spec(p("self_attention.dense.weight"), vec![h, q], inv(q)));
        specs.push(spec(
            p("post_attention_layernorm.weight"),
            vec![h],
            Init::Norm,
        ));
        specs.push(spec(
            p("mlp.dense_h_to_4h.weight"),
            vec![2 * ffn, h],
            inv(h),
        ));
        specs.push(spec(p("mlp.dense_4h_to_h.weight"), vec![h, ffn], inv(ffn)));
    }
    specs.push(spec(
        "transformer.encoder.final_layernorm.weight".into(),
        vec![h],
        Init::Norm,
    ));
    specs.push(spec(
        "transformer.output_layer.weight".into(),
        vec![cfg.padded_vocab_size, h],
        Init::Normal(2.0 / (h as f32).sqrt()),
    ));
    specs
}
