//! Continuous batching: every generation's forward passes go through one queue, and whichever
//! caller finds the model idle runs everything queued as one batched pass.
//!
//! On a CPU a decode step is bound by reading the weights, so a step for four conversations
//! costs little more than a step for one; a server that ran each request on its own split the
//! memory bandwidth between them instead. A generation ([`Batcher::generate`]) hands its prompt
//! and its sampler to the queue: the thread that runs a pass also samples each finished row's
//! next token and queues that row's next step at once, so consecutive passes follow each other
//! without waiting for the generations' threads to come back. Those threads read their tokens
//! ([`Generation::next`]), turn them into text and stream it meanwhile, and run passes
//! themselves whenever the model is idle: there is no engine thread. Passes small enough for
//! one core (a tiny model's decode steps) are the exception: they run one after another in
//! lanes ([`kernels::small_pass_lanes`], one per core, each with its share of the rows, side by
//! side), which wake a reader only once it has a few tokens to read, since for them a thread's
//! wake-up costs as much as the pass. A generation runs at most [`MAX_AHEAD`] tokens ahead of
//! its reader, and leaves the batch within one step once it is cancelled, has sampled a stop
//! token or reached its length.
//!
//! Prompts are prefilled in chunks. While other conversations are decoding, a batch carries at
//! most [`INTERLEAVED_PREFILL`] prompt tokens next to their rows, so a long prompt arriving
//! never holds their next tokens back by more than one such chunk; otherwise prompts share
//! chunks of the engine's full size (several prompts arriving together run in one pass).
//! Background work (next-turn warm-ups, [`Batcher::forward`]) runs only while no generation is
//! in progress, unless a request waits for it ([`Batcher::expedite_background`]), in chunks of
//! [`INTERLEAVED_PREFILL`], and gives the model up between two layers when a request arrives
//! while it runs: a request waits at most one layer of it.
//!
//! Every row is computed as it would be alone ([`Transformer::forward_batch`]) and each
//! generation samples with its own seeded sampler, so a reply is the same batched or not.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::chat::request::FinishReason;
use crate::engine::sampling::Sampler;
use crate::error::{Error, Result};
use crate::kernels;
use crate::nn::transformer::{KvCache, Segment, Transformer};

/// Prompt tokens a batch carries while other sequences decode in it: small enough that their
/// next token waits at most one such chunk (about 0.2 s for the 785M f16 bench model on two
/// cores), large enough that the prompt still streams the weights efficiently.
pub(crate) const INTERLEAVED_PREFILL: usize = 32;

/// Most sequences one batched step decodes; more wait for the next step.
pub(crate) const MAX_BATCH_ROWS: usize = 64;

/// Tokens a generation may sample before its reader has taken them: beyond that it sits out
/// of the batch until the reader catches up, so a client that stops reading stops its
/// generation (as it did when each generation stepped on its own thread) instead of having it
/// run on to its length in the others' passes.
pub(crate) const MAX_AHEAD: usize = 6;

/// Tokens a reader may have waiting before a run of small passes wakes it (see
/// [`Batcher::run_small_passes`]); two short of [`MAX_AHEAD`], so that a reader woken late
/// still catches up before its generation is parked.
const WAKE_AT: usize = MAX_AHEAD - 2;

/// Longest a run of small passes lets a reader with tokens waiting sleep on.
const WAKE_EVERY: Duration = Duration::from_millis(1);

/// Who is asking: requests first, background work when no request waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    Request,
    Background,
}

/// The shared queue of forward passes in front of one model.
#[derive(Debug)]
pub(crate) struct Batcher {
    model: Arc<Transformer>,
    /// Prompt tokens per chunk when a prompt runs alone.
    chunk: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Job>,
    /// Whether a caller is running a pass on every core now: nothing else runs meanwhile.
    running: bool,
    /// Small-pass lanes running passes now, one bit per lane (see
    /// [`Batcher::run_small_passes`]).
    lanes_busy: u32,
    /// Generations in progress, from [`Batcher::generate`] until their end is handed over.
    members: usize,
    /// Of those, the ones past their prompt: a prompt runs in small chunks while there are
    /// any, so that their next tokens are not held back.
    decoding: usize,
    /// Requests waiting for background work (see [`Batcher::expedite_background`]): while
    /// there are any, background jobs run as requests do.
    expedited: usize,
    /// Results of [`Batcher::forward`] jobs, by job id.
    finished: HashMap<u64, (KvCache, Result<Vec<f32>>)>,
    /// Each generation's reader's side, by job id; gone once its reader is.
    inboxes: HashMap<u64, Inbox>,
    /// Generations [`MAX_AHEAD`] tokens ahead of their readers, out of the queue until read.
    parked: HashMap<u64, Job>,
    /// Generations asked to stop while their job was in a pass: ended when it comes back.
    cancelled: HashSet<u64>,
    next_id: u64,
    /// What [`BatchCounts`] reports.
    counts: BatchCounts,
}

