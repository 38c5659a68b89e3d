//! The ChatGLM2 / ChatGLM3 transformer.
//!
//! Follows THUDM's `modeling_chatglm.py` (chatglm2-6b and chatglm3-6b revisions): RMSNorm,
//! grouped multi-query attention with a fused query/key/value projection, rotary embeddings
//! applied to interleaved pairs of the first half of each head, and a SwiGLU MLP. Tensor names
//! are the checkpoint's.
//!
//! Unlike candle-transformers' `chatglm`/`glm4`, the key/value cache belongs to the request
//! ([`KvCache`]), not to the model, so one loaded model serves concurrent conversations; the
//! position offset is explicit, so several new tokens can extend a non-empty cache; and K/V are
//! never expanded to all heads: each group's queries attend to the group's keys (on an AVX-512
//! CPU through [`crate::kernels::attention`], which reads each cached row once per run of heads;
//! elsewhere in one candle matmul per group).

use std::sync::Arc;

use candle_core::{DType, Device, Module, Storage, Tensor};

use candle_core::quantized::QTensor;

use super::linear::{export_dense, Linear};
use crate::error::Result;
use crate::families::config::ModelConfig;
use crate::formats::weights::{Matrix, Weights};
use crate::kernels::{attention, elementwise};
use crate::Quantization;

