//! transformers' `config.json` for GLM-4's -hf layout (`GlmForCausalLM`, `model_type: glm`) and
//! GLM-4-0414 (`Glm4ForCausalLM`, `model_type: glm4`), as transformers 4.x and 5.x write it.

use std::path::Path;

use serde::Deserialize;

use crate::chat::generation::TokenIds;
use crate::error::{Error, Result};
use crate::nn::spec::ArchSpec;

/// The keys of a transformers GLM config that the model needs.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct HfGlmConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5.x: `{"rope_type": "default", "rope_theta": ..., ...}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// transformers 4.x's name for scaled RoPE; GLM-4 checkpoints leave it null.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn default_positions() -> usize {
    131_072
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

impl HfGlmConfig {
    /// Parses a `config.json` read from `path`.
    pub(crate) fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The transformer this config describes; `sandwich_norms` for GLM-4-0414.
    pub(crate) fn arch_spec(&self, sandwich_norms: bool, path: &Path) -> Result<ArchSpec> {
        let bad = |field: &'static str, value: String, reason: &'static str| Error::InvalidConfig {
            path: path.to_path_buf(),
            field,
            value,
            reason,
        };
        if self.num_attention_heads == 0 {
            return Err(bad("num_attention_heads", "0".into(), "must be positive"));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        let rope = self.rope_parameters.as_ref();
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .or_else(|| {
                self.rope_scaling
                    .as_ref()
                    .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            })
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(bad(
                "rope_type",
                rope_type.to_string(),
                "only GLM-4's plain RoPE is supported",
            ));
        }
        let rope_theta = self
            .rope_theta
            .or_else(|| rope?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0);
        let partial = self
            .partial_rotary_factor
            .or_else(|| rope?.get("partial_rotary_factor")?.as_f64())
            .unwrap_or(0.5);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(bad(
                "partial_rotary_factor",
                partial.to_string(),
                "must be in (0, 1]",
            ));
        }
        Ok(ArchSpec {
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            ffn_hidden_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            max_positions: self.max_position_embeddings,
            norm_eps: self.rms_norm_eps,
            rope_base: rope_theta,
            rotary_dims: (head_dim as f64 * partial) as usize,
            qkv_bias: self.attention_bias,
            linear_bias: false,
            residual_post_norm: false,
            final_norm: true,
            sandwich_norms,
            tied_embeddings: self.tie_word_embeddings,
        })
    }
}
