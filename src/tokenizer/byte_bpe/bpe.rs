//! Byte-pair encoding of one pre-tokenized piece, with tiktoken's merge rule.
//!
//! tiktoken's rule: if the whole piece is a token, emit it; otherwise start from single bytes
//! and repeatedly merge the adjacent pair whose concatenation has the lowest rank (the leftmost
//! such pair on ties) until no adjacent concatenation is a token. tiktoken itself rescans all
//! pairs after every merge (O(n²) per piece); a hostile piece such as a megabyte of one letter
//! would stall it. Here the candidate pairs live in a binary heap with lazy invalidation over a
//! linked list of parts, so a piece of n bytes costs O(n log n) merges-and-lookups, and a lookup
//! is skipped when the concatenation is longer than the longest token.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Token bytes → rank table plus the tiktoken merge procedure.
#[derive(Clone, Debug)]
pub struct BytePairEncoder {
    ranks: HashMap<Vec<u8>, u32>,
    max_token_len: usize,
}

impl BytePairEncoder {
    /// Builds the encoder from token bytes indexed by rank (`tokens[r]` has rank `r`).
    ///
    /// The caller guarantees what BPE needs to be total: distinct, non-empty tokens and every
    /// single byte present (the tiktoken loader checks this).
    pub fn new(tokens: &[Vec<u8>]) -> Self {
        let mut ranks = HashMap::with_capacity(tokens.len());
        let mut max_token_len = 0;
        for (rank, token) in tokens.iter().enumerate() {
            max_token_len = max_token_len.max(token.len());
            // Ranks are < tokens.len(), which the loader bounds to u32.
            ranks.insert(token.clone(), rank as u32);
        }
        BytePairEncoder {
            ranks,
            max_token_len,
        }
    }

    /// The rank of exactly these bytes, if they are a token.
    pub fn rank(&self, bytes: &[u8]) -> Option<u32> {
        if bytes.len() > self.max_token_len {
            return None;
        }
        self.ranks.get(bytes).copied()
    }

    /// Appends the ranks of `piece`'s BPE tokens to `out`.
    ///
    /// A byte that is not a token (impossible for a validated vocabulary) is skipped rather
    /// than panicking.
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        if let Some(rank) = self.rank(piece) {
            out.push(rank);
            return;
        }
        let n = piece.len();
        // Parts are identified by their start byte; `end[s]` is where part `s` ends,
        // `prev[s]` where the part before it starts, `alive[s]` whether `s` still starts a part.
        let mut end: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        // Candidate merges (rank, left start, right start, right end); the min-heap order
        // gives the lowest rank and, on ties, the leftmost pair, as tiktoken does.
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(r) = self.rank(&piece[i..i + 2]) {
                heap.push(Reverse((r, i, i + 1, i + 2)));
            }
        }
        while let Some(Reverse((_, s, m, e))) = heap.pop() {
            if !alive[s] || end[s] != m || end[m] != e {
                continue; // stale: one of the two parts has changed since this was pushed
            }
            alive[m] = false;
            end[s] = e;
            if e < n {
                prev[e] = s;
                if let Some(r) = self.rank(&piece[s..end[e]]) {
                    heap.push(Reverse((r, s, e, end[e])));
                }
            }
            if s > 0 {
                let p = prev[s];
                if let Some(r) = self.rank(&piece[p..e]) {
                    heap.push(Reverse((r, p, s, e)));
                }
            }
        }
        let mut s = 0;
        while s < n {
            if let Some(r) = self.rank(&piece[s..end[s]]) {
                out.push(r);
            }
            s = end[s];
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// tiktoken's `_byte_pair_merge` + `byte_pair_encode`, transcribed as the O(n²) reference.
    pub(crate) fn reference_encode(ranks: &HashMap<Vec<u8>, u32>, piece: &[u8]) -> Vec<u32> {
        if let Some(&r) = ranks.get(piece) {
            return vec![r];
        }
        let mut parts: Vec<usize> = (0..=piece.len()).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..parts.len().saturating_sub(2) {
                if let Some(&r) = ranks.get(&piece[parts[i]..parts[i + 2]]) {
                    if best.is_none_or(|(b, _)| r < b) {
                        best = Some((r, i));
                    }
                }
            }
            match best {
                Some((_, i)) => {
                    parts.remove(i + 1);
                }
                None => break,
            }
        }
        parts
            .windows(2)
            .map(|w| ranks[&piece[w[0]..w[1]]])
            .collect()
    }

    /// A small vocabulary with overlapping merges and equal-length competitors.
    fn toy_tokens() -> Vec<Vec<u8>> {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for t in [
            "ab", "bc", "ca", "aa", "abc", "bca", "aaa", "aaaa", "cab", "abca", "bb", "bbb", "cc",
            "abcabc", "ba",
        ] {
            tokens.push(t.as_bytes().to_vec());
        }
        tokens
    }

    #[test]
    fn matches_reference_on_random_pieces() {
        let tokens = toy_tokens();
        let enc = BytePairEncoder::new(&tokens);
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..5000 {
            let len = rng.random_range(0..40);
            let piece: Vec<u8> = (0..len).map(|_| b"abcx"[rng.random_range(0..4)]).collect();
            let mut ours = Vec::new();
            enc.encode_piece(&piece, &mut ours);
            assert_eq!(ours, reference_encode(&enc.ranks, &piece), "{piece:?}");
        }
    }

    #[test]
    fn long_single_letter_piece_completes() {
        let enc = BytePairEncoder::new(&toy_tokens());
        let piece = vec![b'a'; 1 << 20];
        let mut out = Vec::new();
        enc.encode_piece(&piece, &mut out);
        // "aaaa" tiles the run exactly.
        assert_eq!(out.len(), (1 << 20) / 4);
        assert!(out.iter().all(|&r| enc.rank(b"aaaa") == Some(r)));
    }
}
