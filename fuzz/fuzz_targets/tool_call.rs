//! Fuzz target: see `chathub::fuzzing::tool_call`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chathub::fuzzing::tool_call(data);
});