/// cos/sin tables for every position, shared by all layers.
///
/// Pairs beyond the rotated half of a head get cos = 1 and sin = 0, so one interleaved rotary
/// kernel covers the whole head and the second half passes through unchanged.
#[derive(Debug)]
struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let rotated_pairs = head_dim / 4;
        let base = 10_000f64 * cfg.rope_ratio;
        let positions = cfg.seq_length;
        let half = head_dim / 2;
        let mut cos = vec![1f32; positions * half];
        let mut sin = vec![0f32; positions * half];
        for i in 0..rotated_pairs {
            // theta_i = base^(-2i / n_elem) with n_elem = head_dim / 2, computed in f32 like the
            // reference, and the angle pos * theta_i in f32 too.
            let exponent = (2 * i) as f32 / half as f32;
            let theta = 1f32 / (base as f32).powf(exponent);
            for pos in 0..positions {
                let angle = pos as f32 * theta;
                cos[pos * half + i] = angle.cos();
                sin[pos * half + i] = angle.sin();
            }
        }
        let cos = Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?;
        Ok(RotaryTables { cos, sin })
    }

    /// Rotates `x: [tokens, heads, head_dim]` for positions `start..start + tokens`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (tokens, heads, head_dim) = x.dims3()?;
        let cos = self.cos.narrow(0, start, tokens)?.unsqueeze(1)?;
        let sin = self.sin.narrow(0, start, tokens)?.unsqueeze(1)?;
        let x = x.contiguous()?.reshape((tokens, heads, 1, head_dim))?;
        let y = candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?;
        Ok(y.reshape((tokens, heads, head_dim))?)
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(cfg: &ModelConfig, weights: &Weights, name: &str) -> Result<Self> {
        Ok(RmsNorm {
            weight: weights.get(&format!("{name}.weight"), &[cfg.hidden_size])?,
            eps: cfg.layernorm_epsilon as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Reads a linear layer. `host_rows` asks for its matrix as a plain host buffer, which a CPU
/// layer repacks in place for its kernel; layers about to be quantized come as tensors instead.
fn linear(
    weights: &Weights,
    name: &str,
    out_features: usize,
    in_features: usize,
    bias: bool,
    host_rows: bool,
) -> Result<Linear> {
    let bias = if bias {
        Some(weights.get(&format!("{name}.bias"), &[out_features])?)
    } else {
        None
    };
    let weight_name = format!("{name}.weight");
    match weights.get_matrix(&weight_name, &[out_features, in_features], host_rows)? {
        Matrix::Dense(weight) => Ok(Linear::new(weight, bias)),
        Matrix::Rows(rows) => Ok(Linear::from_rows(rows, out_features, in_features, bias)?),
        Matrix::Quantized(qtensor) => Ok(Linear::from_quantized(qtensor, bias)?),
        Matrix::Blocks(blocks) => Ok(Linear::from_blocks(blocks, bias)),
    }
}

/// Quantizes one layer, saying so when its shape forces another format than the one asked for.
fn quantize_linear(layer: &mut Linear, name: &str, quantization: Quantization) -> Result<()> {
    let wanted = quantization.candidates()[0];
    match layer.quantize(quantization)? {
        Some(used) if used == wanted => {}
        Some(used) => tracing::info!(
            layer = name,
            ?wanted,
            ?used,
            "row width is not a multiple of the block size: using another format"
        ),
        None => {
            tracing::warn!(
                layer = name,
                ?wanted,
                "no quantized format fits this matrix's rows: it stays dense"
            );
            layer.pack_dense()?;
        }
    }
    Ok(())
}

#[derive(Debug)]
struct SelfAttention {
    query_key_value: Linear,
    dense: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary: Arc<RotaryTables>,
    span: tracing::Span,
}

impl SelfAttention {
    fn new(
        cfg: &ModelConfig,
        weights: &Weights,
        name: &str,
        rotary: Arc<RotaryTables>,
        host_rows: bool,
    ) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let q_size = cfg.num_attention_heads * head_dim;
        let qkv_size = q_size + 2 * cfg.kv_heads() * head_dim;
        Ok(SelfAttention {
            query_key_value: linear(
                weights,
                &format!("{name}.query_key_value"),
                qkv_size,
                cfg.hidden_size,
                cfg.add_qkv_bias || cfg.add_bias_linear,
                host_rows,
            )?,
            dense: linear(
                weights,
                &format!("{name}.dense"),
                cfg.hidden_size,
                q_size,
                cfg.add_bias_linear,
                host_rows,
            )?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_dim,
            rotary,
            span: tracing::span!(tracing::Level::TRACE, "attn"),
        })
    }

    /// `x: [tokens, hidden]` at positions `cache.len()..`; appends this layer's keys and values.
    fn forward(&self, x: &Tensor, cache: &mut LayerCache, start: usize) -> Result<Tensor> {
        let _enter = self.span.enter();
        let tokens = x.dim(0)?;
        let (hd, q_size, kv_size) = (
            self.head_dim,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        let qkv = self.query_key_value.forward(x)?;
        let q = qkv
            .narrow(1, 0, q_size)?
            .reshape((tokens, self.heads, hd))?;
        let k = qkv
            .narrow(1, q_size, kv_size)?
            .reshape((tokens, self.kv_heads, hd))?;
        let v = qkv
            .narrow(1, q_size + kv_size, kv_size)?
            .reshape((tokens, self.kv_heads, hd))?;
        let q = self.rotary.apply(&q, start)?;
        let k = self.rotary.apply(&k, start)?;
        let (k, v) = cache.append(&k, &v, start)?;
        let context = k.dim(1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some(out) = self.attend_on_cpu(&q, &k, &v, start, scale as f32)? {
            return Ok(self.dense.forward(&out)?);
        }

        // Queries of one group are contiguous heads: [groups, heads_per_group * tokens, hd].
        let per_group = self.heads / self.kv_heads;
        let q =
            q.transpose(0, 1)?
                .contiguous()?
                .reshape((self.kv_heads, per_group * tokens, hd))?;
        // `k`, `v`: [groups, context, hd], a view of the cache whose groups are `capacity` rows
        // apart. candle's CUDA matmul takes only tightly packed batches; the CPU one reads the
        // cache where it lies.
        let (k, v) = if x.device().is_cpu() {
            (k, v)
        } else {
            (k.contiguous()?, v.contiguous()?)
        };
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if tokens > 1 {
            let mask = causal_mask(tokens, start, x.device())?;
            scores = scores
                .reshape((self.kv_heads, per_group, tokens, context))?
                .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                .reshape((self.kv_heads, per_group * tokens, context))?;
        }
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .reshape((self.heads, tokens, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((tokens, q_size))?;
        Ok(self.dense.forward(&out)?)
    }

    /// Attention by [`attention::attend`] where it runs (f32 on an AVX-512 CPU): `q` is
    /// `[tokens, heads, head_dim]`, `k` and `v` the cache's views `[kv_heads, start + tokens,
    /// head_dim]`.
    /// Returns `[tokens, heads * head_dim]`, or `None` for candle's path.
    fn attend_on_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        scale: f32,
    ) -> Result<Option<Tensor>> {
        let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        // Each group's rows packed, groups equally far apart in both.
        let rows_packed =
            |t: &Tensor| t.stride()[1..] == [self.head_dim, 1] && t.stride()[0] == k.stride()[0];
        let runs_here = on_cpu_f32(q)
            && on_cpu_f32(k)
            && on_cpu_f32(v)
            && rows_packed(k)
            && rows_packed(v)
            && attention::available();
        if !runs_here {
            return Ok(None);
        }
        let tokens = q.dim(0)?;
        let q = q.contiguous()?;
        let shape = attention::Shape {
            tokens,
            start,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            group_stride: k.stride()[0],
        };
        let out = {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
                return Ok(None);
            };
            attention::attend(
                &qs.as_slice::<f32>()?[ql.start_offset()..],
                &ks.as_slice::<f32>()?[kl.start_offset()..],
                &vs.as_slice::<f32>()?[vl.start_offset()..],
                shape,
                scale,
            )
        };
        Ok(Some(Tensor::from_vec(
            out,
            (tokens, self.heads * self.head_dim),
            &Device::Cpu,
        )?))
    }
}

/// Additive mask for `tokens` queries at positions `start..` over `start + tokens` keys:
/// 0 where a query may look (keys at or before its own position), -inf elsewhere.
fn causal_mask(tokens: usize, start: usize, device: &Device) -> Result<Tensor> {
    let context = start + tokens;
    let mask: Vec<f32> = (0..tokens)
        .flat_map(|i| {
            (0..context).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (tokens, context), device)?)
}

#[derive(Debug)]
struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    ffn: usize,
    span: tracing::Span,
}

impl Mlp {
    fn new(cfg: &ModelConfig, weights: &Weights, name: &str, host_rows: bool) -> Result<Self> {
        Ok(Mlp {
            dense_h_to_4h: linear(
                weights,
                &format!("{name}.dense_h_to_4h"),
                2 * cfg.ffn_hidden_size,
                cfg.hidden_size,
                cfg.add_bias_linear,
                host_rows,
            )?,
            dense_4h_to_h: linear(
                weights,
                &format!("{name}.dense_4h_to_h"),
                cfg.hidden_size,
                cfg.ffn_hidden_size,
                cfg.add_bias_linear,
                host_rows,
            )?,
            ffn: cfg.ffn_hidden_size,
            span: tracing::span!(tracing::Level::TRACE, "mlp"),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let h = self.dense_h_to_4h.forward(x)?;
        let activated = elementwise::swiglu(&h, self.ffn)?;
        Ok(self.dense_4h_to_h.forward(&activated)?)
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attention: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    residual_post_norm: bool,
}

impl Block {
    fn new(
        cfg: &ModelConfig,
        weights: &Weights,
        name: &str,
        rotary: Arc<RotaryTables>,
        host_rows: bool,
    ) -> Result<Self> {
        Ok(Block {
            input_layernorm: RmsNorm::new(cfg, weights, &format!("{name}.input_layernorm"))?,
            self_attention: SelfAttention::new(
                cfg,
                weights,
                &format!("{name}.self_attention"),
                rotary,
                host_rows,
            )?,
            post_attention_layernorm: RmsNorm::new(
                cfg,
                weights,
                &format!("{name}.post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, weights, &format!("{name}.mlp"), host_rows)?,
            residual_post_norm: cfg.apply_residual_connection_post_layernorm,
        })
    }

    fn quantize(&mut self, quantization: Quantization, name: &str) -> Result<()> {
        let attention = &mut self.self_attention;
        let mlp = &mut self.mlp;
        for (layer, part) in [
            (
                &mut attention.query_key_value,
                "self_attention.query_key_value",
            ),
            (&mut attention.dense, "self_attention.dense"),
            (&mut mlp.dense_h_to_4h, "mlp.dense_h_to_4h"),
            (&mut mlp.dense_4h_to_h, "mlp.dense_4h_to_h"),
        ] {
            quantize_linear(layer, &format!("{name}.{part}"), quantization)?;
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor, cache: &mut LayerCache, start: usize) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(x)?;
        let attn = self.self_attention.forward(&normed, cache, start)?;
        let residual = if self.residual_post_norm { &normed } else { x };
        let x = elementwise::add(residual, &attn)?;
        let normed = self.post_attention_layernorm.forward(&x)?;
        let mlp = self.mlp.forward(&normed)?;
        let residual = if self.residual_post_norm { &normed } else { &x };
        Ok(elementwise::add(residual, &mlp)?)
    }
}

/// A loaded ChatGLM2/ChatGLM3 model. Immutable: share it behind an `Arc` across threads.
#[derive(Debug)]
pub(crate) struct ChatGlmModel {
    word_embeddings: Tensor,
    layers: Vec<Block>,
    final_layernorm: Option<RmsNorm>,
    output_layer: Linear,
    config: ModelConfig,
    device: Device,
    dtype: DType,
}

impl ChatGlmModel {
    /// Builds the model from checkpoint tensors, checking every shape against `cfg`.
    pub(crate) fn load(
        cfg: &ModelConfig,
        weights: &Weights,
        dtype: DType,
        device: &Device,
        quantization: Option<Quantization>,
    ) -> Result<Self> {
        let rotary = Arc::new(RotaryTables::new(cfg, dtype, device)?);
        // A token reads one row of the table, so it is stored as compactly as the weight
        // matrices allow: 16 bits when they are 16-bit or quantized (checkpoints store it in
        // f16 or bf16, so nothing is lost), widened row by row when looked up.
        let embedding_dtype = match (quantization, weights.matrix_dtype()) {
            (Some(_), _) if device.is_cpu() => DType::F16,
            (_, matrix) => matrix,
        };
        let word_embeddings = weights.get_as(
            "transformer.embedding.word_embeddings.weight",
            &[cfg.padded_vocab_size, cfg.hidden_size],
            embedding_dtype,
        )?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let name = format!("transformer.encoder.layers.{i}");
                let mut block =
                    Block::new(cfg, weights, &name, rotary.clone(), quantization.is_none())?;
                // Quantizing each block as it arrives keeps one dense block in memory at most.
                if let Some(q) = quantization {
                    block.quantize(q, &name)?;
                }
                tracing::info!(layer = i + 1, of = cfg.num_layers, "loaded layer");
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layernorm = if cfg.post_layer_norm {
            Some(RmsNorm::new(
                cfg,
                weights,
                "transformer.encoder.final_layernorm",
            )?)
        } else {
            None
        };
        let mut output_layer = linear(
            weights,
            "transformer.output_layer",
            cfg.padded_vocab_size,
            cfg.hidden_size,
            false,
            quantization.is_none(),
        )?;
        if quantization.is_some() {
            // The output layer's errors land on the logits directly: it keeps 8 bits.
            quantize_linear(
                &mut output_layer,
                "transformer.output_layer",
                Quantization::Q8_0,
            )?;
        }
        Ok(ChatGlmModel {
            word_embeddings,
            layers,
            final_layernorm,
            output_layer,
            config: cfg.clone(),
            device: device.clone(),
            dtype,
        })
    }

    /// Every tensor under its checkpoint name, as a GGUF file stores it.
    pub(crate) fn export(&self) -> Result<Vec<(String, Arc<QTensor>)>> {
        let mut out = vec![(
            "transformer.embedding.word_embeddings.weight".to_string(),
            export_dense(&self.word_embeddings)?,
        )];
        let mut linear = |name: String, layer: &Linear| -> Result<()> {
            out.push((format!("{name}.weight"), layer.export_weight()?));
            if let Some(bias) = layer.bias() {
                out.push((format!("{name}.bias"), export_dense(bias)?));
            }
            Ok(())
        };
        for (i, block) in self.layers.iter().enumerate() {
            let p = format!("transformer.encoder.layers.{i}");
            linear(
                format!("{p}.self_attention.query_key_value"),
                &block.self_attention.query_key_value,
            )?;
            linear(
                format!("{p}.self_attention.dense"),
                &block.self_attention.dense,
            )?;
            linear(format!("{p}.mlp.dense_h_to_4h"), &block.mlp.dense_h_to_4h)?;
            linear(format!("{p}.mlp.dense_4h_to_h"), &block.mlp.dense_4h_to_h)?;
        }
        linear("transformer.output_layer".into(), &self.output_layer)?;
        for (i, block) in self.layers.iter().enumerate() {
            let p = format!("transformer.encoder.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                export_dense(&block.input_layernorm.weight)?,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                export_dense(&block.post_attention_layernorm.weight)?,
            ));
        }
        if let Some(norm) = &self.final_layernorm {
            out.push((
                "transformer.encoder.final_layernorm.weight".into(),
                export_dense(&norm.weight)?,
            ));
        }
        Ok(out)
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights read to produce one token (every matrix once; embeddings one row).
    pub(crate) fn weight_bytes_per_token(&self) -> usize {
        let norms =
            self.config.hidden_size * (2 * self.layers.len() + 1) * self.dtype.size_in_bytes();
        self.layers
            .iter()
            .map(|b| {
                b.self_attention.query_key_value.weight_bytes()
                    + b.self_attention.dense.weight_bytes()
                    + b.mlp.dense_h_to_4h.weight_bytes()
                    + b.mlp.dense_4h_to_h.weight_bytes()
            })
            .sum::<usize>()
            + self.output_layer.weight_bytes()
            + norms
    }

    /// An empty cache for one conversation, with room for `capacity` tokens before it grows.
    pub(crate) fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache {
            layers: (0..self.layers.len())
                .map(|_| LayerCache::default())
                .collect(),
            len: 0,
            capacity_hint: capacity.clamp(16, self.config.seq_length),
        }
    }

    /// Runs `ids` at positions `cache.len()..` and returns the logits of the last one as an f32
    /// vector of `padded_vocab_size` entries.
    ///
    /// Any number of ids may extend any cache (prefill in chunks, or continue a conversation).
    pub(crate) fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let start = cache.len;
        let tokens = ids.len();
        if tokens == 0 {
            return Err(crate::Error::invalid(
                "ids",
                0,
                "at least one token is needed",
            ));
        }
        if start + tokens > self.config.seq_length {
            return Err(crate::Error::PromptTooLong {
                prompt_tokens: start + tokens,
                limit: self.config.seq_length,
            });
        }
        let ids_tensor = Tensor::new(ids, &self.device)?;
        let mut x = self
            .word_embeddings
            .index_select(&ids_tensor, 0)?
            .to_dtype(self.dtype)?;
        let wanted = (start + tokens).max(cache.capacity_hint);
        for (block, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            layer_cache.reserve(wanted, &self.config, self.dtype, &self.device)?;
            x = block.forward(&x, layer_cache, start)?;
        }
        cache.len = start + tokens;
        let last = x.narrow(0, tokens - 1, 1)?;
        let last = match &self.final_layernorm {
            Some(norm) => norm.forward(&last)?,
            None => last,
        };
        let logits = self.output_layer.forward(&last)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

/// The keys and values of one conversation: owned by the request, freed when it is dropped.
#[derive(Debug)]
pub(crate) struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity_hint: usize,
}

impl KvCache {
    /// Number of positions computed.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forgets the positions from `len` on; the next forward continues from there.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Memory held by the cache (its allocated capacity, not just the filled part).
    pub(crate) fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// One layer's keys and values, `[kv_heads, capacity, head_dim]`, the first positions filled.
///
/// Storage is preallocated and doubled when full, so appending a token copies only that token.
/// Group-major, so that attention reads each group's keys and values as one stream (with
/// position-major rows, a group's rows alternate with the other groups' and the hardware
/// prefetcher lost track: attention at 2048 tokens of context took twice as long).
#[derive(Debug, Default)]
struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerCache {
    fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0))
    }

    fn reserve(
        &mut self,
        needed: usize,
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let capacity = self.capacity();
        if needed <= capacity {
            return Ok(());
        }
        let new_capacity = needed.max(capacity * 2).min(cfg.seq_length).max(needed);
        let shape = (cfg.kv_heads(), new_capacity, cfg.head_dim());
        let k = Tensor::zeros(shape, dtype, device)?;
        let v = Tensor::zeros(shape, dtype, device)?;
        if let (Some(old_k), Some(old_v)) = (&self.k, &self.v) {
            k.slice_set(old_k, 1, 0)?;
            v.slice_set(old_v, 1, 0)?;
        }
        self.k = Some(k);
        self.v = Some(v);
        Ok(())
    }

    /// Writes `k`, `v` (`[tokens, kv_heads, head_dim]`) at `start` and returns views of all
    /// positions up to the new end, `[kv_heads, end, head_dim]`.
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<(Tensor, Tensor)> {
        let (Some(cache_k), Some(cache_v)) = (&self.k, &self.v) else {
            return Err(crate::Error::invalid(
                "cache",
                "empty",
                "reserve before append",
            ));
        };
        cache_k.slice_set(&k.transpose(0, 1)?.contiguous()?, 1, start)?;
        cache_v.slice_set(&v.transpose(0, 1)?.contiguous()?, 1, start)?;
        let end = start + k.dim(0)?;
        Ok((cache_k.narrow(1, 0, end)?, cache_v.narrow(1, 0, end)?))
    }
}
