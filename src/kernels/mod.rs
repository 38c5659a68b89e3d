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

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// How far ahead of the weights being multiplied the streaming kernels ask for them.
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the `bytes` bytes [`PREFETCH_AHEAD`] past `base` to be brought into L2 (a no-op
/// off x86-64). Decode streams the weights once and is bound by how many reads are in flight,
/// which the hardware prefetcher alone keeps too few of. Into L2, whose queue holds more misses
/// than L1's fill buffers, and 4 KiB ahead rather than 2, because a batched step spends longer
/// on each block (4-stream q4_0 decode 112-144 → 125-148 tokens/s in all, same-round pairs).
#[inline(always)]
pub(crate) fn prefetch_ahead(base: *const u8, bytes: usize) {
    prefetch(base.wrapping_add(PREFETCH_AHEAD), bytes)
}

/// How far ahead the dense panel kernel's decode-sized products ask for their weights, in
/// bytes (0: not at all), by the CPU's maker. On the Intel Xeon the kernels were first tuned
/// on, [`PREFETCH_AHEAD`] took f16 decode from 11.2-12.9 to 13.5-16.0 tokens/s. On an AMD EPYC
/// (Zen 4), the same prefetches cost f16 decode a quarter of its speed whenever memory ran at
/// its faster level (785M: 27.9-28.6 tokens/s at 2-4 KiB against 30.8-38.2 with none or 1 KiB,
/// at 62-66 GB/s) and a little at the slower one, so there the hardware prefetcher works
/// alone. (The block kernels keep [`PREFETCH_AHEAD`] on both: 4-stream q4_0 decode was faster
/// with it in two of three same-round pairs on the EPYC.)
pub(crate) fn panel_prefetch_ahead() -> usize {
    static AHEAD: LazyLock<usize> = LazyLock::new(|| if cpu::amd() { 0 } else { PREFETCH_AHEAD });
    *AHEAD
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
