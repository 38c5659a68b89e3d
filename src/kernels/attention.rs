//! Causal attention over a conversation's cached keys and values on the CPU, one query row at a
//! time.
//!
//! Decoding attends one query per head to the whole context. candle's batched matmul ran that
//! on one core through a strided view of the cache, and at 2048 tokens of context it cost a
//! third of each token (f32 decode 16 → 11 tokens/s). Here a task is a token's run of one
//! group's heads on rayon's pool: it reads the group's cached keys and values once for the run,
//! front to back (the cache keeps each group's positions contiguous), and skips the keys its
//! mask would hide.
//!
//! A row's scores, softmax and weighted sum are computed the same way whether its query came
//! alone or in a prompt chunk, so a cache filled by decoding holds the same bits as one filled by
//! prefill (what lets the prefix cache stand in for a recomputation), as with
//! [`super::dense_matmul`].

use std::sync::LazyLock;

use rayon::prelude::*;

use super::cpu;

/// What a conversation's cache stores keys and values in: f32, or f16 for half the memory per
/// token and half the bytes a decode step's attention reads. The kernels widen each value to
/// f32 on load, which is exact, so attending over an f16 cache gives the bits attending over
/// the same values in an f32 cache gives.
pub(crate) trait Cached: Copy + Send + Sync + sealed::Sealed {
    /// Whether a value is an IEEE half (16 bits a lane to load) rather than an f32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const HALF: bool;

    /// The value as an f32.
    fn widen(self) -> f32;
}

impl Cached for f32 {
    const HALF: bool = false;

    fn widen(self) -> f32 {
        self
    }
}

impl Cached for half::f16 {
    const HALF: bool = true;

    fn widen(self) -> f32 {
        self.to_f32()
    }
}

mod sealed {
    /// Only the element types the vector kernel knows how to load.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// Whether the attention kernel runs here: on AVX-512, or its portable twin off x86 (or when
/// `CHATHUB_CPU=portable` forces it). x86 CPUs without AVX-512 use candle's matmul-based
/// attention, which vectorizes for them.
pub(crate) fn available() -> bool {
    Path::detect().is_some()
}

/// The kernels attention can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Path {
    Avx512(cpu::Avx512),
    Portable,
}

impl Path {
    fn detect() -> Option<Self> {
        *DETECTED
    }
}

static DETECTED: LazyLock<Option<Path>> = LazyLock::new(|| match cpu::avx512() {
    Some(avx512) => Some(Path::Avx512(avx512)),
    // Capped to AVX2 here, a process runs candle's attention as an AVX2 CPU does, so that
    // tests and benchmarks at that level see what such a CPU runs; capped to plain Rust, the
    // portable twin.
    None => (!cfg!(target_arch = "x86_64") || cpu::level() == cpu::Level::Portable)
        .then_some(Path::Portable),
});

/// The shapes of one sequence's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Query rows (new tokens), at positions `start..start + tokens`.
    pub(crate) tokens: usize,
    /// Position of the first new token: keys `0..start + tokens` are in the cache.
    pub(crate) start: usize,
    /// Query heads.
    pub(crate) heads: usize,
    /// Key/value heads (groups); `heads` is a multiple of it.
    pub(crate) kv_heads: usize,
    /// Values per head.
    pub(crate) head_dim: usize,
    /// Elements from one group's first cached row to the next group's (the cache's capacity
    /// times `head_dim`).
    pub(crate) group_stride: usize,
}

/// One sequence's part of an attention call: its new queries and its cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sequence<'a, T: Cached> {
    /// `[tokens, heads, head_dim]`.
    pub(crate) q: &'a [f32],
    /// The cache's keys and values, `[kv_heads, capacity, head_dim]` (groups
    /// `shape.group_stride` apart), holding at least `start + tokens` positions.
    pub(crate) k: &'a [T],
    pub(crate) v: &'a [T],
    pub(crate) shape: Shape,
}

