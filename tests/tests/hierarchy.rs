//! The key hierarchy over the real SQLite store and local root key provider.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::time::Duration;

use keygate_tests::{PATIENT_SCHEMA, open_hierarchy, tenant};
use kms_core::record::{Disclosure, EncryptedRecord, encrypt_record};
use kms_core::schema::SchemaSet;
use kms_core::{
    DekError, DekRequest, HierarchyError, KekState, RecordKeyId, StateChange, WrappedDek,
};
use serde_json::json;

const TTL: Duration = Duration::from_secs(60);

fn request(dek: &kms_core::IssuedDek) -> DekRequest {
    DekRequest {
        record_key_id: dek.record_key_id,
        kek_version: dek.kek_version,
        wrapped: dek.wrapped,
    }
}

#[tokio::test]
async fn issue_then_unwrap_every_dek_cold_warm_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let onc = tenant("onc");
    let issued = {
        let h = open_hierarchy(dir.path(), TTL).await;
        h.create_tenant(&onc).await.unwrap();
        let mut issued = Vec::new();
        for _ in 0..5 {
            issued.extend(h.issue_deks(&onc, 1_000).await.unwrap());
        }
        let requests: Vec<_> = issued.iter().map(request).collect();
        for chunk in requests.chunks(1_000) {
            let start =
                issued.iter().position(|d| d.record_key_id == chunk[0].record_key_id).unwrap();
            for (i, dek) in h.unwrap_deks(&onc, chunk).await.unwrap().into_iter().enumerate() {
                assert_eq!(dek.unwrap().expose_secret(), issued[start + i].dek().expose_secret());
            }
        }
        let ids: std::collections::HashSet<_> =
            issued.iter().map(|d| *d.record_key_id.as_bytes()).collect();
        assert_eq!(ids.len(), 5_000, "record key ids are unique");
        assert!(h.cache_stats().hits > 0, "warm cache served later batches");
        issued
    };
    // A new process: cold caches, same files.
    let h = open_hierarchy(dir.path(), TTL).await;
    let requests: Vec<_> = issued[..1_000].iter().map(request).collect();
    let deks = h.unwrap_deks(&onc, &requests).await.unwrap();
    for (dek, original) in deks.into_iter().zip(&issued) {
        assert_eq!(dek.unwrap().expose_secret(), original.dek().expose_secret());
    }
}

#[tokio::test]
async fn a_wrapped_dek_under_another_binding_fails_per_item() {
    let dir = tempfile::tempdir().unwrap();
    let h = open_hierarchy(dir.path(), TTL).await;
    let (a, b) = (tenant("a"), tenant("b"));
    h.create_tenant(&a).await.unwrap();
    h.create_tenant(&b).await.unwrap();
    let dek = h.issue_deks(&a, 1).await.unwrap().remove(0);
    let good = request(&dek);
    let other_id = DekRequest { record_key_id: RecordKeyId::generate().unwrap(), ..good };
    let other_version = DekRequest { kek_version: 2, ..good };
    let mut flipped_bytes = *good.wrapped.as_bytes();
    flipped_bytes[20] ^= 1;
    let flipped = DekRequest { wrapped: WrappedDek::from_slice(&flipped_bytes).unwrap(), ..good };
    let results = h.unwrap_deks(&a, &[good, other_id, other_version, flipped]).await.unwrap();
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err(), &DekError::CannotDecrypt);
    assert_eq!(results[2].as_ref().unwrap_err(), &DekError::UnknownVersion);
    assert_eq!(results[3].as_ref().unwrap_err(), &DekError::CannotDecrypt);
    // Presented to the other tenant.
    let results = h.unwrap_deks(&b, &[good]).await.unwrap();
    assert_eq!(results[0].as_ref().unwrap_err(), &DekError::CannotDecrypt);
    // Unknown tenant and bad batch sizes fail the whole call.
    assert!(matches!(
        h.unwrap_deks(&tenant("nobody"), &[good]).await,
        Err(HierarchyError::UnknownTenant(_))
    ));
    assert!(matches!(h.issue_deks(&a, 0).await, Err(HierarchyError::BatchSize { .. })));
    assert!(matches!(h.issue_deks(&a, 1_001).await, Err(HierarchyError::BatchSize { .. })));
    assert!(matches!(h.create_tenant(&a).await, Err(HierarchyError::TenantExists(_))));
}

