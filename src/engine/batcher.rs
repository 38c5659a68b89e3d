//! Continuous batching: every generation's forward passes go through one queue, and whichever
//! caller finds the model idle runs everything queued as one batched pass.
//!
//! On a CPU a decode step is bound by reading the weights, so a step for four conversations
//! costs little more than a step for one; a server that ran each request on its own split the
//! memory bandwidth between them instead. Each generation keeps its own loop (sampling, stop
//! strings, streaming, cancellation stay where they were, on the caller's thread); only the
//! model call is shared. A conversation joins the batch with its next step and leaves it by not
//! coming back, so a cancelled or finished one is out within one step.
//!
//! Prompts are prefilled in chunks. While other conversations are decoding, a batch carries at
//! most [`INTERLEAVED_PREFILL`] prompt tokens next to their rows, so a long prompt arriving
//! never holds their next tokens back by more than one such chunk; otherwise prompts share
//! chunks of the engine's full size (several prompts arriving together run in one pass).
//! Background work (next-turn warm-ups) runs only while no generation is in progress, unless a
//! request waits for it ([`Batcher::expedite_background`]), in chunks of
//! [`INTERLEAVED_PREFILL`], and gives the model up between two layers when a request arrives
//! while it runs: a request waits at most one layer of it.
//!
//! Every row is computed as it would be alone ([`Transformer::forward_batch`]), so a greedy
//! reply is the same batched or not.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::nn::transformer::{KvCache, Segment, Transformer};

/// Prompt tokens a batch carries while other sequences decode in it: small enough that their
/// next token waits at most one such chunk (about 0.2 s for the 785M f16 bench model on two
/// cores), large enough that the prompt still streams the weights efficiently.
pub(crate) const INTERLEAVED_PREFILL: usize = 32;

/// Most sequences one batched step decodes; more wait for the next step.
pub(crate) const MAX_BATCH_ROWS: usize = 64;

/// How long a step waits at most for generations that are between two steps (sampling,
/// streaming a token to their client) before it runs without them: without waiting, the
/// caller that ran the last step would always queue first and run alone, and the rest would
/// form a second batch behind it. See [`gather_wait`] for how long it waits below that.
const GATHER_WAIT: Duration = Duration::from_millis(20);

/// A step may always wait this fraction (1 / this) of the last pass's time to gather.
const GATHER_SHARE: u32 = 10;

/// How long a step waits for the generations between two steps, given how long the last
/// pass took and how long generations have been taking to come back after a pass
/// ([`State::comeback`]).
///
/// A tenth of the pass ([`GATHER_SHARE`]) covers a large model, whose callers sample and
/// stream a token in far less. A small model's pass is as short as that turnaround (the
/// built-in demo model's decode step takes 60-90 microseconds on two cores, and three
/// generations woken at its end take tens of microseconds to sample and queue again), so a
/// tenth of it gathered 2.4 sequences a pass out of 4; there a step waits for twice the usual
/// turnaround, but never longer than a pass, which running the stragglers apart would cost
/// anyway.
fn gather_wait(last_pass: Duration, comeback: Duration) -> Duration {
    let share = last_pass / GATHER_SHARE;
    GATHER_WAIT.min(share.max((2 * comeback).min(last_pass)))
}

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
    /// Whether some caller is running a batch now.
    running: bool,
    /// Generations in progress (see [`Batcher::join`]): how many requests' steps a batch
    /// should gather.
    members: usize,
    /// Of those, the ones past their prompt: a prompt runs in small chunks while there are
    /// any, so that their next tokens are not held back.
    decoding: usize,
    /// Requests waiting for background work (see [`Batcher::expedite_background`]): while
    /// there are any, background jobs run as requests do.
    expedited: usize,
    finished: HashMap<u64, (KvCache, Result<Vec<f32>>)>,
    next_id: u64,
    /// How long the last pass took, and when it ended.
    last_pass: Duration,
    last_pass_end: Option<Instant>,
    /// How long after a pass ends a decode step comes back for the next one, averaged
    /// (exponentially, over the last eight or so; steps later than a whole pass left out):
    /// what [`gather_wait`] waits for.
    comeback: Duration,
    /// What [`BatchCounts`] reports.
    counts: BatchCounts,
}

