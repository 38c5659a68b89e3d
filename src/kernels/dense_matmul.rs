//! Dense products of one to a few dozen activation rows with a weight matrix, on AVX-512 or
//! AVX2, over weights repacked at load into panels of 64 rows.
//!
//! A prompt chunk is short (tens of rows) next to a weight matrix of thousands of rows, and a
//! decoded token is a single row: both are bound by how fast the weights stream through the
//! core, from memory or from L2. A panel stores, for each column `k`, the 64 weights of its rows
//! side by side, so the kernel is an outer product: four 16-lane weight vectors meet up to six
//! broadcast activations per column, 24 accumulators stay in registers, and each panel is read
//! front to back as one stream. The previous row-major tile (dot products of 16 columns, summed
//! across lanes at the end) spent its time fetching both operands from L2; this one keeps the
//! activations in L1 and reached 199 against 139 GFLOP/s on the development VM's two cores (the
//! measured FMA peak is 228).
//!
//! Every output is one chain of fused multiply-adds over `k` in order, whatever the number of
//! rows in the product: a token's outputs are the same bits whether it came in a prompt chunk or
//! alone, so a prefix cache filled either way holds identical values. f16 and bf16 weights are
//! widened in registers for a decode step; on Intel CPUs a prompt's product widens each block of
//! 128 panel columns once into an f32 copy in L1 that all its groups of rows share, and fetches
//! the next block meanwhile (785M f16 prefill, same-round medians on a Xeon: 125 → 142 tokens/s
//! at 32 tokens, 166 → 193 at 512); AMD's cores convert beside their multiply-adds, so there
//! prompts widen in registers too (see `widen_blocks_first`).
//!
//! CPUs without AVX-512 (most laptops) run the same panels with 8-lane vectors: the same chains,
//! so the same bits (tested). On the development VM, forced onto that path, f32 decode stayed at
//! the bandwidth limit and 32-token prefill ran at 78-98 tokens/s against 149-165 (candle's
//! matmul, the fallback before, had given 60-65, and widened 16-bit matrices on every call).

use std::sync::LazyLock;

use candle_core::{Device, Tensor};

use rayon::prelude::*;

use super::cpu;

/// Weight rows per panel: four 16-lane vectors.
const PANEL_ROWS: usize = 64;
/// Activation rows per pass over a panel.
const TILE_TOKENS: usize = 6;

/// Whether the panel kernels run here: AVX-512F/BW/VL, AVX2 with FMA and F16C, or the
/// portable twin where fused multiply-adds are native (not x86) or tests force it.
pub(crate) fn available() -> bool {
    KernelPath::detect().is_some()
}

/// The kernels a panel product can run on. All compute every output as the same chain of fused
/// multiply-adds, so they give the same bits (tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum KernelPath {
    /// Four 16-lane vectors per panel column.
    Avx512(cpu::Avx512),
    /// Eight 8-lane vectors per panel column (most laptops' CPUs).
    Avx2(cpu::Avx2),
    /// Scalar `mul_add` chains, the twin of both.
    Portable,
}

impl KernelPath {
    /// The best path for this process, `None` on an x86 CPU without AVX2 (where `mul_add` is a
    /// library call, so candle's matmul is faster) unless `CHATHUB_CPU` forces the twin.
    fn detect() -> Option<Self> {
        *DETECTED
    }
}

static DETECTED: LazyLock<Option<KernelPath>> = LazyLock::new(|| {
    if let Some(avx512) = cpu::avx512() {
        return Some(KernelPath::Avx512(avx512));
    }
    if let Some(avx2) = cpu::avx2() {
        return Some(KernelPath::Avx2(avx2));
    }
    (!cfg!(target_arch = "x86_64") || cpu::capped()).then_some(KernelPath::Portable)
});

/// A dense matrix's elements, row-major (or in panels once packed), in the dtype its products
/// read. Owned outright, so [`PanelMatrix::pack`] can rearrange it without a second copy.
#[derive(Debug)]
pub(crate) enum DenseRows {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl DenseRows {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            DenseRows::F32(v) => v.len(),
            DenseRows::F16(v) => v.len(),
            DenseRows::BF16(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            DenseRows::F32(v) => v.len() * 4,
            DenseRows::F16(v) => v.len() * 2,
            DenseRows::BF16(v) => v.len() * 2,
        }
    }
}

/// A weight matrix `[rows, cols]` stored panel by panel: panel `p` holds rows
/// `64p .. 64p + width` (the last panel may be narrower) as `cols` groups of `width` weights,
/// one group per column. A panel occupies the same elements as its rows did row-major, which is
/// what lets [`PanelMatrix::pack`] work in place.
#[derive(Debug)]
pub(crate) struct PanelMatrix {
    rows: usize,
    cols: usize,
    data: DenseRows,
}

