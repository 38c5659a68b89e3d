//! Fuzz target: see `chathub::fuzzing::gguf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::gguf(data);
});
