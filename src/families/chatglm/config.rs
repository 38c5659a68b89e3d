//! ChatGLM's `config.json` (ChatGLM2, ChatGLM3 and glm-4-9b-chat all use this schema).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chat::generation::TokenIds;
use crate::error::{Error, Result};
use crate::formats::json::read_json;
use crate::nn::spec::ArchSpec;

/// The architecture hyper-parameters of a checkpoint in ChatGLM's layout (ChatGLM2, ChatGLM3,
/// glm-4-9b-chat), read from `config.json`.
///
/// Field names are the JSON keys. Keys that older checkpoints lack have the defaults the official
/// `configuration_chatglm.py` uses.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatGlmConfig {
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Size of one attention head (`hidden_size / num_attention_heads` when absent).
    #[serde(default)]
    pub kv_channels: Option<usize>,
    /// Whether keys and values use fewer heads than queries.
    #[serde(default)]
    pub multi_query_attention: bool,
    /// Number of key/value heads when `multi_query_attention` is set.
    #[serde(default = "default_one")]
    pub multi_query_group_num: usize,
    /// Inner width of the SwiGLU MLP.
    pub ffn_hidden_size: usize,
    /// Rows of the embedding and output matrices (may exceed the tokenizer's id count).
    pub padded_vocab_size: usize,
    /// The context length the model was trained for.
    #[serde(default = "default_seq_length")]
    pub seq_length: usize,
    /// Epsilon of the RMSNorm layers.
    #[serde(default = "default_eps")]
    pub layernorm_epsilon: f64,
    /// RMSNorm (true for every ChatGLM2/3 checkpoint) or LayerNorm.
    #[serde(default = "default_true")]
    pub rmsnorm: bool,
    /// Whether the query/key/value projection has a bias.
    #[serde(default)]
    pub add_qkv_bias: bool,
    /// Whether the other linear layers have biases.
    #[serde(default)]
    pub add_bias_linear: bool,
    /// Whether residuals branch after the layer norm instead of before.
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    /// Whether the final layer norm exists.
    #[serde(default = "default_true")]
    pub post_layer_norm: bool,
    /// Scales the RoPE base (ChatGLM3-6B-32k and GLM-4 set it).
    #[serde(default = "default_rope_ratio")]
    pub rope_ratio: f64,
    /// The name the checkpoint was published under (used to tell model families apart).
    #[serde(default, rename = "_name_or_path")]
    pub name_or_path: Option<String>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Whether the output layer reuses the embedding table (never in THUDM's checkpoints;
    /// llama.cpp files without an output tensor).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_one() -> usize {
    1
}
fn default_seq_length() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_rope_ratio() -> f64 {
    1.0
}

impl ChatGlmConfig {
    /// Reads and checks `config.json`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read, [`Error::Json`] when it is not a ChatGLM config,
    /// [`Error::InvalidConfig`] when sizes are zero or inconsistent.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: ChatGlmConfig = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Parses and checks a `config.json` already read from `path`.
    pub(crate) fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let config: ChatGlmConfig =
            serde_json::from_slice(bytes).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// The transformer this config describes.
    pub fn arch_spec(&self) -> ArchSpec {
        ArchSpec {
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            ffn_hidden_size: self.ffn_hidden_size,
            vocab_size: self.padded_vocab_size,
            max_positions: self.seq_length,
            norm_eps: self.layernorm_epsilon,
            // THUDM's RotaryEmbedding(kv_channels // 2, rope_ratio): half of each head rotates.
            rope_base: 10_000.0 * self.rope_ratio,
            rotary_dims: self.head_dim() / 2,
            qkv_bias: self.add_qkv_bias,
            linear_bias: self.add_bias_linear,
            residual_post_norm: self.apply_residual_connection_post_layernorm,
            final_norm: self.post_layer_norm,
            sandwich_norms: false,
            tied_embeddings: self.tie_word_embeddings,
        }
    }

    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field, value: usize, reason| Error::InvalidConfig {
            path: path.to_path_buf(),
            field,
            value: value.to_string(),
            reason,
        };
        for (field, value) in [
            ("num_layers", self.num_layers),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("ffn_hidden_size", self.ffn_hidden_size),
            ("padded_vocab_size", self.padded_vocab_size),
            ("seq_length", self.seq_length),
            ("multi_query_group_num", self.multi_query_group_num),
        ] {
            if value == 0 {
                return Err(bad(field, value, "must be positive"));
            }
        }
        if self.kv_channels.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(bad(
                "hidden_size",
                self.hidden_size,
                "must be a multiple of num_attention_heads when kv_channels is absent",
            ));
        }
        if !self.head_dim().is_multiple_of(4) {
            return Err(bad(
                "kv_channels",
                self.head_dim(),
                "must be a multiple of 4 (half of each head is rotated in pairs)",
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(bad(
                "multi_query_group_num",
                self.kv_heads(),
                "must divide num_attention_heads",
            ));
        }
        if !self.rmsnorm {
            return Err(bad(
                "rmsnorm",
                0,
                "only RMSNorm checkpoints (every ChatGLM2/3 release) are supported",
            ));
        }
        if !(self.rope_ratio.is_finite() && self.rope_ratio > 0.0) {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                field: "rope_ratio",
                value: self.rope_ratio.to_string(),
                reason: "must be a positive number",
            });
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.kv_channels
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Number of key/value heads (groups).
    pub fn kv_heads(&self) -> usize {
        if self.multi_query_attention {
            self.multi_query_group_num
        } else {
            self.num_attention_heads
        }
    }
}
