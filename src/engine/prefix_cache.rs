//! Reusing the key/value cache of earlier requests whose tokens a new prompt starts with.
//!
//! AIHub sends the whole history with every turn. Without reuse, turn N re-runs every earlier
//! turn through the model, so the time to first token grows with the conversation. Here each
//! finished request leaves its cache behind, keyed by the tokens it holds; a new request takes
//! the cache sharing the longest prefix with its prompt and only runs the rest. A request that
//! continues a cached conversation takes its cache out (two requests never write to one); one
//! that shares only an opening with it (the same system prompt, the same question asked by
//! several users at once) gets a copy of the shared positions and leaves the conversation's
//! cache whole for its next turn. Caches are evicted least-recently-used beyond a byte budget.
//! The math is the same either way, so replies do not change.

use std::sync::Mutex;

use crate::nn::transformer::KvCache;

/// Entries kept at most, under any byte budget. A request that shares only part of an entry
/// gets a copy of that part, so each conversation holds its own copy of a shared opening: many
/// one-off questions under one system prompt would otherwise fill the whole budget with copies
/// of it (a 3000-request soak over a tiny model grew by 200 MB). Like llama.cpp's server slots,
/// this keeps the most recent conversations; a server's concurrent ones are far fewer.
const MAX_ENTRIES: usize = 32;

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

    /// The cache that shares the longest prefix with `prompt`, holding that prefix, and the
    /// number of prompt tokens it covers; `capacity` is the positions the caller expects to
    /// reach. At least one prompt token is always left to run, since generation needs the
    /// logits of the last one.
    ///
    /// When `prompt` continues all of the cached tokens, the cache itself is taken out. When
    /// the cached tokens go on past the shared part, they are some other conversation's (or a
    /// reply that the next prompt spells differently), so the shared part is copied and the
    /// entry stays for whoever continues it.
    pub(crate) fn take(&self, prompt: &[u32], capacity: usize) -> Option<(KvCache, usize)> {
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
        if matched < state.entries[index].ids.len() {
            state.clock += 1;
            let clock = state.clock;
            let entry = &mut state.entries[index];
            entry.last_used = clock;
            return match entry.cache.prefix_copy(matched, capacity) {
                Ok(cache) => Some((cache, matched)),
                Err(error) => {
                    tracing::warn!(%error, "could not copy a cached prefix; running it again");
                    None
                }
            };
        }
        let mut entry = state.entries.swap_remove(index);
        entry.cache.truncate(matched);
        Some((entry.cache, matched))
    }

    /// Drops the entry holding exactly `ids`, if any: one that a newer entry supersedes.
    pub(crate) fn forget(&self, ids: &[u32]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.entries.retain(|e| e.ids != ids);
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
        while total > self.budget_bytes || state.entries.len() > MAX_ENTRIES {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One-off questions under one system prompt leave an entry each: only the most recent
    /// [`MAX_ENTRIES`] stay, however small they are next to the byte budget.
    #[test]
    fn many_small_entries_keep_only_the_most_recent() {
        let cache = PrefixCache::new(usize::MAX);
        let system = [1u32, 2, 3, 4];
        for question in 0..10 * MAX_ENTRIES as u32 {
            let ids: Vec<u32> = system.iter().copied().chain([100 + question]).collect();
            cache.put(ids, KvCache::default());
        }
        let state = cache.state.lock().unwrap();
        assert_eq!(state.entries.len(), MAX_ENTRIES);
        let newest = 100 + 10 * MAX_ENTRIES as u32 - 1;
        assert!(state.entries.iter().any(|e| e.ids[4] == newest));
        assert!(state
            .entries
            .iter()
            .all(|e| e.ids[4] > newest - MAX_ENTRIES as u32));
    }
}