impl PanelMatrix {
    /// Repacks a row-major matrix into panels, in its own buffer (one panel of scratch per
    /// thread), so loading never holds a matrix twice.
    ///
    /// # Panics
    /// When `data` does not hold `rows * cols` elements.
    pub(crate) fn pack(mut data: DenseRows, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "weights are not {rows}x{cols}");
        match &mut data {
            DenseRows::F32(v) => pack_in_place(v, cols),
            DenseRows::F16(v) => pack_in_place(v, cols),
            DenseRows::BF16(v) => pack_in_place(v, cols),
        }
        PanelMatrix { rows, cols, data }
    }

    /// The matrix row-major again, as a tensor on the CPU (for quantizing or exporting it).
    pub(crate) fn to_tensor(&self) -> candle_core::Result<Tensor> {
        let shape = (self.rows, self.cols);
        match &self.data {
            DenseRows::F32(v) => Tensor::from_vec(unpack(v, self.cols), shape, &Device::Cpu),
            DenseRows::F16(v) => Tensor::from_vec(unpack(v, self.cols), shape, &Device::Cpu),
            DenseRows::BF16(v) => Tensor::from_vec(unpack(v, self.cols), shape, &Device::Cpu),
        }
    }

    /// `(rows, cols)`, i.e. `(out_features, in_features)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes of weight one product reads.
    pub(crate) fn bytes(&self) -> usize {
        self.data.bytes()
    }

    /// `out = x W^T` for `x: [tokens, cols]` and `out: [tokens, rows]`, row-major.
    ///
    /// # Panics
    /// When [`available`] is false or the slices do not have those sizes.
    pub(crate) fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let path = KernelPath::detect().expect("a panel kernel runs on this CPU");
        self.matmul_on(path, widen_blocks_first(), x, out)
    }

    /// With `widen_blocks`, prompt-sized products of 16-bit weights on the AVX-512 path widen
    /// blocks into scratch first (see [`widen_blocks_first`]).
    fn matmul_on(&self, path: KernelPath, widen_blocks: bool, x: &[f32], out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        match &self.data {
            DenseRows::F32(w) => matmul(path, widen_blocks, w, rows, cols, x, out),
            DenseRows::F16(w) => matmul(path, widen_blocks, w, rows, cols, x, out),
            DenseRows::BF16(w) => matmul(path, widen_blocks, w, rows, cols, x, out),
        }
    }
}

/// Rearranges each run of [`PANEL_ROWS`] rows of `data` (row-major, `cols` wide) into a panel.
fn pack_in_place<T: Copy + Send + Sync>(data: &mut [T], cols: usize) {
    data.par_chunks_mut(PANEL_ROWS * cols).for_each_init(
        Vec::new,
        |scratch: &mut Vec<T>, panel| {
            let width = panel.len() / cols;
            scratch.clear();
            scratch.extend_from_slice(panel);
            // Eight columns at a time: the eight groups being written and the eight-element
            // pieces of each row being read all stay in L1.
            for (k0, groups) in panel.chunks_mut(8 * width).enumerate() {
                let k0 = 8 * k0;
                let n = groups.len() / width;
                for (r, row) in scratch.chunks_exact(cols).enumerate() {
                    for (i, value) in row[k0..k0 + n].iter().enumerate() {
                        groups[i * width + r] = *value;
                    }
                }
            }
        },
    );
}

/// The row-major matrix that [`pack_in_place`] turned into `panels`.
fn unpack<T: Copy + Default + Send + Sync>(panels: &[T], cols: usize) -> Vec<T> {
    let mut rows = vec![T::default(); panels.len()];
    rows.par_chunks_mut(PANEL_ROWS * cols)
        .zip(panels.par_chunks(PANEL_ROWS * cols))
        .for_each(|(rows, panel)| {
            let width = panel.len() / cols;
            for (k, group) in panel.chunks_exact(width).enumerate() {
                for (r, value) in group.iter().enumerate() {
                    rows[r * cols + k] = *value;
                }
            }
        });
    rows
}

