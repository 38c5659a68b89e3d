//! A linear layer whose products use every core, dense or quantized.
//!
//! Decoding multiplies one activation row by every weight matrix: a matrix-vector product that
//! is bound by memory bandwidth, which candle's CPU matmul runs on one thread; prefill multiplies
//! a few dozen rows, where candle's matmul spends as long packing the weights as multiplying.
//! So on the CPU, dense f32/f16/bf16 weights are repacked at load into panels for this crate's
//! AVX-512 or AVX2 kernel ([`crate::kernels::dense_matmul`]; on other CPUs, a multi-threaded
//! matrix-vector product for one row and candle's matmul otherwise), q8_0 / q4_0 / q4_K blocks go
//! through its own block kernels ([`crate::kernels::block_matmul`]), and other block formats and GPUs
//! through candle.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::formats::weights::HostRows;
use crate::kernels::block_matmul::{BlockFormat, BlockMatrix};
use crate::kernels::dense_matmul::{self, DenseRows, PanelMatrix};

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
    /// f32 / f16 / bf16 on an AVX-512 or AVX2 CPU, in panels for this crate's kernels.
    Panels(Arc<PanelMatrix>),
    /// q8_0 / q4_0 blocks on the CPU, multiplied by this crate's kernels.
    Blocks(Arc<BlockMatrix>),
    /// Other block formats, or another device: candle's kernels.
    Quantized {
        matmul: QMatMul,
        qtensor: Arc<QTensor>,
    },
}

