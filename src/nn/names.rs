//! Where each of the transformer's tensors is stored: one table per checkpoint layout.
//!
//! The same GLM block is published under several naming schemes (ChatGLM's
//! `transformer.encoder.layers.N.self_attention.query_key_value`, transformers' `model.layers.N
//! .self_attn.q_proj`, llama.cpp's `blk.N.attn_qkv`). A family names its layout's table once;
//! loading, GGUF export, the synthetic model writer and the llama.cpp import all read it, so a
//! tensor name is written down in exactly one place.

/// Where the query/key/value projection is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QkvNames {
    /// One fused matrix whose rows are q, then k, then v.
    Fused(&'static str),
    /// Three matrices; `fused` names the fused form some converters write instead (and what an
    /// export of a fused layer is called in this layout).
    Split {
        q: &'static str,
        k: &'static str,
        v: &'static str,
        fused: &'static str,
    },
}

/// A checkpoint layout's tensor names. Per-layer names are relative to `layer`, where `{i}`
/// stands for the block's index; every name is completed with `.weight` or `.bias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorNames {
    /// The layout's name in chathub's own GGUF files (`chathub.layout`).
    pub id: &'static str,
    pub embedding: &'static str,
    /// Prefix of block `{i}`'s tensors.
    pub layer: &'static str,
    pub input_norm: &'static str,
    pub qkv: QkvNames,
    pub attention_output: &'static str,
    /// The norm before the MLP.
    pub post_attention_norm: &'static str,
    /// The fused gate/up projection (`[2 * ffn, hidden]`, gate rows first).
    pub mlp_gate_up: &'static str,
    pub mlp_down: &'static str,
    /// GLM-4-0414's norm on the attention output (sandwich norms).
    pub post_self_attention_norm: Option<&'static str>,
    /// GLM-4-0414's norm on the MLP output (sandwich norms).
    pub post_mlp_norm: Option<&'static str>,
    pub final_norm: &'static str,
    pub output: &'static str,
}

impl TensorNames {
    /// `{prefix}.weight` / `.bias` of a whole-model tensor.
    pub(crate) fn global(&self, prefix: &str, suffix: &str) -> String {
        format!("{prefix}.{suffix}")
    }