/// A weight element type the kernel widens in registers.
pub(crate) trait DenseWeight: Copy + Send + Sync + 'static {
    /// Whether the elements are narrower than f32 (f16, bf16), so that a prompt's product
    /// widens each panel once into f32 instead of once per group of activation rows.
    const NARROW: bool;

    #[cfg(target_arch = "x86_64")]
    /// Sixteen elements from `p` (only the `mask`ed ones read) as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL; the masked elements are readable.
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;

    #[cfg(target_arch = "x86_64")]
    /// Eight elements from `p` as f32.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; eight elements are readable.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// The element as f32.
    fn to_f32(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
mod loads {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::DenseWeight;

    impl DenseWeight for f32 {
        const NARROW: bool = false;

        /// # Safety
        /// As [`DenseWeight::load16`]'s.
        #[inline(always)]
        unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
            // SAFETY: the caller guarantees AVX-512F/BW/VL (what `load_f32` enables) and
            // that the lanes `mask` keeps are readable at `p`.
            unsafe { load_f32(p, mask) }
        }

        /// # Safety
        /// As [`DenseWeight::load8`]'s.
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees AVX2 and F16C (what `load8_f32` enables) and
            // eight readable elements at `p`.
            unsafe { load8_f32(p) }
        }

        fn to_f32(self) -> f32 {
            self
        }
    }

    impl DenseWeight for f16 {
        const NARROW: bool = true;

        /// # Safety
        /// As [`DenseWeight::load16`]'s.
        #[inline(always)]
        unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
            // SAFETY: the caller guarantees AVX-512F/BW/VL (what `load_f16` enables) and
            // that the lanes `mask` keeps are readable at `p`.
            unsafe { load_f16(p, mask) }
        }

        /// # Safety
        /// As [`DenseWeight::load8`]'s.
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees AVX2 and F16C (what `load8_f16` enables) and
            // eight readable elements at `p`.
            unsafe { load8_f16(p) }
        }

        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    impl DenseWeight for bf16 {
        const NARROW: bool = true;

        /// # Safety
        /// As [`DenseWeight::load16`]'s.
        #[inline(always)]
        unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
            // SAFETY: the caller guarantees AVX-512F/BW/VL (what `load_bf16` enables) and
            // that the lanes `mask` keeps are readable at `p`.
            unsafe { load_bf16(p, mask) }
        }

        /// # Safety
        /// As [`DenseWeight::load8`]'s.
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees AVX2 and F16C (what `load8_bf16` enables) and
            // eight readable elements at `p`.
            unsafe { load8_bf16(p) }
        }

        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }

    /// Eight f32 at `p`.
    ///
    /// # Safety
    /// The CPU has AVX2; eight `f32` (32 bytes) are readable at `p` (any alignment).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8_f32(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 32 readable bytes at `p`; `loadu` needs no alignment.
        unsafe { _mm256_loadu_ps(p) }
    }

    /// Eight f16 at `p`, widened.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; eight `f16` (16 bytes) are readable at `p` (any alignment).
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8_f16(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at `p`; `loadu` needs no alignment.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
    }

    /// Eight bf16 at `p`, widened.
    ///
    /// # Safety
    /// The CPU has AVX2; eight `bf16` (16 bytes) are readable at `p` (any alignment).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8_bf16(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at `p`; `loadu` needs no alignment.
        let halves = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
    }

    /// Sixteen f32 at `p`, the lanes outside `mask` zero.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the elements at `p` whose lanes `mask` keeps are readable (all
    /// sixteen when `mask` is `u16::MAX`; lanes masked off are never touched).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load_f32(p: *const f32, mask: u16) -> __m512 {
        if mask == u16::MAX {
            // SAFETY: every lane is kept, so the caller guarantees 64 readable bytes at `p`;
            // `loadu` needs no alignment.
            unsafe { _mm512_loadu_ps(p) }
        } else {
            // SAFETY: a masked load reads only the lanes `mask` keeps, which the caller
            // guarantees are readable (masked-off lanes do not fault).
            unsafe { _mm512_maskz_loadu_ps(mask, p) }
        }
    }

    /// Sixteen f16 at `p`, widened, the lanes outside `mask` zero.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL; the elements at `p` whose lanes `mask` keeps are readable
    /// (all sixteen when `mask` is `u16::MAX`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_f16(p: *const f16, mask: u16) -> __m512 {
        let halves = if mask == u16::MAX {
            // SAFETY: every lane is kept, so the caller guarantees 32 readable bytes at `p`;
            // `loadu` needs no alignment.
            unsafe { _mm256_loadu_si256(p as *const __m256i) }
        } else {
            // SAFETY: a masked load reads only the lanes `mask` keeps, which the caller
            // guarantees are readable.
            unsafe { _mm256_maskz_loadu_epi16(mask, p as *const i16) }
        };
        _mm512_cvtph_ps(halves)
    }

    /// Sixteen bf16 at `p`, widened, the lanes outside `mask` zero.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL; the elements at `p` whose lanes `mask` keeps are readable
    /// (all sixteen when `mask` is `u16::MAX`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_bf16(p: *const bf16, mask: u16) -> __m512 {
        let halves = if mask == u16::MAX {
            // SAFETY: every lane is kept, so the caller guarantees 32 readable bytes at `p`;
            // `loadu` needs no alignment.
            unsafe { _mm256_loadu_si256(p as *const __m256i) }
        } else {
            // SAFETY: a masked load reads only the lanes `mask` keeps, which the caller
            // guarantees are readable.
            unsafe { _mm256_maskz_loadu_epi16(mask, p as *const i16) }
        };
        // A bf16 is the top half of an f32.
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod loads {
    use half::{bf16, f16};

    use super::DenseWeight;

    impl DenseWeight for f32 {
        const NARROW: bool = false;

        fn to_f32(self) -> f32 {
            self
        }
    }

    impl DenseWeight for f16 {
        const NARROW: bool = true;

        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    impl DenseWeight for bf16 {
        const NARROW: bool = true;

        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }
}

/// `out = x W^T` over the panels of `w` (`rows x cols`), panels shared out across rayon's pool.
fn matmul<W: DenseWeight>(
    path: KernelPath,
    widen_blocks: bool,
    w: &[W],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let tokens = x.len() / cols;
    assert_eq!(x.len(), tokens * cols, "activations are not whole rows");
    assert_eq!(w.len(), rows * cols, "weights are not whole rows");
    assert_eq!(out.len(), tokens * rows, "output has the wrong size");
    let panels = rows.div_ceil(PANEL_ROWS);
    // Enough panels per task to hide rayon's overhead, few enough to share out evenly.
    let panels_per_task = (panels / (rayon::current_num_threads() * 8)).max(1);
    // Each task writes all tokens' outputs for its own panels' rows: in the token-major output
    // those are `tokens` runs, disjoint from every other task's.
    let out_ptr = SharedOut(out.as_mut_ptr());
    let widen =
        W::NARROW && tokens > TILE_TOKENS && matches!(path, KernelPath::Avx512(_)) && widen_blocks;
    (0..panels)
        .into_par_iter()
        .step_by(panels_per_task)
        .for_each_init(Vec::new, |scratch: &mut Vec<f32>, first| {
            for p in first..(first + panels_per_task).min(panels) {
                let row = p * PANEL_ROWS;
                let width = PANEL_ROWS.min(rows - row);
                let panel = &w[row * cols..][..width * cols];
                if widen {
                    // SAFETY: `widen` implies the Avx512 path, detected on this CPU. `panel`
                    // is this panel's `width * cols` weights and `x` all `tokens` rows of
                    // `cols`; rows `row .. row + width` of every token lie inside `out` (its
                    // size was checked above) and belong to this task alone.
                    unsafe {
                        widened_panel(
                            panel,
                            width,
                            x,
                            tokens,
                            cols,
                            out_ptr.at(row),
                            rows,
                            scratch,
                        )
                    };
                    continue;
                }
                let mut t = 0;
                for m in token_groups(tokens) {
                    let x_rows = &x[t * cols..][..m * cols];
                    // SAFETY: `path` was detected on this CPU (its token is made only after
                    // detection). `panel` is `width * cols` weights and `x_rows` `m * cols`
                    // activations (sliced just above), `1 <= m <= 6` (token_groups), `width <=
                    // 64` and `cols > 0` (else `x.len() / cols` would have panicked). Rows
                    // `row .. row + width` of tokens `t .. t + m` lie inside `out` (its size was
                    // checked above: `tokens * rows`) and belong to this task alone.
                    unsafe {
                        tile(
                            path,
                            panel,
                            width,
                            x_rows,
                            m,
                            cols,
                            out_ptr.at(t * rows + row),
                            rows,
                        )
                    };
                    t += m;
                }
            }
        });
}

/// The output buffer, shared by tasks that each write their own rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the pointer is only used by `matmul`'s tasks, which write disjoint elements (each
// its own panels' rows), and the buffer it points into is borrowed mutably by `matmul`, which
// outlives them (rayon joins before it returns).
unsafe impl Send for SharedOut {}
// SAFETY: as for `Send`: sharing the pointer lets each task write only its own elements, and
// nothing reads the buffer until every task has finished.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer to element `index`.
    ///
    /// # Safety
    /// `index` is inside the buffer (at most its length).
    unsafe fn at(self, index: usize) -> *mut f32 {
        // SAFETY: the caller guarantees `index` is within the buffer, so the offset stays in
        // the same allocation.
        unsafe { self.0.add(index) }
    }
}