impl Weight {
    /// Blocks this crate's kernels run when they can, candle's `QMatMul` otherwise.
    fn from_qtensor(qtensor: Arc<QTensor>) -> candle_core::Result<Self> {
        if qtensor.device().is_cpu() {
            if let Some(blocks) = BlockMatrix::from_qtensor(&qtensor)? {
                return Ok(Weight::Blocks(Arc::new(blocks)));
            }
        }
        Ok(Weight::Quantized {
            matmul: QMatMul::from_arc(qtensor.clone())?,
            qtensor,
        })
    }
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
            span: tracing::span!(tracing::Level::TRACE, "linear"),
        }
    }

    /// A layer over a dense matrix `[out_features, in_features]` read into a host buffer: on a
    /// CPU that runs the panel kernels (AVX-512 or AVX2) the buffer is repacked in place into
    /// panels, elsewhere it becomes a tensor as is.
    pub(crate) fn from_rows(
        rows: HostRows,
        out_features: usize,
        in_features: usize,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Self> {
        let weight = if dense_matmul::available() {
            Weight::Panels(Arc::new(PanelMatrix::pack(
                dense_rows(rows),
                out_features,
                in_features,
            )))
        } else {
            Weight::Dense(rows.into_tensor(&[out_features, in_features])?)
        };
        Ok(Linear {
            weight,
            bias,
            span: tracing::span!(tracing::Level::TRACE, "linear"),
        })
    }

    /// Repacks a dense CPU matrix into panels when this CPU runs the panel kernel (a copy; for
    /// layers that stayed dense after all, e.g. when no quantized format fits them).
    pub(crate) fn pack_dense(&mut self) -> candle_core::Result<()> {
        if let Weight::Dense(w) = &self.weight {
            if w.device().is_cpu() && dense_matmul::available() {
                let (rows, cols) = w.dims2()?;
                let host = HostRows::from_tensor(w, w.dtype())?;
                self.weight =
                    Weight::Panels(Arc::new(PanelMatrix::pack(dense_rows(host), rows, cols)));
            }
        }
        Ok(())
    }

    /// A layer over quantized blocks already in this crate's CPU layout (read from a GGUF
    /// file).
    pub(crate) fn from_blocks(blocks: BlockMatrix, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Blocks(Arc::new(blocks)),
            bias,
            span: tracing::span!(tracing::Level::TRACE, "linear"),
        }
    }

    /// A layer over weights that are already quantized (read from a GGUF file).
    pub(crate) fn from_quantized(
        qtensor: QTensor,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Self> {
        Ok(Linear {
            weight: Weight::from_qtensor(Arc::new(qtensor))?,
            bias,
            span: tracing::span!(tracing::Level::TRACE, "linear"),
        })
    }

    /// The weight in a form a GGUF file stores: quantized blocks, or the dense matrix encoded
    /// in its own dtype.
    pub(crate) fn export_weight(&self) -> candle_core::Result<Arc<QTensor>> {
        match &self.weight {
            Weight::Quantized { qtensor, .. } => Ok(qtensor.clone()),
            Weight::Blocks(blocks) => blocks.to_qtensor().map(Arc::new),
            Weight::Dense(w) => export_dense(w),
            Weight::Panels(p) => export_dense(&p.to_tensor()?),
        }
    }

    /// The bias, if the layer has one.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// [`Linear::quantize_to`] with `quantization`'s formats (what the model's layers take).
    #[cfg(test)]
    pub(crate) fn quantize(
        &mut self,
        quantization: crate::Quantization,
    ) -> candle_core::Result<Option<GgmlDType>> {
        self.quantize_to(quantization.candidates())
    }

    /// Re-encodes the weight in the first of the block formats `candidates` the matrix shape
    /// allows (k-quants need rows that are a multiple of 256 wide, the others of 32; see
    /// [`crate::Quantization::candidates`] and [`crate::Quantization::output_candidates`]).
    /// Returns the format used; a matrix no format fits stays dense (`None`). Weights that are
    /// quantized already keep their format.
    pub(crate) fn quantize_to(
        &mut self,
        candidates: &[GgmlDType],
    ) -> candle_core::Result<Option<GgmlDType>> {
        let unpacked;
        let weight = match &self.weight {
            Weight::Dense(weight) => weight,
            Weight::Panels(panels) => {
                unpacked = panels.to_tensor()?;
                &unpacked
            }
            // Already quantized (read from a GGUF file): keep the stored format.
            Weight::Quantized { qtensor, .. } => return Ok(Some(qtensor.dtype())),
            Weight::Blocks(blocks) => return Ok(Some(blocks.ggml_dtype())),
        };
        let (rows, cols) = weight.dims2()?;
        let device = weight.device().clone();
        // Bands are quantized on the CPU: a matrix on a GPU comes off it in one copy, not one per
        // band (on an H200, band by band took 100 s for a 785M model).
        let host = if device.is_cpu() {
            weight.clone()
        } else {
            weight.to_device(&Device::Cpu)?
        };
        let mut quantized = None;
        for &dtype in candidates {
            if !cols.is_multiple_of(dtype.block_size()) {
                continue;
            }
            match quantize_rows_in_parallel(&host, dtype)? {
                Some(bands) => {
                    quantized = Some((dtype, bands));
                    break;
                }
                None => tracing::warn!(
                    ?dtype,
                    rows,
                    cols,
                    "the quantizer zeroed a block of equal weights: trying the next format"
                ),
            }
        }
        drop(host);
        let Some((dtype, bands)) = quantized else {
            return Ok(None);
        };
        // The dense matrix is not needed any more: free it before the blocks are laid out, and
        // lay them out band by band (each band freed once copied), so loading never holds
        // the dense matrix, the ggml bytes and the blocks at once.
        self.weight = Weight::Dense(Tensor::zeros(0, DType::F32, &device)?);
        self.weight = if device.is_cpu() && BlockFormat::from_ggml(dtype).is_some() {
            let blocks = BlockMatrix::from_ggml_bytes(dtype, rows, cols, bands)?
                .ok_or_else(|| candle_core::Error::Msg(format!("{dtype:?} rows of {cols}")))?;
            Weight::Blocks(Arc::new(blocks))
        } else {
            let bytes = bands.concat();
            let qtensor = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                &bytes,
                vec![rows, cols],
                &device,
            )?;
            Weight::from_qtensor(Arc::new(qtensor))?
        };
        Ok(Some(dtype))
    }

    /// Bytes of weight this layer reads per token.
    pub(crate) fn weight_bytes(&self) -> usize {
        let mut n = match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Panels(p) => p.bytes(),
            Weight::Quantized { qtensor, .. } => qtensor.storage_size_in_bytes(),
            Weight::Blocks(blocks) => blocks.bytes_read_per_token(),
        };
        if let Some(b) = &self.bias {
            n += b.elem_count() * b.dtype().size_in_bytes();
        }
        n
    }

    fn matvec(&self, weight: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !matches!(x.device(), Device::Cpu)
            || x.dtype() != DType::F32
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
        let xs = &xs.as_slice::<f32>()?[x_layout.start_offset()..][..in_features];
        let start = w_layout.start_offset();
        let out = match weight.dtype() {
            DType::F32 => rows_dot(&w.as_slice::<f32>()?[start..], xs, out_features, dot),
            DType::F16 => rows_dot(&w.as_slice::<f16>()?[start..], xs, out_features, f16::dot),
            DType::BF16 => rows_dot(&w.as_slice::<bf16>()?[start..], xs, out_features, bf16::dot),
            _ => return Ok(None),
        };
        drop(w_storage);
        Tensor::from_vec(out, (1, out_features), &Device::Cpu).map(Some)
    }
}

