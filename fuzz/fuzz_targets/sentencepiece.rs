//! Fuzz target: see `chathub::fuzzing::sentencepiece`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::sentencepiece(data);
});
