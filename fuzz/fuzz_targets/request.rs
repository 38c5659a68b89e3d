//! Fuzz target: see `chathub::fuzzing::request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::request(data);
});
