//! Audit events, checkpoints and signing keys.

use std::sync::Arc;

use kms_core::Key256;
use kms_core::audit::{
    AuditChain, AuditEvent, AuditSigner, Outcome, verify_chain, verify_stored_chain,
};
use kms_core::crypto::Aead;
use kms_core::store::{
    AuditRow, AuditSigningKeyRecord, Durability, KeyStore, MasterKeyId, StoreError,
};

use crate::harness::Fixture;

pub(crate) fn audit_row(instance: &str, seq: i64) -> AuditRow {
    AuditRow {
        instance: instance.into(),
        seq,
        ts_ms: 1,
        actor: "spiffe://test/admin".into(),
        action: "tenant.create".into(),
        tenant: Some("onc".into()),
        kek_version: Some(1),
        record_key_ids: "[]".into(),
        outcome: "ok".into(),
        detail: "{}".into(),
        prev_hash: vec![0; 32],
        hash: vec![seq as u8; 32],
    }
}

fn events(range: std::ops::RangeInclusive<i64>) -> impl Iterator<Item = AuditEvent> {
    range.map(|i| AuditEvent::new(i, "spiffe://test/admin", "tenant.create", Outcome::Ok))
}

pub(crate) async fn audit_appends_are_atomic_and_ordered(f: Fixture) {
    let store = f.open().await;
    assert!(store.last_audit_row("i1").await.unwrap().is_none());
    store.append_audit(&[audit_row("i1", 1), audit_row("i1", 2)]).await.unwrap();
    // A batch with one duplicate is refused whole.
    let refused = store.append_audit(&[audit_row("i1", 3), audit_row("i1", 2)]).await;
    assert!(matches!(refused, Err(StoreError::AuditConflict { seq: 2, .. })), "{refused:?}");
    // So is one that repeats a position within itself.
    let refused = store.append_audit(&[audit_row("i1", 3), audit_row("i1", 3)]).await;
    assert!(matches!(refused, Err(StoreError::AuditConflict { seq: 3, .. })), "{refused:?}");
    let rows = store.audit_rows("i1", 0, 10).await.unwrap();
    assert_eq!(rows, [audit_row("i1", 1), audit_row("i1", 2)]);
    assert_eq!(store.audit_rows("i1", 1, 10).await.unwrap().len(), 1);
    assert_eq!(store.audit_rows("i1", 0, 1).await.unwrap(), [audit_row("i1", 1)]);
    assert!(store.audit_rows("other", 0, 10).await.unwrap().is_empty());
    // Nullable columns and binary hashes round-trip exactly.
    let mut bare = audit_row("i1", 3);
    (bare.tenant, bare.kek_version, bare.hash) = (None, None, (0..=255).collect());
    bare.detail = r#"{"note":"ünïcödé \u0000 \"quoted\""}"#.into();
    store.append_audit(std::slice::from_ref(&bare)).await.unwrap();
    assert_eq!(store.last_audit_row("i1").await.unwrap(), Some(bare));
    // Out-of-order positions are stored and read back by position.
    store.append_audit(&[audit_row("i1", 10), audit_row("i1", 5)]).await.unwrap();
    let seqs: Vec<i64> =
        store.audit_rows("i1", 0, 10).await.unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 5, 10]);
}

pub(crate) async fn a_batch_with_a_duplicate_writes_nothing(f: Fixture) {
    let store = f.open().await;
    let signer = AuditSigner::generate().unwrap();
    let mut chain = AuditChain::new("i1");
    assert_eq!(store.last_audit_checkpoint("i1").await.unwrap(), None);
    let first = chain.seal_all(events(1..=3));
    let (seq, hash) = chain.head();
    let cp3 = signer.sign_checkpoint("i1", seq, &hash, 1).unwrap();
    store.append_audit_batch(&first, Some(&cp3)).await.unwrap();
    assert_eq!(store.last_audit_checkpoint("i1").await.unwrap().as_ref(), Some(&cp3));

    // New rows 4 and 5, plus a repeat of 3, with a checkpoint of 5.
    let more = chain.seal_all(events(4..=5));
    let (seq, hash) = chain.head();
    let cp5 = signer.sign_checkpoint("i1", seq, &hash, 2).unwrap();
    let batch = [more[0].clone(), more[1].clone(), first[2].clone()];
    let refused = store.append_audit_batch(&batch, Some(&cp5)).await;
    assert!(matches!(refused, Err(StoreError::AuditConflict { seq: 3, .. })), "{refused:?}");
    assert_eq!(store.last_audit_row("i1").await.unwrap().unwrap().seq, 3);
    assert_eq!(store.audit_checkpoints("i1", 0, 10).await.unwrap(), std::slice::from_ref(&cp3));

    // Fresh rows with a checkpoint that exists already: refused whole too.
    let refused = store.append_audit_batch(&more, Some(&cp3)).await;
    assert!(matches!(refused, Err(StoreError::AuditConflict { seq: 3, .. })), "{refused:?}");
    assert_eq!(store.last_audit_row("i1").await.unwrap().unwrap().seq, 3);

    store.append_audit_batch(&more, Some(&cp5)).await.unwrap();
    let rows = store.audit_rows("i1", 0, 10).await.unwrap();
    let checkpoints = store.audit_checkpoints("i1", 0, 10).await.unwrap();
    assert_eq!(store.audit_checkpoints("i1", 3, 10).await.unwrap(), std::slice::from_ref(&cp5));
    assert_eq!(store.last_audit_checkpoint("i1").await.unwrap(), Some(cp5));
    assert_eq!(store.last_audit_checkpoint("i2").await.unwrap(), None);
    let report = verify_chain("i1", &rows, &checkpoints, &signer.public_key_sec1()).unwrap();
    assert_eq!((report.events, report.checkpoints, report.head_seq), (5, 2, 5));

    // The older single-call append still works, through the same path.
    let last = chain.seal(AuditEvent::new(6, "a", "b", Outcome::Ok));
    store.append_audit(std::slice::from_ref(&last)).await.unwrap();
    assert_eq!(store.last_audit_row("i1").await.unwrap(), Some(last.clone()));
    assert!(matches!(
        store.append_audit(&[last]).await,
        Err(StoreError::AuditConflict { seq: 6, .. })
    ));
    store.append_audit_batch(&[], None).await.unwrap();
}