#[tokio::test]
async fn rotation_rewrap_and_version_states() {
    let dir = tempfile::tempdir().unwrap();
    let h = open_hierarchy(dir.path(), TTL).await;
    let onc = tenant("onc");
    h.create_tenant(&onc).await.unwrap();
    let old = h.issue_deks(&onc, 3).await.unwrap();
    assert!(old.iter().all(|d| d.kek_version == 1));
    let v2 = h.rotate(&onc).await.unwrap();
    assert_eq!((v2.version, v2.state), (2, KekState::Active));
    let new = h.issue_deks(&onc, 2).await.unwrap();
    assert!(new.iter().all(|d| d.kek_version == 2), "issued under the new version at once");

    // Rewrap moves v1 DEKs to v2 (same DEK), and leaves v2 ones untouched.
    let mut requests: Vec<_> = old.iter().map(request).collect();
    requests.push(request(&new[0]));
    let rewrapped = h.rewrap_deks(&onc, &requests).await.unwrap();
    let rewrapped: Vec<_> = rewrapped.into_iter().map(Result::unwrap).collect();
    assert!(rewrapped.iter().all(|r| r.kek_version == 2));
    assert_eq!(rewrapped[3].wrapped, new[0].wrapped);
    let moved: Vec<_> = old
        .iter()
        .zip(&rewrapped)
        .map(|(d, r)| DekRequest {
            record_key_id: d.record_key_id,
            kek_version: 2,
            wrapped: r.wrapped,
        })
        .collect();

    // Disable v1: old wrappings refused, rewrapped ones fine; enable again.
    h.change_state(&onc, 1, StateChange::Disable).await.unwrap();
    let results = h.unwrap_deks(&onc, &[request(&old[0]), moved[0]]).await.unwrap();
    assert_eq!(results[0].as_ref().unwrap_err(), &DekError::VersionDisabled);
    assert_eq!(results[1].as_ref().unwrap().expose_secret(), old[0].dek().expose_secret());
    h.change_state(&onc, 1, StateChange::Enable).await.unwrap();
    let results = h.unwrap_deks(&onc, &[request(&old[0])]).await.unwrap();
    assert_eq!(results[0].as_ref().unwrap().expose_secret(), old[0].dek().expose_secret());
    // The active version cannot be disabled.
    assert!(matches!(
        h.change_state(&onc, 2, StateChange::Disable).await,
        Err(HierarchyError::InvalidTransition(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rotations_from_two_instances_leave_one_active_version() {
    let dir = tempfile::tempdir().unwrap();
    let first = std::sync::Arc::new(open_hierarchy(dir.path(), TTL).await);
    let second = std::sync::Arc::new(open_hierarchy(dir.path(), TTL).await);
    let onc = tenant("onc");
    first.create_tenant(&onc).await.unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let h = if i % 2 == 0 { first.clone() } else { second.clone() };
            let onc = onc.clone();
            tokio::spawn(async move { h.rotate(&onc).await.unwrap().version })
        })
        .collect();
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=11).collect::<Vec<_>>());
    let record = first.tenant(&onc).await.unwrap();
    assert_eq!(record.versions.iter().filter(|v| v.state == KekState::Active).count(), 1);
    assert_eq!(record.active().unwrap().version, 11);
}

#[tokio::test]
async fn an_issue_after_another_instance_rotated_uses_the_new_active_version() {
    let dir = tempfile::tempdir().unwrap();
    let first = open_hierarchy(dir.path(), TTL).await;
    let second = open_hierarchy(dir.path(), TTL).await;
    let onc = tenant("onc");
    first.create_tenant(&onc).await.unwrap();
    // `first` holds version 1 as the active one in its cache, not its KEK.
    assert_eq!(first.active_version(&onc).await.unwrap(), 1);
    second.rotate(&onc).await.unwrap();
    // Its cached version is now decrypt-only in the store: it must look
    // again, not answer that the tenant has no active key.
    let issued = first.issue_deks(&onc, 3).await.unwrap();
    assert!(issued.iter().all(|d| d.kek_version == 2), "issued under the new version");
    let requests: Vec<_> = issued.iter().map(request).collect();
    let unwrapped = second.unwrap_deks(&onc, &requests).await.unwrap();
    assert!(unwrapped.iter().all(Result::is_ok));
}

#[tokio::test]
async fn a_rotation_prepared_before_a_shred_is_refused_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let h = open_hierarchy(dir.path(), TTL).await;
    let onc = tenant("onc");
    h.create_tenant(&onc).await.unwrap();
    let read_before = h.tenant(&onc).await.unwrap();
    let prepared = h.prepare_rotation(&read_before).await.unwrap();
    h.destroy(&onc, None).await.unwrap();
    assert!(matches!(h.commit_rotation(prepared).await, Err(HierarchyError::KeyDestroyed(_))));
    assert!(matches!(h.issue_deks(&onc, 1).await, Err(HierarchyError::KeyDestroyed(_))));
    let after = h.tenant(&onc).await.unwrap();
    assert!(after.active().is_none() && after.versions.len() == 1, "{after:?}");
}

