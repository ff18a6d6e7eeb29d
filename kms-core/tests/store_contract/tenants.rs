//! Tenants and KEK versions: transactions, constraints, concurrency,
//! durability.

use std::sync::Arc;

use kms_core::store::{KeyStore, MasterKeyId, NewTenant, StoreError};
use kms_core::{KekState, StateChange};

use crate::harness::{Backend, Fixture, tenant, test_master};

fn new_tenant(name: &str, master: MasterKeyId) -> NewTenant {
    NewTenant {
        id: tenant(name),
        index_root_wrapped: vec![1; 40],
        kek_wrapped: vec![2; 40],
        master,
        created_at: 1_700_000_000,
    }
}

pub(crate) async fn creates_reads_and_refuses_duplicates(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.ping().await.unwrap();
    let created = store.create_tenant(new_tenant("onc", master)).await.unwrap();
    assert_eq!(created.versions.len(), 1);
    assert_eq!((created.created_at, created.index_root_master), (1_700_000_000, master));
    assert_eq!(created.index_root_wrapped.as_deref(), Some(&[1u8; 40][..]));
    let v1 = created.active().unwrap();
    assert_eq!(
        (v1.version, v1.master, v1.created_at, v1.state_changed_at),
        (1, master, 1_700_000_000, 1_700_000_000)
    );
    assert_eq!(v1.wrapped.as_deref(), Some(&[2u8; 40][..]));
    assert_eq!(store.tenant(&tenant("onc")).await.unwrap().as_ref(), Some(&created));
    assert_eq!(store.kek(&tenant("onc"), 1).await.unwrap().as_ref(), Some(v1));
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
    assert!(store.kek(&tenant("nobody"), 1).await.unwrap().is_none());
    // Registering the same master twice yields the same id; another, another.
    assert_eq!(store.register_master(&test_master()).await.unwrap(), master);
    let other = kms_core::ProviderInfo { kind: "local", key_ref: "other".into() };
    assert_ne!(store.register_master(&other).await.unwrap(), master);
}

pub(crate) async fn tenants_are_listed_in_bytewise_order(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    for name in ["ab", "a_b", "a0", "a-b", "b"] {
        store.create_tenant(new_tenant(name, master)).await.unwrap();
    }
    store.add_kek_version(&tenant("a0"), 2, &[3; 40], master, 2).await.unwrap();
    let tenants = store.list_tenants().await.unwrap();
    let ids: Vec<&str> = tenants.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["a-b", "a0", "a_b", "ab", "b"], "bytewise, whatever the locale");
    let versions: Vec<usize> = tenants.iter().map(|t| t.versions.len()).collect();
    assert_eq!(versions, [1, 2, 1, 1, 1]);
    assert_eq!(tenants[1], store.tenant(&tenant("a0")).await.unwrap().unwrap());
}

pub(crate) async fn rotation_is_atomic_when_it_fails_midway(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    // Fail the INSERT of the new version, after the UPDATE that demoted v1.
    f.fail_kek_inserts(Some(2)).await;
    let failed = store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 1).await;
    assert!(matches!(failed, Err(StoreError::Unavailable(_))), "{failed:?}");
    let after = store.tenant(&tenant("onc")).await.unwrap().unwrap();
    assert_eq!(after.versions.len(), 1);
    assert_eq!(after.versions[0].state, KekState::Active, "demotion rolled back");

    f.stop_failing().await;
    let v2 = store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 2).await.unwrap();
    assert_eq!(v2.state, KekState::Active);
    let after = store.tenant(&tenant("onc")).await.unwrap().unwrap();
    assert_eq!(after.versions[0].state, KekState::DecryptOnly);
    assert_eq!(after.versions[0].state_changed_at, 2);
    assert_eq!(after.active().unwrap(), &v2);
}

pub(crate) async fn tenant_creation_is_all_or_nothing(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    f.fail_kek_inserts(None).await;
    assert!(store.create_tenant(new_tenant("onc", master)).await.is_err());
    assert!(store.tenant(&tenant("onc")).await.unwrap().is_none(), "no half-created tenant");
    assert!(store.list_tenants().await.unwrap().is_empty());
    f.stop_failing().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
}

pub(crate) async fn the_database_itself_refuses_two_active_versions(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    let blob = match f.backend() {
        Backend::Sqlite => "x'00'",
        Backend::Postgres => "'\\x00'::bytea",
    };
    let insert = format!(
        "INSERT INTO kek_versions (tenant, version, state, wrapped, master_key, created_at, state_changed_at)
         VALUES ('onc', 2, 'active', {blob}, {}, 0, 0)",
        master.0
    );
    let refused = f.try_exec(&insert).await.unwrap_err();
    assert!(refused.as_database_error().unwrap().is_unique_violation(), "{refused}");
    // Nor can an update make a second one active.
    store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 1).await.unwrap();
    let refused = f
        .try_exec("UPDATE kek_versions SET state = 'active' WHERE tenant = 'onc' AND version = 1")
        .await
        .unwrap_err();
    assert!(refused.as_database_error().unwrap().is_unique_violation(), "{refused}");
    // And destroyed means no material, the other way round too.
    let refused = f
        .try_exec(
            "UPDATE kek_versions SET state = 'destroyed' WHERE tenant = 'onc' AND version = 1",
        )
        .await;
    assert!(refused.is_err());
}