/// What a generation's reader has yet to take, and how to wake it: readers wait each on their
/// own condition variable, so that a pass wakes only the readers it has something for.
#[derive(Debug, Default)]
struct Inbox {
    events: VecDeque<Event>,
    wake: Arc<Condvar>,
    /// Whether the reader is waiting now (waking one that is not costs a system call).
    waiting: bool,
}

impl State {
    fn priority_of(&self, job: &Job) -> Priority {
        if self.expedited > 0 {
            Priority::Request
        } else {
            job.priority
        }
    }

    /// Whether a caller may start a pass now: the model is idle and something may run.
    fn may_start_pass(&self) -> bool {
        !self.running && !self.queue.is_empty() && (self.requests_queued() > 0 || self.members == 0)
    }

    /// Puts jobs taken for a batch back at the front of the queue, in their order: the next
    /// [`Batcher::take_batch`] takes the same batch again.
    fn put_back(&mut self, batch: Vec<(Job, usize)>) {
        for (job, _) in batch.into_iter().rev() {
            self.queue.push_front(job);
        }
    }

    fn count(&mut self, batch: &[(Job, usize)]) {
        self.counts.passes += 1;
        self.counts.sequences += batch.len() as u64;
    }

    fn requests_queued(&self) -> usize {
        self.queue
            .iter()
            .filter(|j| self.priority_of(j) == Priority::Request)
            .count()
    }

    /// Hands a generation's event to its reader, if it still has one; returns what that
    /// reader has yet to take (0 when it is gone).
    fn deliver(&mut self, id: u64, event: Event) -> usize {
        self.inboxes.get_mut(&id).map_or(0, |inbox| {
            inbox.events.push_back(event);
            inbox.events.len()
        })
    }

    /// Wakes generation `id`'s reader if it waits.
    fn wake(&self, id: u64) {
        if let Some(inbox) = self.inboxes.get(&id).filter(|inbox| inbox.waiting) {
            inbox.wake.notify_one();
        }
    }

    /// Wakes every waiting reader that has something to read.
    fn wake_readers_with_news(&self) {
        for inbox in self.inboxes.values() {
            if inbox.waiting && !inbox.events.is_empty() {
                inbox.wake.notify_one();
            }
        }
    }

    /// Ends generation `job` with `reason`: its reader gets its cache back.
    fn end(&mut self, mut job: Job, reason: FinishReason) {
        let decode = job.decode.take().expect("a generation's job");
        self.leave(&decode);
        let ended = Ended {
            reason,
            cache: job.cache,
            context: decode.context,
        };
        self.deliver(job.id, Event::End(ended));
        self.wake(job.id);
    }

    /// Ends generation `job` with a failed pass.
    fn fail(&mut self, mut job: Job, error: Error) {
        let decode = job.decode.take().expect("a generation's job");
        self.leave(&decode);
        self.deliver(job.id, Event::Failed(error));
        self.wake(job.id);
    }

    fn leave(&mut self, decode: &Decode) {
        self.members -= 1;
        self.decoding -= usize::from(decode.produced > 0);
    }
}

#[derive(Debug)]
struct Job {
    id: u64,
    ids: Vec<u32>,
    /// Ids already run (a prompt runs in chunks over several batches).
    done: usize,
    cache: KvCache,
    priority: Priority,
    /// How a generation goes on from its logits; `None` for a [`Batcher::forward`] job.
    decode: Option<Decode>,
}

impl Job {
    fn remaining(&self) -> usize {
        self.ids.len() - self.done
    }
}

/// How a generation goes on from each pass's logits: its sampler, what it has seen, and when it
/// ends. Owned by its job, and run by whichever thread ran the pass.
#[derive(Debug)]
pub(crate) struct Decode {
    sampler: Sampler,
    context: Vec<u32>,
    stop_ids: Vec<u32>,
    max_new: usize,
    produced: usize,
}

impl Decode {
    /// Samples with `sampler` after `context` (the prompt: what the repetition penalty looks
    /// at first); a token in `stop_ids` ends the reply unseen, and `max_new` tokens end it
    /// (the first one is always sampled).
    pub(crate) fn new(
        sampler: Sampler,
        context: Vec<u32>,
        stop_ids: Vec<u32>,
        max_new: usize,
    ) -> Self {
        Decode {
            sampler,
            context,
            stop_ids,
            max_new,
            produced: 0,
        }
    }
}

