//! What the transformer needs to know about a checkpoint, whichever family wrote it.
//!
//! Every supported family (ChatGLM2, ChatGLM3, GLM-4 in its three layouts) runs the same GLM
//! block: RMSNorm, grouped-query attention with rotary embeddings on interleaved pairs of the
//! first part of each head, and a SwiGLU MLP. They differ in sizes, in a few switches (biases,
//! the 0414 "sandwich" norms), in their config keys and in their tensor names. Families turn
//! their own `config.json` into an [`ArchSpec`]; the transformer reads nothing else.

use serde::{Deserialize, Serialize};

/// Sizes and math switches of one GLM-style transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ArchSpec {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (query heads are split evenly among them).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Inner width of the SwiGLU MLP (the fused gate/up projection has twice as many rows).
    pub ffn_hidden_size: usize,
    /// Rows of the embedding and output matrices (may exceed the tokenizer's id count).
    pub vocab_size: usize,
    /// Longest sequence the model accepts (prompt plus reply).
    pub max_positions: usize,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Base of the rotary embedding's frequencies.
    pub rope_base: f64,
    /// How many of each head's dimensions rotate (in interleaved pairs); the rest pass through.
    pub rotary_dims: usize,
    /// Whether the query/key/value projections have biases.
    pub qkv_bias: bool,
    /// Whether the attention output and MLP projections have biases.
    pub linear_bias: bool,
    /// Whether residuals branch after the layer norm instead of before it (never set by a
    /// released checkpoint, but part of ChatGLM's config).
    pub residual_post_norm: bool,
    /// Whether a final RMSNorm precedes the output layer.
    pub final_norm: bool,
    /// GLM-4-0414's extra norms on the attention and MLP outputs, before the residual adds.
    pub sandwich_norms: bool,
    /// Whether the output layer reuses the embedding table (no output tensor is stored).
    pub tied_embeddings: bool,
}

impl ArchSpec {
    /// Rows of the fused query/key/value projection.
    pub fn qkv_rows(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Number of parameters, counted from the shapes the spec implies.
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = 2 * self.num_kv_heads * self.head_dim;
        let norms = if self.sandwich_norms { 4 } else { 2 };
        let per_layer = norms * h
            + (q + kv) * h
            + if self.qkv_bias { q + kv } else { 0 }
            + q * h
            + 3 * self.ffn_hidden_size * h;
        2 * self.vocab_size * h + self.num_layers * per_layer + h
    }

    /// Bytes of f32 key/value cache one token takes (a loaded model's own figure, in the dtype
    /// its caches store, is `Engine::kv_cache_bytes_per_token`).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * 4
    }

    /// Checks the relations the transformer relies on; `Err` names the offending field.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String, &'static str)> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_hidden_size", self.ffn_hidden_size),
            ("vocab_size", self.vocab_size),
            ("max_positions", self.max_positions),
        ] {
            if value == 0 {
                return Err((field, value.to_string(), "must be positive"));
            }
        }
        // Far beyond any released model, and small enough that the sizes computed from them
        // (parameter counts, cache bytes) cannot overflow: a damaged config is an error here,
        // not an allocation the process aborts on.
        for (field, value, limit, reason) in [
            (
                "hidden_size",
                self.hidden_size,
                1 << 17,
                "must be at most 131072",
            ),
            (
                "num_layers",
                self.num_layers,
                1 << 10,
                "must be at most 1024",
            ),
            ("num_heads", self.num_heads, 1 << 12, "must be at most 4096"),
            (
                "num_kv_heads",
                self.num_kv_heads,
                1 << 12,
                "must be at most 4096",
            ),
            ("head_dim", self.head_dim, 1 << 12, "must be at most 4096"),
            (
                "ffn_hidden_size",
                self.ffn_hidden_size,
                1 << 20,
                "must be at most 1048576",
            ),
            (
                "vocab_size",
                self.vocab_size,
                1 << 23,
                "must be at most 8388608",
            ),
            (
                "max_positions",
                self.max_positions,
                1 << 24,
                "must be at most 16777216",
            ),
        ] {
            if value > limit {
                return Err((field, value.to_string(), reason));
            }
        }
        if self.parameter_count() > 1 << 40 {
            return Err((
                "hidden_size",
                self.hidden_size.to_string(),
                "the config describes more than 2^40 parameters",
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err((
                "num_kv_heads",
                self.num_kv_heads.to_string(),
                "must divide the number of query heads",
            ));
        }
        if self.rotary_dims > self.head_dim || !self.rotary_dims.is_multiple_of(2) {
            return Err((
                "rotary_dims",
                self.rotary_dims.to_string(),
                "must be even and at most the head width",
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return Err((
                "rope_base",
                self.rope_base.to_string(),
                "must be a positive number",
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err((
                "norm_eps",
                self.norm_eps.to_string(),
                "must be a non-negative number",
            ));
        }
        Ok(())
    }
}
