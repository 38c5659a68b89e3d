//! Reading weight files (safetensors, PyTorch pickles, GGUF) and JSON configs: tensors and
//! values out, with the file named in every error. Nothing here knows what the tensors mean.

pub(crate) mod gguf;
pub(crate) mod json;
pub(crate) mod weights;

/// Runs one of candle's file readers, turning a panic into an error. Candle's readers trust
/// some fields of the file they read (found by fuzzing, candle 0.11.1: the pickle reader
/// indexes tuples without checking their length, the GGUF reader divides by
/// `general.alignment`), so a damaged or crafted file would take the process down; it must be
/// an error that names the file instead. `failure` says what could not be read.
pub(crate) fn contain_panic<T>(
    read: impl FnOnce() -> candle_core::Result<T>,
    failure: impl FnOnce() -> String,
) -> candle_core::Result<T> {
    // libFuzzer's panic hook aborts even on a panic that is caught; these are contained on
    // purpose, so under `cargo fuzz` a silent hook stands in for the reader's call alone.
    #[cfg(fuzzing)]
    let fuzzer_hook = std::panic::take_hook();
    #[cfg(fuzzing)]
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    #[cfg(fuzzing)]
    std::panic::set_hook(fuzzer_hook);
    outcome.unwrap_or_else(|_| Err(candle_core::Error::Msg(failure())))
}
