//! The schema file parser must be total on any text.
#![no_main]

use kms_core::schema::SchemaSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SchemaSet::from_toml(text, "fuzz.toml");
    }
});
