//! Fuzz target `issue_binary`: see `keygate_fuzz::issue_binary`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::issue_binary(data));
