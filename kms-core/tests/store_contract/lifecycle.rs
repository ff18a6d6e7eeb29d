//! Lifecycle operations: shredding, auto-rotation periods, master keys and
//! the rewrap bookkeeping of a master rotation, usage counters, approvals.

use std::sync::Arc;

use kms_core::store::{
    Approval, ApprovalState, DecideApproval, Decision, KeyStore, MasterKeyId, NewTenant,
    StoreError, StoredKeyRef, UsageDelta,
};
use kms_core::{KekState, ProviderInfo};

use crate::harness::{Fixture, tenant};

fn new_tenant(name: &str, master: MasterKeyId) -> NewTenant {
    NewTenant {
        id: tenant(name),
        index_root_wrapped: vec![1; 40],
        kek_wrapped: vec![2; 40],
        master,
        created_at: 1_700_000_000,
    }
}

pub(crate) async fn shredding_erases_material_and_is_final(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    store.create_tenant(new_tenant("other", master)).await.unwrap();
    store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 10).await.unwrap();
    store.add_kek_version(&tenant("onc"), 3, &[4; 40], master, 20).await.unwrap();

    // The active version cannot be shredded alone; unknown ones are named.
    assert!(matches!(
        store.destroy_keys(&tenant("onc"), Some(3), 30).await,
        Err(StoreError::InvalidTransition(_))
    ));
    assert!(matches!(
        store.destroy_keys(&tenant("onc"), Some(9), 30).await,
        Err(StoreError::UnknownVersion { version: 9, .. })
    ));
    assert!(matches!(
        store.destroy_keys(&tenant("nobody"), None, 30).await,
        Err(StoreError::UnknownTenant(_))
    ));

    let after = store.destroy_keys(&tenant("onc"), Some(1), 30).await.unwrap();
    let v1 = &after.versions[0];
    assert_eq!(
        (v1.state, v1.wrapped.as_ref(), v1.state_changed_at),
        (KekState::Destroyed, None, 30)
    );
    assert!(after.index_root_wrapped.is_some(), "a version shred keeps the index root");
    // Idempotent, and it keeps the first destruction time.
    let again = store.destroy_keys(&tenant("onc"), Some(1), 40).await.unwrap();
    assert_eq!(again.versions[0].state_changed_at, 30);
    // Nothing comes back from destroyed.
    assert!(
        store.change_kek_state(&tenant("onc"), 1, kms_core::StateChange::Enable, 41).await.is_err()
    );

    let whole = store.destroy_keys(&tenant("onc"), None, 50).await.unwrap();
    assert!(whole.index_root_wrapped.is_none());
    assert!(whole.versions.iter().all(|v| v.state == KekState::Destroyed && v.wrapped.is_none()));
    assert!(whole.active().is_none());
    // A rotation prepared before the shred and committed after it (its
    // number is still the next one) must not bring the tenant back.
    assert!(matches!(
        store.add_kek_version(&tenant("onc"), 4, &[5; 40], master, 51).await,
        Err(StoreError::Shredded(_))
    ));
    let still = store.tenant(&tenant("onc")).await.unwrap().unwrap();
    assert!(still.active().is_none() && still.versions.len() == 3, "{still:?}");
    let other = store.tenant(&tenant("other")).await.unwrap().unwrap();
    assert_eq!(
        other.active().unwrap().wrapped.as_deref(),
        Some(&[2u8; 40][..]),
        "others untouched"
    );
}

pub(crate) async fn rotation_periods_are_stored(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    assert_eq!(store.tenant(&tenant("onc")).await.unwrap().unwrap().rotate_every_secs, None);
    let t = store.set_rotation_period(&tenant("onc"), Some(86_400)).await.unwrap();
    assert_eq!(t.rotate_every_secs, Some(86_400));
    assert_eq!(store.list_tenants().await.unwrap()[0].rotate_every_secs, Some(86_400));
    let t = store.set_rotation_period(&tenant("onc"), None).await.unwrap();
    assert_eq!(t.rotate_every_secs, None);
    assert!(matches!(
        store.set_rotation_period(&tenant("nobody"), Some(1)).await,
        Err(StoreError::UnknownTenant(_))
    ));
}

