//! Fuzz target `audit_chain`: see `keygate_fuzz::audit_chain`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate_fuzz::audit_chain(data));