    /// `{layer}.{part}.{suffix}` for block `i`.
    pub(crate) fn layer(&self, i: usize, part: &str, suffix: &str) -> String {
        format!(
            "{}.{part}.{suffix}",
            self.layer.replace("{i}", &i.to_string())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPLIT: TensorNames = TensorNames {
        id: "test-split",
        embedding: "model.embed_tokens",
        layer: "model.layers.{i}",
        input_norm: "input_layernorm",
        qkv: QkvNames::Split {
            q: "self_attn.q_proj",
            k: "self_attn.k_proj",
            v: "self_attn.v_proj",
            fused: "self_attn.qkv_proj",
        },
        attention_output: "self_attn.o_proj",
        post_attention_norm: "post_attention_layernorm",
        mlp_gate_up: "mlp.gate_up_proj",
        mlp_down: "mlp.down_proj",
        post_self_attention_norm: Some("post_self_attn_layernorm"),
        post_mlp_norm: Some("post_mlp_layernorm"),
        final_norm: "model.norm",
        output: "lm_head",
    };

    const FUSED: TensorNames = TensorNames {
        id: "test-fused",
        embedding: "token_embd",
        layer: "blk.{i}",
        input_norm: "attn_norm",
        qkv: QkvNames::Fused("attn_qkv"),
        attention_output: "attn_output",
        post_attention_norm: "ffn_norm",
        mlp_gate_up: "ffn_up",
        mlp_down: "ffn_down",
        post_self_attention_norm: None,
        post_mlp_norm: None,
        final_norm: "output_norm",
        output: "output",
    };

    #[test]
    fn names_carry_between_layouts() {
        let t = |name: &str| SPLIT.translate(name, &FUSED);
        assert_eq!(
            t("model.layers.27.self_attn.qkv_proj.bias").as_deref(),
            Some("blk.27.attn_qkv.bias")
        );
        assert_eq!(
            t("model.layers.3.mlp.down_proj.weight").as_deref(),
            Some("blk.3.ffn_down.weight")
        );
        assert_eq!(t("lm_head.weight").as_deref(), Some("output.weight"));
        // Split parts and sandwich norms have no fused-layout name.
        assert_eq!(t("model.layers.0.self_attn.q_proj.weight"), None);
        assert_eq!(t("model.layers.0.post_mlp_layernorm.weight"), None);
        assert_eq!(t("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(t("rope_freqs.weight"), None);
        assert_eq!(
            FUSED.translate("blk.1.attn_qkv.weight", &SPLIT).as_deref(),
            Some("model.layers.1.self_attn.qkv_proj.weight")
        );
    }
}

/// One tensor's role in a layout, so a name can be carried from one layout to another (tests
/// write files in other tools' layouts with it).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Embedding,
    FinalNorm,
    Output,
    Layer(usize, Part),
}

#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    InputNorm,
    Qkv,
    Q,
    K,
    V,
    AttentionOutput,
    PostAttentionNorm,
    MlpGateUp,
    MlpDown,
    PostSelfAttentionNorm,
    PostMlpNorm,
}

#[cfg(test)]
impl TensorNames {
    fn parts(&self) -> Vec<(Part, &'static str)> {
        let mut parts = vec![
            (Part::InputNorm, self.input_norm),
            (Part::AttentionOutput, self.attention_output),
            (Part::PostAttentionNorm, self.post_attention_norm),
            (Part::MlpGateUp, self.mlp_gate_up),
            (Part::MlpDown, self.mlp_down),
        ];
        match self.qkv {
            QkvNames::Fused(fused) => parts.push((Part::Qkv, fused)),
            QkvNames::Split { q, k, v, fused } => {
                parts.extend([(Part::Qkv, fused), (Part::Q, q), (Part::K, k), (Part::V, v)])
            }
        }
        if let Some(name) = self.post_self_attention_norm {
            parts.push((Part::PostSelfAttentionNorm, name));
        }
        if let Some(name) = self.post_mlp_norm {
            parts.push((Part::PostMlpNorm, name));
        }
        parts
    }

    /// What `name` (without `.weight`/`.bias`) is in this layout.
    fn role(&self, name: &str) -> Option<Role> {
        for (role, prefix) in [
            (Role::Embedding, self.embedding),
            (Role::FinalNorm, self.final_norm),
            (Role::Output, self.output),
        ] {
            if name == prefix {
                return Some(role);
            }
        }
        let (before, after) = self.layer.split_once("{i}")?;
        let rest = name.strip_prefix(before)?;
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let index: usize = rest[..digits].parse().ok()?;
        let part = rest[digits..].strip_prefix(after)?.strip_prefix('.')?;
        let (part, _) = self.parts().into_iter().find(|(_, p)| *p == part)?;
        Some(Role::Layer(index, part))
    }

    fn name_of(&self, role: Role) -> Option<String> {
        match role {
            Role::Embedding => Some(self.embedding.to_string()),
            Role::FinalNorm => Some(self.final_norm.to_string()),
            Role::Output => Some(self.output.to_string()),
            Role::Layer(i, part) => {
                let (_, name) = self.parts().into_iter().find(|(p, _)| *p == part)?;
                Some(format!(
                    "{}.{name}",
                    self.layer.replace("{i}", &i.to_string())
                ))
            }
        }
    }

    /// The name in layout `to` of the tensor this layout calls `name` (with its `.weight` or
    /// `.bias`), or `None` when `to` has no such tensor.
    pub(crate) fn translate(&self, name: &str, to: &TensorNames) -> Option<String> {
        let (stem, suffix) = name.rsplit_once('.')?;
        let role = self.role(stem)?;
        Some(format!("{}.{suffix}", to.name_of(role)?))
    }
}
