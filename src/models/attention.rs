//! Causal attention over a conversation's cached keys and values on the CPU, one query row at a
//! time.
//!
//! Decoding attends one query per head to the whole context. candle's batched matmul ran that
//! on one core through a strided view of the cache, and at 2048 tokens of context it cost a
//! third of each token (f32 decode 16 → 11 tokens/s). Here every (token, head) pair is a task on
//! rayon's pool that reads the cache where it lies and skips the keys its mask would hide.
//!
//! A row's scores, softmax and weighted sum are computed the same way whether its query came
//! alone or in a prompt chunk, so a cache filled by decoding holds the same bits as one filled by
//! prefill (what lets the prefix cache stand in for a recomputation), as with
//! [`super::dense_matmul`], whose AVX-512 requirement this shares.

use rayon::prelude::*;

/// The shapes of one attention call.
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
}

/// `softmax(q kᵀ · scale, causal) v` for `q: [tokens, heads, head_dim]` and a cache laid out as
/// `[positions, kv_heads, head_dim]` holding at least `start + tokens` positions. Returns
/// `[tokens, heads · head_dim]`.
///
/// # Panics
/// When [`super::dense_matmul::available`] is false or the slices are shorter than `shape` says.
pub(crate) fn attend(q: &[f32], k: &[f32], v: &[f32], shape: Shape, scale: f32) -> Vec<f32> {
    assert!(
        super::dense_matmul::available(),
        "the attention kernel needs AVX-512F"
    );
    let Shape {
        tokens,
        start,
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let context = start + tokens;
    let kv_row = kv_heads * head_dim;
    assert!(q.len() >= tokens * heads * head_dim, "queries too short");
    assert!(
        k.len() >= context * kv_row && v.len() >= context * kv_row,
        "cache too short"
    );
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
            let (t, first_head) = (task / (heads / run), (task % (heads / run)) * run);
            let offset = (first_head / per_group) * head_dim;
            // Causal: the query at position start + t sees keys 0..=start + t.
            let seen = start + t + 1;
            let end = (seen - 1) * kv_row + offset + head_dim;
            let (keys, values) = (&k[offset..end], &v[offset..end]);
            for pass in (0..run).step_by(x86::HEADS_PER_PASS) {
                let n = x86::HEADS_PER_PASS.min(run - pass);
                let queries = &q[(t * heads + first_head + pass) * head_dim..][..n * head_dim];
                scores.clear();
                scores.resize(n * seen, 0.0);
                // SAFETY: `available()` was checked above; `keys` and `values` hold `seen` rows
                // of `head_dim` values, `kv_row` apart; `queries` holds `n` rows.
                unsafe { x86::scores(queries, n, keys, kv_row, scale, scores) };
                for row in scores.chunks_mut(seen) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for s in row.iter_mut() {
                        *s /= sum;
                    }
                }
                let out = &mut out[pass * head_dim..][..n * head_dim];
                // SAFETY: as above; `out` holds `n` rows.
                unsafe { x86::weighted_sum(scores, n, values, kv_row, out) };
            }
        });
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::models::dense_matmul::lane_mask as lanes;

    /// Query heads one pass of [`scores`] and [`weighted_sum`] takes: 16 of the 32 vector
    /// registers hold their sums.
    pub(super) const HEADS_PER_PASS: usize = 8;

    /// `scores[i · seen + j] = (query_i · key_j) · scale` for `n` query rows of `head_dim` and
    /// `seen = scores.len() / n` keys, key `j` at `keys[j * stride..]`. Each dot is summed in
    /// sixteen lanes in column order, then across; each key is read once for all `n` queries.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(
        queries: &[f32],
        n: usize,
        keys: &[f32],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let head_dim = queries.len() / n;
        let seen = scores.len() / n;
        for j in 0..seen {
            let key = keys.as_ptr().add(j * stride);
            let mut acc = [_mm512_setzero_ps(); HEADS_PER_PASS];
            let mut d = 0;
            while d < head_dim {
                let mask = lanes(d, head_dim);
                let k = _mm512_maskz_loadu_ps(mask, key.add(d));
                for (i, acc) in acc.iter_mut().enumerate().take(n) {
                    let q = _mm512_maskz_loadu_ps(mask, queries.as_ptr().add(i * head_dim + d));
                    *acc = _mm512_fmadd_ps(q, k, *acc);
                }
                d += 16;
            }
            for (i, acc) in acc.iter().enumerate().take(n) {
                scores[i * seen + j] = _mm512_reduce_add_ps(*acc) * scale;
            }
        }
    }

    /// `out_i = Σ_j weights[i · seen + j] · value_j` for `n` rows, value `j` at
    /// `values[j * stride..]`, summed in order of `j`; each value row is read once for all `n`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted_sum(
        weights: &[f32],
        n: usize,
        values: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        // 32 columns of 8 heads: 16 accumulators.
        const VECTORS: usize = 2;
        let head_dim = out.len() / n;
        let seen = weights.len() / n;
        let mut first = 0;
        while first < head_dim {
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; HEADS_PER_PASS];
            for j in 0..seen {
                let row = values.as_ptr().add(j * stride);
                let mut x = [_mm512_setzero_ps(); VECTORS];
                for (c, x) in x.iter_mut().enumerate() {
                    let d = first + 16 * c;
                    if d < head_dim {
                        *x = _mm512_maskz_loadu_ps(lanes(d, head_dim), row.add(d));
                    }
                }
                for (i, acc) in acc.iter_mut().enumerate().take(n) {
                    let p = _mm512_set1_ps(weights[i * seen + j]);
                    for (acc, x) in acc.iter_mut().zip(&x) {
                        *acc = _mm512_fmadd_ps(*x, p, *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(n) {
                for (c, acc) in acc.iter().enumerate() {
                    let d = first + 16 * c;
                    if d < head_dim {
                        let o = out.as_mut_ptr().add(i * head_dim + d);
                        _mm512_mask_storeu_ps(o, lanes(d, head_dim), *acc);
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

    pub(super) unsafe fn scores(
        _q: &[f32],
        _n: usize,
        _k: &[f32],
        _s: usize,
        _x: f32,
        _o: &mut [f32],
    ) {
        unreachable!("the attention kernel runs on x86-64 only")
    }

    pub(super) unsafe fn weighted_sum(
        _w: &[f32],
        _n: usize,
        _v: &[f32],
        _s: usize,
        _o: &mut [f32],
    ) {
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
        let kv_row = s.kv_heads * s.head_dim;
        let mut out = vec![0f32; s.tokens * s.heads * s.head_dim];
        for t in 0..s.tokens {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let qr = &q[(t * s.heads + h) * s.head_dim..][..s.head_dim];
                let scores: Vec<f64> = (0..=s.start + t)
                    .map(|j| {
                        let kr = &k[j * kv_row + g * s.head_dim..][..s.head_dim];
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
                        .map(|(j, sc)| {
                            (sc - max).exp() / sum * v[j * kv_row + g * s.head_dim + d] as f64
                        })
                        .sum::<f64>()
                        as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_formula_with_groups_and_a_causal_mask() {
        if !crate::models::dense_matmul::available() {
            return;
        }
        for (tokens, start, heads, head_dim) in [
            (1, 40, 8, 128),
            (7, 0, 8, 128),
            (5, 9, 8, 20),
            (2, 3, 32, 48),
            (1, 6, 2, 16),
        ] {
            let s = Shape {
                tokens,
                start,
                heads,
                kv_heads: 2,
                head_dim,
            };
            let context = start + tokens;
            let q = values(tokens * heads * head_dim, 1.1);
            let k = values(context * 2 * head_dim, 0.7);
            let v = values(context * 2 * head_dim, 1.9);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let got = attend(&q, &k, &v, s, scale);
            for (g, w) in got.iter().zip(reference(&q, &k, &v, s, scale)) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    /// A token's output is the same bits alone as in a chunk: decoding and prefill fill a cache
    /// with identical values.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        if !crate::models::dense_matmul::available() {
            return;
        }
        // 8 heads in one group: alone, a token's heads are split in two runs (one per thread),
        // in a batch they are one.
        for (heads, kv_heads) in [(4, 2), (8, 1)] {
            batch_invariance(heads, kv_heads);
        }
    }

    fn batch_invariance(heads: usize, kv_heads: usize) {
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
        };
        let all = attend(&q, &k, &v, shape(context, 0), 0.1);
        let row = heads * head_dim;
        for t in 0..context {
            let alone = attend(&q[t * row..], &k, &v, shape(1, t), 0.1);
            assert_eq!(alone, all[t * row..][..row], "token {t}");
        }
    }
}
