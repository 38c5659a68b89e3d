//! A linear layer whose single-token product uses every core, dense or quantized.
//!
//! Decoding multiplies one activation row by every weight matrix: a matrix-vector product that
//! is bound by memory bandwidth. candle's CPU matmul runs that shape on one thread, so for one
//! row of f32 on the CPU this layer splits the weight rows across rayon's pool instead. Everything
//! else (prefill, other dtypes, GPUs) goes through candle's matmul. Quantized weights (ggml block
//! formats) go through candle's `QMatMul`, whose CPU kernels are multi-threaded already.

use std::sync::LazyLock;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;

use crate::Quantization;

/// `y = x W^T + b` with `W` stored `[out_features, in_features]` as in PyTorch checkpoints.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    span: tracing::Span,
}

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantized { matmul: QMatMul, bytes: usize },
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
            span: tracing::span!(tracing::Level::TRACE, "linear"),
        }
    }

    /// Re-encodes the weight in `quantization`'s block format, or the closest one the matrix
    /// shape allows (k-quants need rows that are a multiple of 256 wide, the others of 32).
    /// Returns the format used; a matrix no format fits stays dense (`None`).
    pub(crate) fn quantize(
        &mut self,
        quantization: Quantization,
    ) -> candle_core::Result<Option<GgmlDType>> {
        let Weight::Dense(weight) = &self.weight else {
            return Ok(None);
        };
        let in_features = weight.dim(1)?;
        let Some(dtype) = quantization
            .candidates()
            .iter()
            .copied()
            .find(|d| in_features % d.block_size() == 0)
        else {
            return Ok(None);
        };
        let qtensor = quantize_rows_in_parallel(&weight.to_dtype(DType::F32)?, dtype)?;
        let bytes = qtensor.storage_size_in_bytes();
        self.weight = Weight::Quantized {
            matmul: QMatMul::from_qtensor(qtensor)?,
            bytes,
        };
        Ok(Some(dtype))
    }

    /// Bytes of weight this layer reads per token.
    pub(crate) fn weight_bytes(&self) -> usize {
        let mut n = match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Quantized { bytes, .. } => *bytes,
        };
        if let Some(b) = &self.bias {
            n += b.elem_count() * b.dtype().size_in_bytes();
        }
        n
    }

    fn matvec(&self, weight: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !matches!(x.device(), Device::Cpu)
            || x.dtype() != DType::F32
            || weight.dtype() != DType::F32
            || x.dims().len() != 2
            || x.dim(0)? != 1
            || !weight.is_contiguous()
        {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (out_features, in_features) = weight.dims2()?;
        let (w_storage, w_layout) = weight.storage_and_layout();
        let (x_storage, x_layout) = x.storage_and_layout();
        let (candle_core::Storage::Cpu(w), candle_core::Storage::Cpu(xs)) =
            (&*w_storage, &*x_storage)
        else {
            return Ok(None);
        };
        let w = &w.as_slice::<f32>()?[w_layout.start_offset()..];
        let xs = &xs.as_slice::<f32>()?[x_layout.start_offset()..][..in_features];
        let mut out = vec![0f32; out_features];
        let rows_per_task = (out_features / (rayon::current_num_threads() * 8)).max(16);
        out.par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(chunk, out)| {
                let first = chunk * rows_per_task;
                for (i, o) in out.iter_mut().enumerate() {
                    let row = &w[(first + i) * in_features..][..in_features];
                    *o = dot(row, xs);
                }
            });
        drop(w_storage);
        Tensor::from_vec(out, (1, out_features), &Device::Cpu).map(Some)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let y = match &self.weight {
            Weight::Dense(w) => match self.matvec(w, x)? {
                Some(y) => y,
                None => x.matmul(&w.t()?)?,
            },
            Weight::Quantized { matmul, .. } => matmul.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Quantizes `weight` (`[rows, cols]`, f32) with every core: blocks never straddle rows, so
/// bands of rows quantize independently and their bytes concatenate into the whole tensor.
fn quantize_rows_in_parallel(weight: &Tensor, dtype: GgmlDType) -> candle_core::Result<QTensor> {
    let (rows, cols) = weight.dims2()?;
    let threads = rayon::current_num_threads().max(1);
    let band = rows.div_ceil(threads * 4).max(1);
    let parts = (0..rows)
        .step_by(band)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            // Fresh storage, not a view: candle's quantizer reads the whole underlying storage
            // and ignores a view's offset and length.
            let n = band.min(rows - start);
            let values = weight
                .narrow(0, start, n)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let part = Tensor::from_vec(values, (n, cols), &Device::Cpu)?;
            QTensor::quantize(&part, dtype)?
                .data()
                .map(|d| d.into_owned())
        })
        .collect::<candle_core::Result<Vec<Vec<u8>>>>()?;
    let bytes = parts.concat();
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &bytes,
        vec![rows, cols],
        weight.device(),
    )
}

static HAS_AVX2: LazyLock<bool> = LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
});

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX2 {
        // SAFETY: the CPU supports AVX2, checked at run time above.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// Sixteen independent accumulators let the compiler keep two or four SIMD registers busy
/// without reassociating floating-point sums on its own.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() - a.len() % LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (x, y) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_quantization_is_byte_identical() -> candle_core::Result<()> {
        let w = Tensor::arange(0f32, 67.0 * 256.0, &Device::Cpu)?
            .reshape((67, 256))?
            .affine(0.0003, -2.0)?
            .sin()?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
            let whole = QTensor::quantize(&w, dtype)?;
            let banded = quantize_rows_in_parallel(&w, dtype)?;
            assert_eq!(whole.data()?, banded.data()?, "{dtype:?}");
            assert_eq!(whole.shape(), banded.shape());
        }
        Ok(())
    }

    #[test]
    fn matvec_matches_matmul() -> candle_core::Result<()> {
        let w = Tensor::arange(0f32, 37.0 * 53.0, &Device::Cpu)?
            .reshape((37, 53))?
            .affine(0.001, -0.5)?;
        let x = Tensor::arange(0f32, 53.0, &Device::Cpu)?
            .reshape((1, 53))?
            .affine(0.01, 0.1)?;
        let b = Tensor::arange(0f32, 37.0, &Device::Cpu)?;
        let layer = Linear::new(w.clone(), Some(b.clone()));
        let fast = layer.forward(&x)?;
        let slow = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max difference {diff}");
        Ok(())
    }
}
