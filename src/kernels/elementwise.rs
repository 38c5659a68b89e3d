//! The forward pass's element-wise steps on f32 CPU tensors, on rayon's pool.
//!
//! candle runs element-wise ops of 64Ki elements and more (a 32-token prompt's residual adds and
//! MLP activations) on its own thread pool, whose worker then spins for the next op: on a 2-core
//! machine that takes a core from the matrix product that follows, which runs on rayon's pool
//! (32-token prefill ran up to a third slower). Here the same arithmetic, with the same
//! formulas and so the same bits, runs on rayon's pool instead. Other dtypes, devices and
//! layouts go through candle.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Elements per rayon task; below two of these the step runs on the calling thread.
const CHUNK: usize = 16 * 1024;

/// `silu(h[.., ..n]) * h[.., n..]` for `h: [rows, 2n]`: ChatGLM's SwiGLU, gate then up.
pub(crate) fn swiglu(h: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let rows = h.elem_count() / (2 * n).max(1);
    let computed = with_f32(h, |src| {
        let mut out = vec![0f32; rows * n];
        let row = |(out, h): (&mut [f32], &[f32])| {
            let (gate, up) = h.split_at(n);
            for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                // candle's silu: v / (1 + e^-v).
                *o = g / (1.0 + (-g).exp()) * u;
            }
        };
        if rows * n >= 2 * CHUNK {
            let rows_per_task = (CHUNK / n).max(1);
            out.par_chunks_mut(rows_per_task * n)
                .zip(src.par_chunks(rows_per_task * 2 * n))
                .for_each(|(out, h)| out.chunks_mut(n).zip(h.chunks(2 * n)).for_each(row));
        } else {
            out.chunks_mut(n).zip(src.chunks(2 * n)).for_each(row);
        }
        out
    })?;
    match computed {
        Some(out) if h.dims2()? == (rows, 2 * n) => Tensor::from_vec(out, (rows, n), &Device::Cpu),
        _ => {
            let gate = candle_nn::ops::silu(&h.narrow(1, 0, n)?)?;
            gate * h.narrow(1, n, n)?
        }
    }
}

/// `a + b` for tensors of one shape.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dims() != b.dims() {
        return a + b;
    }
    let computed = with_f32(a, |x| {
        with_f32(b, |y| {
            let mut out = vec![0f32; x.len()];
            let sum = |((o, x), y): ((&mut [f32], &[f32]), &[f32])| {
                for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                    *o = x + y;
                }
            };
            if out.len() >= 2 * CHUNK {
                out.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .zip(y.par_chunks(CHUNK))
                    .for_each(sum);
            } else {
                sum(((&mut out[..], x), y));
            }
            out
        })
    })?;
    match computed {
        Some(Ok(Some(out))) => Tensor::from_vec(out, a.dims(), &Device::Cpu),
        _ => a + b,
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor; `None` for other tensors.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<Option<R>> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() || !t.is_contiguous() {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let data = &cpu.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()];
    Ok(Some(f(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(rows: usize, cols: usize, seed: f32) -> candle_core::Result<Tensor> {
        Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
            .reshape((rows, cols))?
            .affine(0.0137 * seed as f64, -3.0)?
            .sin()?
            .affine(4.0, 0.0)
    }

    /// The same bits as candle's ops, on the calling thread (small) and on rayon's pool (large).
    #[test]
    fn steps_match_candles_ops_bit_for_bit() -> candle_core::Result<()> {
        for (rows, n) in [(3, 64), (40, 2048), (7, 5504)] {
            let h = values(rows, 2 * n, 1.0)?;
            let ours = swiglu(&h, n)?.flatten_all()?.to_vec1::<f32>()?;
            let theirs = (candle_nn::ops::silu(&h.narrow(1, 0, n)?)? * h.narrow(1, n, n)?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(ours, theirs, "swiglu {rows}x{n}");

            let (a, b) = (values(rows, n, 0.3)?, values(rows, n, 0.7)?);
            let ours = add(&a, &b)?.flatten_all()?.to_vec1::<f32>()?;
            let theirs = (&a + &b)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(ours, theirs, "add {rows}x{n}");
        }
        Ok(())
    }
}
