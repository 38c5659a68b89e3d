//! Fuzz target: see `chathub::fuzzing::stream_decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::stream_decoder(data);
});