/// Whether some block of 32 weights, not all zero, came back all zero from `blocks`: candle's
/// q4_K quantizer does that to a block of 32 equal or nearly equal weights (ggml's own keeps
/// them), which trained weights almost never hold but would then lose outright.
fn zeroes_a_block(values: &Tensor, blocks: &QTensor) -> candle_core::Result<bool> {
    let values = values.flatten_all()?.to_vec1::<f32>()?;
    // Only a block of equal weights is at risk (the quantizer gives up on `max == min`):
    // without one, the blocks are not widened back (a sixth of q4_K's loading time).
    let equal = |v: &[f32]| v.iter().all(|x| *x == v[0] && *x != 0.0);
    if !values.chunks(32).any(equal) {
        return Ok(false);
    }
    let back = blocks
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(values
        .chunks(32)
        .zip(back.chunks(32))
        .any(|(v, b)| b.iter().all(|x| *x == 0.0) && v.iter().any(|x| *x != 0.0)))
}

/// A dense tensor as a GGUF tensor of the same dtype (f32, f16 or bf16).
pub(crate) fn export_dense(t: &Tensor) -> candle_core::Result<Arc<QTensor>> {
    let dtype = match t.dtype() {
        DType::F16 => GgmlDType::F16,
        DType::BF16 => GgmlDType::BF16,
        _ => GgmlDType::F32,
    };
    let t = t.to_device(&Device::Cpu)?;
    let t = if dtype == GgmlDType::F32 {
        t.to_dtype(DType::F32)?
    } else {
        t
    };
    QTensor::quantize(&t, dtype).map(Arc::new)
}

/// `out[r] = dot(w[r], x)` for every row of `w`, rows split across rayon's pool.
fn rows_dot<T: Sync>(
    w: &[T],
    x: &[f32],
    rows: usize,
    dot: impl Fn(&[T], &[f32]) -> f32 + Sync,
) -> Vec<f32> {
    let cols = x.len();
    let mut out = vec![0f32; rows];
    let rows_per_task = (rows / (rayon::current_num_threads() * 8)).max(16);
    out.par_chunks_mut(rows_per_task)
        .enumerate()
        .for_each(|(chunk, out)| {
            let first = chunk * rows_per_task;
            for (i, o) in out.iter_mut().enumerate() {
                *o = dot(&w[(first + i) * cols..][..cols], x);
            }
        });
    out
}

/// A 16-bit float format that weight matrices may be stored in.
trait HalfWeight: Copy + Send + Sync + 'static {
    /// Widens `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);

    /// Dot product with f32 activations, widening a block at a time.
    fn dot(a: &[Self], b: &[f32]) -> f32 {
        dot_widened(a, b)
    }
}

impl HalfWeight for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl HalfWeight for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// Portable fallback: widen a block at a time, then an f32 dot product.
fn dot_widened<T: HalfWeight>(a: &[T], b: &[f32]) -> f32 {
    const BLOCK: usize = 256;
    let mut wide = [0f32; BLOCK];
    let mut sum = 0f32;
    for (a, b) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let wide = &mut wide[..a.len()];
        T::widen(a, wide);
        sum += dot(wide, b);
    }
    sum
}

/// A 16-bit weight matrix widened to f32 on every core, for prefill's matmul (the matrix is
/// read once per prompt chunk, where the math dominates).
fn widen_matrix<T: HalfWeight + candle_core::WithDType>(w: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        drop(storage);
        return w.to_dtype(DType::F32);
    };
    let src = &cpu.as_slice::<T>()?[layout.start_offset()..][..rows * cols];
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols * 64)
        .zip(src.par_chunks(cols * 64))
        .for_each(|(dst, src)| T::widen(src, dst));
    drop(storage);
    Tensor::from_vec(out, (rows, cols), &Device::Cpu)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let y = match &self.weight {
            Weight::Panels(panels) => panels_forward(panels, x)?,
            Weight::Dense(w) => match self.matvec(w, x)? {
                Some(y) => y,
                // 16-bit weights under f32 activations (the CPU setup): widen for the matmul.
                None if w.dtype() == DType::F16 && x.dtype() == DType::F32 => {
                    x.matmul(&widen_matrix::<f16>(w)?.t()?)?
                }
                None if w.dtype() == DType::BF16 && x.dtype() == DType::F32 => {
                    x.matmul(&widen_matrix::<bf16>(w)?.t()?)?
                }
                None => x.matmul(&w.t()?)?,
            },
            Weight::Quantized { matmul, .. } => matmul.forward(x)?,
            Weight::Blocks(blocks) => blocks_forward(blocks, x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Hands a buffer read from a weight file to the panel kernel (a move, not a copy).
fn dense_rows(rows: HostRows) -> DenseRows {
    match rows {
        HostRows::F32(v) => DenseRows::F32(v),
        HostRows::F16(v) => DenseRows::F16(v),
        HostRows::BF16(v) => DenseRows::BF16(v),
    }
}

/// `x W^T` by the panel kernel for `x: [.., cols]` on the CPU (widened to f32 if need be).
fn panels_forward(panels: &PanelMatrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, cols) = panels.dims();
    let mut out_dims = x.dims().to_vec();
    match out_dims.last_mut() {
        Some(last) if *last == cols => *last = rows,
        _ => {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: (rows, cols).into(),
                op: "linear",
            })
        }
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let tokens = x.elem_count() / cols;
    let mut out = vec![0f32; tokens * rows];
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(xc) = &*storage else {
            candle_core::bail!("the panel kernel runs on the CPU");
        };
        panels.matmul(
            &xc.as_slice::<f32>()?[layout.start_offset()..][..tokens * cols],
            &mut out,
        );
    }
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}