pub(crate) async fn concurrent_rotations_never_produce_two_active_versions(f: Fixture) {
    let (first, master) = f.open_with_master().await;
    // A second, independent pool on the same database: another replica.
    let second = f.open().await;
    first.create_tenant(new_tenant("onc", master)).await.unwrap();
    let stores: [Arc<dyn KeyStore>; 2] = [first.clone(), second];

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
    let numbers: Vec<u32> = t.versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, (1..=18).collect::<Vec<_>>(), "versions unique and gapless");
    let active: Vec<_> = t.versions.iter().filter(|v| v.state == KekState::Active).collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].version, 18);
    assert!(t.versions[..17].iter().all(|v| v.state == KekState::DecryptOnly));
}

pub(crate) async fn racing_tenant_creations_yield_one_tenant(f: Fixture) {
    let (first, master) = f.open_with_master().await;
    let second = f.open().await;
    let stores: [Arc<dyn KeyStore>; 2] = [first.clone(), second];
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let store = stores[i % 2].clone();
            let mut t = new_tenant("onc", master);
            t.kek_wrapped = vec![i as u8; 40];
            tokio::spawn(async move { store.create_tenant(t).await })
        })
        .collect();
    let mut created = Vec::new();
    for a in attempts {
        match a.await.unwrap() {
            Ok(t) => created.push(t),
            Err(StoreError::TenantExists(_)) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(created.len(), 1);
    assert_eq!(first.tenant(&tenant("onc")).await.unwrap().unwrap(), created[0]);
}

pub(crate) async fn state_changes_follow_the_rules(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    let onc = tenant("onc");
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    assert!(matches!(
        store.change_kek_state(&onc, 1, StateChange::Disable, 1).await,
        Err(StoreError::InvalidTransition(_))
    ));
    store.add_kek_version(&onc, 2, &[3; 40], master, 2).await.unwrap();
    let disabled = store.change_kek_state(&onc, 1, StateChange::Disable, 3).await.unwrap();
    assert_eq!((disabled.state, disabled.state_changed_at), (KekState::Disabled, 3));
    assert_eq!(store.kek(&onc, 1).await.unwrap().unwrap(), disabled);
    let enabled = store.change_kek_state(&onc, 1, StateChange::Enable, 4).await.unwrap();
    assert_eq!(enabled.state, KekState::DecryptOnly);
    let again = store.change_kek_state(&onc, 1, StateChange::DecryptOnly, 5).await.unwrap();
    assert_eq!((again.state, again.state_changed_at), (KekState::DecryptOnly, 5));
    assert!(matches!(
        store.change_kek_state(&onc, 9, StateChange::Enable, 5).await,
        Err(StoreError::UnknownVersion { version: 9, .. })
    ));
    assert!(matches!(
        store.change_kek_state(&tenant("ghost"), 1, StateChange::Enable, 5).await,
        Err(StoreError::UnknownVersion { version: 1, .. })
    ));
    assert!(matches!(
        store.add_kek_version(&tenant("ghost"), 1, &[3; 40], master, 2).await,
        Err(StoreError::UnknownTenant(_))
    ));
    assert!(matches!(
        store.add_kek_version(&onc, 4, &[3; 40], master, 2).await,
        Err(StoreError::VersionConflict(_))
    ));
    assert!(matches!(
        store.add_kek_version(&onc, 2, &[3; 40], master, 2).await,
        Err(StoreError::VersionConflict(_))
    ));
}

pub(crate) async fn everything_survives_close_and_reopen(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    let onc = tenant("onc");
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    store.add_kek_version(&onc, 2, &[3; 40], master, 2).await.unwrap();
    store.change_kek_state(&onc, 1, StateChange::Disable, 3).await.unwrap();
    let row = crate::audit::audit_row("i1", 1);
    store.append_audit(std::slice::from_ref(&row)).await.unwrap();
    let before = store.tenant(&onc).await.unwrap();
    drop(store);

    // Reopening runs the migrations again: they must find nothing to do.
    let (reopened, master_again) = f.open_with_master().await;
    assert_eq!(master_again, master);
    assert_eq!(reopened.tenant(&onc).await.unwrap(), before);
    assert_eq!(reopened.audit_rows("i1", 0, 10).await.unwrap(), vec![row]);
}