/// What a generation's reader gets ([`Generation::next`]).
#[derive(Debug)]
pub(crate) enum Event {
    /// The reply's next token.
    Token(u32),
    /// The generation is over.
    End(Ended),
    /// A forward pass failed; the cache, possibly part-written, is dropped.
    Failed(Error),
}

/// How a generation ended: a stop token (not delivered), its length, or a cancellation.
/// `cache` holds the keys and values of `context[..cache.len()]`, where `context` is the prompt
/// and every token delivered.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) reason: FinishReason,
    pub(crate) cache: KvCache,
    pub(crate) context: Vec<u32>,
}

/// How many forward passes an [`Engine`](crate::Engine) ran and how many sequences they
/// carried in all: `sequences / passes` is how well concurrent generations were batched (1 when
/// they never met).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchCounts {
    /// Forward passes run (a prompt chunk or a decode step, each possibly for many sequences).
    pub passes: u64,
    /// Sequences carried, summed over the passes.
    pub sequences: u64,
    /// Background passes given up part-way for a request that arrived while they ran (run
    /// again later, from where they started).
    pub background_yields: u64,
}

/// What became of one job in a pass.
enum Ran {
    /// A [`Batcher::forward`] job's ids have all run: the logits after the last one.
    Logits(Vec<f32>),
    /// A generation's prompt or step has run: the token it sampled next.
    Sampled(u32),
    /// Ids are left to run: a prompt's next chunks, or a background pass given up.
    Pending,
    Failed(Error),
}