/// The lanes of a 16-column step at column `k` of a row of `n` that lie inside the row.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn lane_mask(k: usize, n: usize) -> u16 {
    if n - k >= 16 {
        u16::MAX
    } else {
        (1u16 << (n - k)) - 1
    }
}

/// Sizes of the groups of activation rows that share a pass over a panel: as even as possible
/// (32 rows: 6, 6, 5, 5, 5, 5), since a small last group would stream the panel for few
/// products.
fn token_groups(tokens: usize) -> impl Iterator<Item = usize> {
    let groups = tokens.div_ceil(TILE_TOKENS);
    let (base, extra) = (tokens / groups.max(1), tokens % groups.max(1));
    (0..groups).map(move |g| base + usize::from(g < extra))
}

/// One panel of `width <= 64` rows against `m <= 6` activation rows, by the kernel sized for
/// it; the results go to `out[j * out_stride + i]` for token `j` and panel row `i`.
///
/// # Safety
/// `path` runs on this CPU; `1 <= m <= 6`, `width <= 64` and `cols > 0`; `panel` holds `cols`
/// groups of `width` weights, `x` holds `m` rows of `cols`, and `out` has room for `m` runs of
/// `width` values `out_stride` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<W: DenseWeight>(
    path: KernelPath,
    panel: &[W],
    width: usize,
    x: &[f32],
    m: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
) {
    match path {
        // SAFETY: the Avx512 token proves AVX-512F/BW/VL; the rows of `x` are `cols` apart,
        // and the rest is as the caller guarantees.
        KernelPath::Avx512(_) => unsafe {
            avx512_tile(panel, width, x, cols, m, cols, out, out_stride, false, true)
        },
        // SAFETY: the Avx2 token proves FMA; `out` has room for `m` runs of `width` values, as
        // the caller guarantees.
        KernelPath::Avx2(_) if width < PANEL_ROWS => unsafe {
            narrow_panel(panel, width, x, m, cols, out, out_stride)
        },
        // SAFETY: `out` has room for `m` runs of `width` values, as the caller guarantees.
        KernelPath::Portable => unsafe { portable_tile(panel, width, x, m, cols, out, out_stride) },
        // For all five: the Avx2 token proves AVX2, FMA and F16C; the panel is a full 64 rows
        // wide (narrower ones took the arm above), so `panel` holds `cols` groups of 64, `x`
        // holds `m` rows of `cols` and `out` has room for `m` runs of 64 `out_stride` apart, as
        // the caller guarantees.
        KernelPath::Avx2(_) => match m {
            // SAFETY: see above; one token, so `out_stride` is not used.
            1 => unsafe { avx2::column(panel, x, cols, out) },
            // SAFETY: see above.
            2 => unsafe { avx2::tile::<W, 2>(panel, x, cols, out, out_stride) },
            // SAFETY: see above.
            3 => unsafe { avx2::tile::<W, 3>(panel, x, cols, out, out_stride) },
            // SAFETY: see above.
            4 => unsafe { avx2::tile::<W, 4>(panel, x, cols, out, out_stride) },
            // SAFETY: see above.
            5 => unsafe { avx2::tile::<W, 5>(panel, x, cols, out, out_stride) },
            // SAFETY: see above.
            6 => unsafe { avx2::tile::<W, 6>(panel, x, cols, out, out_stride) },
            _ => unreachable!("tile of {m} tokens"),
        },
    }
}

/// [`x86::tile`] sized for `m` rows and for a full or narrow panel (see there for the
/// arguments).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `1 <= m <= 6`, and the rest as [`x86::tile`] asks.
#[allow(clippy::too_many_arguments)]
unsafe fn avx512_tile<W: DenseWeight>(
    panel: &[W],
    width: usize,
    x: &[f32],
    x_stride: usize,
    m: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
    carry: bool,
    streamed: bool,
) {
    macro_rules! dispatch {
        ($($m:literal),*) => {
            match (width == PANEL_ROWS, m) {
                $((true, $m) => {
                    // SAFETY: `M = m` and `FULL` is whether the panel is 64 rows wide; the
                    // rest is the caller's contract.
                    unsafe {
                        x86::tile::<W, $m, true>(
                            panel, width, x, x_stride, cols, out, out_stride, carry, streamed,
                        )
                    }
                }
                (false, $m) => {
                    // SAFETY: as above, for a panel narrower than 64 rows.
                    unsafe {
                        x86::tile::<W, $m, false>(
                            panel, width, x, x_stride, cols, out, out_stride, carry, streamed,
                        )
                    }
                })*
                _ => unreachable!("tile of {width}x{m}"),
            }
        };
    }
    dispatch!(1, 2, 3, 4, 5, 6)
}

/// Whether prompt-sized products of 16-bit weights widen blocks of them into f32 scratch first
/// ([`widened_panel`]) rather than in registers at every pass of a group of rows. On Intel
/// cores the conversions are two uops on the ports the fused multiply-adds need, and widening
/// once paid (785M f16 prefill, Xeon: 125 -> 142 tokens/s at 32 tokens). AMD's Zen 4 runs them
/// beside its multiply-adds, and there the extra pass over the weights was the loss (EPYC,
/// same-binary pairs: f16 at 32 tokens 140-144 widened against 172-175 in registers, at 512
/// 179-180 against 190; bf16 the same).
fn widen_blocks_first() -> bool {
    !cpu::amd()
}