/// `x W^T` over q8_0 / q4_0 blocks for `x: [.., cols]` (f32 on the CPU).
fn blocks_forward(blocks: &BlockMatrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, cols) = blocks.dims();
    let mut out_dims = x.dims().to_vec();
    match out_dims.last_mut() {
        Some(last) if *last == cols => *last = rows,
        _ => candle_core::bail!("activations {:?} do not have {cols} columns", x.dims()),
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let tokens = x.elem_count() / cols;
    let mut out = Vec::with_capacity(tokens * rows);
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("q8_0 / q4_0 blocks multiply CPU activations only");
        };
        let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..][..tokens * cols];
        blocks.matmul_uninit(xs, &mut out.spare_capacity_mut()[..tokens * rows]);
    }
    // SAFETY: `matmul_uninit` wrote all `tokens * rows` values, within the capacity.
    unsafe { out.set_len(tokens * rows) };
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}

/// Quantizes `weight` (`[rows, cols]`, any float dtype) with every core: blocks never straddle
/// rows, so bands of rows quantize independently and their bytes concatenate into the whole
/// tensor. Only a band at a time is widened to f32, so a 16-bit matrix never exists in f32.
/// `None` when candle's quantizer lost a block (see [`zeroes_a_block`]).
fn quantize_rows_in_parallel(
    weight: &Tensor,
    dtype: GgmlDType,
) -> candle_core::Result<Option<Vec<Vec<u8>>>> {
    let (rows, cols) = weight.dims2()?;
    let threads = rayon::current_num_threads().max(1);
    // Bands of at most 16 MiB in f32: what is widened at a time stays small next to the model.
    let band = rows
        .div_ceil(threads * 4)
        .min((16 << 20) / (cols * 4).max(1))
        .max(1);
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
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let part = Tensor::from_vec(values, (n, cols), &Device::Cpu)?;
            let blocks = QTensor::quantize(&part, dtype)?;
            if dtype == GgmlDType::Q4K && zeroes_a_block(&part, &blocks)? {
                return Ok(None);
            }
            blocks.data().map(|d| Some(d.into_owned()))
        })
        .collect::<candle_core::Result<Option<Vec<Vec<u8>>>>>()?;
    Ok(parts)
}

