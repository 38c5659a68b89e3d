//! Prefilling a finished reply as the next turn's prompt will spell it, while the user reads it.
//!
//! A reply leaves its key/value cache behind (see [`crate::prefix_cache`]), but that cache holds
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
    /// Token ids to pre-fill, oldest first.
    pending: Vec<Vec<u32>>,
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

    /// Queues `ids` (the start of a conversation's next prompt) to be pre-filled.
    pub(crate) fn submit(&self, ids: Vec<u32>) {
        if self.thread.is_none() {
            return;
        }
        let mut state = self.shared.lock();
        if state.pending.len() >= MAX_PENDING {
            tracing::debug!("next-turn warm-up dropped: queue full");
            return;
        }
        state.pending.push(ids);
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Blocks while a queued or running warm-up would leave a longer prefix of `prompt` in the
    /// cache than the cache holds now: the next turn of its conversation, or the same turn asked
    /// again ("regenerate"), whose cache the warm-up has taken out. The request then finds the
    /// result instead of racing the warm-up and starting cold.
    pub(crate) fn wait_for(&self, prompt: &[u32]) {
        let mut state = self.shared.lock();
        // Warm-ups are background work, which waits for every request's steps: this request
        // would wait behind all of them. It waits for the warm-up alone instead.
        let mut expedite = None;
        while !state.closing && {
            let coming = state
                .pending
                .iter()
                .chain(state.running.as_ref())
                .map(|ids| common_prefix(ids, prompt))
                .max()
                .unwrap_or(0);
            coming > 0 && coming > self.cache.longest_prefix(prompt)
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
    fn run(&self, batcher: &Batcher, cache: &PrefixCache) {
        loop {
            let mut state = self.lock();
            while state.pending.is_empty() && !state.closing {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.closing {
                return;
            }
            let ids = state.pending.remove(0);
            state.running = Some(ids.clone());
            drop(state);
            if let Err(e) = prefill(batcher, cache, &ids) {
                tracing::warn!(error = %e, "next-turn warm-up failed");
            }
            self.lock().running = None;
            self.changed.notify_all();
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Extends the cached prefix of `ids` to all of `ids`. Without a cached prefix there is nothing
/// to extend: a cold prefill in the background would only compete with requests.
fn prefill(batcher: &Batcher, cache: &PrefixCache, ids: &[u32]) -> crate::Result<()> {
    let Some((mut kv, cached)) = cache.take(ids) else {
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