/// Columns of a panel widened to f32 at a time: 64 rows of them fill 32 KiB, which stays in
/// L1 next to the activation rows while every group of rows runs over them.
const WIDEN_COLS: usize = 128;

/// One panel of 16-bit weights against all `tokens` activation rows, a block of
/// [`WIDEN_COLS`] columns at a time: the block is widened to f32 once into `scratch`, then each
/// group of rows runs over it, carrying its sums from the previous block through `out`. Reading
/// 16-bit weights, every group paid for the conversions itself, two uops each on the ports the
/// fused multiply-adds need. The chains of fused multiply-adds are the same (widening is exact,
/// a stored and reloaded sum is the same bits), so the results are too.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `width <= 64` and `cols > 0`; `panel` holds `cols` groups of
/// `width` weights, `x` holds `tokens` rows of `cols`, and `out` has room for `tokens` runs
/// of `width` values `out_stride` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn widened_panel<W: DenseWeight>(
    panel: &[W],
    width: usize,
    x: &[f32],
    tokens: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
    scratch: &mut Vec<f32>,
) {
    scratch.resize(WIDEN_COLS * PANEL_ROWS, 0.0);
    let mut k = 0;
    while k < cols {
        let block = WIDEN_COLS.min(cols - k);
        let widened = &mut scratch[..block * width];
        // SAFETY: AVX-512 as the caller guarantees; the source is columns `k .. k + block` of
        // the panel, `block * width` weights, as many as `widened` holds.
        unsafe { x86::widen(&panel[k * width..][..block * width], widened) };
        // The next block's weights come from memory while the groups run over this one, a
        // share after each group (all at once would overflow the queue of misses in flight).
        let next = &panel[(k + block) * width..];
        let next = &next[..next.len().min(WIDEN_COLS * width)];
        let next_bytes = std::mem::size_of_val(next);
        let groups = tokens.div_ceil(TILE_TOKENS);
        let share = next_bytes.div_ceil(groups).next_multiple_of(64);
        let mut t = 0;
        for (g, m) in token_groups(tokens).enumerate() {
            crate::kernels::prefetch(
                next.as_ptr().cast::<u8>().wrapping_add(g * share),
                share.min(next_bytes.saturating_sub(g * share)),
            );
            // SAFETY: AVX-512 as the caller guarantees; `widened` holds `block` groups of
            // `width` weights, `x` from row `t` column `k` holds `m <= 6` rows `cols` apart with
            // `block` columns each, and `out` from token `t` has room for `m` runs of `width`
            // values (holding the sums so far after the first block), as the caller guarantees
            // for all `tokens`.
            unsafe {
                avx512_tile(
                    widened,
                    width,
                    &x[t * cols + k..],
                    cols,
                    m,
                    block,
                    out.add(t * out_stride),
                    out_stride,
                    k > 0,
                    false,
                )
            };
            t += m;
        }
        k += block;
    }
}

/// The portable twin of the vector kernels: for each column, every row of the panel takes the
/// column's weight times each activation into its running sum with one fused multiply-add,
/// exactly the chains the vector kernels compute (so the same bits).
///
/// # Safety
/// `out` has room for `m` runs of `width` values `out_stride` apart (the slices are indexed
/// with bounds checks).
#[allow(clippy::too_many_arguments)]
unsafe fn portable_tile<W: DenseWeight>(
    panel: &[W],
    width: usize,
    x: &[f32],
    m: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let mut acc = [[0f32; PANEL_ROWS]; TILE_TOKENS];
    for k in 0..cols {
        let weights = &panel[k * width..][..width];
        for (j, acc) in acc.iter_mut().enumerate().take(m) {
            let xk = x[j * cols + k];
            for (acc, w) in acc.iter_mut().zip(weights) {
                *acc = w.to_f32().mul_add(xk, *acc);
            }
        }
    }
    for (j, acc) in acc.iter().enumerate().take(m) {
        for (i, value) in acc.iter().enumerate().take(width) {
            // SAFETY: `j < m` and `i < width`, and the caller gives room for `m` runs of
            // `width` values `out_stride` apart.
            unsafe { out.add(j * out_stride + i).write(*value) };
        }
    }
}

