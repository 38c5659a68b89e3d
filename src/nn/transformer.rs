//! The GLM transformer every supported family runs: ChatGLM2, ChatGLM3 and GLM-4.
//!
//! Follows THUDM's `modeling_chatglm.py` (chatglm2-6b, chatglm3-6b, glm-4-9b-chat) and
//! transformers' `GlmForCausalLM` / `Glm4ForCausalLM`, which compute the same thing under other
//! names: RMSNorm, grouped-query attention with a (fused or split) query/key/value projection,
//! rotary embeddings applied to interleaved pairs of the first `rotary_dims` of each head, and a
//! SwiGLU MLP; GLM-4-0414 adds a norm on each sub-layer's output ("sandwich" norms). Sizes and
//! switches come from an [`ArchSpec`], tensor names from the layout's [`TensorNames`].
//!
//! Unlike candle-transformers' `chatglm`/`glm4`, the key/value cache belongs to the request
//! ([`KvCache`]), not to the model, so one loaded model serves concurrent conversations; the
//! position offset is explicit, so several new tokens can extend a non-empty cache; and K/V are
//! never expanded to all heads: each group's queries attend to the group's keys (on an AVX-512
//! CPU through [`crate::kernels::attention`], which reads each cached row once per run of
//! heads; elsewhere in one candle matmul per group). Rotary angles are computed for the
//! positions a forward pass covers, so a 131072-token context costs no table at load.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor};

use super::linear::{export_dense, Linear};
use super::names::{QkvNames, TensorNames};
use super::quantization::Quantization;
use super::spec::ArchSpec;
use crate::error::Result;
use crate::formats::weights::{Matrix, Weights};
use crate::kernels::block_matmul::BlockMatrix;
use crate::kernels::{self, attention, elementwise};

/// Rotary frequencies: `theta_i = base^(-2i / rotary_dims)` for each rotated pair `i`.
#[derive(Debug)]
struct Rotary {
    /// One frequency per pair of a head; pairs past the rotated part have none.
    inv_freq: Vec<f32>,
    /// Pairs per head (`head_dim / 2`).
    pairs: usize,
}

impl Rotary {
    fn new(spec: &ArchSpec) -> Self {
        let rotated = spec.rotary_dims / 2;
        // In f32 like the reference (`1 / base ** (arange(0, dim, 2) / dim)`).
        let inv_freq = (0..rotated)
            .map(|i| {
                let exponent = (2 * i) as f32 / spec.rotary_dims as f32;
                1f32 / (spec.rope_base as f32).powf(exponent)
            })
            .collect();
        Rotary {
            inv_freq,
            pairs: spec.head_dim / 2,
        }
    }

