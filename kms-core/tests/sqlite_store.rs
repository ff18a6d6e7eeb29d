//! The SQLite keystore: transactions, concurrency, durability across reopen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::sync::Arc;

use kms_core::store::{AuditRow, KeyStore, MasterKeyId, NewTenant, SqliteStore, StoreError};
use kms_core::{KekState, ProviderInfo, StateChange, TenantId};
use sqlx::Connection;

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

fn new_tenant(name: &str, master: MasterKeyId) -> NewTenant {
    NewTenant {
        id: tenant(name),
        index_root_wrapped: vec![1; 40],
        kek_wrapped: vec![2; 40],
        master,
        created_at: 1_700_000_000,
    }
}

async fn open(dir: &tempfile::TempDir) -> (SqliteStore, MasterKeyId) {
    let store = SqliteStore::open_in_dir(&dir.path().join("data")).await.unwrap();
    let master = store
        .register_master(&ProviderInfo { kind: "local", key_ref: "test".into() })
        .await
        .unwrap();
    (store, master)
}

/// A raw connection for fault injection and inspection.
async fn raw(store: &SqliteStore) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", store.path().display())).await.unwrap()
}

#[tokio::test]
async fn creates_reads_and_refuses_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    let created = store.create_tenant(new_tenant("onc", master)).await.unwrap();
    assert_eq!(created.versions.len(), 1);
    assert_eq!(created.active().unwrap().version, 1);
    assert_eq!(created.active().unwrap().wrapped.as_deref(), Some(&[2u8; 40][..]));
    assert!(matches!(
        store.create_tenant(new_tenant("onc", master)).await,
        Err(StoreError::TenantExists(_))
    ));
    store.create_tenant(new_tenant("a-first", master)).await.unwrap();
    let ids: Vec<String> =
        store.list_tenants().await.unwrap().into_iter().map(|t| t.id.to_string()).collect();
    assert_eq!(ids, ["a-first", "onc"]);
    assert!(store.tenant(&tenant("nobody")).await.unwrap().is_none());
    assert!(store.kek(&tenant("onc"), 2).await.unwrap().is_none());
    // Registering the same master twice yields the same id.
    let again = store
        .register_master(&ProviderInfo { kind: "local", key_ref: "test".into() })
        .await
        .unwrap();
    assert_eq!(again, master);
}

#[tokio::test]
async fn files_are_private_and_journal_is_wal() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("data")), 0o700);
    assert_eq!(mode(store.path()), 0o600);
    let mut conn = raw(&store).await;
    let journal: String =
        sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
    assert_eq!(journal, "wal");
}

#[tokio::test]
async fn rotation_is_atomic_when_it_fails_midway() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    let mut conn = raw(&store).await;
    // Fail the INSERT of the new version, after the UPDATE that demoted v1.
    sqlx::query(
        "CREATE TRIGGER inject_failure BEFORE INSERT ON kek_versions WHEN NEW.version = 2
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let failed = store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 1).await;
    assert!(matches!(failed, Err(StoreError::Unavailable(_))), "{failed:?}");
    let after = store.tenant(&tenant("onc")).await.unwrap().unwrap();
    assert_eq!(after.versions.len(), 1);
    assert_eq!(after.versions[0].state, KekState::Active, "demotion rolled back");

    sqlx::query("DROP TRIGGER inject_failure").execute(&mut conn).await.unwrap();
    let v2 = store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 2).await.unwrap();
    assert_eq!(v2.state, KekState::Active);
    let after = store.tenant(&tenant("onc")).await.unwrap().unwrap();
    assert_eq!(after.versions[0].state, KekState::DecryptOnly);
    assert_eq!(after.active().unwrap().version, 2);
}

#[tokio::test]
async fn tenant_creation_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    let mut conn = raw(&store).await;
    sqlx::query(
        "CREATE TRIGGER inject_failure BEFORE INSERT ON kek_versions
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert!(store.create_tenant(new_tenant("onc", master)).await.is_err());
    assert!(store.tenant(&tenant("onc")).await.unwrap().is_none(), "no half-created tenant");
    sqlx::query("DROP TRIGGER inject_failure").execute(&mut conn).await.unwrap();
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
}