#[tokio::test]
async fn kek_cache_entries_expire_and_are_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let h = open_hierarchy(dir.path(), Duration::from_millis(100)).await;
    let onc = tenant("onc");
    h.create_tenant(&onc).await.unwrap();
    let dek = h.issue_deks(&onc, 1).await.unwrap().remove(0);
    assert!(h.cache_stats().entries > 0);
    let misses = h.cache_stats().misses;
    h.unwrap_deks(&onc, &[request(&dek)]).await.unwrap();
    assert_eq!(h.cache_stats().misses, misses, "warm: no new miss");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(h.evict_expired() > 0, "expired keys are dropped");
    assert_eq!(h.cache_stats().entries, 0);
    h.unwrap_deks(&onc, &[request(&dek)]).await.unwrap();
    assert!(h.cache_stats().misses > misses, "cold again after expiry");
}

#[tokio::test]
async fn keys_under_another_master_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let onc = tenant("onc");
    let dek = {
        let h = open_hierarchy(dir.path(), TTL).await;
        h.create_tenant(&onc).await.unwrap();
        h.issue_deks(&onc, 1).await.unwrap().remove(0)
    };
    // Replace the root key file: the stored keys are under a master this
    // instance does not hold. Fail closed, with a clear error.
    std::fs::remove_file(dir.path().join("root.key")).unwrap();
    let h = open_hierarchy(dir.path(), TTL).await;
    assert!(matches!(
        h.unwrap_deks(&onc, &[request(&dek)]).await,
        Err(HierarchyError::ForeignMaster(_))
    ));
}

#[tokio::test]
async fn a_record_round_trips_through_the_hierarchy() {
    let dir = tempfile::tempdir().unwrap();
    let h = open_hierarchy(dir.path(), TTL).await;
    let onc = tenant("onc");
    h.create_tenant(&onc).await.unwrap();
    let set = SchemaSet::from_toml(PATIENT_SCHEMA, "patient.toml").unwrap();
    let schema = set.latest("patient").unwrap();
    let keys = h.schema_keys(&onc, schema).await.unwrap();
    let record = json!({"ssn": "123-45-6789", "mrn": "M1", "email": "A@B.org", "diagnosis": "flu",
                        "patient_id": "P1", "allergies": ["latex"], "age": 40});
    let dek = h.issue_deks(&onc, 1).await.unwrap().remove(0);
    let encrypted = encrypt_record(record.clone(), &onc, schema, &keys, dek).unwrap();
    assert!(!encrypted.to_string().contains("123-45-6789"));

    let parsed = EncryptedRecord::parse(encrypted).unwrap();
    let header = parsed.header();
    let request = DekRequest {
        record_key_id: *header.record_key_id(),
        kek_version: header.kek_version(),
        wrapped: *header.wrapped_dek(),
    };
    let dek = h.unwrap_deks(&onc, &[request]).await.unwrap().remove(0).unwrap();
    let decrypted = parsed.decrypt(&dek, schema, &keys, &|_| Disclosure::Reveal).unwrap();
    let mut expected = record;
    expected["patient_id"] = decrypted.record["patient_id"].clone();
    assert_eq!(decrypted.record, expected);
}
