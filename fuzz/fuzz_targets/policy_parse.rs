//! Fuzz target `policy_parse`: see `keygate_fuzz::policy_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::policy_parse(data));
