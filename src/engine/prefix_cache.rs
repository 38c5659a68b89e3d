//! Reusing the key/value cache of earlier requests whose tokens a new prompt starts with.
//!
//! AIHub sends the whole history with every turn. Without reuse, turn N re-runs every earlier
//! turn through the model, so the time to first token grows with the conversation. Here each
//! finished request leaves its cache behind, keyed by the tokens it holds; a new request takes
//! the cache sharing the longest prefix with its prompt and only runs the rest. Caches are
//! taken out while in use (two requests never share one) and evicted least-recently-used
//! beyond a byte budget. The math is the same either way, so replies do not change.

use std::sync::Mutex;

use crate::nn::transformer::KvCache;

/// A byte-bounded LRU of key/value caches keyed by their token ids.
#[derive(Debug)]
pub(crate) struct PrefixCache {
    budget_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    ids: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    last_used: u64,
}

impl PrefixCache {
    /// A cache holding at most `budget_bytes` of keys and values (0 disables reuse).
    pub(crate) fn new(budget_bytes: usize) -> Self {
        PrefixCache {
            budget_bytes,
            state: Mutex::new(State::default()),
        }
    }

    /// Takes the cache that shares the longest prefix with `prompt`, truncated to that prefix,
    /// and the number of prompt tokens it covers. At least one prompt token is always left to
    /// run, since generation needs the logits of the last one.
    pub(crate) fn take(&self, prompt: &[u32]) -> Option<(KvCache, usize)> {
        if self.budget_bytes == 0 || prompt.len() < 2 {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (index, matched) = state
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.ids, prompt).min(prompt.len() - 1)))
            .max_by_key(|&(_, matched)| matched)?;
        if matched == 0 {
            return None;
        }
        let mut entry = state.entries.swap_remove(index);
        entry.cache.truncate(matched);
        Some((entry.cache, matched))
    }

    /// How many leading tokens of `prompt` the best cached entry holds (0 when reuse is off).
    pub(crate) fn longest_prefix(&self, prompt: &[u32]) -> usize {
        if self.budget_bytes == 0 {
            return 0;
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .entries
            .iter()
            .map(|e| common_prefix(&e.ids, prompt))
            .max()
            .unwrap_or(0)
    }

    /// Keeps `cache` (which holds the positions of `ids`) for later requests.
    pub(crate) fn put(&self, ids: Vec<u32>, cache: KvCache) {
        if self.budget_bytes == 0 || ids.is_empty() {
            return;
        }
        let bytes = cache.bytes();
        if bytes > self.budget_bytes {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.clock += 1;
        let last_used = state.clock;
        // A cache that another one extends adds nothing: keep the longer one.
        state
            .entries
            .retain(|e| !(e.ids.len() <= ids.len() && ids.starts_with(&e.ids)));
        if state
            .entries
            .iter()
            .any(|e| e.ids.len() >= ids.len() && e.ids.starts_with(&ids))
        {
            return;
        }
        state.entries.push(Entry {
            ids,
            cache,
            bytes,
            last_used,
        });
        let mut total: usize = state.entries.iter().map(|e| e.bytes).sum();
        while total > self.budget_bytes {
            let Some(oldest) = state
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            total -= state.entries.swap_remove(oldest).bytes;
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