impl State {
    fn priority_of(&self, job: &Job) -> Priority {
        if self.expedited > 0 {
            Priority::Request
        } else {
            job.priority
        }
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
}

impl Job {
    fn remaining(&self) -> usize {
        self.ids.len() - self.done
    }
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

    /// Registers a generation for as long as the returned guard lives, so that each step
    /// waits (at most [`GATHER_WAIT`]) for its next forward pass before running.
    pub(crate) fn join(&self) -> Member<'_> {
        self.lock().members += 1;
        Member {
            batcher: self,
            decoding: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `ids` at positions `cache.len()..` of `cache`, batched with whatever else is
    /// queued, and returns the logits after the last one (as [`Transformer::forward`]).
    /// Blocks the calling thread until then; the thread may run batches for others meanwhile.
    pub(crate) fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        priority: Priority,
    ) -> Result<Vec<f32>> {
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
        let mut state = self.lock();
        if let (1, false, Some(end)) = (ids.len(), state.running, state.last_pass_end) {
            // Later than a whole pass is not a turnaround: the step was somewhere else (a
            // generation starting after an idle spell, a client that stopped reading).
            let sample = end.elapsed();
            if sample <= state.last_pass {
                state.comeback = (state.comeback * 7 + sample) / 8;
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Job {
            id,
            ids: ids.to_vec(),
            done: 0,
            cache: std::mem::take(cache),
            priority,
        });
        self.changed.notify_all();
        loop {
            if let Some((kv, result)) = state.finished.remove(&id) {
                *cache = kv;
                return result;
            }
            let requests = state
                .queue
                .iter()
                .filter(|j| state.priority_of(j) == Priority::Request)
                .count();
            // Background work waits for every generation in progress to end, not only for
            // their queued steps: between two of their steps it would hold them back by a
            // layer each time it started (see `run`), for work that their end makes stale
            // anyway (a warm-up of a conversation whose next turn is already being asked).
            if state.running || (requests == 0 && state.members > 0) {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Counted from the end of the last pass, the same for every waiting caller.
            let now = Instant::now();
            let wait = gather_wait(state.last_pass, state.comeback);
            let deadline = state.last_pass_end.map_or(now, |end| end + wait);
            if requests < state.members && now < deadline {
                state = self
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let comeback = state.comeback;
            let (priority, batch) = self.take_batch(&mut state);
            state.running = true;
            state.counts.passes += 1;
            state.counts.sequences += batch.len() as u64;
            drop(state);
            let started = Instant::now();
            let (sequences, tokens) = (batch.len(), batch.iter().map(|(_, n)| n).sum::<usize>());
            let (outcome, yielded) = self.run(batch, priority);
            let elapsed = started.elapsed();
            tracing::trace!(
                sequences,
                tokens,
                yielded,
                ms = elapsed.as_secs_f64() * 1e3,
                comeback_ms = comeback.as_secs_f64() * 1e3,
                "forward pass"
            );
            state = self.lock();
            state.running = false;
            if yielded {
                state.counts.background_yields += 1;
            } else {
                // A pass given up part-way says nothing of how long a pass takes.
                state.last_pass = elapsed;
            }
            state.last_pass_end = Some(Instant::now());
            // Jobs with chunks still to run keep their places at the front, in their order.
            for (job, result) in outcome.into_iter().rev() {
                match result {
                    Some(result) => {
                        state.finished.insert(job.id, (job.cache, result));
                    }
                    None => state.queue.push_front(job),
                }
            }
            self.changed.notify_all();
        }
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
    /// work: each waiting decode step (one token) up to [`MAX_BATCH_ROWS`], and prompt tokens
    /// up to one chunk in all, oldest prompt first. Returns whose batch it is and each job with
    /// the number of its ids to run now.
    fn take_batch(&self, state: &mut State) -> (Priority, Vec<(Job, usize)>) {
        let priority = if state
            .queue
            .iter()
            .any(|j| state.priority_of(j) == Priority::Request)
        {
            Priority::Request
        } else {
            Priority::Background
        };
        // Generations past their prompt (decoding now, or due back after sampling) get their
        // next step after one small chunk of prompt tokens, not after a whole one. Background
        // work always runs in small chunks: a request arriving meanwhile waits for the pass
        // under way, and a warm-up of a long reply in one pass held a burst of new requests
        // back by 0.7 s (785M f16), a tenth of their whole replies.
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
            if eligible && job.remaining() == 1 && rows < MAX_BATCH_ROWS {
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

    /// Runs one batch of `priority`'s jobs. Each job comes back with its result when all its
    /// ids have run, or with `None` when it has chunks left. A background batch gives the
    /// model up between two layers when a request is queued meanwhile (its jobs then come back
    /// with `None` and nothing run, and the flag says so). A failure fails every job in the
    /// batch (their caches may be part-written); a panic in the model is contained the same
    /// way, so no caller waits forever.
    fn run(&self, mut batch: Vec<(Job, usize)>, priority: Priority) -> (Outcome, bool) {
        let request_waits = || {
            let state = self.lock();
            state
                .queue
                .iter()
                .any(|j| state.priority_of(j) == Priority::Request)
        };
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
        let logits = match outcome {
            Ok(Ok(Some(logits))) => logits,
            Ok(Ok(None)) => {
                return (
                    batch.into_iter().map(|(job, _)| (job, None)).collect(),
                    true,
                )
            }
            Ok(Err(error)) => return (fail_all(batch, &error.to_string()), false),
            Err(_) => {
                let reason = "the model panicked during a forward pass";
                return (fail_all(batch, reason), false);
            }
        };
        let outcome = batch
            .into_iter()
            .zip(logits)
            .map(|((mut job, n), logits)| {
                job.done += n;
                let result = (job.remaining() == 0).then_some(Ok(logits));
                (job, result)
            })
            .collect();
        (outcome, false)
    }
}

/// A generation in progress (see [`Batcher::join`]).
#[derive(Debug)]
pub(crate) struct Member<'a> {
    batcher: &'a Batcher,
    decoding: bool,
}

impl Member<'_> {
    /// Says the prompt is done: from now on this generation asks for one token per step, and
    /// other prompts run in small chunks so as not to hold it back.
    pub(crate) fn decoding(&mut self) {
        if !self.decoding {
            self.decoding = true;
            self.batcher.lock().decoding += 1;
        }
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut state = self.batcher.lock();
        state.members -= 1;
        state.decoding -= usize::from(self.decoding);
        drop(state);
        // A step gathering for this generation need not wait for it any longer.
        self.batcher.changed.notify_all();
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

/// Each job of a batch after it ran, with its result once all its ids have run.
type Outcome = Vec<(Job, Option<Result<Vec<f32>>>)>;

fn fail_all(batch: Vec<(Job, usize)>, reason: &str) -> Outcome {
    batch
        .into_iter()
        .map(|(job, _)| {
            let error = Error::Compute(candle_core::Error::Msg(reason.to_string()));
            (job, Some(Err(error)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
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

    /// Background work waits while a generation is in progress, even between its steps, and
    /// runs once it has ended.
    #[test]
    fn background_work_waits_for_generations_in_progress() {
        let engine = demo();
        let batcher = &engine.batcher;
        let member = batcher.join();
        std::thread::scope(|scope| {
            let background = scope.spawn(|| {
                let mut cache = engine.model.new_cache(16);
                batcher.forward(&[1, 2, 3], &mut cache, Priority::Background)
            });
            // The generation's own step runs; the background job stays queued.
            let mut cache = engine.model.new_cache(16);
            batcher
                .forward(&[4, 5], &mut cache, Priority::Request)
                .expect("the request runs");
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(batcher.counts().passes, 1, "only the request's pass ran");
            assert!(!background.is_finished());
            drop(member);
            background
                .join()
                .expect("no panic")
                .expect("the background work runs once the generation has ended");
        });
        assert_eq!(batcher.counts().passes, 2);
    }

    #[test]
    fn a_step_waits_for_the_usual_turnaround_but_never_a_pass_or_the_cap() {
        let us = Duration::from_micros;
        let ms = Duration::from_millis;
        // A large model: a tenth of its pass, whatever the turnaround.
        assert_eq!(gather_wait(ms(13), us(200)), us(1300));
        // A small one: twice the turnaround, more than a tenth of the pass...
        assert_eq!(gather_wait(us(80), us(15)), us(30));
        // ...but never more than the pass,
        assert_eq!(gather_wait(us(80), us(60)), us(80));
        // nor than the cap.
        assert_eq!(gather_wait(ms(500), ms(20)), GATHER_WAIT);
        // No pass yet: no wait.
        assert_eq!(gather_wait(Duration::ZERO, us(15)), Duration::ZERO);
    }
}
