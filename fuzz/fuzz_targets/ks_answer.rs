//! Fuzz target `ks_answer`: see `keygate_fuzz::ks_answer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::ks_answer(data));
