//! Fuzz target: see `chathub::fuzzing::byte_level_bpe`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::byte_level_bpe(data);
});
