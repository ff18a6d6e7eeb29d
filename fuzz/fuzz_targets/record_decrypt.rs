//! Fuzz target `record_decrypt`: see `keygate_fuzz::record_decrypt`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::record_decrypt(data));