pub(crate) async fn large_batches_are_written_whole_or_not_at_all(f: Fixture) {
    let store = f.open().await;
    let mut chain = AuditChain::new("i1");
    // More rows than one multi-row INSERT holds.
    let first = chain.seal_all(events(1..=700));
    store.append_audit_batch(&first, None).await.unwrap();
    let rows = store.audit_rows("i1", 0, 1_000).await.unwrap();
    assert_eq!(rows, first);

    // 700 new rows whose 600th repeats an existing one: a conflict found in a
    // later statement of the batch rolls back the earlier statements too.
    let mut next = chain.seal_all(events(701..=1_400));
    let fresh = next.clone();
    next[599] = first[9].clone();
    let refused = store.append_audit_batch(&next, None).await;
    assert!(matches!(refused, Err(StoreError::AuditConflict { seq: 10, .. })), "{refused:?}");
    assert_eq!(store.last_audit_row("i1").await.unwrap().unwrap().seq, 700);

    store.append_audit_batch(&fresh, None).await.unwrap();
    let rows = store.audit_rows("i1", 0, 2_000).await.unwrap();
    assert_eq!(rows, [first, fresh].concat(), "the chain continues where it stood");
}

pub(crate) async fn racing_appends_of_one_position_conflict(f: Fixture) {
    let stores: [Arc<dyn KeyStore>; 2] = [f.open().await, f.open().await];
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let store = stores[i % 2].clone();
            let mut row = audit_row("i1", 1);
            row.hash = vec![i as u8; 32];
            tokio::spawn(async move { (store.append_audit(std::slice::from_ref(&row)).await, row) })
        })
        .collect();
    let mut winners = Vec::new();
    for a in attempts {
        match a.await.unwrap() {
            (Ok(()), row) => winners.push(row),
            (Err(StoreError::AuditConflict { seq: 1, .. }), _) => {}
            (Err(e), _) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(stores[0].audit_rows("i1", 0, 10).await.unwrap(), winners);
}

pub(crate) async fn instances_are_listed_from_events_checkpoints_and_keys(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    assert!(store.audit_instances().await.unwrap().is_empty());
    for instance in ["b", "a", "c", "B", "_"] {
        let rows = AuditChain::new(instance).seal_all(events(1..=3));
        store.append_audit_batch(&rows, None).await.unwrap();
    }
    let orphan = AuditSigner::generate().unwrap().sign_checkpoint("d", 1, &[0; 32], 0).unwrap();
    store.append_audit_batch(&[], Some(&orphan)).await.unwrap();
    let record = AuditSigningKeyRecord {
        instance: "e".into(),
        wrapped: vec![1; 60],
        master,
        public_key: vec![4; 65],
        created_at: 1,
    };
    store.insert_audit_signing_key(&record).await.unwrap();
    // Bytewise order, whatever the database's locale.
    assert_eq!(store.audit_instances().await.unwrap(), ["B", "_", "a", "b", "c", "d", "e"]);
}

/// Wraps the way a root provider does (AEAD bound to the wrap context);
/// the real providers live in `hsm-adapters`.
fn wrap(root: &Key256, signer: &AuditSigner, instance: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let aad = AuditSigner::wrap_context(instance).aad();
    Aead::new(root).seal_random(&aad, signer.to_key().expose_secret(), &mut out).unwrap();
    out
}

fn unwrap(root: &Key256, record: &AuditSigningKeyRecord) -> AuditSigner {
    let aad = AuditSigner::wrap_context(&record.instance).aad();
    let scalar = Aead::new(root).open(&record.wrapped, &aad).unwrap();
    AuditSigner::from_key(&Key256::from_slice(&scalar).unwrap()).unwrap()
}

pub(crate) async fn racing_first_starts_agree_on_one_signing_key(f: Fixture) {
    let (first, master) = f.open_with_master().await;
    let stores: [Arc<dyn KeyStore>; 2] = [first.clone(), f.open().await];
    let root = Key256::from_array(&mut [9; 32]);
    assert!(first.audit_signing_key("ks-1").await.unwrap().is_none());

    // Eight starts of the same instance each generate a key; one wins.
    let mut attempts = Vec::new();
    for i in 0..8 {
        let signer = AuditSigner::generate().unwrap();
        let record = AuditSigningKeyRecord {
            instance: "ks-1".into(),
            wrapped: wrap(&root, &signer, "ks-1"),
            master,
            public_key: signer.public_key_sec1(),
            created_at: 1_700_000_000,
        };
        let store = stores[i % 2].clone();
        attempts.push(tokio::spawn(async move { store.insert_audit_signing_key(&record).await }));
    }
    let mut stored = Vec::new();
    for attempt in attempts {
        stored.push(attempt.await.unwrap().unwrap());
    }
    assert!(stored.iter().all(|r| r == &stored[0]), "every start got the same key");
    let again = first.audit_signing_key("ks-1").await.unwrap().unwrap();
    assert_eq!(again, stored[0]);

    // The stored key unwraps only for its own instance and matches its
    // public key: what a verifier checks before trusting the column.
    let signer = unwrap(&root, &again);
    assert_eq!(signer.public_key_sec1(), again.public_key);
    let wrong_owner =
        Aead::new(&root).open(&again.wrapped, &AuditSigner::wrap_context("ks-2").aad());
    assert!(wrong_owner.is_err());
}

pub(crate) async fn signing_keys_survive_reopen(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    let record = AuditSigningKeyRecord {
        instance: "ks-1".into(),
        wrapped: vec![7; 60],
        master,
        public_key: AuditSigner::generate().unwrap().public_key_sec1(),
        created_at: 5,
    };
    assert_eq!(store.insert_audit_signing_key(&record).await.unwrap(), record);
    // A second insert returns the stored key, not its own.
    let other = AuditSigningKeyRecord { wrapped: vec![8; 60], ..record.clone() };
    assert_eq!(store.insert_audit_signing_key(&other).await.unwrap(), record);
    // A key for an unknown master key is refused by the foreign key.
    let orphan = AuditSigningKeyRecord {
        instance: "ks-2".into(),
        master: MasterKeyId(99),
        ..record.clone()
    };
    assert!(store.insert_audit_signing_key(&orphan).await.is_err());
    drop(store);
    let reopened = f.open().await;
    assert_eq!(reopened.audit_signing_key("ks-1").await.unwrap(), Some(record));
    assert!(reopened.audit_signing_key("ks-2").await.unwrap().is_none());
}

/// Each replica appends to its own chain, at the same time, through its own
/// store; every chain then verifies from any store.
pub(crate) async fn chains_of_several_replicas_verify_together(f: Fixture) {
    let replicas = ["ks-a", "ks-b", "ks-c"];
    let mut writers = Vec::new();
    for instance in replicas {
        let store = f.open().await;
        writers.push(tokio::spawn(async move {
            let signer = AuditSigner::generate().unwrap();
            let mut chain = AuditChain::new(instance);
            for group in 0..5 {
                let rows = chain.seal_all(events(group * 10 + 1..=group * 10 + 10));
                let (seq, hash) = chain.head();
                let checkpoint = signer.sign_checkpoint(instance, seq, &hash, seq).unwrap();
                store.append_audit_batch(&rows, Some(&checkpoint)).await.unwrap();
            }
            (instance, signer)
        }));
    }
    let reader = f.open().await;
    for writer in writers {
        let (instance, signer) = writer.await.unwrap();
        let report = verify_stored_chain(reader.as_ref(), instance, signer.verifying_key(), &[], 7)
            .await
            .unwrap();
        assert_eq!((report.events, report.checkpoints, report.head_seq), (50, 5, 50), "{instance}");
        assert_eq!(report.unsigned_tail(), 0);
    }
    assert_eq!(reader.audit_instances().await.unwrap(), replicas);
}

/// The audit promise rests on commits surviving a crash: a store as this
/// crate opens it says they do, in the database's own words.
pub(crate) async fn a_new_store_keeps_what_it_commits(f: Fixture) {
    let store = f.open().await;
    let Durability::Durable(how) = store.durability().await.unwrap() else {
        panic!("a fresh store can lose commits");
    };
    assert!(how.contains("synchronous"), "{how}");
}
