//! Fuzz target `root_key_file`: see `keygate_fuzz::root_key_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::root_key_file(data));
