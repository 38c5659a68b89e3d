//! Picking the next token from logits: greedy, or temperature / top-k / top-p sampling.
//!
//! The order of the steps is Hugging Face's (`generate` with ChatGLM's settings): repetition
//! penalty, temperature, top-k, top-p. The random generator is a seeded SplitMix64, so a seed
//! reproduces a reply on every platform and release.

pub use crate::chat::request::Sampling;

/// A seeded token picker for one request.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    sampling: Sampling,
    repetition_penalty: f32,
    rng: SplitMix64,
}

impl Sampler {
    pub(crate) fn new(sampling: Sampling, repetition_penalty: f32, seed: u64) -> Self {
        Sampler {
            sampling,
            repetition_penalty,
            rng: SplitMix64(seed),
        }
    }

    /// Picks the next token. `context` is every token so far (prompt and reply), which the
    /// repetition penalty looks at.
    pub(crate) fn next(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &id in context {
                let Some(l) = logits.get_mut(id as usize) else {
                    continue;
                };
                if std::mem::replace(&mut seen[id as usize], true) {
                    continue;
                }
                *l = if *l > 0.0 {
                    *l / self.repetition_penalty
                } else {
                    *l * self.repetition_penalty
                };
            }
        }
        match self.sampling {
            Sampling::ArgMax => argmax(logits),
            Sampling::Sample {
                temperature,
                top_p,
                top_k,
            } => self.sample(logits, temperature, top_p, top_k),
        }
    }

    fn sample(
        &mut self,
        logits: &[f32],
        temperature: f64,
        top_p: f64,
        top_k: Option<usize>,
    ) -> u32 {
        // Tokens more than 30 nats below the best (a probability ratio under 1e-13) cannot
        // matter: dropping them first spares sorting the whole vocabulary on every token.
        let best = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let floor = best - 30.0 * temperature;
        let mut candidates: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, &l)| l.is_finite() && l as f64 >= floor)
            .map(|(i, &l)| (i as u32, l as f64 / temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut total = 0.0;
        for c in candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1;
        }
        // Keep the most likely tokens until their mass reaches top_p (at least one).
        let mut mass = 0.0;
        let mut keep = 0;
        for c in &candidates {
            if keep > 0 && mass >= top_p * total {
                break;
            }
            mass += c.1;
            keep += 1;
        }
        candidates.truncate(keep);
        let mut target = self.rng.next_f64() * mass;
        for &(id, weight) in &candidates {
            if target < weight {
                return id;
            }
            target -= weight;
        }
        candidates[candidates.len() - 1].0
    }
}

/// Index of the largest logit; the lowest index wins ties, as in PyTorch's `argmax`.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// SplitMix64: tiny, fast and identical everywhere, which is what reproducible seeds need.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn greedy_ignores_nan() {
        let mut s = Sampler::new(Sampling::ArgMax, 1.0, 0);
        assert_eq!(s.next(&mut [f32::NAN, 1.0, 2.0], &[]), 2);
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(
            Sampling::Sample {
                temperature: 1.0,
                top_p: 1e-6,
                top_k: None,
            },
            1.0,
            7,
        );
        for _ in 0..20 {
            assert_eq!(s.next(&mut [0.5, 4.0, 3.9, -2.0], &[]), 1);
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            Sampling::Sample {
                temperature: 5.0,
                top_p: 1.0,
                top_k: Some(1),
            },
            1.0,
            3,
        );
        for _ in 0..20 {
            assert_eq!(s.next(&mut [0.5, 4.0, 3.9, -2.0], &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_both_candidates_occur() {
        let draw = |seed| {
            let mut s = Sampler::new(
                Sampling::Sample {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: None,
                },
                1.0,
                seed,
            );
            (0..200)
                .map(|_| s.next(&mut [1.0, 1.0, f32::NEG_INFINITY], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(42);
        assert_eq!(a, draw(42));
        assert!(a.contains(&0) && a.contains(&1) && !a.contains(&2));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(Sampling::ArgMax, 2.0, 0);
        assert_eq!(s.next(&mut [3.0, 2.0], &[0, 0]), 1);
    }
}
