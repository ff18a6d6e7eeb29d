//! Property tests: sealed events decode back unchanged, and different
//! events at the same position never share a chain hash encoding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use kms_core::audit::{
    AuditChain, AuditEvent, AuditSigner, Outcome, PURPOSE_KEY, encode_row, verify_chain,
};
use kms_core::{RecordKeyId, TenantId};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Ok),
        Just(Outcome::Denied),
        Just(Outcome::Invalid),
        Just(Outcome::Error)
    ]
}

fn detail() -> impl Strategy<Value = Map<String, Value>> {
    let value = prop_oneof![
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        Just(Value::Null),
        prop::collection::vec("/[a-z]{1,6}", 0..3).prop_map(Value::from),
    ];
    prop::collection::btree_map("[a-z_]{1,8}", value, 0..4)
        .prop_map(|entries| entries.into_iter().filter(|(key, _)| key != PURPOSE_KEY).collect())
}

prop_compose! {
    fn event()(
        ts_ms in any::<i64>(),
        actor in ".{0,20}",
        action in ".{0,12}",
        tenant in prop::option::of("[a-z0-9][a-z0-9_-]{0,10}"),
        kek_version in prop::option::of(any::<u32>()),
        ids in prop::collection::vec(any::<[u8; 16]>(), 0..4),
        outcome in outcome(),
        purpose in prop::option::of(".{0,10}"),
        detail in detail(),
    ) -> AuditEvent {
        let mut event = AuditEvent::new(ts_ms, actor, action, outcome)
            .with_record_key_ids(ids.into_iter().map(RecordKeyId::from_bytes));
        event.tenant = tenant.map(|t| TenantId::new(t).unwrap());
        event.kek_version = kek_version;
        event.purpose = purpose;
        event.detail = detail;
        event
    }
}

proptest! {
    #[test]
    fn sealed_events_decode_back_and_verify(events in prop::collection::vec(event(), 1..6)) {
        let signer = AuditSigner::generate().unwrap();
        let mut chain = AuditChain::new("ks");
        let rows = chain.seal_all(events.clone());
        for (row, event) in rows.iter().zip(&events) {
            prop_assert_eq!(&AuditEvent::from_row(row).unwrap(), event);
        }
        let (seq, hash) = chain.head();
        let checkpoint = signer.sign_checkpoint("ks", seq, &hash, 0).unwrap();
        let report = verify_chain("ks", &rows, &[checkpoint], &signer.public_key_sec1()).unwrap();
        prop_assert_eq!(report.events, events.len() as u64);
    }

    #[test]
    fn different_events_encode_differently(a in event(), b in event()) {
        let row_a = AuditChain::new("ks").seal(a.clone());
        let row_b = AuditChain::new("ks").seal(b.clone());
        if a != b {
            prop_assert_ne!(encode_row(&row_a), encode_row(&row_b));
            prop_assert_ne!(row_a.hash, row_b.hash);
        }
    }
}
