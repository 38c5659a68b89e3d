//! Dense products of one to a few dozen activation rows with a weight matrix, on AVX-512.
//!
//! A prompt chunk is short (tens of rows) next to a weight matrix of thousands of rows. candle's
//! matmul packs the whole weight matrix for every product, which costs as much memory traffic as
//! the product itself at that shape (prefill of 32 tokens ran at half the speed of 512). This
//! kernel reads the weights where they lie: a tile of four weight rows meets six activation rows
//! at a time, 24 accumulators in registers, while the tile stays in cache for every group of six
//! activation rows. f16 and bf16 weights are widened in registers, so 16-bit models no longer
//! widen each matrix to f32 for every chunk.
//!
//! Decoding (one row) runs the same kernel, so a token's outputs are the same bits whether it
//! came in a prompt chunk or alone: a prefix cache filled either way holds identical values.

use std::sync::LazyLock;

use rayon::prelude::*;

/// Weight rows per tile.
const TILE_ROWS: usize = 4;
/// Activation rows per tile.
const TILE_TOKENS: usize = 6;

/// Whether this CPU runs the AVX-512 kernel (checked once).
pub(crate) fn available() -> bool {
    *AVAILABLE
}

static AVAILABLE: LazyLock<bool> = LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
});

/// A weight element type the kernel widens in registers.
pub(crate) trait DenseWeight: Copy + Send + Sync + 'static {
    #[cfg(target_arch = "x86_64")]
    /// Sixteen elements from `p` (only the `mask`ed ones read) as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the masked elements are readable.
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
mod loads {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::DenseWeight;

