//! Fuzz target `unwrap_binary`: see `keygate_fuzz::unwrap_binary`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::unwrap_binary(data));
