//! CPU kernels: the products, attention and element-wise steps the transformer runs, each with
//! a portable twin for CPUs without the SIMD extensions they were written for.
//!
//! Nothing here knows about models, file formats or tokens: kernels take slices and shapes.

pub(crate) mod attention;
pub(crate) mod block_matmul;
pub(crate) mod cpu;
pub(crate) mod dense_matmul;
pub(crate) mod elementwise;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

/// Runs `work` on one of rayon's worker threads, with every other worker kept awake to take
/// its share of each parallel step, and returns its result.
///
/// A forward pass is a hundred or so short parallel steps with a little serial work between
/// them. Run from a thread outside the pool, each step was handed to the pool while the caller
/// slept, a sleep and a wake-up per step; and between steps rayon's idle workers fall asleep
/// within some tens of microseconds, so each step also waited for a wake-up. Here the caller
/// sleeps once per pass, and the other workers spin on [`rayon::yield_now`] until the pass
/// ends, running the steps' tasks as soon as they appear, the way llama.cpp's threads spin
/// through one graph.
pub(crate) fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return work();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(|_| {
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Set even if `work` panics, or the spinners would keep the scope open for ever.
        let _release = SetOnDrop(&done);
        work()
    })
}

/// Runs `work` on a pool of one thread, where every parallel step inside it runs inline, and
/// returns its result (on [`on_pool`] if that pool cannot be started). Already on such a
/// thread (a [`small_pass_lanes`] lane), runs it right here.
///
/// For passes too small to pay for sharing: the built-in demo model's decode step is a few
/// hundred thousand multiply-adds, and rayon's hand-offs between its two workers (tasks per
/// product, per attention head, the other worker spinning through the pass) cost more than the
/// products; a 4-row step took 151-154 us across the pool and 95 us on one thread. Each output
/// is computed whole by one task either way, so the bits are the same.
pub(crate) fn on_one_thread<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() && rayon::current_num_threads() == 1 {
        return work();
    }
    match small_pass_lanes().first() {
        Some(pool) => pool.install(work),
        None => on_pool(work),
    }
}

/// Pools of one thread each, one per core of rayon's pool (at most [`MAX_LANES`]; none where
/// they cannot be started): the lanes small passes run in, each pass on one core, several
/// passes at once, started there without waiting for them.
///
/// A tiny model's decode step is mostly the fixed cost of a hundred small steps on one core;
/// two such passes side by side on two cores do nearly twice the work of one, where one pass
/// of twice the rows does not. And handing each pass to a pool and waiting for it cost two
/// thread wake-ups a pass, 20-45 us on this project's two-core VM against a 60 us demo-model
/// pass: a lane goes from pass to pass on its own thread while the callers read their tokens
/// on theirs.
pub(crate) fn small_pass_lanes() -> &'static [rayon::ThreadPool] {
    static LANES: LazyLock<Vec<rayon::ThreadPool>> = LazyLock::new(|| {
        // The size of rayon's global pool, asked from outside any pool (the first caller may be
        // on a lane's thread already, where the answer is 1).
        let cores = std::thread::scope(|s| s.spawn(rayon::current_num_threads).join())
            .unwrap_or(1)
            .clamp(1, MAX_LANES);
        (0..cores)
            .map_while(|lane| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("chathub-lane-{lane}"))
                    // A panic in spawned work is logged, not an abort of the whole process
                    // (rayon's default); whoever spawned it cleans up after it.
                    .panic_handler(|_| tracing::error!("work on a small-pass lane panicked"))
                    .build()
                    .ok()
            })
            .collect()
    });
    &LANES
}

/// Most [`small_pass_lanes`] (they are told apart by the bits of a `u32`).
pub(crate) const MAX_LANES: usize = 16;

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// How far ahead of the weights being multiplied the streaming kernels ask for them.
const PREFETCH_AHEAD: usize = 4096;

/// How far ahead a single row's pass over quantized blocks asks for them on AMD CPUs (see
/// [`block_prefetch_ahead`]).
const SINGLE_ROW_AHEAD_AMD: usize = 1024;

/// How far ahead of the block being multiplied the quantized kernels ask for the weights, in a
/// pass of `tokens` activation rows. Decode streams the weights once and is bound by how many
/// reads are in flight, which the hardware prefetcher alone keeps too few of; the hints go into
/// L2, whose queue holds more misses than L1's fill buffers. [`PREFETCH_AHEAD`] (4 KiB rather
/// than 2) because a batched step spends longer on each block (4-stream q4_0 decode 112-144 →
/// 125-148 tokens/s in all on the Xeon; 171-184 with 0-1 KiB against 227-233 on the EPYC). A
/// single row on an AMD EPYC (Zen 4) ran faster with hints only [`SINGLE_ROW_AHEAD_AMD`] ahead
/// (785M q4_0 decode, alternating runs: 90.8-95.6 tokens/s against 82.6-83.6 at 4 KiB with
/// memory at 68 GB/s, 75.5-76.5 against 72.0-74.9 at 38 GB/s).
pub(crate) fn block_prefetch_ahead(tokens: usize) -> usize {
    if tokens == 1 && cpu::amd() {
        SINGLE_ROW_AHEAD_AMD
    } else {
        PREFETCH_AHEAD
    }
}

/// Asks for the `bytes` bytes `ahead` bytes past `base` to be brought into L2 (a no-op off
/// x86-64): the quantized kernels' hint for the weights they reach next, `ahead` from
/// [`block_prefetch_ahead`].
#[inline(always)]
pub(crate) fn prefetch_ahead(base: *const u8, ahead: usize, bytes: usize) {
    prefetch(base.wrapping_add(ahead), bytes)
}

/// How far ahead the dense panel kernel's decode-sized products ask for their weights, in
/// bytes (0: not at all), by the CPU's maker. On the Intel Xeon the kernels were first tuned
/// on, [`PREFETCH_AHEAD`] took f16 decode from 11.2-12.9 to 13.5-16.0 tokens/s. On an AMD EPYC
/// (Zen 4), the same prefetches cost f16 decode a quarter of its speed whenever memory ran at
/// its faster level (785M: 27.9-28.6 tokens/s at 2-4 KiB against 30.8-38.2 with none or 1 KiB,
/// at 62-66 GB/s) and a little at the slower one, so there the hardware prefetcher works
/// alone. (The block kernels have their own rule: [`block_prefetch_ahead`].)
pub(crate) fn panel_prefetch_ahead() -> usize {
    if cpu::amd() {
        0
    } else {
        PREFETCH_AHEAD
    }
}

/// Asks for the `bytes` bytes at `at` to be brought into L2 (a no-op off x86-64).
#[inline(always)]
pub(crate) fn prefetch(at: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(line).cast::<i8>()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, bytes);
}