#[tokio::test]
async fn the_database_itself_refuses_two_active_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    let mut conn = raw(&store).await;
    let second_active = sqlx::query(
        "INSERT INTO kek_versions (tenant, version, state, wrapped, master_key, created_at, state_changed_at)
         VALUES ('onc', 2, 'active', x'00', ?, 0, 0)",
    )
    .bind(master.0)
    .execute(&mut conn)
    .await;
    assert!(second_active.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rotations_never_produce_two_active_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (first, master) = open(&dir).await;
    // A second, independent pool on the same file: another writer process.
    let (second, _) = open(&dir).await;
    first.create_tenant(new_tenant("onc", master)).await.unwrap();
    let stores: [Arc<dyn KeyStore>; 2] = [Arc::new(first.clone()), Arc::new(second)];

    // Everyone tries version 2 at once: exactly one wins.
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let store = stores[i % 2].clone();
            tokio::spawn(async move {
                store.add_kek_version(&tenant("onc"), 2, &[9; 40], master, 5).await
            })
        })
        .collect();
    let mut won = 0;
    for a in attempts {
        match a.await.unwrap() {
            Ok(_) => won += 1,
            Err(StoreError::VersionConflict(_)) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);

    // Then 16 rotations racing with retry: each gets its own version.
    let racers: Vec<_> = (0..16)
        .map(|i| {
            let store = stores[i % 2].clone();
            tokio::spawn(async move {
                loop {
                    let t = store.tenant(&tenant("onc")).await.unwrap().unwrap();
                    let next = t.versions.last().unwrap().version + 1;
                    match store.add_kek_version(&tenant("onc"), next, &[9; 40], master, 6).await {
                        Ok(r) => return r.version,
                        Err(StoreError::VersionConflict(_)) => tokio::task::yield_now().await,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
            })
        })
        .collect();
    let mut versions = Vec::new();
    for r in racers {
        versions.push(r.await.unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (3..=18).collect::<Vec<_>>());
    let t = first.tenant(&tenant("onc")).await.unwrap().unwrap();
    let active: Vec<_> = t.versions.iter().filter(|v| v.state == KekState::Active).collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].version, 18);
    assert!(t.versions[..17].iter().all(|v| v.state == KekState::DecryptOnly));
}

#[tokio::test]
async fn state_changes_follow_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    let onc = tenant("onc");
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    assert!(matches!(
        store.change_kek_state(&onc, 1, StateChange::Disable, 1).await,
        Err(StoreError::InvalidTransition(_))
    ));
    store.add_kek_version(&onc, 2, &[3; 40], master, 2).await.unwrap();
    let disabled = store.change_kek_state(&onc, 1, StateChange::Disable, 3).await.unwrap();
    assert_eq!((disabled.state, disabled.state_changed_at), (KekState::Disabled, 3));
    let enabled = store.change_kek_state(&onc, 1, StateChange::Enable, 4).await.unwrap();
    assert_eq!(enabled.state, KekState::DecryptOnly);
    assert!(matches!(
        store.change_kek_state(&onc, 9, StateChange::Enable, 5).await,
        Err(StoreError::UnknownVersion { version: 9, .. })
    ));
    assert!(matches!(
        store.add_kek_version(&tenant("ghost"), 1, &[3; 40], master, 2).await,
        Err(StoreError::UnknownTenant(_))
    ));
}

#[tokio::test]
async fn everything_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, master) = open(&dir).await;
    let onc = tenant("onc");
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    store.add_kek_version(&onc, 2, &[3; 40], master, 2).await.unwrap();
    store.change_kek_state(&onc, 1, StateChange::Disable, 3).await.unwrap();
    let row = audit_row(1);
    store.append_audit(std::slice::from_ref(&row)).await.unwrap();
    let before = store.tenant(&onc).await.unwrap();
    store.close().await;
    drop(store);

    let (reopened, master_again) = open(&dir).await;
    assert_eq!(master_again, master);
    assert_eq!(reopened.tenant(&onc).await.unwrap(), before);
    assert_eq!(reopened.audit_rows("i1", 0, 10).await.unwrap(), vec![row]);
}

fn audit_row(seq: i64) -> AuditRow {
    AuditRow {
        instance: "i1".into(),
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

#[tokio::test]
async fn audit_appends_are_atomic_and_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir).await;
    store.append_audit(&[audit_row(1), audit_row(2)]).await.unwrap();
    // A batch with one duplicate is refused whole.
    let refused = store.append_audit(&[audit_row(3), audit_row(2)]).await;
    assert!(matches!(refused, Err(StoreError::AuditConflict { seq: 2, .. })));
    let rows = store.audit_rows("i1", 0, 10).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(store.audit_rows("i1", 1, 10).await.unwrap().len(), 1);
    assert!(store.audit_rows("other", 0, 10).await.unwrap().is_empty());
}
