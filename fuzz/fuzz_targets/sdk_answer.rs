//! Fuzz target `sdk_answer`: see `keygate_fuzz::sdk_answer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::sdk_answer(data));
