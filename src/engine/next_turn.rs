//! Prefilling a finished reply as the next turn's prompt will spell it, while the user reads it.
//!
//! A reply leaves its key/value cache behind (see [`super::prefix_cache`]), but that cache holds
//! the tokens the model sampled. The next turn's prompt carries the reply back as text, and the
//! prompt builder encodes it afresh: the two token sequences part ways early in the reply (for
//! a random model at its first token), so the reply would run through the model again before
//! the first token of turn N + 1, and the time to first token would grow with the reply.
//!
//! So once a reply is complete, a background thread extends the cache with the tokens the next
//! prompt will start with (history + this turn's question + the reply as the builder encodes
//! it + the next user turn's opening tokens) and files it under those tokens. The next request
//! then only runs its own question. The cached values are the ones a cold prefill computes
//! (every product is computed per token the same way whatever the chunk), so replies do not
//! change; a request that continues a conversation whose warm-up is still running waits for it
//! rather than start over.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::engine::batcher::{Batcher, Priority};
use crate::engine::prefix_cache::PrefixCache;

/// Warm-ups waiting at most; beyond that new ones are dropped (a busy server's idle time, not
/// a backlog, is what they are for).
const MAX_PENDING: usize = 4;

/// The background thread that pre-fills conversations' next prompts, one at a time.
#[derive(Debug)]
pub(crate) struct NextTurnWarmer {
    shared: Arc<Shared>,
    cache: Arc<PrefixCache>,
    batcher: Arc<Batcher>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Warm-ups to run, oldest first.
    pending: Vec<Warmup>,
    /// The ids being pre-filled now.
    running: Option<Vec<u32>>,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NextTurnWarmer {
    /// Starts the thread; it runs the model through `batcher` (as background work, after
    /// every waiting request) and files its results in `cache`.
    pub(crate) fn start(batcher: Arc<Batcher>, cache: Arc<PrefixCache>) -> Self {
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        let worker_cache = cache.clone();
        let worker_batcher = batcher.clone();
        let thread = std::thread::Builder::new()
            .name("chathub-next-turn".into())
            .spawn(move || worker.run(&worker_batcher, &worker_cache))
            .map_err(|e| tracing::warn!(error = %e, "no thread for next-turn warm-ups"))
            .ok();
        NextTurnWarmer {
            shared,
            cache,
            batcher,
            thread,
        }
    }

    /// Queues `ids` (the start of a conversation's next prompt) to be pre-filled, from the
    /// cache filed under `reply` (the finished request's prompt and sampled reply), which the
    /// result replaces.
    pub(crate) fn submit(&self, ids: Vec<u32>, reply: Vec<u32>) {
        if self.thread.is_none() {
            return;
        }
        let mut state = self.shared.lock();
        if state.pending.len() >= MAX_PENDING {
            tracing::debug!("next-turn warm-up dropped: queue full");
            return;
        }
        state.pending.push(Warmup { ids, reply });
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Blocks while a queued or running warm-up would leave a longer prefix of `prompt` in the
    /// cache than the cache holds now, and would spend fewer tokens on the rest of its
    /// conversation than it saves this request: the next turn of its conversation above all.
    /// The request then finds the result instead of racing the warm-up and starting cold. A
    /// request that only shares the warm-up's opening (a new conversation with the same system
    /// prompt or question) does not wait for the other conversation's reply to run, and the
    /// same turn asked again ("regenerate") finds the reply's own cache still in place.
    pub(crate) fn wait_for(&self, prompt: &[u32]) {
        let mut state = self.shared.lock();
        // Warm-ups are background work, which waits for every request's steps: this request
        // would wait behind all of them. It waits for the warm-up alone instead.
        let mut expedite = None;
        while !state.closing && {
            let cached = self.cache.longest_prefix(prompt);
            state
                .pending
                .iter()
                .map(|warmup| &warmup.ids)
                .chain(state.running.as_ref())
                .any(|ids| worth_waiting(ids, prompt, cached))
        } {
            expedite.get_or_insert_with(|| self.batcher.expedite_background());
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until no warm-up is queued or running.
    pub(crate) fn wait_idle(&self) {
        let mut state = self.shared.lock();
        while !state.closing && (state.running.is_some() || !state.pending.is_empty()) {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Shared {
    fn run(&self, batcher: &Arc<Batcher>, cache: &PrefixCache) {
        loop {
            let mut state = self.lock();
            while state.pending.is_empty() && !state.closing {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.closing {
                return;
            }
            let warmup = state.pending.remove(0);
            state.running = Some(warmup.ids.clone());
            drop(state);
            if let Err(e) = prefill(batcher, cache, &warmup) {
                tracing::warn!(error = %e, "next-turn warm-up failed");
            }
            self.lock().running = None;
            self.changed.notify_all();
        }
    }
}

/// A conversation's next prompt to pre-fill.
#[derive(Debug)]
struct Warmup {
    /// The next prompt's first tokens.
    ids: Vec<u32>,
    /// What the finished request's cache is filed under (its prompt and sampled reply).
    reply: Vec<u32>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Whether a request for `prompt`, whose longest cached prefix is `cached` tokens, gains by
/// waiting for the warm-up of `warming`: the prompt tokens it would not have to run exceed the
/// warm-up's tokens beyond the prompt, which it would wait for without needing them.
fn worth_waiting(warming: &[u32], prompt: &[u32], cached: usize) -> bool {
    let shared = common_prefix(warming, prompt);
    shared > cached && shared - cached >= warming.len() - shared
}

/// Extends the cached prefix of `ids` to all of `ids`. Without a cached prefix there is nothing
/// to extend: a cold prefill in the background would only compete with requests.
fn prefill(batcher: &Arc<Batcher>, cache: &PrefixCache, warmup: &Warmup) -> crate::Result<()> {
    let ids = &warmup.ids[..];
    // Several replies alike (the same question asked at once) queue the same warm-up.
    if cache.longest_prefix(ids) >= ids.len() {
        return Ok(());
    }
    // The reply's own cache stays in place while this runs, for a request asking the same
    // turn again or opening the same way meanwhile.
    let Some((mut kv, cached)) = cache.take(ids, ids.len()) else {
        return Ok(());
    };
    if cached < ids.len() {
        batcher.forward(&ids[cached..], &mut kv, Priority::Background)?;
    }
    tracing::debug!(
        reused = cached,
        added = ids.len() - cached,
        "next turn pre-filled"
    );
    cache.put(ids.to_vec(), kv);
    // This one holds all the reply's cache is good for: its prompt, and the reply as the next
    // prompt spells it (the tokens sampled past where the two part are never asked for again).
    if warmup.reply != ids {
        cache.forget(&warmup.reply);
    }
    Ok(())
}

impl Drop for NextTurnWarmer {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            // Returns once the warm-up in progress (a reply's worth of prefill) ends.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worth_waiting;

    #[test]
    fn a_request_waits_only_for_warm_ups_that_save_it_more_than_they_cost() {
        let warming: Vec<u32> = (0..100).collect();
        // The conversation's next turn: everything the warm-up runs is its prompt's.
        let next_turn: Vec<u32> = (0..130).collect();
        assert!(worth_waiting(&warming, &next_turn, 0));
        // Its own cache already holds all the warm-up would give it.
        assert!(!worth_waiting(&warming, &next_turn, 100));
        // The same turn asked again after a long history, the warm-up's reply short.
        let regenerate: Vec<u32> = (0..80).chain([999]).collect();
        assert!(worth_waiting(&warming, &regenerate, 0));
        // A new conversation opening like this one: it would wait for a reply it never reads.
        let same_opening: Vec<u32> = (0..24).chain([999]).collect();
        assert!(!worth_waiting(&warming, &same_opening, 0));
        // Nothing in common.
        assert!(!worth_waiting(&warming, &[999], 0));
    }
}
