//! Fuzz target `sidecar_request`: see `keygate_fuzz::sidecar_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::sidecar_request(data));