impl Batcher {
    /// A queue in front of `model`; a prompt alone runs in chunks of `chunk` tokens.
    pub(crate) fn new(model: Arc<Transformer>, chunk: usize) -> Self {
        Batcher {
            model,
            chunk: chunk.max(1),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, ids: &[u32], cache: &KvCache) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("ids", 0, "at least one token is needed"));
        }
        let limit = self.model.spec().max_positions;
        if cache.len() + ids.len() > limit {
            return Err(Error::PromptTooLong {
                prompt_tokens: cache.len() + ids.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Queues `job` under a new id and returns the state, still locked, and the id.
    fn queue(
        &self,
        ids: &[u32],
        cache: KvCache,
        priority: Priority,
        decode: Option<Decode>,
    ) -> (MutexGuard<'_, State>, u64) {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Job {
            id,
            ids: ids.to_vec(),
            done: 0,
            cache,
            priority,
            decode,
        });
        self.changed.notify_all();
        (state, id)
    }

    /// Starts a generation: runs `prompt` at positions `cache.len()..` of `cache`, batched
    /// with whatever else is queued, then samples and runs one token per step as `decode`
    /// says, until it ends. Read its tokens with [`Generation::next`]; the calling thread runs
    /// passes for everyone while it waits for them.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty prompt, [`Error::PromptTooLong`] past the
    /// model's context.
    pub(crate) fn generate(
        self: &Arc<Self>,
        prompt: &[u32],
        cache: KvCache,
        decode: Decode,
    ) -> Result<Generation<'_>> {
        self.check(prompt, &cache)?;
        let (mut state, id) = self.queue(prompt, cache, Priority::Request, Some(decode));
        state.members += 1;
        state.inboxes.insert(id, Inbox::default());
        Ok(Generation {
            batcher: self,
            id,
            ended: false,
        })
    }

    /// Runs `ids` at positions `cache.len()..` of `cache`, batched with whatever else is
    /// queued, and returns the logits after the last one (as [`Transformer::forward`]).
    /// Blocks the calling thread until then; the thread may run batches for others meanwhile.
    pub(crate) fn forward(
        self: &Arc<Self>,
        ids: &[u32],
        cache: &mut KvCache,
        priority: Priority,
    ) -> Result<Vec<f32>> {
        self.check(ids, cache)?;
        let (mut state, id) = self.queue(ids, std::mem::take(cache), priority, None);
        loop {
            if let Some((kv, result)) = state.finished.remove(&id) {
                *cache = kv;
                return result;
            }
            state = self.step(state, None);
        }
    }

    /// Runs the next batch if the model is idle and something may run, else waits until the
    /// state changes. Returns with the state locked again. Small passes (a tiny model's steps)
    /// are instead started in lanes ([`Batcher::start_lane`]), which go on from pass to pass
    /// for as long as small ones are queued; the caller then waits for its tokens as every
    /// other reader does. `reader`: the generation whose reader calls, which waits on its own
    /// [`Inbox`]; `None` for a [`Batcher::forward`] caller.
    fn step<'a>(
        self: &'a Arc<Self>,
        mut state: MutexGuard<'a, State>,
        reader: Option<u64>,
    ) -> MutexGuard<'a, State> {
        // Background work waits for every generation in progress to end, not only for their
        // queued steps: it would hold them back by a layer each time it started (see `run`),
        // for work that their end makes stale anyway (a warm-up of a conversation whose next
        // turn is already being asked).
        if !state.may_start_pass() {
            return self.wait(state, reader);
        }
        if self.start_lane(&mut state) {
            while self.start_lane(&mut state) {}
            return self.wait(state, reader);
        }
        // A pass on every core: once the lanes have stopped (they stop at a batch too big for
        // them, which is the one at the front now).
        if state.lanes_busy != 0 {
            return self.wait(state, reader);
        }
        let (priority, batch) = self.take_batch(&mut state, MAX_BATCH_ROWS);
        state.running = true;
        state.count(&batch);
        drop(state);
        let (outcome, yielded) = self.run_traced(batch, priority);
        let mut state = self.lock();
        state.running = false;
        self.finish_pass(&mut state, outcome, yielded);
        self.wake_all(&state);
        state
    }

    /// Waits until woken: on `reader`'s own condition variable (see [`Inbox`]), else on the
    /// one [`Batcher::forward`] callers share.
    fn wait<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        reader: Option<u64>,
    ) -> MutexGuard<'a, State> {
        let Some((id, inbox)) = reader.and_then(|id| Some((id, state.inboxes.get_mut(&id)?)))
        else {
            return self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        };
        inbox.waiting = true;
        let wake = Arc::clone(&inbox.wake);
        let mut state = wake.wait(state).unwrap_or_else(|e| e.into_inner());
        if let Some(inbox) = state.inboxes.get_mut(&id) {
            inbox.waiting = false;
        }
        state
    }

    /// Wakes everyone who waits: after a pass on every core, or when a lane stops (someone
    /// may have to start the next pass).
    fn wake_all(&self, state: &State) {
        self.changed.notify_all();
        for inbox in state.inboxes.values().filter(|inbox| inbox.waiting) {
            inbox.wake.notify_one();
        }
    }

    /// Starts the next batch in a free lane if it is small enough for one core; `false` (and
    /// the queue as it was) if it is not, or no lane is free. A lane takes its share of the
    /// rows: the generations in progress split evenly between the lanes.
    fn start_lane(self: &Arc<Self>, state: &mut State) -> bool {
        let lanes = kernels::small_pass_lanes();
        let Some(lane) = (0..lanes.len()).find(|&i| state.lanes_busy & (1 << i) == 0) else {
            return false;
        };
        let Some((priority, batch)) = self.take_small_batch(state) else {
            return false;
        };
        state.lanes_busy |= 1 << lane;
        let run = Arc::clone(self);
        lanes[lane].spawn(move || run.run_small_passes(lane, priority, batch));
        true
    }

    /// A lane's next batch, counted, if a pass may start and the batch is small enough for one
    /// core; else `None` and the queue as it was. A model whose single-row pass is too big
    /// never takes one (and the queue is not touched).
    fn take_small_batch(&self, state: &mut State) -> Option<(Priority, Vec<(Job, usize)>)> {
        if !self.model.is_small_pass(1) || !state.may_start_pass() {
            return None;
        }
        let (priority, batch) = self.take_batch(state, self.lane_share(state));
        if batch.is_empty() || !self.is_small(&batch) {
            state.put_back(batch);
            return None;
        }
        state.count(&batch);
        Some((priority, batch))
    }

    /// Rows a lane takes at most: an even share of the generations in progress.
    fn lane_share(&self, state: &State) -> usize {
        let lanes = kernels::small_pass_lanes().len().max(1);
        state.members.div_ceil(lanes).clamp(1, MAX_BATCH_ROWS)
    }

    fn is_small(&self, batch: &[(Job, usize)]) -> bool {
        self.model
            .is_small_pass(batch.iter().map(|(_, n)| n).sum::<usize>())
    }

    /// [`Batcher::run`], traced.
    fn run_traced(&self, batch: Vec<(Job, usize)>, priority: Priority) -> (Vec<(Job, Ran)>, bool) {
        let started = Instant::now();
        let (sequences, tokens) = (batch.len(), batch.iter().map(|(_, n)| n).sum::<usize>());
        let (outcome, yielded) = self.run(batch, priority);
        tracing::trace!(
            sequences,
            tokens,
            yielded,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "forward pass"
        );
        (outcome, yielded)
    }

    /// Runs `batch` on lane `lane`'s thread, then its share of every small batch queued after
    /// it, one after another, until none is left to run: a tiny model's passes follow each
    /// other without waiting for a reader's thread to come back and start the next one. Starts
    /// other lanes for rows left queued. A batch too big for one core is left at the front of
    /// the queue for a caller to run on every core.
    fn run_small_passes(
        self: Arc<Self>,
        lane: usize,
        mut priority: Priority,
        mut batch: Vec<(Job, usize)>,
    ) {
        // Should this thread unwind, the lane must not stay marked busy for ever.
        let free_on_unwind = FreeLaneOnUnwind(&self, lane);
        // Readers are woken only when they have something to do soon (see `finish_pass`):
        // each wake-up is a system call, and on a VM an interrupt to another core, in the way
        // of the next pass (the demo model's pass thread spent a tenth of its time waking its
        // four readers after every pass). Those with a token or two are swept up this often.
        let mut last_sweep = Instant::now();
        loop {
            let (outcome, yielded) = self.run_traced(batch, priority);
            let mut state = self.lock();
            let results = self.finish_pass(&mut state, outcome, yielded);
            match self.take_small_batch(&mut state) {
                Some(next) => {
                    while self.start_lane(&mut state) {}
                    if results {
                        self.changed.notify_all();
                    }
                    if last_sweep.elapsed() >= WAKE_EVERY {
                        state.wake_readers_with_news();
                        last_sweep = Instant::now();
                    }
                    (priority, batch) = next;
                }
                None => {
                    state.lanes_busy &= !(1 << lane);
                    self.wake_all(&state);
                    break;
                }
            }
        }
        std::mem::forget(free_on_unwind);
    }

    /// Files what a pass did: hands out logits and tokens, ends generations that are over, and
    /// requeues the others' next steps. Wakes the readers with something urgent to read (an
    /// end, a first token, or [`WAKE_AT`] tokens); the others read when they come back, or
    /// when the caller wakes them. True when [`Batcher::forward`] callers should hear: a result
    /// of theirs, or a generation gone (background work may start).
    fn finish_pass(&self, state: &mut State, outcome: Vec<(Job, Ran)>, yielded: bool) -> bool {
        let mut results = false;
        state.counts.background_yields += u64::from(yielded);
        // Jobs with chunks still to run keep their places at the front, in their order; the
        // generations going on queue up behind everything waiting.
        let mut front = Vec::new();
        for (mut job, ran) in outcome {
            let cancelled = state.cancelled.remove(&job.id);
            match ran {
                Ran::Logits(logits) => {
                    state.finished.insert(job.id, (job.cache, Ok(logits)));
                    results = true;
                }
                Ran::Failed(error) if job.decode.is_some() => {
                    state.fail(job, error);
                    results = true;
                }
                Ran::Failed(error) => {
                    state.finished.insert(job.id, (job.cache, Err(error)));
                    results = true;
                }
                _ if cancelled => {
                    state.end(job, FinishReason::Cancelled);
                    results = true;
                }
                Ran::Pending => front.push(job),
                Ran::Sampled(token) => {
                    let decode = job.decode.as_mut().expect("a generation's job");
                    if decode.stop_ids.contains(&token) {
                        state.end(job, FinishReason::Stop);
                        results = true;
                        continue;
                    }
                    decode.context.push(token);
                    decode.produced += 1;
                    let (first, done) = (decode.produced == 1, decode.produced >= decode.max_new);
                    state.decoding += usize::from(first);
                    let unread = state.deliver(job.id, Event::Token(token));
                    if done {
                        state.end(job, FinishReason::Length);
                        results = true;
                        continue;
                    }
                    job.ids = vec![token];
                    job.done = 0;
                    if first || unread >= WAKE_AT {
                        state.wake(job.id);
                    }
                    if unread >= MAX_AHEAD {
                        state.parked.insert(job.id, job);
                    } else {
                        state.queue.push_back(job);
                    }
                }
            }
        }
        for job in front.into_iter().rev() {
            state.queue.push_front(job);
        }
        results
    }

    /// Runs background work as requests for as long as the returned guard lives: for a
    /// request that waits for a warm-up (its next turn's cache), which would otherwise wait
    /// behind every other request's steps.
    pub(crate) fn expedite_background(&self) -> Expedite<'_> {
        self.lock().expedited += 1;
        self.changed.notify_all();
        Expedite { batcher: self }
    }

    /// Passes run so far and the sequences they carried.
    pub(crate) fn counts(&self) -> BatchCounts {
        self.lock().counts
    }

    /// Takes the next batch off the queue, from requests if any wait, else from background
    /// work: each waiting decode step (one token) up to `max_rows` rows, and prompt tokens up
    /// to one chunk in all, oldest prompt first. Returns whose batch it is and each job with
    /// the number of its ids to run now.
    fn take_batch(&self, state: &mut State, max_rows: usize) -> (Priority, Vec<(Job, usize)>) {
        let priority = if state.requests_queued() > 0 {
            Priority::Request
        } else {
            Priority::Background
        };
        // Generations past their prompt get their next step after one small chunk of prompt
        // tokens, not after a whole one. Background work always runs in small chunks: a
        // request arriving meanwhile waits for the pass under way, and a warm-up of a long
        // reply in one pass held a burst of new requests back by 0.7 s (785M f16), a tenth of
        // their whole replies.
        let decoders_waiting = state
            .queue
            .iter()
            .any(|j| state.priority_of(j) == priority && j.remaining() == 1);
        let mut budget =
            if decoders_waiting || state.decoding > 0 || priority == Priority::Background {
                INTERLEAVED_PREFILL.min(self.chunk)
            } else {
                self.chunk
            };
        let mut batch = Vec::new();
        let mut rest = VecDeque::with_capacity(state.queue.len());
        while let Some(job) = state.queue.pop_front() {
            let rows = batch.len();
            let eligible = state.priority_of(&job) == priority;
            if eligible && job.remaining() == 1 && rows < max_rows {
                batch.push((job, 1));
            } else if eligible && job.remaining() > 1 && budget > 0 {
                // Prompts share the chunk's tokens, oldest first.
                let n = job.remaining().min(budget);
                budget -= n;
                batch.push((job, n));
            } else {
                rest.push_back(job);
            }
        }
        state.queue = rest;
        (priority, batch)
    }

    /// Runs one batch of `priority`'s jobs and samples each generation whose ids have all
    /// run. A background batch gives the model up between two layers when a request is queued
    /// meanwhile (its jobs then come back pending with nothing run, and the flag says so). A
    /// failure fails every job in the batch (their caches may be part-written); a panic in
    /// the model is contained the same way, so no caller waits forever.
    fn run(&self, mut batch: Vec<(Job, usize)>, priority: Priority) -> (Vec<(Job, Ran)>, bool) {
        let request_waits = || self.lock().requests_queued() > 0;
        let never = || false;
        let stop: &(dyn Fn() -> bool + Sync) = match priority {
            Priority::Background => &request_waits,
            Priority::Request => &never,
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut segments: Vec<Segment<'_>> = batch
                .iter_mut()
                .map(|(job, n)| Segment {
                    ids: &job.ids[job.done..job.done + *n],
                    cache: &mut job.cache,
                })
                .collect();
            self.model.forward_batch_unless(&mut segments, stop)
        }));
        let failed = |batch: Vec<(Job, usize)>, reason: &str| {
            let jobs = batch.into_iter().map(|(job, _)| {
                let error = Error::Compute(candle_core::Error::Msg(reason.to_string()));
                (job, Ran::Failed(error))
            });
            (jobs.collect(), false)
        };
        let logits = match outcome {
            Ok(Ok(Some(logits))) => logits,
            Ok(Ok(None)) => {
                let pending = batch.into_iter().map(|(job, _)| (job, Ran::Pending));
                return (pending.collect(), true);
            }
            Ok(Err(error)) => return failed(batch, &error.to_string()),
            Err(_) => return failed(batch, "the model panicked during a forward pass"),
        };
        let ran = batch
            .into_iter()
            .zip(logits)
            .map(|((mut job, n), mut logits)| {
                job.done += n;
                let ran = if job.remaining() > 0 {
                    Ran::Pending
                } else if let Some(decode) = &mut job.decode {
                    Ran::Sampled(decode.sampler.next(&mut logits, &decode.context))
                } else {
                    Ran::Logits(logits)
                };
                (job, ran)
            })
            .collect();
        (ran, false)
    }
}

