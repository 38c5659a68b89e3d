//! Fuzz target: see `chathub::fuzzing::stop_gate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::stop_gate(data);
});