/// An f32 dot product (the matrix-vector product of layers the panel kernels do not take).
fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    use crate::Quantization;

    #[test]
    fn half_weights_match_their_f32_widening() -> candle_core::Result<()> {
        let w = Tensor::arange(0f32, 45.0 * 77.0, &Device::Cpu)?
            .reshape((45, 77))?
            .affine(0.0011, -1.5)?
            .sin()?;
        let x1 = Tensor::arange(0f32, 77.0, &Device::Cpu)?
            .reshape((1, 77))?
            .affine(0.01, -0.3)?;
        let x3 = Tensor::cat(&[&x1, &x1.affine(-1.0, 0.2)?, &x1.sqr()?], 0)?;
        for dtype in [DType::F16, DType::BF16] {
            let half = w.to_dtype(dtype)?;
            let exact = half.to_dtype(DType::F32)?;
            let layer = Linear::new(half, None);
            for x in [&x1, &x3] {
                let fast = layer.forward(x)?;
                let slow = x.matmul(&exact.t()?)?;
                let diff = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{dtype:?} rows {}: max difference {diff}",
                    x.dim(0)?
                );
            }
        }
        Ok(())
    }

    #[test]
    fn parallel_quantization_is_byte_identical() -> candle_core::Result<()> {
        // Weights that vary within every block of 32, as trained ones do (candle's q4_K
        // quantizer zeroes blocks that barely vary: see `zeroes_a_block`).
        let w = Tensor::arange(0f32, 67.0 * 256.0, &Device::Cpu)?
            .reshape((67, 256))?
            .affine(0.37, -2.0)?
            .sin()?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
            let whole = QTensor::quantize(&w, dtype)?;
            let banded = quantize_rows_in_parallel(&w, dtype)?
                .expect("no block lost")
                .concat();
            assert_eq!(&whole.data()?[..], &banded[..], "{dtype:?}");
            // From 16-bit weights too, widened a band at a time.
            let half = w.to_dtype(DType::F16)?;
            let from_half = QTensor::quantize(&half.to_dtype(DType::F32)?, dtype)?;
            let banded = quantize_rows_in_parallel(&half, dtype)?
                .expect("no block lost")
                .concat();
            assert_eq!(&from_half.data()?[..], &banded[..], "{dtype:?} from f16");
        }
        Ok(())
    }

    /// The 4-bit choices' output layer in q6_K keeps every weight within a step and a half of
    /// its sub-block of 16 (a step is a 64th of its range; ggml's quantizer picks the scale
    /// with the least squared error, which may clamp an extreme weight a step short) and
    /// within 0.3 of a step on average (rounding alone: 0.25), blocks of equal weights
    /// included (which candle's q4_K quantizer loses); and it runs on the block kernels.
    #[test]
    fn the_output_layer_of_4_bit_choices_is_q6k() -> candle_core::Result<()> {
        let mut values: Vec<f32> = (0..8 * 512).map(|i| (i as f32 * 0.37).sin()).collect();
        values[512..544].fill(0.25);
        values[1040..1056].fill(-3.0);
        let w = Tensor::from_vec(values.clone(), (8, 512), &Device::Cpu)?;
        for q in [Quantization::Q4_0, Quantization::Q4K] {
            let mut layer = Linear::new(w.clone(), None);
            assert_eq!(
                layer.quantize_to(q.output_candidates())?,
                Some(GgmlDType::Q6K)
            );
            assert!(matches!(layer.weight, Weight::Blocks(_)), "{q:?}");
            let back = layer.export_weight()?.dequantize(&Device::Cpu)?;
            let back = back.flatten_all()?.to_vec1::<f32>()?;
            let mut relative = 0.0;
            for (i, (want, got)) in values.chunks(16).zip(back.chunks(16)).enumerate() {
                let step = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 32.0;
                for (a, b) in want.iter().zip(got) {
                    let error = (a - b).abs();
                    assert!(error <= 1.5 * step, "{q:?} sub-block {i}: {a} became {b}");
                    relative += error / step;
                }
            }
            let mean = relative / values.len() as f32;
            assert!(mean <= 0.3, "{q:?}: mean error {mean} steps");
        }
        // q8_0's output layer stays q8_0; rows too narrow for q6_K take q8_0.
        let mut layer = Linear::new(w, None);
        let q8 = Quantization::Q8_0.output_candidates();
        assert_eq!(layer.quantize_to(q8)?, Some(GgmlDType::Q8_0));
        let narrow = Tensor::from_vec(values[..16 * 224].to_vec(), (16, 224), &Device::Cpu)?;
        let mut layer = Linear::new(narrow, None);
        let q4 = Quantization::Q4_0.output_candidates();
        assert_eq!(layer.quantize_to(q4)?, Some(GgmlDType::Q8_0));
        Ok(())
    }

    /// A block of 32 equal weights, which candle's q4_K quantizer would zero, sends the matrix
    /// to q4k's next format, q8_0, which keeps it.
    #[test]
    fn q4k_falls_back_when_a_block_of_equal_weights_would_be_lost() -> candle_core::Result<()> {
        let mut values: Vec<f32> = (0..4 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
        values[256..288].fill(1.0);
        let w = Tensor::from_vec(values, (4, 256), &Device::Cpu)?;
        let mut layer = Linear::new(w.clone(), None);
        assert_eq!(layer.quantize(Quantization::Q4K)?, Some(GgmlDType::Q8_0));
        let x = Tensor::ones((1, 256), DType::F32, &Device::Cpu)?;
        let got = layer.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let want = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.05 * w.abs().max(1.0), "{g} vs {w}");
        }
        // Varied weights keep q4_K.
        let mut varied = Linear::new(
            Tensor::arange(0f32, 1024.0, &Device::Cpu)?
                .reshape((4, 256))?
                .sin()?,
            None,
        );
        assert_eq!(varied.quantize(Quantization::Q4K)?, Some(GgmlDType::Q4K));
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
