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