/// Frees a lane again if its thread unwinds mid-run (see [`Batcher::run_small_passes`]), so
/// that callers do not wait for it for ever.
struct FreeLaneOnUnwind<'a>(&'a Batcher, usize);

impl Drop for FreeLaneOnUnwind<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.lanes_busy &= !(1 << self.1);
        self.0.wake_all(&state);
    }
}

/// A generation under way (see [`Batcher::generate`]): its reader's end.
#[derive(Debug)]
pub(crate) struct Generation<'a> {
    batcher: &'a Arc<Batcher>,
    id: u64,
    /// Whether the end has been handed over.
    ended: bool,
}

impl Generation<'_> {
    /// The next event: a token, or the end. Blocks until there is one, running passes (for
    /// every generation) while the model is idle. After the end, returns the end's reason
    /// as [`Event::Failed`]: there is nothing more.
    pub(crate) fn next(&mut self) -> Event {
        if self.ended {
            return Event::Failed(Error::invalid("generation", "ended", "already ended"));
        }
        let mut state = self.batcher.lock();
        loop {
            let inbox = state.inboxes.get_mut(&self.id);
            if let Some(event) = inbox.and_then(|inbox| inbox.events.pop_front()) {
                if matches!(event, Event::Token(_)) {
                    // Read: a generation parked ahead of its reader may go on.
                    if let Some(job) = state.parked.remove(&self.id) {
                        state.queue.push_back(job);
                        // Small passes go on in a lane now, not once this reader has read all
                        // it has (the other readers are not woken for it).
                        self.batcher.start_lane(&mut state);
                        self.batcher.changed.notify_all();
                    }
                } else {
                    self.ended = true;
                    state.inboxes.remove(&self.id);
                }
                return event;
            }
            state = self.batcher.step(state, Some(self.id));
        }
    }

    /// Stops the generation before its next step and waits for its end: its cache and the ids
    /// that cache holds a prefix of (the reason says [`FinishReason::Cancelled`], or why it had
    /// ended already). Tokens sampled meanwhile are dropped.
    ///
    /// # Errors
    ///
    /// The error of a pass that failed meanwhile.
    pub(crate) fn stop(mut self) -> Result<Ended> {
        self.cancel();
        loop {
            match self.next() {
                Event::Token(_) => {}
                Event::End(ended) => return Ok(ended),
                Event::Failed(error) => return Err(error),
            }
        }
    }

    /// Ends the generation now when its job is waiting (queued or parked), else when its pass
    /// comes back.
    fn cancel(&mut self) {
        if self.ended {
            return;
        }
        let mut state = self.batcher.lock();
        let queued = state.queue.iter().position(|j| j.id == self.id);
        let job = match queued {
            Some(i) => state.queue.remove(i),
            None => state.parked.remove(&self.id),
        };
        let ended = state
            .inboxes
            .get(&self.id)
            .is_some_and(|inbox| inbox.events.iter().any(|e| !matches!(e, Event::Token(_))));
        match job {
            Some(job) => state.end(job, FinishReason::Cancelled),
            None if !ended => {
                state.cancelled.insert(self.id);
            }
            None => {}
        }
        self.batcher.changed.notify_all();
    }
}

