//! Fuzz target: see `chathub::fuzzing::pickle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::pickle(data);
});