/// A matrix's narrower last panel on the AVX2 path: each output as the same chain of fused
/// multiply-adds the vector kernels compute, one at a time (one panel per matrix at most).
///
/// # Safety
/// The CPU has FMA (on x86-64); `out` has room for `m` runs of `width` values `out_stride`
/// apart (the slices are indexed with bounds checks).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
unsafe fn narrow_panel<W: DenseWeight>(
    panel: &[W],
    width: usize,
    x: &[f32],
    m: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for j in 0..m {
        let x = &x[j * cols..][..cols];
        for i in 0..width {
            let mut acc = 0f32;
            for (k, x) in x.iter().enumerate() {
                acc = panel[k * width + i].to_f32().mul_add(*x, acc);
            }
            // SAFETY: `j < m` and `i < width`, and the caller gives room for `m` runs of
            // `width` values `out_stride` apart.
            unsafe { out.add(j * out_stride + i).write(acc) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{DenseWeight, PANEL_ROWS};

    /// One activation row against a full panel: all 64 rows a column step, eight 8-lane sums.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `panel` holds `cols` groups of 64 weights (at least
    /// `64 * cols` elements), `x` one row of `cols` (checked), and `out` has room for 64
    /// values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn column<W: DenseWeight>(
        panel: &[W],
        x: &[f32],
        cols: usize,
        out: *mut f32,
    ) {
        const VECTORS: usize = PANEL_ROWS / 8;
        let mut acc = [_mm256_setzero_ps(); VECTORS];
        let mut wp = panel.as_ptr();
        for xk in &x[..cols] {
            let xb = _mm256_set1_ps(*xk);
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `wp` is at this column's group of 64 weights inside `panel` (`cols`
                // groups, one step per column), so the eight at `8 * v < 64` are readable;
                // AVX2 and F16C as the caller guarantees.
                let w = unsafe { W::load8(wp.add(8 * v)) };
                *acc = _mm256_fmadd_ps(w, xb, *acc);
            }
            // SAFETY: the next column's group; after the last of the `cols` groups this is one
            // past the end of `panel`'s `64 * cols` elements, which is still in bounds.
            wp = unsafe { wp.add(PANEL_ROWS) };
        }
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: `8 * v + 8 <= 64`, and the caller gives room for 64 values at `out`;
            // `storeu` needs no alignment.
            unsafe { _mm256_storeu_ps(out.add(8 * v), *acc) };
        }
    }

    /// `M` activation rows against a full panel, 16 of its rows at a time (2 × `M` sums and two
    /// weight vectors fill the 16 registers), a block of [`TILE_BLOCK`] columns at a time: the
    /// four runs of 16 rows go over each block while it is in L1, and carry their sums from
    /// block to block. Each output is still one chain of multiply-adds in column order.
    ///
    /// Run over the whole panel for each 16 rows, a matrix streaming from memory was read four
    /// times: 4 rows of an 11008x2048 f16 matrix took 3.39 ms against 0.91 for one row.
    ///
    /// # Safety
    /// As [`column()`]'s, with `cols > 0`, `M` rows of `cols` in `x` (at least `M * cols`
    /// elements, read unchecked) and room for `M` runs of 64 values `out_stride` apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<W: DenseWeight, const M: usize>(
        panel: &[W],
        x: &[f32],
        cols: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        const RUNS: usize = PANEL_ROWS / 16;
        let xp = x.as_ptr();
        let mut sums = [[[_mm256_setzero_ps(); 2]; M]; RUNS];
        for start in (0..cols).step_by(TILE_BLOCK) {
            let end = (start + TILE_BLOCK).min(cols);
            for (sub, sums) in sums.iter_mut().enumerate() {
                let mut acc = *sums;
                // SAFETY: `start < cols`, so column `start`'s group of 64 lies inside `panel`
                // (`64 * cols` elements), and `16 * sub < 64` stays in it.
                let mut wp = unsafe { panel.as_ptr().add(start * PANEL_ROWS + 16 * sub) };
                for k in start..end {
                    // SAFETY: `wp` is rows `16 * sub .. 16 * sub + 16` of column `k`'s group of
                    // 64 inside `panel`, so both runs of eight are readable; AVX2 and F16C as
                    // the caller guarantees.
                    let (w0, w1) = unsafe { (W::load8(wp), W::load8(wp.add(8))) };
                    if sub == 0 {
                        // The next block's group of this column, both of its lines: the first
                        // run reads only every other line of a block, and left to the
                        // hardware the rest arrived late. A prefetch never faults, so the
                        // address may lie past the panel.
                        let next = wp.wrapping_add(TILE_BLOCK * PANEL_ROWS).cast::<i8>();
                        _mm_prefetch::<_MM_HINT_T0>(next);
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64));
                    }
                    for (j, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: `j < M` and `k < cols`: inside `x`'s `M * cols` elements.
                        let xb = _mm256_set1_ps(unsafe { *xp.add(j * cols + k) });
                        acc[0] = _mm256_fmadd_ps(w0, xb, acc[0]);
                        acc[1] = _mm256_fmadd_ps(w1, xb, acc[1]);
                    }
                    // The same rows of the next column's group, inside `panel` while
                    // `k + 1 < cols`. After the last column this is `16 * sub` elements past
                    // the end of `panel` (never read), possibly outside its allocation:
                    // `wrapping_add` allows that where `add` does not.
                    wp = wp.wrapping_add(PANEL_ROWS);
                }
                *sums = acc;
            }
        }
        for (sub, sums) in sums.iter().enumerate() {
            for (j, acc) in sums.iter().enumerate() {
                // SAFETY: `j < M` and `16 * sub + 16 <= 64`: values `16 * sub .. 16 * sub + 16`
                // of run `j`, for which the caller gives room; `storeu` needs no alignment.
                unsafe {
                    let dst = out.add(j * out_stride + 16 * sub);
                    _mm256_storeu_ps(dst, acc[0]);
                    _mm256_storeu_ps(dst.add(8), acc[1]);
                }
            }
        }
    }

    /// Columns [`tile`] takes at a time: 16 KiB of a 16-bit panel (32 KiB of an f32 one), what
    /// L1 holds beside the activations.
    const TILE_BLOCK: usize = 128;
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use super::DenseWeight;

    /// Never called: there is no AVX2 token off x86-64.
    ///
    /// # Safety
    /// None needed (it only panics); `unsafe` to match the x86-64 kernel's signature.
    pub(super) unsafe fn column<W: DenseWeight>(_p: &[W], _x: &[f32], _c: usize, _o: *mut f32) {
        unreachable!("the AVX2 kernel runs on x86-64 only")
    }

    /// Never called: there is no AVX2 token off x86-64.
    ///
    /// # Safety
    /// None needed (it only panics); `unsafe` to match the x86-64 kernel's signature.
    pub(super) unsafe fn tile<W: DenseWeight, const M: usize>(
        _p: &[W],
        _x: &[f32],
        _c: usize,
        _o: *mut f32,
        _s: usize,
    ) {
        unreachable!("the AVX2 kernel runs on x86-64 only")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{lane_mask, DenseWeight, PANEL_ROWS};

    /// Vectors of 16 rows in a panel.
    const VECTORS: usize = PANEL_ROWS / 16;

    /// Only passes of up to this many activation rows prefetch: decode steps (one row per
    /// sequence) stream each panel once, while prefill's groups of five or six rows find it in
    /// L2 after their first pass, where the hints are only extra instructions (32-token f16
    /// prefill lost speed with them).
    const PREFETCH_MAX_ROWS: usize = 4;

    /// `to[i] = from[i]` as f32, sixteen at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL; `to` is as long as `from`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn widen<W: DenseWeight>(from: &[W], to: &mut [f32]) {
        assert_eq!(
            from.len(),
            to.len(),
            "widening into a buffer of another size"
        );
        let n = from.len();
        let mut i = 0;
        while i < n {
            let mask = lane_mask(i, n);
            // SAFETY: `i < n`, and `mask` keeps only the lanes of elements `i .. n`, inside
            // both slices (`to` is as long as `from`, the caller guarantees); masked-off lanes
            // are neither read nor written.
            unsafe {
                let wide = W::load16(from.as_ptr().add(i), mask);
                _mm512_mask_storeu_ps(to.as_mut_ptr().add(i), mask, wide);
            }
            i += 16;
        }
    }

    /// `M` activation rows times one panel over `cols` columns, one column a step: the
    /// panel's weights for the column are four vectors, each activation is broadcast. `FULL`
    /// panels are 64 rows wide; the narrower last panel of a matrix masks its loads and
    /// stores. The activation rows are `x_stride` apart. With `carry`, each sum continues from
    /// the value in `out` (the same chain, split over blocks of columns), else from zero.
    /// `streamed` weights come from memory and are prefetched ahead (for the decode-sized
    /// passes that stream a panel once).
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL; `width <= 64`, and `width == 64` when `FULL`; `panel` holds
    /// `cols` groups of `width` weights, `x` holds `M` rows of `cols` `x_stride` apart (both
    /// read unchecked), and `out` has room for `M` runs of `width` values `out_stride` apart
    /// (holding the sums so far, with `carry`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<W: DenseWeight, const M: usize, const FULL: bool>(
        panel: &[W],
        width: usize,
        x: &[f32],
        x_stride: usize,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        carry: bool,
        streamed: bool,
    ) {
        let masks: [u16; VECTORS] = std::array::from_fn(|v| {
            if FULL || 16 * v + 16 <= width {
                u16::MAX
            } else if 16 * v < width {
                lane_mask(16 * v, width)
            } else {
                0
            }
        });
        let stride = if FULL { PANEL_ROWS } else { width };
        let (mut wp, xp) = (panel.as_ptr(), x.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; M];
        if carry {
            for (j, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: the lanes the stores below write, which the caller says hold
                    // the sums so far (masked-off lanes are never read).
                    *acc = unsafe {
                        _mm512_maskz_loadu_ps(masks[v], out.wrapping_add(j * out_stride + 16 * v))
                    };
                }
            }
        }
        let column_bytes = stride * std::mem::size_of::<W>();
        let ahead = crate::kernels::panel_prefetch_ahead();
        let prefetch = streamed && M <= PREFETCH_MAX_ROWS && ahead > 0;
        for k in 0..cols {
            if prefetch {
                crate::kernels::prefetch(wp.cast::<u8>().wrapping_add(ahead), column_bytes);
            }
            let mut wv = [_mm512_setzero_ps(); VECTORS];
            for (v, wv) in wv.iter_mut().enumerate() {
                let mask = if FULL { u16::MAX } else { masks[v] };
                // SAFETY: `wp` is column `k`'s group of `stride` weights inside `panel`; `mask`
                // keeps only rows `16 * v .. width` of it (all 16 of a full panel's), so every
                // lane read is inside `panel`, and masked-off lanes are never touched. AVX-512
                // as the caller guarantees. In a narrow panel, for `16 * v >= width` (mask 0)
                // the address is past the group, and at the last column possibly past the
                // end of `panel`'s allocation: computed with `wrapping_add`, never read.
                *wv = unsafe { W::load16(wp.wrapping_add(16 * v), mask) };
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `j < M` and `k < cols`: inside the `M` rows of `x`, `x_stride`
                // apart, of `cols` elements each.
                let xb = _mm512_set1_ps(unsafe { *xp.add(j * x_stride + k) });
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_fmadd_ps(*wv, xb, *acc);
                }
            }
            // SAFETY: the next column's group; after the last of the `cols` groups this is one
            // past the end of `panel`'s `stride * cols` elements, which is still in bounds.
            wp = unsafe { wp.add(stride) };
        }
        for (j, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: `j < M`; a full panel stores values `16 * v .. 16 * v + 16 <= 64` of
                // run `j`, a narrow one only the lanes of `masks[v]`, values below `width`: all
                // inside the room the caller gives. As for the loads, when `16 * v >= width`
                // (mask 0) `dst` can lie past the end of the output buffer (the last token's
                // run of the last panel): `wrapping_add`, never written through.
                unsafe {
                    let dst = out.wrapping_add(j * out_stride + 16 * v);
                    if FULL {
                        _mm512_storeu_ps(dst, *acc);
                    } else {
                        _mm512_mask_storeu_ps(dst, masks[v], *acc);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::DenseWeight;

    /// Never called: there is no AVX-512 token off x86-64.
    ///
    /// # Safety
    /// None needed (it only panics); `unsafe` to match the x86-64 kernel's signature.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<W: DenseWeight, const M: usize, const FULL: bool>(
        _panel: &[W],
        _width: usize,
        _x: &[f32],
        _x_stride: usize,
        _cols: usize,
        _out: *mut f32,
        _out_stride: usize,
        _carry: bool,
        _streamed: bool,
    ) {
        unreachable!("the dense kernel runs on x86-64 only")
    }

    /// Never called: there is no AVX-512 token off x86-64.
    ///
    /// # Safety
    /// None needed (it only panics); `unsafe` to match the x86-64 kernel's signature.
    pub(super) unsafe fn widen<W: DenseWeight>(_from: &[W], _to: &mut [f32]) {
        unreachable!("the dense kernel runs on x86-64 only")
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

    fn product(m: &PanelMatrix, x: &[f32]) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.len() / m.cols * m.rows];
        m.matmul(x, &mut out);
        out
    }

    fn product_on(
        (path, widen_blocks): (KernelPath, bool),
        m: &PanelMatrix,
        x: &[f32],
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.len() / m.cols * m.rows];
        m.matmul_on(path, widen_blocks, x, &mut out);
        out
    }

    /// `w` (`rows x cols`) packed as f32, f16 and bf16.
    fn every_weight_type(w: &[f32], rows: usize, cols: usize) -> [PanelMatrix; 3] {
        [
            PanelMatrix::pack(DenseRows::F32(w.to_vec()), rows, cols),
            PanelMatrix::pack(
                DenseRows::F16(w.iter().map(|v| f16::from_f32(*v)).collect()),
                rows,
                cols,
            ),
            PanelMatrix::pack(
                DenseRows::BF16(w.iter().map(|v| bf16::from_f32(*v)).collect()),
                rows,
                cols,
            ),
        ]
    }

    /// Every kernel path this process may run (an AVX-512 CPU runs all three, and the AVX-512
    /// one both ways of widening 16-bit weights, whichever maker's CPU this is), each with
    /// whether it widens blocks first.
    fn paths() -> Vec<(KernelPath, bool)> {
        let mut paths = Vec::new();
        if let Some(avx512) = cpu::avx512() {
            paths.push((KernelPath::Avx512(avx512), true));
            paths.push((KernelPath::Avx512(avx512), false));
        }
        paths.extend(cpu::avx2().map(|avx2| (KernelPath::Avx2(avx2), false)));
        paths.push((KernelPath::Portable, false));
        paths
    }

    /// Both paths compute the same chains of fused multiply-adds: the same bits, whichever
    /// machine a prefix cache or a test expectation was made on. Full and narrow panels, every
    /// token-group size, every weight type.
    #[test]
    fn every_path_gives_the_same_bits() {
        let paths = paths();
        // (150, 20, 300): 16-bit prompts widen blocks of 128 columns, the last one short.
        for (rows, tokens, cols) in [
            (37, 13, 83),
            (64, 6, 64),
            (200, 32, 256),
            (130, 1, 300),
            (150, 20, 300),
        ] {
            let w = values(rows * cols, 1.0);
            let x = values(tokens * cols, 0.7);
            for m in &every_weight_type(&w, rows, cols) {
                let results: Vec<Vec<u32>> = paths
                    .iter()
                    .map(|p| product_on(*p, m, &x).iter().map(|v| v.to_bits()).collect())
                    .collect();
                for (path, bits) in paths.iter().zip(&results) {
                    assert_eq!(bits, &results[0], "{path:?} {rows}x{cols}, {tokens} tokens");
                }
            }
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

    /// Packing and unpacking give back the row-major matrix, narrow last panel included.
    #[test]
    fn packing_round_trips() -> candle_core::Result<()> {
        for (rows, cols) in [(64, 3), (130, 7), (5, 16), (200, 1)] {
            let w = values(rows * cols, 1.1);
            let packed = PanelMatrix::pack(DenseRows::F32(w.clone()), rows, cols);
            assert_eq!(packed.dims(), (rows, cols));
            let back = packed.to_tensor()?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(back, w, "{rows}x{cols}");
        }
        Ok(())
    }

    /// A token's outputs are the same bits alone or in any batch: what lets a prefix cache
    /// filled by decoding stand in for one filled by prefill.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        if !available() {
            return;
        }
        let (rows, cols) = (150, 2100);
        let w = values(rows * cols, 1.3);
        // 16-bit weights too: a prompt's product may widen them into f32 blocks first, a
        // decode step's widens them in registers.
        let matrices = every_weight_type(&w, rows, cols);
        for (w, path) in matrices
            .iter()
            .flat_map(|w| paths().into_iter().map(move |p| (w, p)))
        {
            for tokens in [2, 5, 6, 7, 13, 32] {
                let x = values(tokens * cols, 0.9);
                let batch = product_on(path, w, &x);
                for t in 0..tokens {
                    let alone = product_on(path, w, &x[t * cols..][..cols]);
                    assert_eq!(
                        alone,
                        batch[t * rows..][..rows],
                        "{path:?} token {t} of {tokens}"
                    );
                }
            }
        }
    }

    /// Every token-group size, full and narrow panels, and every weight type.
    #[test]
    fn matches_a_plain_product_for_every_weight_type() {
        if !available() {
            return;
        }
        for (rows, tokens, cols) in [
            (37, 13, 83),
            (64, 6, 64),
            (5, 1, 16),
            (200, 32, 256),
            (129, 7, 2100),
            (70, 3, 1),
        ] {
            let w = values(rows * cols, 1.0);
            let x = values(tokens * cols, 0.7);
            let packed = PanelMatrix::pack(DenseRows::F32(w.clone()), rows, cols);
            check(&product(&packed, &x), &reference(&w, &x, cols), "f32");

            let w16: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
            let mut wide = vec![0f32; w.len()];
            w16.convert_to_f32_slice(&mut wide);
            let packed = PanelMatrix::pack(DenseRows::F16(w16), rows, cols);
            assert!(matches!(packed.data, DenseRows::F16(_)));
            check(&product(&packed, &x), &reference(&wide, &x, cols), "f16");

            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            wb.convert_to_f32_slice(&mut wide);
            let packed = PanelMatrix::pack(DenseRows::BF16(wb), rows, cols);
            check(&product(&packed, &x), &reference(&wide, &x, cols), "bf16");
        }
    }
}
