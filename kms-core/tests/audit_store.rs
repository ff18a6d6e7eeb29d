//! The keystore's audit methods: atomic batches, signing keys, instances.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::sync::Arc;

use kms_core::audit::{AuditChain, AuditEvent, AuditSigner, Outcome, verify_chain};
use kms_core::crypto::Aead;
use kms_core::store::{AuditSigningKeyRecord, KeyStore, MasterKeyId, SqliteStore, StoreError};
use kms_core::{Key256, ProviderInfo};

async fn open(dir: &tempfile::TempDir) -> (SqliteStore, MasterKeyId) {
    let store = SqliteStore::open_in_dir(&dir.path().join("data")).await.unwrap();
    let master = store
        .register_master(&ProviderInfo { kind: "local", key_ref: "test".into() })
        .await
        .unwrap();
    (store, master)
}

fn events(range: std::ops::RangeInclusive<i64>) -> impl Iterator<Item = AuditEvent> {
    range.map(|i| AuditEvent::new(i, "spiffe://test/admin", "tenant.create", Outcome::Ok))
}

#[tokio::test]
async fn a_batch_with_a_duplicate_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir).await;
    let signer = AuditSigner::generate().unwrap();
    let mut chain = AuditChain::new("i1");
    let first = chain.seal_all(events(1..=3));
    let (seq, hash) = chain.head();
    let cp3 = signer.sign_checkpoint("i1", seq, &hash, 1).unwrap();
    store.append_audit_batch(&first, Some(&cp3)).await.unwrap();

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

#[tokio::test]
async fn instances_are_listed_from_events_checkpoints_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    assert!(store.audit_instances().await.unwrap().is_empty());
    for instance in ["b", "a", "c"] {
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
    assert_eq!(store.audit_instances().await.unwrap(), ["a", "b", "c", "d", "e"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_first_starts_agree_on_one_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let (first, master) = open(&dir).await;
    let (second, _) = open(&dir).await;
    let stores: [Arc<dyn KeyStore>; 2] = [Arc::new(first.clone()), Arc::new(second)];
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

#[tokio::test]
async fn signing_keys_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    let record = AuditSigningKeyRecord {
        instance: "ks-1".into(),
        wrapped: vec![7; 60],
        master,
        public_key: AuditSigner::generate().unwrap().public_key_sec1(),
        created_at: 5,
    };
    assert_eq!(store.insert_audit_signing_key(&record).await.unwrap(), record);
    // A key for an unknown master key is refused by the foreign key.
    let orphan = AuditSigningKeyRecord {
        instance: "ks-2".into(),
        master: MasterKeyId(99),
        ..record.clone()
    };
    assert!(store.insert_audit_signing_key(&orphan).await.is_err());
    store.close().await;
    drop(store);
    let (reopened, _) = open(&dir).await;
    assert_eq!(reopened.audit_signing_key("ks-1").await.unwrap(), Some(record));
    assert!(reopened.audit_signing_key("ks-2").await.unwrap().is_none());
}
