//! Fuzz target: see `chathub::fuzzing::safetensors`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::safetensors(data);
});
