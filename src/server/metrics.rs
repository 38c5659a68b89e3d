//! Counters and histograms of a server, written as Prometheus text for `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::{ChatOutcome, FinishReason};

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A cumulative histogram of durations, lock-free.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// What a server counts, for both of its protocols.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    pub active: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub completed: AtomicU64,
    pub ttft: Histogram,
    pub latency: Histogram,
    pub queue_wait: Histogram,
}

impl Metrics {
    /// Counts a finished generation.
    pub(crate) fn record(&self, outcome: &ChatOutcome, queued: Duration) {
        self.prompt_tokens
            .fetch_add(outcome.usage.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_prompt_tokens
            .fetch_add(outcome.usage.cached_prompt_tokens as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(outcome.usage.completion_tokens as u64, Ordering::Relaxed);
        if outcome.finish_reason == FinishReason::Cancelled {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        } else {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
        self.ttft.observe(outcome.timings.ttft_ms / 1e3);
        self.latency.observe(outcome.timings.total_ms / 1e3);
        self.queue_wait.observe(queued.as_secs_f64());
    }

    /// Prometheus' text format; `waiting` is the queue's length now.
    pub(crate) fn prometheus(
        &self,
        waiting: usize,
        loaded: bool,
        batching: crate::BatchCounts,
    ) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "chathub_model_loaded",
            "1 once the model is loaded and requests are served.",
            u64::from(loaded),
        );
        gauge(
            &mut out,
            "chathub_requests_running",
            "Generations running now.",
            self.active.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "chathub_requests_queued",
            "Requests waiting for a generation slot.",
            waiting as u64,
        );
        counter(
            &mut out,
            "chathub_requests_total",
            "Requests received (gRPC and HTTP).",
            load(&self.requests),
        );
        counter(
            &mut out,
            "chathub_requests_completed_total",
            "Generations that ran to their end.",
            load(&self.completed),
        );
        counter(
            &mut out,
            "chathub_requests_cancelled_total",
            "Generations stopped early (client gone, deadline, shutdown).",
            load(&self.cancelled),
        );
        counter(
            &mut out,
            "chathub_requests_rejected_total",
            "Requests turned away because the queue was full.",
            load(&self.rejected),
        );
        counter(
            &mut out,
            "chathub_requests_failed_total",
            "Requests that failed (bad arguments, prompt too long, errors).",
            load(&self.failed),
        );
        counter(
            &mut out,
            "chathub_prompt_tokens_total",
            "Prompt tokens of finished generations.",
            load(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "chathub_cached_prompt_tokens_total",
            "Prompt tokens taken from earlier requests' caches.",
            load(&self.cached_prompt_tokens),
        );
        counter(
            &mut out,
            "chathub_generated_tokens_total",
            "Reply tokens generated.",
            load(&self.generated_tokens),
        );
        counter(
            &mut out,
            "chathub_forward_passes_total",
            "Forward passes run (decode steps and prompt chunks, each shared by the generations batched into it).",
            batching.passes,
        );
        counter(
            &mut out,
            "chathub_forward_pass_sequences_total",
            "Sequences carried by the forward passes; divided by chathub_forward_passes_total, the mean batch.",
            batching.sequences,
        );
        self.ttft.write(
            &mut out,
            "chathub_time_to_first_token_seconds",
            "From the start of a generation to its first token.",
        );
        self.latency.write(
            &mut out,
            "chathub_request_duration_seconds",
            "Whole generations.",
        );
        self.queue_wait.write(
            &mut out,
            "chathub_queue_wait_seconds",
            "Time requests waited for a generation slot.",
        );
        out
    }
}