    impl DenseWeight for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
            load_f32(p, mask)
        }
    }

    impl DenseWeight for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
            load_f16(p, mask)
        }
    }

    impl DenseWeight for bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
            load_bf16(p, mask)
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load_f32(p: *const f32, mask: u16) -> __m512 {
        if mask == u16::MAX {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_f16(p: *const f16, mask: u16) -> __m512 {
        let halves = if mask == u16::MAX {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            _mm256_maskz_loadu_epi16(mask, p as *const i16)
        };
        _mm512_cvtph_ps(halves)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_bf16(p: *const bf16, mask: u16) -> __m512 {
        let halves = if mask == u16::MAX {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            _mm256_maskz_loadu_epi16(mask, p as *const i16)
        };
        // A bf16 is the top half of an f32.
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
    }
}

/// `out = x W^T` for `x: [tokens, cols]`, `w: [rows, cols]`, `out: [tokens, rows]`, row-major.
///
/// # Panics
/// When [`available`] is false or the slices do not have those sizes.
pub(crate) fn matmul<W: DenseWeight>(w: &[W], x: &[f32], out: &mut [f32], cols: usize) {
    assert!(available(), "the dense prefill kernel needs AVX-512F");
    let tokens = x.len() / cols;
    let rows = w.len() / cols;
    assert_eq!(x.len(), tokens * cols, "activations are not whole rows");
    assert_eq!(w.len(), rows * cols, "weights are not whole rows");
    assert_eq!(out.len(), tokens * rows, "output has the wrong size");
    // Enough rows per task to hide rayon's overhead, few enough to share out evenly.
    let rows_per_task = (rows / (rayon::current_num_threads() * 8))
        .max(16)
        .next_multiple_of(TILE_ROWS);
    // One token has nothing to share a weight tile with: one row at a time reads one stream per
    // core, which the memory system serves faster than four interleaved ones.
    let tile_rows = if tokens == 1 { 1 } else { TILE_ROWS };
    // Each task computes all tokens' outputs for its own rows: in the token-major output those
    // are `tokens` runs of `task_rows`, disjoint from every other task's.
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..rows)
        .into_par_iter()
        .step_by(rows_per_task)
        .for_each(|first| {
            let task_rows = rows_per_task.min(rows - first);
            let mut r = 0;
            while r < task_rows {
                let n = (task_rows - r).min(tile_rows);
                let w_rows = &w[(first + r) * cols..][..n * cols];
                let mut t = 0;
                for m in token_groups(tokens) {
                    let x_rows = &x[t * cols..][..m * cols];
                    let tile = tile(w_rows, n, x_rows, m, cols);
                    for (i, row) in tile.iter().take(n).enumerate() {
                        for (j, value) in row.iter().take(m).enumerate() {
                            // SAFETY: token `t + j` < `tokens` and row `first + r + i` < `rows`,
                            // so the index is inside `out`; only this task writes this row.
                            unsafe { out_ptr.write((t + j) * rows + first + r + i, *value) };
                        }
                    }
                    t += m;
                }
                r += n;
            }
        });
}

/// The output buffer, shared by tasks that each write their own rows.
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements, and the buffer outlives them (rayon joins before
// `matmul` returns).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `index` is inside the buffer and no other thread touches that element meanwhile.
    unsafe fn write(&self, index: usize, value: f32) {
        unsafe { self.0.add(index).write(value) }
    }
}

/// The lanes of a 16-column step at column `k` of a row of `n` that lie inside the row.
#[inline(always)]
pub(super) fn lane_mask(k: usize, n: usize) -> u16 {
    if n - k >= 16 {
        u16::MAX
    } else {
        (1u16 << (n - k)) - 1
    }
}

/// Sizes of the groups of activation rows that share a pass over a weight tile: as even as
/// possible (32 rows: 6, 6, 5, 5, 5, 5), since a small last group would stream the weights for
/// few products.
fn token_groups(tokens: usize) -> impl Iterator<Item = usize> {
    let groups = tokens.div_ceil(TILE_TOKENS);
    let (base, extra) = (tokens / groups.max(1), tokens % groups.max(1));
    (0..groups).map(move |g| base + usize::from(g < extra))
}

/// One tile: `n <= 4` weight rows against `m <= 6` activation rows, by the kernel sized for it.
fn tile<W: DenseWeight>(
    w: &[W],
    n: usize,
    x: &[f32],
    m: usize,
    cols: usize,
) -> [[f32; TILE_TOKENS]; TILE_ROWS] {
    macro_rules! dispatch {
        ($($n:literal, $m:literal);*) => {
            match (n, m) {
                $(($n, $m) => {
                    // SAFETY: `available()` was checked by `matmul`; the slices hold `n` and `m`
                    // rows of `cols`.
                    unsafe { x86::tile::<W, $n, $m>(w, x, cols) }
                })*
                _ => unreachable!("tile of {n}x{m}"),
            }
        };
    }
    dispatch!(4, 6; 4, 5; 4, 4; 4, 3; 4, 2; 4, 1;
              3, 6; 3, 5; 3, 4; 3, 3; 3, 2; 3, 1;
              2, 6; 2, 5; 2, 4; 2, 3; 2, 2; 2, 1;
              1, 6; 1, 5; 1, 4; 1, 3; 1, 2; 1, 1)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{lane_mask, DenseWeight, TILE_ROWS, TILE_TOKENS};

    /// `N` weight rows times `M` activation rows over all `cols`, sixteen columns a step.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn tile<W: DenseWeight, const N: usize, const M: usize>(
        w: &[W],
        x: &[f32],
        cols: usize,
    ) -> [[f32; TILE_TOKENS]; TILE_ROWS] {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); M]; N];
        let mut k = 0;
        while k < cols {
            let mask = lane_mask(k, cols);
            let mut wv = [_mm512_setzero_ps(); N];
            for (i, wv) in wv.iter_mut().enumerate() {
                *wv = W::load16(wp.add(i * cols + k), mask);
            }
            for j in 0..M {
                let xv = f32::load16(xp.add(j * cols + k), mask);
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    acc[j] = _mm512_fmadd_ps(*wv, xv, acc[j]);
                }
            }
            k += 16;
        }
        let mut out = [[0f32; TILE_TOKENS]; TILE_ROWS];
        for i in 0..N {
            for j in 0..M {
                out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
            }
        }
        out
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{DenseWeight, TILE_ROWS, TILE_TOKENS};

    pub(super) unsafe fn tile<W: DenseWeight, const N: usize, const M: usize>(
        _w: &[W],
        _x: &[f32],
        _cols: usize,
    ) -> [[f32; TILE_TOKENS]; TILE_ROWS] {
        unreachable!("the dense prefill kernel runs on x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};

    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 * seed).sin()).collect()
    }

    fn reference(w: &[f32], x: &[f32], cols: usize) -> Vec<f32> {
        let (rows, tokens) = (w.len() / cols, x.len() / cols);
        let mut out = vec![0f32; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                out[t * rows + r] = (0..cols)
                    .map(|k| w[r * cols + k] as f64 * x[t * cols + k] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn check(got: &[f32], want: &[f32], what: &str) {
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn token_groups_are_even_and_cover_every_row() {
        for tokens in 1..100 {
            let groups: Vec<usize> = token_groups(tokens).collect();
            assert_eq!(groups.iter().sum::<usize>(), tokens);
            assert!(groups.iter().all(|&g| (1..=TILE_TOKENS).contains(&g)));
            let (min, max) = (groups.iter().min(), groups.iter().max());
            assert!(max.unwrap() - min.unwrap() <= 1, "{tokens}: {groups:?}");
        }
        assert_eq!(token_groups(32).collect::<Vec<_>>(), [6, 6, 5, 5, 5, 5]);
    }

    /// A token's outputs are the same bits alone or in any batch: what lets a prefix cache
    /// filled by decoding stand in for one filled by prefill.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        if !available() {
            return;
        }
        let (rows, cols) = (21, 2100);
        let w = values(rows * cols, 1.3);
        for tokens in [2, 5, 6, 7, 13, 32] {
            let x = values(tokens * cols, 0.9);
            let mut batch = vec![0f32; tokens * rows];
            matmul(&w, &x, &mut batch, cols);
            for t in 0..tokens {
                let mut alone = vec![0f32; rows];
                matmul(&w, &x[t * cols..][..cols], &mut alone, cols);
                assert_eq!(alone, batch[t * rows..][..rows], "token {t} of {tokens}");
            }
        }
    }

    /// Every tile shape (row and token remainders) and a column count with a masked tail.
    #[test]
    fn matches_a_plain_product_for_every_weight_type() {
        if !available() {
            return;
        }
        for (rows, tokens, cols) in [
            (37, 13, 83),
            (16, 6, 64),
            (5, 1, 16),
            (70, 32, 256),
            (9, 7, 2100),
        ] {
            let w = values(rows * cols, 1.0);
            let x = values(tokens * cols, 0.7);
            let mut out = vec![0f32; tokens * rows];
            matmul(&w, &x, &mut out, cols);
            check(&out, &reference(&w, &x, cols), "f32");

            let w16: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
            let mut wide = vec![0f32; w.len()];
            w16.convert_to_f32_slice(&mut wide);
            matmul(&w16, &x, &mut out, cols);
            check(&out, &reference(&wide, &x, cols), "f16");

            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            wb.convert_to_f32_slice(&mut wide);
            matmul(&wb, &x, &mut out, cols);
            check(&out, &reference(&wide, &x, cols), "bf16");
        }
    }
}
