//! Fuzz target `header_parse`: see `keygate_fuzz::header_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::header_parse(data));
