//! The record header parser must be total: any bytes give a header or an
//! error, never a panic, and a parsed header re-encodes to the same text.
#![no_main]

use kms_core::record::{HEADER_PREFIX, RecordHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = RecordHeader::parse_bytes(data) {
        // Canonical encoding: parsing is injective.
        let text = header.encode();
        let again = RecordHeader::parse(&text).expect("re-parse of an encoded header");
        assert_eq!(again, header);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RecordHeader::parse(text);
        let _ = RecordHeader::parse(&format!("{HEADER_PREFIX}{text}"));
    }
});
