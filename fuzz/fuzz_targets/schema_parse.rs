//! Fuzz target `schema_parse`: see `keygate_fuzz::schema_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::schema_parse(data));