impl Drop for Generation<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.cancel();
            // Nobody reads its end: the cache is dropped when the job comes back.
            self.batcher.lock().inboxes.remove(&self.id);
        }
    }
}

/// Background work runs as requests do while this lives (see
/// [`Batcher::expedite_background`]).
#[derive(Debug)]
pub(crate) struct Expedite<'a> {
    batcher: &'a Batcher,
}

impl Drop for Expedite<'_> {
    fn drop(&mut self) {
        self.batcher.lock().expedited -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::synthetic::demo_model_dir;
    use crate::Engine;

    fn demo() -> Engine {
        Engine::load(demo_model_dir().expect("demo model")).expect("loads")
    }

    /// A pass given up part-way leaves the cache as it was: run again, it gives the bits of a
    /// pass never interrupted, and so does the step after it.
    #[test]
    fn a_pass_given_up_between_layers_runs_again_to_the_same_bits() -> Result<()> {
        let engine = demo();
        let model = &engine.model;
        let prompt = [5u32, 17, 99, 3, 42, 8];
        let mut whole = model.new_cache(16);
        let expected = model.forward(&prompt, &mut whole)?;
        let expected_next = model.forward(&[7], &mut whole)?;

        let mut cache = model.new_cache(16);
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let stop_at_once = || {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        };
        let given_up = model.forward_batch_unless(
            &mut [Segment {
                ids: &prompt,
                cache: &mut cache,
            }],
            &stop_at_once,
        )?;
        assert!(given_up.is_none());
        assert_eq!(asked.into_inner(), 1, "asked once, before the second layer");
        assert_eq!(cache.len(), 0);

        assert_eq!(model.forward(&prompt, &mut cache)?, expected);
        assert_eq!(model.forward(&[7], &mut cache)?, expected_next);
        Ok(())
    }

    fn greedy(prompt: &[u32], max_new: usize) -> Decode {
        use crate::chat::request::Sampling;
        Decode::new(
            Sampler::new(Sampling::ArgMax, 1.0, 0),
            prompt.to_vec(),
            Vec::new(),
            max_new,
        )
    }

    /// Background work waits while a generation is in progress, even while that generation
    /// has no step queued (here: parked ahead of a reader that does not read), and runs once it
    /// has ended. The background caller meanwhile runs the generation's passes itself.
    #[test]
    fn background_work_waits_for_generations_in_progress() {
        let engine = demo();
        let batcher = &engine.batcher;
        let prompt = [4u32, 5, 6];
        let generation = batcher
            .generate(&prompt, engine.model.new_cache(16), greedy(&prompt, 1000))
            .expect("starts");
        std::thread::scope(|scope| {
            let background = scope.spawn(|| {
                let mut cache = engine.model.new_cache(16);
                batcher.forward(&[1, 2, 3], &mut cache, Priority::Background)
            });
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(
                batcher.counts().passes,
                MAX_AHEAD as u64,
                "the generation ran until it was a reader's read ahead, and nothing else ran"
            );
            assert!(!background.is_finished());
            drop(generation);
            background
                .join()
                .expect("no panic")
                .expect("the background work runs once the generation has ended");
        });
        assert_eq!(batcher.counts().passes, MAX_AHEAD as u64 + 1);
    }

    /// A reader gets the tokens a model call per token gives, and its end: the cache holds
    /// the prompt and every token but the last, which `context` ends with.
    #[test]
    fn a_generation_reads_the_greedy_tokens_and_gets_its_cache_back() -> Result<()> {
        let engine = demo();
        let prompt = [9u32, 8, 7, 6];
        let mut expected = Vec::new();
        let mut cache = engine.model.new_cache(16);
        let mut logits = engine.model.forward(&prompt, &mut cache)?;
        for _ in 0..5 {
            let token = crate::engine::sampling::argmax(&logits);
            expected.push(token);
            logits = engine.model.forward(&[token], &mut cache)?;
        }
        let mut generation =
            engine
                .batcher
                .generate(&prompt, engine.model.new_cache(16), greedy(&prompt, 5))?;
        let mut got = Vec::new();
        let Ended {
            reason,
            cache,
            context,
        } = loop {
            match generation.next() {
                Event::Token(token) => got.push(token),
                Event::End(ended) => break ended,
                Event::Failed(error) => return Err(error),
            }
        };
        assert_eq!(got, expected);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(context, [&prompt[..], &expected].concat());
        assert_eq!(cache.len(), prompt.len() + 4);
        Ok(())
    }

    /// Small passes split the generations in progress evenly between the lanes: with four
    /// generations and two lanes, each decode step carries two rows, and every reader still
    /// gets the tokens it gets alone.
    #[test]
    fn small_passes_share_the_rows_between_lanes() -> Result<()> {
        let engine = demo();
        let prompts: Vec<Vec<u32>> = (0..4u32).map(|i| vec![7 + i, 3, 11 + 2 * i]).collect();
        let steps = 24;
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|prompt| {
                let mut cache = engine.model.new_cache(64);
                let mut logits = engine.model.forward(prompt, &mut cache)?;
                let mut tokens = Vec::new();
                for _ in 0..steps {
                    let token = crate::engine::sampling::argmax(&logits);
                    tokens.push(token);
                    logits = engine.model.forward(&[token], &mut cache)?;
                }
                Ok(tokens)
            })
            .collect::<Result<_>>()?;
        let before = engine.batcher.counts();
        // Queued together, before any reader asks: the first pass takes every prompt.
        let generations = prompts
            .iter()
            .map(|p| {
                engine
                    .batcher
                    .generate(p, engine.model.new_cache(64), greedy(p, steps))
            })
            .collect::<Result<Vec<_>>>()?;
        let read: Vec<Vec<u32>> = std::thread::scope(|scope| {
            let readers: Vec<_> = generations
                .into_iter()
                .map(|mut generation| {
                    scope.spawn(move || {
                        let mut tokens = Vec::new();
                        while let Event::Token(token) = generation.next() {
                            tokens.push(token);
                        }
                        tokens
                    })
                })
                .collect();
            readers
                .into_iter()
                .map(|r| r.join().expect("reads"))
                .collect()
        });
        assert_eq!(read, alone);
        let after = engine.batcher.counts();
        let (passes, rows) = (
            after.passes - before.passes,
            after.sequences - before.sequences,
        );
        let lanes = kernels::small_pass_lanes().len().max(1) as u64;
        // Every pass but the prompts' carries at most its lane's share of the four.
        let share = 4u64.div_ceil(lanes);
        assert!(
            rows <= 4 + (passes - 1) * share,
            "{rows} rows in {passes} passes, {lanes} lanes"
        );
        Ok(())
    }

    /// Stopping a generation hands its cache back; the ids it holds are the prompt and the
    /// tokens delivered, whatever was sampled after the stop.
    #[test]
    fn a_stopped_generation_hands_back_a_cache_its_context_describes() -> Result<()> {
        let engine = demo();
        let prompt = [3u32, 1, 4, 1, 5];
        let mut generation =
            engine
                .batcher
                .generate(&prompt, engine.model.new_cache(16), greedy(&prompt, 1000))?;
        let mut read = Vec::new();
        while read.len() < 3 {
            match generation.next() {
                Event::Token(token) => read.push(token),
                other => panic!("ended early: {other:?}"),
            }
        }
        let Ended { cache, context, .. } = generation.stop()?;
        assert!(context.starts_with(&prompt) && context[prompt.len()..].starts_with(&read));
        assert!(cache.len() <= context.len());
        assert!(cache.len() >= prompt.len() + read.len() - 1);
        let counts = engine.batcher.counts();
        assert!(counts.passes <= (read.len() + MAX_AHEAD) as u64);
        Ok(())
    }
}