/// `softmax(q kᵀ · scale, causal) v` for each of `sequences` (which share `heads`, `kv_heads`
/// and `head_dim`), in one parallel step: a batched decode step attends for every
/// conversation at once instead of one short step per conversation. Returns every sequence's
/// `[tokens, heads · head_dim]`, one after another.
///
/// # Panics
/// When [`available`] is false, the sequences' head shapes differ, or a slice is shorter than
/// its shape says.
pub(crate) fn attend<T: Cached>(sequences: &[Sequence<'_, T>], scale: f32) -> Vec<f32> {
    let path = Path::detect().expect("the attention kernel runs here");
    attend_on(path, sequences, scale)
}

fn attend_on<T: Cached>(path: Path, sequences: &[Sequence<'_, T>], scale: f32) -> Vec<f32> {
    let Some(first) = sequences.first() else {
        return Vec::new();
    };
    let (heads, kv_heads, head_dim) = (
        first.shape.heads,
        first.shape.kv_heads,
        first.shape.head_dim,
    );
    // The sequence and position of each query row, in output order.
    let mut rows = Vec::new();
    for (i, sequence) in sequences.iter().enumerate() {
        let Sequence { q, k, v, shape } = *sequence;
        assert_eq!(
            (shape.heads, shape.kv_heads, shape.head_dim),
            (heads, kv_heads, head_dim),
            "sequences with different heads"
        );
        let context = shape.start + shape.tokens;
        assert!(
            q.len() >= shape.tokens * heads * head_dim,
            "queries too short"
        );
        assert!(shape.group_stride >= context * head_dim, "groups overlap");
        let cache_len = (kv_heads - 1) * shape.group_stride + context * head_dim;
        assert!(
            k.len() >= cache_len && v.len() >= cache_len,
            "cache too short"
        );
        rows.extend((0..shape.tokens).map(|t| (i, t)));
    }
    let tokens = rows.len();
    let per_group = heads / kv_heads;
    // A task is one token's run of consecutive heads of one group: the group's keys and values
    // are read once for the run, not once per head (at 2048 tokens of context they are 2 MiB a
    // layer, re-read from memory per head otherwise). Runs shrink only when there are more
    // threads than (token, group) pairs.
    let wanted = rayon::current_num_threads()
        .div_ceil(tokens * kv_heads)
        .clamp(1, per_group);
    let runs = (wanted..=per_group)
        .find(|r| per_group % r == 0)
        .unwrap_or(per_group);
    let run = per_group / runs;
    let mut out = vec![0f32; tokens * heads * head_dim];
    out.par_chunks_mut(run * head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (task, out)| {
            let (row, first_head) = (task / (heads / run), (task % (heads / run)) * run);
            let (sequence, t) = rows[row];
            let Sequence { q, k, v, shape } = sequences[sequence];
            let group = (first_head / per_group) * shape.group_stride;
            // Causal: the query at position start + t sees keys 0..=start + t.
            let seen = shape.start + t + 1;
            let (keys, values) = (
                &k[group..][..seen * head_dim],
                &v[group..][..seen * head_dim],
            );
            for pass in (0..run).step_by(x86::HEADS_PER_PASS) {
                let n = x86::HEADS_PER_PASS.min(run - pass);
                let queries = &q[(t * heads + first_head + pass) * head_dim..][..n * head_dim];
                scores.clear();
                scores.resize(n * seen, 0.0);
                let out = &mut out[pass * head_dim..][..n * head_dim];
                match path {
                    // SAFETY: the Avx512 token is made only once detection found AVX-512F, BW
                    // and VL.
                    // `1 <= n <= 8` (HEADS_PER_PASS); `keys` and `values` hold `seen` rows of
                    // `head_dim` values, `queries` and `out` `n` rows of `head_dim`, and
                    // `scores` `n` rows of `seen` (all sized just above), which is what the
                    // kernels' contracts ask.
                    Path::Avx512(_) => unsafe {
                        x86::scores(queries, n, keys, scale, scores);
                        for row in scores.chunks_mut(seen) {
                            x86::softmax(row);
                        }
                        x86::weighted_sum(scores, n, values, out);
                    },
                    Path::Portable => {
                        portable::scores(queries, n, keys, scale, scores);
                        for row in scores.chunks_mut(seen) {
                            portable::softmax(row);
                        }
                        portable::weighted_sum(scores, n, values, out);
                    }
                }
            }
        });
    out
}

/// The portable twin of the AVX-512 kernel: the same sums in the same order where it is cheap
/// to keep (weighted sums, dots in sixteen lanes), `f32::exp` in softmax.
mod portable {
    use super::Cached;

    /// Lanes the dots are summed in, as the vector kernel does.
    const LANES: usize = 16;

    /// As `x86::scores`.
    pub(super) fn scores<T: Cached>(
        queries: &[f32],
        n: usize,
        keys: &[T],
        scale: f32,
        scores: &mut [f32],
    ) {
        let head_dim = queries.len() / n;
        let seen = scores.len() / n;
        for j in 0..seen {
            let key = &keys[j * head_dim..][..head_dim];
            for i in 0..n {
                let query = &queries[i * head_dim..][..head_dim];
                let mut lanes = [0f32; LANES];
                for (d, (q, k)) in query.iter().zip(key).enumerate() {
                    lanes[d % LANES] = q.mul_add(k.widen(), lanes[d % LANES]);
                }
                scores[i * seen + j] = lanes.iter().sum::<f32>() * scale;
            }
        }
    }

    /// `row = exp(row - max) / Σ exp(row - max)`.
    pub(super) fn softmax(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut lanes = [0f32; LANES];
        for (k, x) in row.iter_mut().enumerate() {
            *x = (*x - max).exp();
            lanes[k % LANES] += *x;
        }
        let sum: f32 = lanes.iter().sum();
        for x in row.iter_mut() {
            *x /= sum;
        }
    }

    /// As `x86::weighted_sum`: each output a chain of fused multiply-adds in order of `j`.
    pub(super) fn weighted_sum<T: Cached>(
        weights: &[f32],
        n: usize,
        values: &[T],
        out: &mut [f32],
    ) {
        let head_dim = out.len() / n;
        let seen = weights.len() / n;
        out.fill(0.0);
        for j in 0..seen {
            let value = &values[j * head_dim..][..head_dim];
            for i in 0..n {
                let w = weights[i * seen + j];
                for (o, v) in out[i * head_dim..][..head_dim].iter_mut().zip(value) {
                    *o = v.widen().mul_add(w, *o);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Cached;
    use crate::kernels::dense_matmul::lane_mask as lanes;

    /// The lanes `mask` keeps of the sixteen values at `p`, widened to f32 (the others 0).
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL; the kept lanes' values lie inside one allocation.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load<T: Cached>(mask: u16, p: *const T) -> __m512 {
        if T::HALF {
            // SAFETY: the caller's contract; masked-off lanes are never read.
            unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
        } else {
            // SAFETY: as above.
            unsafe { _mm512_maskz_loadu_ps(mask, p.cast()) }
        }
    }

    /// Query heads one pass of [`scores`] and [`weighted_sum`] takes: 16 of the 32 vector
    /// registers hold their sums.
    pub(super) const HEADS_PER_PASS: usize = 8;

    /// `scores[i · seen + j] = (query_i · key_j) · scale` for `n <= 8` query rows of
    /// `head_dim` and `seen = scores.len() / n` keys, key `j` at `keys[j * head_dim..]`. Each
    /// dot is summed in sixteen lanes in column order, then across in `_mm512_reduce_add_ps`'s
    /// order; each key is read once for all `n` queries. One or two queries go sixteen dots at
    /// a time ([`scores_by_sixteen`], the same bits), and so do four or eight over an f16
    /// cache; more over an f32 cache go one key at a time. For eight heads of 128 sixteen at a
    /// time was 1.6x as fast on keys in cache, but no faster (785M q4_0, 4 streams at 512-1536
    /// tokens: 186.7-200.4 against 199.4-219.4 tokens/s in all, within this VM's noise) on an
    /// f32 cache that streams from memory; over an f16 cache, which streams half the bytes,
    /// a decode step's attention at 4096 tokens of context (16 heads of 128 in 2 groups, 12
    /// layers) took 2.8-2.9 ms against 3.7-3.9 one key at a time (5.1-5.3 over f32).
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL; `keys` holds at least `seen * head_dim` values, where
    /// `head_dim = queries.len() / n` and `seen = scores.len() / n` (an `n` outside `1..=8`
    /// panics).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn scores<T: Cached>(
        queries: &[f32],
        n: usize,
        keys: &[T],
        scale: f32,
        scores: &mut [f32],
    ) {
        macro_rules! dispatch {
            ($($n:literal),*) => {
                match n {
                    $($n => {
                        // SAFETY: `N = n`, so this is the caller's contract: AVX-512, and
                        // `keys` as long as `scores_of` asks.
                        unsafe { scores_of::<$n, T>(queries, keys, scale, scores) }
                    })*
                    _ => unreachable!("{n} heads in a pass"),
                }
            };
        }
        match n {
            // SAFETY: as in `dispatch`, for `N = n`.
            1 => unsafe { scores_by_sixteen::<1, T>(queries, keys, scale, scores) },
            // SAFETY: as in `dispatch`, for `N = n`.
            2 => unsafe { scores_by_sixteen::<2, T>(queries, keys, scale, scores) },
            // SAFETY: as in `dispatch`, for `N = n`.
            4 if T::HALF => unsafe { scores_by_sixteen::<4, T>(queries, keys, scale, scores) },
            // SAFETY: as in `dispatch`, for `N = n`.
            8 if T::HALF => unsafe { scores_by_sixteen::<8, T>(queries, keys, scale, scores) },
            _ => dispatch!(3, 4, 5, 6, 7, 8),
        }
    }

    /// [`scores`] for `N` query rows, one key at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL; `keys` holds at least `seen * head_dim` values, where
    /// `head_dim = queries.len() / N` and `seen = scores.len() / N` (`queries` and `scores`
    /// are then read and written unchecked, within their lengths).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn scores_of<const N: usize, T: Cached>(
        queries: &[f32],
        keys: &[T],
        scale: f32,
        scores: &mut [f32],
    ) {
        let head_dim = queries.len() / N;
        let seen = scores.len() / N;
        for j in 0..seen {
            // SAFETY: `j < seen`, so key `j` starts inside `keys`' `seen * head_dim` values.
            let key = unsafe { keys.as_ptr().add(j * head_dim) };
            let mut acc = [_mm512_setzero_ps(); N];
            let mut d = 0;
            while d < head_dim {
                let mask = lanes(d, head_dim);
                // SAFETY: `d < head_dim`, and `mask` keeps only the lanes of columns `d ..
                // head_dim`, all inside key `j`; masked-off lanes are never read.
                let k = unsafe { load(mask, key.add(d)) };
                for (i, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: as for the key: `i < N`, so the kept lanes are columns `d ..
                    // head_dim` of query row `i`, inside `queries`' `N * head_dim` values.
                    let q = unsafe {
                        _mm512_maskz_loadu_ps(mask, queries.as_ptr().add(i * head_dim + d))
                    };
                    *acc = _mm512_fmadd_ps(q, k, *acc);
                }
                d += 16;
            }
            for (i, acc) in acc.iter().enumerate() {
                // SAFETY: `i < N` and `j < seen`: `i * seen + j < N * seen <= scores.len()`.
                *unsafe { scores.get_unchecked_mut(i * seen + j) } =
                    _mm512_reduce_add_ps(*acc) * scale;
            }
        }
    }

    /// [`scores`] for `N` (1, 2, 4 or 8; [`scores`] takes it for 1 and 2) query rows, sixteen
    /// dots at a time: `G = min(N, 4)`
    /// heads by `16 / G` keys in 16 registers, their sums across lanes in one
    /// [`reduce_sixteen`]. One key at a time, each dot was reduced on its own (8 shuffles and
    /// adds: for the demo model's 32-wide heads, more than its two multiply-adds, and half a
    /// lane's time at 1024 tokens of context was this kernel) and every query reloaded per
    /// key; here a query chunk serves several keys and a key chunk several queries. Each lane's
    /// chain of multiply-adds, the reduction's order and the scaling are unchanged: the same
    /// bits. Keys left over (`seen % (16 / G)`) go one at a time.
    ///
    /// # Safety
    /// As [`scores_of`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn scores_by_sixteen<const N: usize, T: Cached>(
        queries: &[f32],
        keys: &[T],
        scale: f32,
        scores: &mut [f32],
    ) {
        let (heads, block) = (N.min(4), 16 / N.min(4));
        // Dot (head h, key t) of a block goes where `reduce_sixteen` leaves its sum in lane
        // `block * h + t`: head h's `block` scores side by side.
        let slot = |h: usize, t: usize| {
            let lane = block * h + t;
            4 * (lane % 4) + lane / 4
        };
        let head_dim = queries.len() / N;
        let seen = scores.len() / N;
        let blocked = seen / block * block;
        let out = scores.as_mut_ptr();
        // Keys outside, heads inside: a block's keys are read from memory once for all `N`.
        for j in (0..blocked).step_by(block) {
            for first in (0..N).step_by(heads) {
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut d = 0;
                while d < head_dim {
                    let mask = lanes(d, head_dim);
                    let qs: [__m512; 4] = std::array::from_fn(|h| {
                        if h < heads {
                            // SAFETY: `mask` keeps only the lanes of columns `d .. head_dim` of
                            // query row `first + h < N`, inside `queries` (and below, of key
                            // `j + t < seen`, inside `keys`); masked-off lanes are never read.
                            unsafe {
                                _mm512_maskz_loadu_ps(
                                    mask,
                                    queries.as_ptr().add((first + h) * head_dim + d),
                                )
                            }
                        } else {
                            _mm512_setzero_ps()
                        }
                    });
                    for t in 0..block {
                        // SAFETY: as just above.
                        let k = unsafe { load(mask, keys.as_ptr().add((j + t) * head_dim + d)) };
                        for (h, q) in qs.iter().enumerate().take(heads) {
                            acc[slot(h, t)] = _mm512_fmadd_ps(*q, k, acc[slot(h, t)]);
                        }
                    }
                    d += 16;
                }
                let mut sums = [0f32; 16];
                // SAFETY: `sums` holds 16 values.
                unsafe {
                    _mm512_storeu_ps(
                        sums.as_mut_ptr(),
                        _mm512_mul_ps(reduce_sixteen(&acc), _mm512_set1_ps(scale)),
                    )
                };
                for (h, sums) in sums.chunks_exact(block).take(heads).enumerate() {
                    // SAFETY: row `first + h < N`, keys `j..j + block <= seen`: inside
                    // `scores`' `N * seen` values, which its exclusive borrow lets us write.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            sums.as_ptr(),
                            out.add((first + h) * seen + j),
                            block,
                        )
                    };
                }
            }
        }
        for j in blocked..seen {
            let mut dots = [0f32; N];
            // SAFETY: key `j < seen` is inside `keys`; one key for the `N` rows.
            unsafe { scores_of::<N, T>(queries, &keys[j * head_dim..], scale, &mut dots) };
            for (h, dot) in dots.iter().enumerate() {
                // SAFETY: row `h < N`, key `j < seen`.
                unsafe { *out.add(h * seen + j) = *dot };
            }
        }
    }

    /// The sums across lanes of 16 vectors at once, each in `_mm512_reduce_add_ps`'s order
    /// (lane `i` plus `i + 8`, then `+ 4`, `+ 2`, `+ 1`), so bit for bit what it gives: lane
    /// `4b + c` of the result is the sum of `acc[4c + b]`. Four rounds of shuffles and adds
    /// instead of sixteen reductions of four.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn reduce_sixteen(acc: &[__m512; 16]) -> __m512 {
        // Lanes 0..8 of pair p: acc[2p]'s i + (i + 8); lanes 8..16: acc[2p + 1]'s.
        let halves: [__m512; 8] = std::array::from_fn(|p| {
            let (a, b) = (acc[2 * p], acc[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        });
        // 128-bit lane b of quad p: acc[4p + b]'s four partial sums.
        let quarters: [__m512; 4] = std::array::from_fn(|p| {
            let (a, b) = (halves[2 * p], halves[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        // 128-bit lane b: two partial sums of acc[b] (acc[8 + b]), then two of acc[4 + b]
        // (acc[12 + b]).
        let pairs: [__m512; 2] = std::array::from_fn(|p| {
            let (a, b) = (quarters[2 * p], quarters[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        });
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(pairs[0], pairs[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(pairs[0], pairs[1]),
        )
    }

    /// `row = exp(row - max) / Σ exp(row - max)`, sixteen lanes at a time (the sum in lanes
    /// in order, then across).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax(row: &mut [f32]) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut k = 0;
        while k < n {
            let mask = lanes(k, n);
            // SAFETY: `k < n`, and `mask` keeps only the lanes of elements `k .. n` of `row`;
            // masked-off lanes are never read.
            let x = unsafe { _mm512_maskz_loadu_ps(mask, p.add(k)) };
            max = _mm512_mask_max_ps(max, mask, max, x);
            k += 16;
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        let mut k = 0;
        while k < n {
            let mask = lanes(k, n);
            // SAFETY: as above, the load and the store touch only elements `k .. n` of `row`,
            // which `p` (from the exclusive borrow) may write; `exp` needs AVX-512F, which the
            // caller guarantees.
            let e = unsafe {
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p.add(k)), max));
                _mm512_mask_storeu_ps(p.add(k), mask, e);
                e
            };
            sum = _mm512_mask_add_ps(sum, mask, sum, e);
            k += 16;
        }
        let sum = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
        let mut k = 0;
        while k < n {
            let mask = lanes(k, n);
            // SAFETY: as above: only elements `k .. n` of `row` are read and written.
            unsafe {
                let e = _mm512_maskz_loadu_ps(mask, p.add(k));
                _mm512_mask_storeu_ps(p.add(k), mask, _mm512_div_ps(e, sum));
            }
            k += 16;
        }
    }

    /// `e^x` in sixteen lanes, within 2 ulp for `x <= 0` (what softmax feeds it); 0 below
    /// about -87.3.
    ///
    /// `x = m ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its degree-7 Taylor polynomial, then
    /// scaled by `2^m`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn exp(x: __m512) -> __m512 {
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.5));
        let m = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(m, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(m, _mm512_set1_ps(LN2_LO), r);
        let mut poly = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c));
        }
        // Below e^-87.3 the scaled result is subnormal; flush it (a softmax weight that small
        // adds nothing next to the maximum's 1).
        let e = _mm512_scalef_ps(poly, m);
        _mm512_mask_mov_ps(
            e,
            _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.3)),
            _mm512_setzero_ps(),
        )
    }

    /// `out_i = Σ_j weights[i · seen + j] · value_j` for `n <= 8` rows, value `j` at
    /// `values[j * head_dim..]`, summed in order of `j`; each value row is read once for all
    /// `n`.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL; `values` holds at least `seen * head_dim` values, where
    /// `head_dim = out.len() / n` and `seen = weights.len() / n` (an `n` outside `1..=8`
    /// panics).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn weighted_sum<T: Cached>(
        weights: &[f32],
        n: usize,
        values: &[T],
        out: &mut [f32],
    ) {
        macro_rules! dispatch {
            ($($n:literal),*) => {
                match n {
                    $($n => {
                        // SAFETY: `N = n`, so this is the caller's contract: AVX-512, and
                        // `values` as long as `weighted_sum_of` asks.
                        unsafe { weighted_sum_of::<$n, T>(weights, values, out) }
                    })*
                    _ => unreachable!("{n} heads in a pass"),
                }
            };
        }
        dispatch!(1, 2, 3, 4, 5, 6, 7, 8)
    }

    /// [`weighted_sum`] for `N` rows.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL; `values` holds at least `seen * head_dim` values, where
    /// `head_dim = out.len() / N` and `seen = weights.len() / N` (`weights` and `out` are then
    /// read and written unchecked, within their lengths).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn weighted_sum_of<const N: usize, T: Cached>(
        weights: &[f32],
        values: &[T],
        out: &mut [f32],
    ) {
        // 32 columns of up to 8 heads: 16 accumulators.
        const VECTORS: usize = 2;
        let head_dim = out.len() / N;
        let seen = weights.len() / N;
        let mut first = 0;
        while first < head_dim {
            let masks: [u16; VECTORS] = std::array::from_fn(|c| {
                let d = first + 16 * c;
                if d < head_dim {
                    lanes(d, head_dim)
                } else {
                    0
                }
            });
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; N];
            for j in 0..seen {
                // SAFETY: `j < seen` and `first < head_dim`: inside `values`' `seen *
                // head_dim` values.
                let row = unsafe { values.as_ptr().add(j * head_dim + first) };
                // SAFETY: `masks[c]` keeps only the lanes of columns `first + 16 * c ..
                // head_dim` of value row `j`, all inside `values`; masked-off lanes are never
                // read. When `first + 16 > head_dim` (head_dim % 32 in 1..=15) the second
                // vector's address lies past the end of `values` with a mask of 0: computed
                // with `wrapping_add`, which (unlike `add`) may leave the allocation, and
                // never dereferenced.
                let x: [__m512; VECTORS] =
                    std::array::from_fn(|c| unsafe { load(masks[c], row.wrapping_add(16 * c)) });
                for (i, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: `i < N` and `j < seen`: `i * seen + j < N * seen <=
                    // weights.len()`.
                    let p = _mm512_set1_ps(*unsafe { weights.get_unchecked(i * seen + j) });
                    for (acc, x) in acc.iter_mut().zip(&x) {
                        *acc = _mm512_fmadd_ps(*x, p, *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (c, acc) in acc.iter().enumerate() {
                    // SAFETY: `masks[c]` keeps only columns `first + 16 * c .. head_dim` of
                    // output row `i < N`, inside `out`'s `N * head_dim` values, which `out`'s
                    // exclusive borrow lets us write. As for the loads, with a mask of 0 `o`
                    // can lie past the end of `out` (the last row): `wrapping_add`, never
                    // dereferenced.
                    unsafe {
                        let o = out.as_mut_ptr().wrapping_add(i * head_dim + first + 16 * c);
                        _mm512_mask_storeu_ps(o, masks[c], *acc);
                    }
                }
            }
            first += 16 * VECTORS;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) const HEADS_PER_PASS: usize = 8;

    /// Never called: there is no AVX-512 token off x86-64.
    ///
    /// # Safety
    /// None needed (it only panics); `unsafe` to match the x86-64 kernel's signature.
    pub(super) unsafe fn scores<T>(_q: &[f32], _n: usize, _k: &[T], _x: f32, _o: &mut [f32]) {
        unreachable!("the attention kernel runs on x86-64 only")
    }

    /// Never called: there is no AVX-512 token off x86-64.
    ///
    /// # Safety
    /// None needed (it only panics); `unsafe` to match the x86-64 kernel's signature.
    pub(super) unsafe fn softmax(_row: &mut [f32]) {
        unreachable!("the attention kernel runs on x86-64 only")
    }

    /// Never called: there is no AVX-512 token off x86-64.
    ///
    /// # Safety
    /// None needed (it only panics); `unsafe` to match the x86-64 kernel's signature.
    pub(super) unsafe fn weighted_sum<T>(_w: &[f32], _n: usize, _v: &[T], _o: &mut [f32]) {
        unreachable!("the attention kernel runs on x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.61 * seed).sin()).collect()
    }

    /// The textbook formula in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Shape, scale: f32) -> Vec<f32> {
        let row = |g: usize, j: usize| g * s.group_stride + j * s.head_dim;
        let mut out = vec![0f32; s.tokens * s.heads * s.head_dim];
        for t in 0..s.tokens {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let qr = &q[(t * s.heads + h) * s.head_dim..][..s.head_dim];
                let scores: Vec<f64> = (0..=s.start + t)
                    .map(|j| {
                        let kr = &k[row(g, j)..][..s.head_dim];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..s.head_dim {
                    out[(t * s.heads + h) * s.head_dim + d] = scores
                        .iter()
                        .enumerate()
                        .map(|(j, sc)| (sc - max).exp() / sum * v[row(g, j) + d] as f64)
                        .sum::<f64>()
                        as f32;
                }
            }
        }
        out
    }

    /// Every path this process may run: AVX-512 where the CPU has it, and the portable twin.
    fn paths() -> Vec<Path> {
        let mut paths: Vec<Path> = cpu::avx512().map(Path::Avx512).into_iter().collect();
        paths.push(Path::Portable);
        paths
    }

    #[test]
    fn matches_the_formula_with_groups_and_a_causal_mask() {
        for path in paths() {
            matches_the_formula_on(path);
        }
    }

    fn matches_the_formula_on(path: Path) {
        // (tokens, start, heads, head_dim, spare capacity after the context)
        for (tokens, start, heads, head_dim, spare) in [
            (1, 40, 8, 128, 0),
            (7, 0, 8, 128, 3),
            (5, 9, 8, 20, 0),
            (2, 3, 32, 48, 10),
            (1, 6, 2, 16, 1),
            (3, 300, 8, 128, 0),
        ] {
            let context = start + tokens;
            let s = Shape {
                tokens,
                start,
                heads,
                kv_heads: 2,
                head_dim,
                group_stride: (context + spare) * head_dim,
            };
            let q = values(tokens * heads * head_dim, 1.1);
            let k = values(2 * s.group_stride, 0.7);
            let v = values(2 * s.group_stride, 1.9);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let got = attend_on(
                path,
                &[Sequence {
                    q: &q,
                    k: &k,
                    v: &v,
                    shape: s,
                }],
                scale,
            );
            for (g, w) in got.iter().zip(reference(&q, &k, &v, s, scale)) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{path:?}: {g} vs {w}"
                );
            }
        }
    }

    /// A token's output is the same bits alone as in a chunk: decoding and prefill fill a cache
    /// with identical values.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        // 8 heads in one group: alone, a token's heads are split in two runs (one per thread),
        // in a batch they are one.
        for path in paths() {
            for (heads, kv_heads) in [(4, 2), (8, 1)] {
                batch_invariance(path, heads, kv_heads);
            }
        }
    }

    fn batch_invariance(path: Path, heads: usize, kv_heads: usize) {
        let (head_dim, context) = (128, 30);
        let q = values(context * heads * head_dim, 1.3);
        let k = values(context * kv_heads * head_dim, 0.8);
        let v = values(context * kv_heads * head_dim, 1.7);
        let shape = |tokens, start| Shape {
            tokens,
            start,
            heads,
            kv_heads,
            head_dim,
            group_stride: context * head_dim,
        };
        let one = |q: &[f32], shape| {
            attend_on(
                path,
                &[Sequence {
                    q,
                    k: &k,
                    v: &v,
                    shape,
                }],
                0.1,
            )
        };
        let all = one(&q, shape(context, 0));
        let row = heads * head_dim;
        for t in 0..context {
            let alone = one(&q[t * row..], shape(1, t));
            assert_eq!(alone, all[t * row..][..row], "{path:?} token {t}");
        }
    }

    /// Sequences attended in one call (a batched decode step: one new token each, over caches
    /// of different lengths and capacities, and a prompt chunk) get the same bits as each
    /// attended alone.
    #[test]
    fn sequences_attended_together_match_each_alone() {
        let (heads, kv_heads, head_dim) = (8, 2, 64);
        // (tokens, start, capacity)
        let layout = [(1, 0, 16), (1, 37, 40), (5, 3, 8), (1, 200, 256)];
        let data: Vec<_> = layout
            .iter()
            .enumerate()
            .map(|(i, &(tokens, _, capacity))| {
                let seed = i as f32 + 1.0;
                (
                    values(tokens * heads * head_dim, 1.1 * seed),
                    values(kv_heads * capacity * head_dim, 0.7 * seed),
                    values(kv_heads * capacity * head_dim, 1.9 * seed),
                )
            })
            .collect();
        let sequences: Vec<_> = layout
            .iter()
            .zip(&data)
            .map(|(&(tokens, start, capacity), (q, k, v))| Sequence {
                q,
                k,
                v,
                shape: Shape {
                    tokens,
                    start,
                    heads,
                    kv_heads,
                    head_dim,
                    group_stride: capacity * head_dim,
                },
            })
            .collect();
        for path in paths() {
            let together = attend_on(path, &sequences, 0.125);
            let alone: Vec<f32> = sequences
                .iter()
                .flat_map(|s| attend_on(path, std::slice::from_ref(s), 0.125))
                .collect();
            assert_eq!(together, alone, "{path:?}");
        }
    }

    /// An f16 cache gives the bits of its values widened into an f32 cache, on every path: one
    /// and several heads a pass (sixteen dots at a time and one key at a time), head sizes
    /// that leave partial vectors, prompt chunks and single tokens.
    #[test]
    fn a_half_cache_attends_as_its_values_widened() {
        use half::f16;
        // (tokens, start, heads, kv_heads, head_dim)
        for (tokens, start, heads, kv_heads, head_dim) in [
            (1, 40, 8, 2, 128),
            (1, 70, 2, 2, 32),
            (1, 17, 1, 1, 8),
            (3, 9, 4, 2, 20),
            (2, 5, 16, 2, 40),
            (6, 300, 8, 1, 128),
        ] {
            let context = start + tokens;
            let shape = Shape {
                tokens,
                start,
                heads,
                kv_heads,
                head_dim,
                group_stride: (context + 3) * head_dim,
            };
            let q = values(tokens * heads * head_dim, 1.1);
            let narrow = |x: Vec<f32>| -> Vec<f16> { x.into_iter().map(f16::from_f32).collect() };
            let k16 = narrow(values(kv_heads * shape.group_stride, 0.7));
            let v16 = narrow(values(kv_heads * shape.group_stride, 1.9));
            let widen = |x: &[f16]| -> Vec<f32> { x.iter().map(|h| h.to_f32()).collect() };
            let (k32, v32) = (widen(&k16), widen(&v16));
            for path in paths() {
                let half = attend_on(
                    path,
                    &[Sequence {
                        q: &q,
                        k: &k16,
                        v: &v16,
                        shape,
                    }],
                    0.125,
                );
                let full = attend_on(
                    path,
                    &[Sequence {
                        q: &q,
                        k: &k32,
                        v: &v32,
                        shape,
                    }],
                    0.125,
                );
                assert_eq!(
                    half, full,
                    "{path:?}: {heads} heads of {head_dim}, {tokens} tokens"
                );
            }
        }
    }

    /// Sixteen dots at a time give the bits of one key at a time: each dot's lanes, its sum
    /// across them and the scaling are the same, whatever the head size (masked tails) and
    /// the keys left over.
    #[test]
    fn scores_by_sixteen_are_the_bits_of_one_key_at_a_time() {
        if cpu::avx512().is_none() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // Magnitudes over six orders, so that another order of the sums would show.
            let spread = |n: usize, seed: f32| -> Vec<f32> {
                values(n, seed)
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x * 10f32.powi((i % 7) as i32 - 3))
                    .collect()
            };
            fn both<const N: usize>(q: &[f32], keys: &[f32], seen: usize) -> [Vec<f32>; 2] {
                let mut one = vec![0f32; N * seen];
                let mut sixteen = vec![0f32; N * seen];
                // SAFETY: AVX-512 (F, BW, VL) was checked; `keys` holds `seen` keys of the
                // queries' head size, and both outputs `N * seen` scores.
                unsafe {
                    x86::scores_of::<N, f32>(q, keys, 0.17, &mut one);
                    x86::scores_by_sixteen::<N, f32>(q, keys, 0.17, &mut sixteen);
                }
                [one, sixteen]
            }
            for head_dim in [8, 32, 40, 128] {
                for seen in [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 37, 512] {
                    let keys = spread(seen * head_dim, 1.3);
                    let q = spread(8 * head_dim, 0.7);
                    let check = |[one, sixteen]: [Vec<f32>; 2], n: usize| {
                        assert_eq!(one, sixteen, "{n} heads of {head_dim}, {seen} keys");
                    };
                    check(both::<1>(&q[..head_dim], &keys, seen), 1);
                    check(both::<2>(&q[..2 * head_dim], &keys, seen), 2);
                    check(both::<4>(&q[..4 * head_dim], &keys, seen), 4);
                    check(both::<8>(&q, &keys, seen), 8);
                }
            }
        }
    }

    /// The vector exp behind softmax, against f64 over what softmax feeds it (x <= 0).
    #[test]
    fn vector_exp_is_within_two_ulp() {
        if cpu::avx512().is_none() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let xs: Vec<f32> = (0..=200_000)
                .map(|i| -87.0 * i as f32 / 200_000.0)
                .collect();
            for chunk in xs.chunks(16) {
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F was checked above; both buffers hold 16 lanes (the input's
                // short last chunk is padded).
                unsafe {
                    let mut lanes = [0f32; 16];
                    lanes[..chunk.len()].copy_from_slice(chunk);
                    _mm512_storeu_ps(got.as_mut_ptr(), x86::exp(_mm512_loadu_ps(lanes.as_ptr())));
                }
                for (x, e) in chunk.iter().zip(got) {
                    let want = (*x as f64).exp();
                    let ulp = (want as f32).abs() * f32::EPSILON;
                    assert!(
                        (e as f64 - want).abs() <= 2.0 * ulp as f64,
                        "exp({x}) = {e}, want {want}"
                    );
                }
            }
            // SAFETY: as above.
            let tiny = unsafe {
                let mut out = [1f32; 16];
                _mm512_storeu_ps(out.as_mut_ptr(), x86::exp(_mm512_set1_ps(-1000.0)));
                out
            };
            assert_eq!(tiny, [0.0; 16]);
        }
    }
}