pub(crate) async fn one_master_is_active_and_keys_move_by_compare_and_swap(f: Fixture) {
    let (store, old) = f.open_with_master().await;
    store.activate_master(old).await.unwrap();
    store.create_tenant(new_tenant("onc", old)).await.unwrap();
    store.add_kek_version(&tenant("onc"), 2, &[3; 40], old, 10).await.unwrap();
    store.create_tenant(new_tenant("gone", old)).await.unwrap();
    store.destroy_keys(&tenant("gone"), None, 11).await.unwrap();
    let new = store
        .register_master(&ProviderInfo { kind: "pkcs11", key_ref: "token/new".into() })
        .await
        .unwrap();
    store.set_master_config(new, r#"{"provider":"pkcs11"}"#).await.unwrap();
    store.activate_master(new).await.unwrap();
    let masters = store.masters().await.unwrap();
    let active: Vec<_> = masters.iter().filter(|m| m.active).map(|m| m.id).collect();
    assert_eq!(active, [new], "exactly one active master");
    let recorded = masters.iter().find(|m| m.id == new).unwrap();
    assert_eq!(recorded.config.as_deref(), Some(r#"{"provider":"pkcs11"}"#));
    assert!(matches!(
        store.activate_master(MasterKeyId(9_999)).await,
        Err(StoreError::UnknownMaster(_))
    ));
    // Keys wrapped under the old master before the activation and stored
    // after it would escape the rotation's sweep: they are refused.
    assert!(matches!(
        store.create_tenant(new_tenant("late", old)).await,
        Err(StoreError::MasterNotActive(id)) if id == old.0
    ));
    assert!(store.tenant(&tenant("late")).await.unwrap().is_none());
    assert!(matches!(
        store.add_kek_version(&tenant("onc"), 3, &[9; 40], old, 12).await,
        Err(StoreError::MasterNotActive(_))
    ));
    assert!(matches!(
        store
            .insert_audit_signing_key(&kms_core::store::AuditSigningKeyRecord {
                instance: "late".into(),
                wrapped: vec![1; 40],
                master: old,
                public_key: vec![4; 65],
                created_at: 12,
            })
            .await,
        Err(StoreError::MasterNotActive(_))
    ));
    assert!(matches!(
        store.create_tenant(new_tenant("late", MasterKeyId(9_999))).await,
        Err(StoreError::UnknownMaster(_))
    ));

    // Destroyed material is not listed: only onc's two KEKs and index root.
    let mut pending = store.keys_not_under(new, 100).await.unwrap();
    pending.sort_by_key(|k| format!("{}", k.key));
    let names: Vec<String> = pending.iter().map(|k| k.key.to_string()).collect();
    assert_eq!(names, ["KEK onc v1", "KEK onc v2", "index root of onc"]);
    assert_eq!(store.keys_per_master().await.unwrap(), [(old, 3)]);
    assert_eq!(store.keys_not_under(new, 2).await.unwrap().len(), 2, "pages are bounded");

    let v1 = StoredKeyRef::Kek { tenant: tenant("onc"), version: 1 };
    assert!(store.replace_wrapped(&v1, old, &[7; 40], new).await.unwrap());
    assert!(!store.replace_wrapped(&v1, old, &[8; 40], new).await.unwrap(), "compare and swap");
    // Back under a master that is no longer active: never.
    assert!(matches!(
        store.replace_wrapped(&v1, new, &[6; 40], old).await,
        Err(StoreError::MasterNotActive(_))
    ));
    let kek = store.kek(&tenant("onc"), 1).await.unwrap().unwrap();
    assert_eq!((kek.master, kek.wrapped.as_deref()), (new, Some(&[7u8; 40][..])));

    // A shred between listing and replacing wins: nothing is resurrected.
    let root = StoredKeyRef::IndexRoot { tenant: tenant("onc") };
    store.destroy_keys(&tenant("onc"), None, 20).await.unwrap();
    assert!(!store.replace_wrapped(&root, old, &[9; 40], new).await.unwrap());
    let v2 = StoredKeyRef::Kek { tenant: tenant("onc"), version: 2 };
    assert!(!store.replace_wrapped(&v2, old, &[9; 40], new).await.unwrap());
    assert!(store.tenant(&tenant("onc")).await.unwrap().unwrap().index_root_wrapped.is_none());
    assert!(store.keys_not_under(new, 100).await.unwrap().is_empty());
}

pub(crate) async fn usage_counts_add_up_per_version_and_hour(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 10).await.unwrap();
    let delta = |version, hour, issued, unwraps, last| UsageDelta {
        tenant: tenant("onc"),
        version,
        hour,
        issued,
        unwraps,
        last_unwrap_at: last,
    };
    store
        .add_usage(&[delta(1, 100, 10, 0, None), delta(1, 130, 0, 5, Some(130 * 3600 + 7))])
        .await
        .unwrap();
    store
        .add_usage(&[delta(1, 130, 2, 3, Some(130 * 3600 + 1)), delta(2, 130, 4, 0, None)])
        .await
        .unwrap();
    store.add_usage(&[]).await.unwrap();
    let usage = store.usage(&tenant("onc"), 120).await.unwrap();
    assert_eq!(usage.len(), 2);
    let (v1, v2) = (&usage[0], &usage[1]);
    assert_eq!((v1.version, v1.state), (1, KekState::DecryptOnly));
    assert_eq!((v1.issued, v1.unwraps, v1.recent_unwraps), (12, 8, 8));
    assert_eq!(v1.last_unwrap_at, Some(130 * 3600 + 7), "the latest unwrap wins");
    assert_eq!((v2.issued, v2.unwraps, v2.last_unwrap_at), (4, 0, None));
    let older = store.usage(&tenant("onc"), 131).await.unwrap();
    assert_eq!(older[0].recent_unwraps, 0, "outside the window");
    assert!(matches!(store.usage(&tenant("nobody"), 0).await, Err(StoreError::UnknownTenant(_))));
}

pub(crate) async fn approvals_need_a_second_person_and_decide_once(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    let request =
        Approval::new("a1".into(), tenant("onc"), Some(1), "retire".into(), "alice".into(), 100);
    store.create_approval(&request).await.unwrap();
    let orphan =
        Approval::new("a2".into(), tenant("nobody"), None, "x".into(), "alice".into(), 100);
    assert!(matches!(store.create_approval(&orphan).await, Err(StoreError::UnknownTenant(_))));
    assert_eq!(store.approval("a1").await.unwrap().as_ref(), Some(&request));
    assert!(store.approval("nope").await.unwrap().is_none());

    let decide = |by: &'static str, decision| DecideApproval {
        id: "a1",
        decision,
        by,
        comment: Some("ok"),
        now: 200,
        delay_secs: 60,
        approve_within_secs: 1_000,
    };
    assert!(matches!(
        store.decide_approval(&decide("alice", Decision::Approve)).await,
        Err(StoreError::SelfApproval)
    ));
    assert!(matches!(
        store
            .decide_approval(&DecideApproval { id: "nope", ..decide("bob", Decision::Approve) })
            .await,
        Err(StoreError::UnknownApproval(_))
    ));
    // Two officers at once: exactly one decides.
    let (bob, carol) = (decide("bob", Decision::Approve), decide("carol", Decision::Reject));
    let (a, b) = tokio::join!(store.decide_approval(&bob), store.decide_approval(&carol));
    assert!(a.is_ok() ^ b.is_ok(), "one decision wins: {a:?} {b:?}");
    let loser = if a.is_ok() { b } else { a };
    assert!(matches!(loser, Err(StoreError::ApprovalNotPending { .. })));
    let stored = store.approval("a1").await.unwrap().unwrap();
    match stored.state {
        ApprovalState::Approved => {
            assert_eq!(
                (stored.decided_by.as_deref(), stored.execute_after),
                (Some("bob"), Some(260))
            );
            // Not before its waiting period is over, whoever asks.
            assert!(matches!(
                store.execute_approval("a1", 259).await,
                Err(StoreError::ApprovalNotDue { execute_after: 260, .. })
            ));
            // Refused inside the transaction (version 1 is still the active
            // one, which cannot be shredded alone): nothing changes.
            assert!(matches!(
                store.execute_approval("a1", 260).await,
                Err(StoreError::InvalidTransition(_))
            ));
            assert_eq!(store.approval("a1").await.unwrap().as_ref(), Some(&stored));
            let onc = store.tenant(&tenant("onc")).await.unwrap().unwrap();
            assert_eq!(onc.versions[0].wrapped.as_deref(), Some(&[2u8; 40][..]), "intact");
            // Version 1 may go once it is no longer the active one.
            store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 250).await.unwrap();
            let (done, after) = store.execute_approval("a1", 300).await.unwrap();
            assert_eq!((done.state, done.executed_at), (ApprovalState::Executed, Some(300)));
            assert_eq!(
                (after.versions[0].state, after.versions[0].wrapped.as_ref()),
                (KekState::Destroyed, None)
            );
            assert_eq!(store.approval("a1").await.unwrap().as_ref(), Some(&done));
            assert!(
                matches!(
                    store.execute_approval("a1", 301).await,
                    Err(StoreError::ApprovalNotPending { state: ApprovalState::Executed, .. })
                ),
                "once"
            );
        }
        ApprovalState::Rejected => {
            assert_eq!((stored.decided_by.as_deref(), stored.execute_after), (Some("carol"), None));
            assert!(
                matches!(
                    store.execute_approval("a1", 300).await,
                    Err(StoreError::ApprovalNotPending { state: ApprovalState::Rejected, .. })
                ),
                "never runs"
            );
            let onc = store.tenant(&tenant("onc")).await.unwrap().unwrap();
            assert_eq!(onc.versions[0].state, KekState::Active, "nothing destroyed");
        }
        other => panic!("unexpected state {other}"),
    }
    let pending = Approval::new("a3".into(), tenant("onc"), None, "y".into(), "dave".into(), 150);
    store.create_approval(&pending).await.unwrap();
    let all = store.approvals(None).await.unwrap();
    assert_eq!(all.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a1", "a3"]);
    let only = store.approvals(Some(ApprovalState::Pending)).await.unwrap();
    assert_eq!(only.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a3"]);

    // A pending request, or an approved one waiting for its time, can be
    // withdrawn, once; a rejected or executed one cannot.
    let mistaken = Approval::new("a4".into(), tenant("onc"), None, "z".into(), "hank".into(), 150);
    store.create_approval(&mistaken).await.unwrap();
    let withdrawn = store
        .withdraw_approval("a4", ApprovalState::Pending, "withdrawn by hank: typo")
        .await
        .unwrap();
    assert_eq!(
        (withdrawn.state, withdrawn.comment.as_deref(), withdrawn.decided_by.as_deref()),
        (ApprovalState::Rejected, Some("withdrawn by hank: typo"), None)
    );
    assert!(matches!(
        store
            .decide_approval(&DecideApproval { id: "a4", ..decide("erin", Decision::Approve) })
            .await,
        Err(StoreError::ApprovalNotPending { state: ApprovalState::Rejected, .. })
    ));
    let approve_a3 = DecideApproval { id: "a3", ..decide("erin", Decision::Approve) };
    store.decide_approval(&approve_a3).await.unwrap();
    // Decided on while it was pending (by its requester, say): not made
    // once it has been approved meanwhile.
    assert!(matches!(
        store.withdraw_approval("a3", ApprovalState::Pending, "withdrawn by dave").await,
        Err(StoreError::ApprovalNotPending { state: ApprovalState::Approved, .. })
    ));
    let withdrawn = store
        .withdraw_approval("a3", ApprovalState::Approved, "withdrawn by frank: wrong tenant")
        .await
        .unwrap();
    assert_eq!(
        (withdrawn.state, withdrawn.comment.as_deref(), withdrawn.decided_by.as_deref()),
        (ApprovalState::Rejected, Some("withdrawn by frank: wrong tenant"), Some("erin"))
    );
    assert!(
        matches!(
            store.execute_approval("a3", 400).await,
            Err(StoreError::ApprovalNotPending { state: ApprovalState::Rejected, .. })
        ),
        "a withdrawn request never runs"
    );
    let onc = store.tenant(&tenant("onc")).await.unwrap().unwrap();
    assert!(onc.index_root_wrapped.is_some(), "nothing destroyed");
    assert!(matches!(
        store.withdraw_approval("a3", ApprovalState::Approved, "again").await,
        Err(StoreError::ApprovalNotPending { state: ApprovalState::Rejected, .. })
    ));
    assert!(matches!(
        store.withdraw_approval("a1", ApprovalState::Approved, "late").await,
        Err(StoreError::ApprovalNotPending {
            state: ApprovalState::Executed | ApprovalState::Rejected,
            ..
        })
    ));
    assert!(matches!(
        store.withdraw_approval("nope", ApprovalState::Pending, "x").await,
        Err(StoreError::UnknownApproval(_))
    ));

    // A request not approved in time is stale: it may be rejected, never
    // approved.
    let stale = Approval::new("a5".into(), tenant("onc"), None, "s".into(), "ivan".into(), 150);
    store.create_approval(&stale).await.unwrap();
    let late = |decision| DecideApproval { id: "a5", now: 1_151, ..decide("erin", decision) };
    assert!(matches!(
        store.decide_approval(&late(Decision::Approve)).await,
        Err(StoreError::ApprovalExpired { .. })
    ));
    assert_eq!(store.approval("a5").await.unwrap().as_ref(), Some(&stale), "unchanged");
    let in_time = DecideApproval { now: 1_150, ..late(Decision::Approve) };
    assert!(stale.check_decision(&in_time).is_ok(), "exactly the limit is in time");
    let rejected = store.decide_approval(&late(Decision::Reject)).await.unwrap();
    assert_eq!(rejected.state, ApprovalState::Rejected);
}

/// The database itself refuses an approval decided by its requester.
pub(crate) async fn the_database_refuses_self_approval(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    store.create_tenant(new_tenant("onc", master)).await.unwrap();
    let request = Approval::new("a1".into(), tenant("onc"), None, "r".into(), "alice".into(), 1);
    store.create_approval(&request).await.unwrap();
    let sql = "UPDATE approvals SET state = 'approved', decided_by = 'alice' WHERE id = 'a1'";
    assert!(f.try_exec(sql).await.is_err());
    let _: Arc<dyn KeyStore> = store;
}

/// A withdrawal and an execution of one approved shred, from two stores at
/// once (two replicas): exactly one wins, and what is stored agrees with
/// it: executed and destroyed, or withdrawn and intact.
pub(crate) async fn a_withdrawal_racing_an_execution_ends_one_way(f: Fixture) {
    let (store, master) = f.open_with_master().await;
    let other = f.open().await;
    let (mut executed, mut withdrawn) = (0, 0);
    for round in 0..12 {
        let (name, id) = (format!("race-{round}"), format!("r{round}"));
        store.create_tenant(new_tenant(&name, master)).await.unwrap();
        let request = Approval::new(id.clone(), tenant(&name), None, "x".into(), "alice".into(), 1);
        store.create_approval(&request).await.unwrap();
        let approve = DecideApproval {
            id: &id,
            decision: Decision::Approve,
            by: "bob",
            comment: None,
            now: 2,
            delay_secs: 0,
            approve_within_secs: 60,
        };
        store.decide_approval(&approve).await.unwrap();
        let (run, withdraw) = tokio::join!(
            store.execute_approval(&id, 3),
            other.withdraw_approval(&id, ApprovalState::Approved, "withdrawn by carol"),
        );
        let stored = store.approval(&id).await.unwrap().unwrap();
        let keys = other.tenant(&tenant(&name)).await.unwrap().unwrap();
        match (run, withdraw) {
            (Ok(_), Err(StoreError::ApprovalNotPending { state: ApprovalState::Executed, .. })) => {
                executed += 1;
                assert_eq!(stored.state, ApprovalState::Executed);
                assert!(keys.index_root_wrapped.is_none(), "destroyed");
                assert!(keys.versions.iter().all(|v| v.wrapped.is_none()), "destroyed");
            }
            (Err(StoreError::ApprovalNotPending { state: ApprovalState::Rejected, .. }), Ok(_)) => {
                withdrawn += 1;
                assert_eq!(stored.state, ApprovalState::Rejected);
                assert!(keys.index_root_wrapped.is_some(), "intact");
                assert!(keys.versions.iter().all(|v| v.wrapped.is_some()), "intact");
            }
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        }
    }
    // Which side wins is the scheduler's business; both may.
    eprintln!("executed {executed}, withdrawn {withdrawn}");
}
