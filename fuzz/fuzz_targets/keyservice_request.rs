//! Fuzz target `keyservice_request`: see `keygate_fuzz::keyservice_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::keyservice_request(data));