    /// cos/sin `[tokens, head_dim / 2]` for the positions of every span in turn (a span is
    /// `start..start + tokens` of one sequence). Pairs beyond the rotated ones get cos = 1 and
    /// sin = 0, so one interleaved rotary kernel covers the whole head and the rest passes
    /// through unchanged.
    fn angles(&self, spans: &[Span], dtype: DType, device: &Device) -> Result<Angles> {
        let tokens: usize = spans.iter().map(|s| s.tokens).sum();
        let mut cos = vec![1f32; tokens * self.pairs];
        let mut sin = vec![0f32; tokens * self.pairs];
        let positions = spans.iter().flat_map(|s| s.start..s.start + s.tokens);
        for (t, pos) in positions.enumerate() {
            let pos = pos as f32;
            for (i, theta) in self.inv_freq.iter().enumerate() {
                // The angle in f32 too, as `pos * theta` in the reference.
                let angle = pos * theta;
                cos[t * self.pairs + i] = angle.cos();
                sin[t * self.pairs + i] = angle.sin();
            }
        }
        let shape = (tokens, self.pairs);
        Ok(Angles {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }
}

/// One sequence's rows in a forward pass: `tokens` new positions from `start` on.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    tokens: usize,
}

/// Rotary cos/sin of one forward pass's positions, shared by all layers.
struct Angles {
    cos: Tensor,
    sin: Tensor,
}

impl Angles {
    /// Rotates `x: [tokens, heads, head_dim]`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, heads, head_dim) = x.dims3()?;
        let cos = self.cos.unsqueeze(1)?;
        let sin = self.sin.unsqueeze(1)?;
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
    fn new(spec: &ArchSpec, weights: &Weights, name: &str) -> Result<Self> {
        Ok(RmsNorm {
            weight: weights.get(&format!("{name}.weight"), &[spec.hidden_size])?,
            eps: spec.norm_eps as f32,
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
    let matrix = weights.get_matrix(
        &format!("{name}.weight"),
        &[out_features, in_features],
        host_rows,
        BlockMatrix::read_ggml,
    )?;
    from_matrix(matrix, out_features, in_features, bias)
}

fn from_matrix(
    matrix: Matrix<BlockMatrix>,
    out_features: usize,
    in_features: usize,
    bias: Option<Tensor>,
) -> Result<Linear> {
    Ok(match matrix {
        Matrix::Dense(weight) => Linear::new(weight, bias),
        Matrix::Rows(rows) => Linear::from_rows(rows, out_features, in_features, bias)?,
        Matrix::Quantized(qtensor) => Linear::from_quantized(qtensor, bias)?,
        Matrix::Blocks(blocks) => Linear::from_blocks(blocks, bias),
    })
}

/// Quantizes one layer, saying so when its shape forces another format than the one asked for.
fn quantize_linear(layer: &mut Linear, name: &str, candidates: &[GgmlDType]) -> Result<()> {
    let wanted = candidates[0];
    match layer.quantize_to(candidates)? {
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

/// The query/key/value projection: one product, or three where a file stores them apart in a
/// form that cannot be joined (quantized blocks).
#[derive(Debug)]
enum Qkv {
    Fused(Linear),
    Split([Linear; 3]),
}

impl Qkv {
    fn load(
        spec: &ArchSpec,
        names: &TensorNames,
        weights: &Weights,
        i: usize,
        host_rows: bool,
    ) -> Result<Self> {
        let h = spec.hidden_size;
        let bias = spec.qkv_bias || spec.linear_bias;
        let (q_rows, kv_rows) = (
            spec.num_heads * spec.head_dim,
            spec.num_kv_heads * spec.head_dim,
        );
        let (q, k, v) = match names.qkv {
            QkvNames::Fused(fused) => {
                let name = names.layer(i, fused, "weight");
                let name = name.trim_end_matches(".weight");
                return Ok(Qkv::Fused(linear(
                    weights,
                    name,
                    spec.qkv_rows(),
                    h,
                    bias,
                    host_rows,
                )?));
            }
            QkvNames::Split { fused, .. } if weights.contains(&names.layer(i, fused, "weight")) => {
                let name = names.layer(i, fused, "weight");
                let name = name.trim_end_matches(".weight");
                return Ok(Qkv::Fused(linear(
                    weights,
                    name,
                    spec.qkv_rows(),
                    h,
                    bias,
                    host_rows,
                )?));
            }
            QkvNames::Split { q, k, v, .. } => (q, k, v),
        };
        let read = |part: &str, rows: usize| -> Result<(Matrix<BlockMatrix>, Option<Tensor>)> {
            let bias = if bias {
                Some(weights.get(&names.layer(i, part, "bias"), &[rows])?)
            } else {
                None
            };
            let matrix = weights.get_matrix(
                &names.layer(i, part, "weight"),
                &[rows, h],
                host_rows,
                BlockMatrix::read_ggml,
            )?;
            Ok((matrix, bias))
        };
        let parts = [read(q, q_rows)?, read(k, kv_rows)?, read(v, kv_rows)?];
        let bias = match (&parts[0].1, &parts[1].1, &parts[2].1) {
            (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
            _ => None,
        };
        // Dense matrices are joined into the fused layout (one product per token); quantized
        // blocks stay three layers.
        match parts {
            [(Matrix::Rows(a), _), (Matrix::Rows(b), _), (Matrix::Rows(c), _)] => {
                let rows = a.concat(b, c)?;
                Ok(Qkv::Fused(Linear::from_rows(
                    rows,
                    spec.qkv_rows(),
                    h,
                    bias,
                )?))
            }
            [(Matrix::Dense(a), _), (Matrix::Dense(b), _), (Matrix::Dense(c), _)] => Ok(
                Qkv::Fused(Linear::new(Tensor::cat(&[&a, &b, &c], 0)?, bias)),
            ),
            [(a, ab), (b, bb), (c, cb)] => Ok(Qkv::Split([
                from_matrix(a, q_rows, h, ab)?,
                from_matrix(b, kv_rows, h, bb)?,
                from_matrix(c, kv_rows, h, cb)?,
            ])),
        }
    }

    fn layers_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Qkv::Fused(l) => vec![l],
            Qkv::Split(ls) => ls.iter_mut().collect(),
        }
    }

    fn layers(&self) -> Vec<&Linear> {
        match self {
            Qkv::Fused(l) => vec![l],
            Qkv::Split(ls) => ls.iter().collect(),
        }
    }

    /// `[tokens, (heads + 2 kv_heads) * head_dim]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Qkv::Fused(l) => Ok(l.forward(x)?),
            Qkv::Split([q, k, v]) => Ok(Tensor::cat(
                &[q.forward(x)?, k.forward(x)?, v.forward(x)?],
                1,
            )?),
        }
    }
}

#[derive(Debug)]
struct SelfAttention {
    qkv: Qkv,
    dense: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl SelfAttention {
    fn new(
        spec: &ArchSpec,
        names: &TensorNames,
        weights: &Weights,
        i: usize,
        host_rows: bool,
    ) -> Result<Self> {
        let q_size = spec.num_heads * spec.head_dim;
        let dense = names.layer(i, names.attention_output, "weight");
        Ok(SelfAttention {
            qkv: Qkv::load(spec, names, weights, i, host_rows)?,
            dense: linear(
                weights,
                dense.trim_end_matches(".weight"),
                spec.hidden_size,
                q_size,
                spec.linear_bias,
                host_rows,
            )?,
            heads: spec.num_heads,
            kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            span: tracing::span!(tracing::Level::TRACE, "attn"),
        })
    }

    /// `x: [tokens, hidden]`, the rows of each of `spans` in turn; appends each sequence's
    /// keys and values to its own cache (`caches[i]` for `spans[i]`). The projections run once
    /// over all rows, attention per sequence over its own cache.
    fn forward(
        &self,
        x: &Tensor,
        caches: &mut [&mut LayerCache],
        spans: &[Span],
        angles: &Angles,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let tokens = x.dim(0)?;
        let (hd, q_size, kv_size) = (
            self.head_dim,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        let qkv = self.qkv.forward(x)?;
        let q = qkv
            .narrow(1, 0, q_size)?
            .reshape((tokens, self.heads, hd))?;
        let k = qkv
            .narrow(1, q_size, kv_size)?
            .reshape((tokens, self.kv_heads, hd))?;
        let v = qkv
            .narrow(1, q_size + kv_size, kv_size)?
            .reshape((tokens, self.kv_heads, hd))?;
        let q = angles.apply(&q)?;
        let k = angles.apply(&k)?;
        // Each sequence's keys and values join its own cache; then it attends over that cache.
        let mut sequences = Vec::with_capacity(spans.len());
        let mut row = 0;
        for (cache, span) in caches.iter_mut().zip(spans) {
            let rows = |t: &Tensor| t.narrow(0, row, span.tokens);
            let (k, v) = cache.append(&rows(&k)?, &rows(&v)?, span.start)?;
            sequences.push(Attending {
                q: rows(&q)?,
                k,
                v,
                span: *span,
            });
            row += span.tokens;
        }
        let out = match self.attend_on_cpu(&sequences)? {
            Some(out) => out,
            None => {
                let mut outs = sequences
                    .iter()
                    .map(|s| self.attend(s))
                    .collect::<Result<Vec<_>>>()?;
                match outs.len() {
                    1 => outs.remove(0),
                    _ => Tensor::cat(&outs, 0)?,
                }
            }
        };
        Ok(self.dense.forward(&out)?)
    }

    /// One sequence's attention by candle's ops, where the CPU kernel does not run (GPUs,
    /// x86 without AVX-512; an f16 cache is widened for it). Returns `[tokens, heads *
    /// head_dim]`.
    fn attend(&self, sequence: &Attending) -> Result<Tensor> {
        let Attending { q, k, v, span } = sequence;
        let Span { start, tokens } = *span;
        let (hd, q_size) = (self.head_dim, self.heads * self.head_dim);
        let context = k.dim(1)?;
        let scale = 1.0 / (hd as f64).sqrt();

        // Queries of one group are contiguous heads: [groups, heads_per_group * tokens, hd].
        let per_group = self.heads / self.kv_heads;
        let q =
            q.transpose(0, 1)?
                .contiguous()?
                .reshape((self.kv_heads, per_group * tokens, hd))?;
        // `k`, `v`: [groups, context, hd], a view of the cache whose groups are `capacity` rows
        // apart. candle's CUDA matmul takes only tightly packed batches; the CPU one reads the
        // cache where it lies.
        let (k, v) = if k.dtype() != q.dtype() {
            // An f16 cache under f32 queries: widened for candle's matmul.
            (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?)
        } else if q.device().is_cpu() {
            (k.clone(), v.clone())
        } else {
            (k.contiguous()?, v.contiguous()?)
        };
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if tokens > 1 {
            let mask = causal_mask(tokens, start, q.device())?;
            scores = scores
                .reshape((self.kv_heads, per_group, tokens, context))?
                .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                .reshape((self.kv_heads, per_group * tokens, context))?;
        }
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        Ok(probs
            .matmul(&v)?
            .reshape((self.heads, tokens, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((tokens, q_size))?)
    }

    /// Every sequence's attention by [`attention::attend`], in one parallel step, where it
    /// runs (f32 queries over an f32 or f16 cache on an AVX-512 CPU). Returns the sequences'
    /// `[tokens, heads * head_dim]` one after another, or `None` for candle's path.
    fn attend_on_cpu(&self, sequences: &[Attending]) -> Result<Option<Tensor>> {
        match sequences.first().map(|s| s.k.dtype()) {
            Some(DType::F16) => self.attend_cached::<half::f16>(sequences),
            _ => self.attend_cached::<f32>(sequences),
        }
    }

    /// [`Transformer::attend_on_cpu`] over caches of `T`.
    fn attend_cached<T>(&self, sequences: &[Attending]) -> Result<Option<Tensor>>
    where
        T: attention::Cached + candle_core::WithDType,
    {
        let on_cpu = |t: &Tensor, dtype| t.device().is_cpu() && t.dtype() == dtype;
        // Each group's rows packed, groups equally far apart in both.
        let rows_packed = |t: &Tensor, k: &Tensor| {
            t.stride()[1..] == [self.head_dim, 1] && t.stride()[0] == k.stride()[0]
        };
        let runs_here = attention::available()
            && sequences.iter().all(|s| {
                on_cpu(&s.q, DType::F32)
                    && on_cpu(&s.k, T::DTYPE)
                    && on_cpu(&s.v, T::DTYPE)
                    && rows_packed(&s.k, &s.k)
                    && rows_packed(&s.v, &s.k)
            });
        if !runs_here {
            return Ok(None);
        }
        let queries = sequences
            .iter()
            .map(|s| s.q.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let storages: Vec<_> = sequences
            .iter()
            .zip(&queries)
            .map(|(s, q)| {
                (
                    q.storage_and_layout(),
                    s.k.storage_and_layout(),
                    s.v.storage_and_layout(),
                )
            })
            .collect();
        let mut parts = Vec::with_capacity(sequences.len());
        for (((qs, ql), (ks, kl), (vs, vl)), s) in storages.iter().zip(sequences) {
            let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&**qs, &**ks, &**vs)
            else {
                return Ok(None);
            };
            parts.push(attention::Sequence {
                q: &qs.as_slice::<f32>()?[ql.start_offset()..],
                k: &ks.as_slice::<T>()?[kl.start_offset()..],
                v: &vs.as_slice::<T>()?[vl.start_offset()..],
                shape: attention::Shape {
                    tokens: s.span.tokens,
                    start: s.span.start,
                    heads: self.heads,
                    kv_heads: self.kv_heads,
                    head_dim: self.head_dim,
                    group_stride: s.k.stride()[0],
                },
            });
        }
        let scale = (1.0 / (self.head_dim as f64).sqrt()) as f32;
        let out = attention::attend(&parts, scale);
        let tokens = sequences.iter().map(|s| s.span.tokens).sum::<usize>();
        Ok(Some(Tensor::from_vec(
            out,
            (tokens, self.heads * self.head_dim),
            &Device::Cpu,
        )?))
    }
}

/// One sequence's part of a layer's attention: its new queries `q` (`[tokens, heads,
/// head_dim]`) at `span`'s positions, and its cache's views `k`, `v` (`[kv_heads, start +
/// tokens, head_dim]`).
struct Attending {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    span: Span,
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
    gate_up: Linear,
    down: Linear,
    ffn: usize,
    span: tracing::Span,
}

impl Mlp {
    fn new(
        spec: &ArchSpec,
        names: &TensorNames,
        weights: &Weights,
        i: usize,
        host_rows: bool,
    ) -> Result<Self> {
        let gate_up = names.layer(i, names.mlp_gate_up, "weight");
        let down = names.layer(i, names.mlp_down, "weight");
        Ok(Mlp {
            gate_up: linear(
                weights,
                gate_up.trim_end_matches(".weight"),
                2 * spec.ffn_hidden_size,
                spec.hidden_size,
                spec.linear_bias,
                host_rows,
            )?,
            down: linear(
                weights,
                down.trim_end_matches(".weight"),
                spec.hidden_size,
                spec.ffn_hidden_size,
                spec.linear_bias,
                host_rows,
            )?,
            ffn: spec.ffn_hidden_size,
            span: tracing::span!(tracing::Level::TRACE, "mlp"),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let h = self.gate_up.forward(x)?;
        let activated = elementwise::swiglu(&h, self.ffn)?;
        Ok(self.down.forward(&activated)?)
    }
}

/// GLM-4-0414's norms on each sub-layer's output.
#[derive(Debug)]
struct SandwichNorms {
    post_self_attention: RmsNorm,
    post_mlp: RmsNorm,
}

#[derive(Debug)]
struct Block {
    input_norm: RmsNorm,
    attention: SelfAttention,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
    sandwich: Option<SandwichNorms>,
    residual_post_norm: bool,
}

impl Block {
    fn new(
        spec: &ArchSpec,
        names: &TensorNames,
        weights: &Weights,
        i: usize,
        host_rows: bool,
    ) -> Result<Self> {
        let norm = |part: &str| {
            let name = names.layer(i, part, "weight");
            RmsNorm::new(spec, weights, name.trim_end_matches(".weight"))
        };
        let sandwich = match (
            spec.sandwich_norms,
            names.post_self_attention_norm,
            names.post_mlp_norm,
        ) {
            (true, Some(attn), Some(mlp)) => Some(SandwichNorms {
                post_self_attention: norm(attn)?,
                post_mlp: norm(mlp)?,
            }),
            (true, _, _) => {
                return Err(crate::Error::invalid(
                    "layout",
                    names.id,
                    "this layout has no sandwich norms",
                ))
            }
            _ => None,
        };
        Ok(Block {
            input_norm: norm(names.input_norm)?,
            attention: SelfAttention::new(spec, names, weights, i, host_rows)?,
            post_attention_norm: norm(names.post_attention_norm)?,
            mlp: Mlp::new(spec, names, weights, i, host_rows)?,
            sandwich,
            residual_post_norm: spec.residual_post_norm,
        })
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut layers = self.attention.qkv.layers_mut();
        layers.push(&mut self.attention.dense);
        layers.push(&mut self.mlp.gate_up);
        layers.push(&mut self.mlp.down);
        layers
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut layers = self.attention.qkv.layers();
        layers.push(&self.attention.dense);
        layers.push(&self.mlp.gate_up);
        layers.push(&self.mlp.down);
        layers
    }

    fn quantize(&mut self, quantization: Quantization, i: usize) -> Result<()> {
        for layer in self.linears_mut() {
            quantize_linear(layer, &format!("layer {i}"), quantization.candidates())?;
        }
        Ok(())
    }

    /// `x`: the rows of every span in turn (see [`SelfAttention::forward`]).
    fn forward(
        &self,
        x: &Tensor,
        caches: &mut [&mut LayerCache],
        spans: &[Span],
        angles: &Angles,
    ) -> Result<Tensor> {
        let normed = self.input_norm.forward(x)?;
        let mut attn = self.attention.forward(&normed, caches, spans, angles)?;
        if let Some(sandwich) = &self.sandwich {
            attn = sandwich.post_self_attention.forward(&attn)?;
        }
        let residual = if self.residual_post_norm { &normed } else { x };
        let x = elementwise::add(residual, &attn)?;
        let normed = self.post_attention_norm.forward(&x)?;
        let mut mlp = self.mlp.forward(&normed)?;
        if let Some(sandwich) = &self.sandwich {
            mlp = sandwich.post_mlp.forward(&mlp)?;
        }
        let residual = if self.residual_post_norm { &normed } else { &x };
        Ok(elementwise::add(residual, &mlp)?)
    }
}

/// A loaded GLM transformer. Immutable: share it behind an `Arc` across threads.
#[derive(Debug)]
pub(crate) struct Transformer {
    embedding: Tensor,
    layers: Vec<Block>,
    final_norm: Option<RmsNorm>,
    output: Linear,
    rotary: Rotary,
    spec: ArchSpec,
    device: Device,
    dtype: DType,
    /// What conversations' caches store keys and values in ([`Transformer::set_cache_dtype`]).
    cache_dtype: DType,
}

/// Multiply-adds (weights read times rows) below which a CPU pass runs on one thread
/// ([`kernels::on_one_thread`]): about 0.2 ms of products on one core, less than what sharing
/// them between threads costs in hand-offs.
const SMALL_PASS_WORK: usize = 8 << 20;

impl Transformer {
    /// Builds the model from checkpoint tensors named by `names`, checking every shape against
    /// `spec`.
    pub(crate) fn load(
        spec: &ArchSpec,
        names: &TensorNames,
        weights: &Weights,
        dtype: DType,
        device: &Device,
        quantization: Option<Quantization>,
    ) -> Result<Self> {
        // A token reads one row of the table, so it is stored as compactly as the weight
        // matrices allow: 16 bits when they are 16-bit or quantized (checkpoints store it in
        // f16 or bf16, so nothing is lost), widened row by row when looked up.
        let embedding_dtype = match (quantization, weights.matrix_dtype()) {
            (Some(_), _) if device.is_cpu() => DType::F16,
            (_, matrix) => matrix,
        };
        let embedding = weights.get_as(
            &names.global(names.embedding, "weight"),
            &[spec.vocab_size, spec.hidden_size],
            embedding_dtype,
        )?;
        let layers = (0..spec.num_layers)
            .map(|i| {
                let mut block = Block::new(spec, names, weights, i, quantization.is_none())?;
                // Quantizing each block as it arrives keeps one dense block in memory at most.
                if let Some(q) = quantization {
                    block.quantize(q, i)?;
                }
                tracing::info!(layer = i + 1, of = spec.num_layers, "loaded layer");
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = if spec.final_norm {
            Some(RmsNorm::new(spec, weights, names.final_norm)?)
        } else {
            None
        };
        let output_name = if spec.tied_embeddings {
            names.embedding
        } else {
            names.output
        };
        let mut output = linear(
            weights,
            output_name,
            spec.vocab_size,
            spec.hidden_size,
            false,
            quantization.is_none(),
        )?;
        if let Some(q) = quantization {
            quantize_linear(&mut output, names.output, q.output_candidates())?;
        }
        Ok(Transformer {
            embedding,
            layers,
            final_norm,
            output,
            rotary: Rotary::new(spec),
            spec: spec.clone(),
            device: device.clone(),
            dtype,
            cache_dtype: dtype,
        })
    }

    /// Makes conversations' caches store keys and values in `dtype`: the compute dtype by
    /// default; f16 on the CPU halves a conversation's memory per token and the bytes a decode
    /// step's attention reads, at the price of rounding them.
    ///
    /// # Errors
    /// A dtype other than f32 or f16.
    pub(crate) fn set_cache_dtype(&mut self, dtype: DType) -> Result<()> {
        Self::check_cache_dtype(dtype)?;
        self.cache_dtype = dtype;
        Ok(())
    }

    /// Whether caches can store `dtype` (f32 or f16), so a loader can refuse before it reads
    /// gigabytes of weights.
    pub(crate) fn check_cache_dtype(dtype: DType) -> Result<()> {
        if matches!(dtype, DType::F32 | DType::F16) {
            return Ok(());
        }
        Err(crate::Error::invalid(
            "kv_cache_dtype",
            format!("{dtype:?}").to_lowercase(),
            "must be f32 or f16",
        ))
    }

    /// What conversations' caches store keys and values in.
    pub(crate) fn cache_dtype(&self) -> DType {
        self.cache_dtype
    }

    /// Bytes of key/value cache one token of a conversation takes.
    pub(crate) fn kv_bytes_per_token(&self) -> usize {
        2 * self.spec.num_layers
            * self.spec.num_kv_heads
            * self.spec.head_dim
            * self.cache_dtype.size_in_bytes()
    }

    /// Every tensor under its name in `names`' layout, as a GGUF file stores it.
    pub(crate) fn export(&self, names: &TensorNames) -> Result<Vec<(String, Arc<QTensor>)>> {
        let mut out = vec![(
            names.global(names.embedding, "weight"),
            export_dense(&self.embedding)?,
        )];
        let mut linear = |name: String, layer: &Linear| -> Result<()> {
            out.push((format!("{name}.weight"), layer.export_weight()?));
            if let Some(bias) = layer.bias() {
                out.push((format!("{name}.bias"), export_dense(bias)?));
            }
            Ok(())
        };
        let prefix = |i: usize, part: &str| {
            names
                .layer(i, part, "weight")
                .trim_end_matches(".weight")
                .to_string()
        };
        for (i, block) in self.layers.iter().enumerate() {
            match (&block.attention.qkv, names.qkv) {
                (Qkv::Fused(l), QkvNames::Fused(fused) | QkvNames::Split { fused, .. }) => {
                    linear(prefix(i, fused), l)?
                }
                (
                    Qkv::Split([q, k, v]),
                    QkvNames::Split {
                        q: qn,
                        k: kn,
                        v: vn,
                        ..
                    },
                ) => {
                    linear(prefix(i, qn), q)?;
                    linear(prefix(i, kn), k)?;
                    linear(prefix(i, vn), v)?;
                }
                (Qkv::Split(_), QkvNames::Fused(_)) => {
                    return Err(crate::Error::invalid(
                        "layout",
                        names.id,
                        "split query/key/value layers cannot be written in a fused layout",
                    ))
                }
            }
            linear(prefix(i, names.attention_output), &block.attention.dense)?;
            linear(prefix(i, names.mlp_gate_up), &block.mlp.gate_up)?;
            linear(prefix(i, names.mlp_down), &block.mlp.down)?;
        }
        linear(names.output.to_string(), &self.output)?;
        for (i, block) in self.layers.iter().enumerate() {
            let mut norms = vec![
                (names.input_norm, &block.input_norm),
                (names.post_attention_norm, &block.post_attention_norm),
            ];
            if let (Some(sandwich), Some(attn), Some(mlp)) = (
                &block.sandwich,
                names.post_self_attention_norm,
                names.post_mlp_norm,
            ) {
                norms.push((attn, &sandwich.post_self_attention));
                norms.push((mlp, &sandwich.post_mlp));
            }
            for (part, norm) in norms {
                out.push((names.layer(i, part, "weight"), export_dense(&norm.weight)?));
            }
        }
        if let Some(norm) = &self.final_norm {
            out.push((
                names.global(names.final_norm, "weight"),
                export_dense(&norm.weight)?,
            ));
        }
        Ok(out)
    }

    /// The sizes and switches the model was built from.
    pub(crate) fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Bytes of weights read to produce one token (every matrix once; embeddings one row).
    pub(crate) fn weight_bytes_per_token(&self) -> usize {
        let norms_per_layer = if self.spec.sandwich_norms { 4 } else { 2 };
        let norms = self.spec.hidden_size
            * (norms_per_layer * self.layers.len() + 1)
            * self.dtype.size_in_bytes();
        self.layers
            .iter()
            .flat_map(Block::linears)
            .map(Linear::weight_bytes)
            .sum::<usize>()
            + self.output.weight_bytes()
            + norms
    }

    /// An empty cache for one conversation, with room for `capacity` tokens before it grows.
    pub(crate) fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache {
            layers: (0..self.layers.len())
                .map(|_| LayerCache::default())
                .collect(),
            len: 0,
            capacity_hint: capacity.clamp(16, self.spec.max_positions.max(16)),
        }
    }

    /// Runs `ids` at positions `cache.len()..` and returns the logits of the last one as an f32
    /// vector of `vocab_size` entries.
    ///
    /// Any number of ids may extend any cache (prefill in chunks, or continue a conversation).
    pub(crate) fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let mut logits = self.forward_batch(&mut [Segment { ids, cache }])?;
        Ok(logits.remove(0))
    }

    /// Runs several sequences in one pass, each `ids` at positions `cache.len()..` of its own
    /// cache, and returns each one's last logits, in order.
    ///
    /// The weights are read once for all rows, which is what makes serving several
    /// conversations at once cheap: on a CPU a decode step is bound by reading the weights.
    /// Every row is computed as it would be alone (the products, norms and rotations are per
    /// row, attention per sequence), so a sequence gets the same bits batched or not.
    pub(crate) fn forward_batch(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>> {
        let logits = self.forward_batch_unless(segments, &|| false)?;
        Ok(logits.expect("a pass that is never asked to stop finishes"))
    }

    /// [`Transformer::forward_batch`], asking `stop` before every layer after the first
    /// whether to give up: `None` when it said so. A pass given up leaves every cache as it
    /// was (positions are counted only once the last layer has run; what the layers before
    /// wrote past the end is overwritten by the next pass), so running it again later gives
    /// the same bits. For background work, which yields the model to a request that arrives
    /// while it runs within one layer instead of one whole pass.
    pub(crate) fn forward_batch_unless(
        &self,
        segments: &mut [Segment<'_>],
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let tokens: usize = segments.iter().map(|s| s.ids.len()).sum();
        if self.is_small_pass(tokens) {
            kernels::on_one_thread(|| self.forward_batch_on_pool(segments, stop))
        } else {
            kernels::on_pool(|| self.forward_batch_on_pool(segments, stop))
        }
    }

    /// Whether a pass of `tokens` rows is small enough to run on one thread (see
    /// [`SMALL_PASS_WORK`]): always false off the CPU.
    pub(crate) fn is_small_pass(&self, tokens: usize) -> bool {
        let per_token = self.spec.parameter_count() - self.spec.vocab_size * self.spec.hidden_size;
        self.device.is_cpu() && per_token.saturating_mul(tokens) <= SMALL_PASS_WORK
    }

    fn forward_batch_on_pool(
        &self,
        segments: &mut [Segment<'_>],
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let mut spans = Vec::with_capacity(segments.len());
        for segment in segments.iter() {
            let span = Span {
                start: segment.cache.len,
                tokens: segment.ids.len(),
            };
            if span.tokens == 0 {
                return Err(crate::Error::invalid(
                    "ids",
                    0,
                    "at least one token is needed",
                ));
            }
            if span.start + span.tokens > self.spec.max_positions {
                return Err(crate::Error::PromptTooLong {
                    prompt_tokens: span.start + span.tokens,
                    limit: self.spec.max_positions,
                });
            }
            spans.push(span);
        }
        let ids: Vec<u32> = segments.iter().flat_map(|s| s.ids).copied().collect();
        let ids_tensor = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self
            .embedding
            .index_select(&ids_tensor, 0)?
            .to_dtype(self.dtype)?;
        let angles = self.rotary.angles(&spans, self.dtype, &self.device)?;
        for (i, block) in self.layers.iter().enumerate() {
            if i > 0 && stop() {
                return Ok(None);
            }
            let mut caches = Vec::with_capacity(segments.len());
            for (segment, span) in segments.iter_mut().zip(&spans) {
                let layer_cache = &mut segment.cache.layers[i];
                let wanted = (span.start + span.tokens).max(segment.cache.capacity_hint);
                layer_cache.reserve(wanted, &self.spec, self.cache_dtype, &self.device)?;
                caches.push(layer_cache);
            }
            x = block.forward(&x, &mut caches, &spans, &angles)?;
        }
        for (segment, span) in segments.iter_mut().zip(&spans) {
            segment.cache.len = span.start + span.tokens;
        }
        // Each sequence's last row.
        let last: Vec<u32> = spans
            .iter()
            .scan(0, |end, span| {
                *end += span.tokens;
                Some((*end - 1) as u32)
            })
            .collect();
        let last = if let [only] = last[..] {
            x.narrow(0, only as usize, 1)?
        } else {
            x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
        };
        let last = match &self.final_norm {
            Some(norm) => norm.forward(&last)?,
            None => last,
        };
        let logits = self.output.forward(&last)?;
        Ok(Some(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?))
    }
}

/// One sequence's part of a batched forward pass (see [`Transformer::forward_batch`]).
pub(crate) struct Segment<'a> {
    /// The new tokens, at positions `cache.len()..`.
    pub ids: &'a [u32],
    /// The sequence's keys and values, extended by `ids`.
    pub cache: &'a mut KvCache,
}

/// The keys and values of one conversation: owned by the request, freed when it is dropped.
/// The default is an empty stand-in that holds nothing (see [`Transformer::new_cache`] for a
/// real one).
#[derive(Debug, Default)]
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

    /// A new cache holding a copy of this one's first `len` positions (at most those
    /// computed), with room for `capacity` before it grows: for a conversation that shares an
    /// opening with this one while this one goes on.
    pub(crate) fn prefix_copy(&self, len: usize, capacity: usize) -> Result<KvCache> {
        let len = len.min(self.len);
        let layers = self
            .layers
            .iter()
            .map(|layer| layer.prefix_copy(len, capacity))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len,
            capacity_hint: capacity.max(len).max(16),
        })
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
        spec: &ArchSpec,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let capacity = self.capacity();
        if needed <= capacity {
            return Ok(());
        }
        let new_capacity = needed.max(capacity * 2).min(spec.max_positions).max(needed);
        let shape = (spec.num_kv_heads, new_capacity, spec.head_dim);
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

    /// A copy of the first `len` positions, with room for `capacity`.
    fn prefix_copy(&self, len: usize, capacity: usize) -> Result<LayerCache> {
        let copy = |t: &Tensor| -> Result<Tensor> {
            let (heads, _, head_dim) = t.dims3()?;
            let out = Tensor::zeros((heads, capacity.max(len), head_dim), t.dtype(), t.device())?;
            if len > 0 {
                out.slice_set(&t.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
            Ok(out)
        };
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok(LayerCache {
                k: Some(copy(k)?),
                v: Some(copy(v)?),
            }),
            _ => Ok(LayerCache::default()),
        }
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
        let stored = |t: &Tensor| t.transpose(0, 1)?.to_dtype(cache_k.dtype())?.contiguous();
        cache_k.slice_set(&stored(k)?, 1, start)?;
        cache_v.slice_set(&stored(v)?, 1, start)?;
        let end = start + k.dim(0)?;
        Ok((cache_k.narrow(1, 0, end)?, cache_v.narrow(1, 0, end)?))
    }
}
