//! The audit chain end to end on the SQLite keystore: seal, sign, store,
//! read back, verify; then tamper with the database file directly and
//! check that verification names the first bad position.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use kms_core::audit::{
    Anchor, AuditChain, AuditEvent, AuditSigner, BreakReason, ChainBreak, ChainVerifier, HASH_LEN,
    Outcome, VerifyReport, VerifyStoredError, chain_hash, verify_chain, verify_stored_chain,
};
use kms_core::store::{AuditRow, CheckpointRow, KeyStore, SqliteStore};
use kms_core::{RecordKeyId, TenantId};
use sqlx::Connection;

const INSTANCE: &str = "ks-1";
const EVENTS: i64 = 50;
const CHECKPOINT_EVERY: i64 = 10;

struct Fixture {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    signer: AuditSigner,
    chain: AuditChain,
}

fn event(i: i64) -> AuditEvent {
    let base = AuditEvent::new(
        1_700_000_000_000 + i,
        format!("spiffe://prod/ns/onc/sa/api-{}", i % 3),
        "dek.unwrap",
        Outcome::Ok,
    );
    match i % 4 {
        0 => base
            .with_tenant(TenantId::new("onc").unwrap())
            .with_kek_version(2)
            .with_record_key_ids([RecordKeyId::from_bytes([i as u8; 16])])
            .with_purpose("treatment")
            .with_detail("fields", 6),
        1 => base.with_outcome(Outcome::Denied).with_detail("error", "policy_denied"),
        2 => base
            .with_tenant(TenantId::new("derm").unwrap())
            .with_detail("pointers", vec!["/ssn", "/mrn"]),
        _ => {
            let mut rotate = base.with_outcome(Outcome::Error);
            rotate.action = "tenant.rotate".into();
            rotate
        }
    }
}

/// 50 events, committed in groups of 10, each group with a checkpoint of
/// its last event (the way the key service's group commit writes).
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(&dir.path().join("data")).await.unwrap();
    let signer = AuditSigner::generate().unwrap();
    let mut chain = AuditChain::resume(INSTANCE, None).unwrap();
    for group in 0..EVENTS / CHECKPOINT_EVERY {
        let rows =
            chain.seal_all((1..=CHECKPOINT_EVERY).map(|i| event(group * CHECKPOINT_EVERY + i)));
        let (seq, hash) = chain.head();
        let checkpoint =
            signer.sign_checkpoint(INSTANCE, seq, &hash, 1_700_000_000_000 + seq).unwrap();
        store.append_audit_batch(&rows, Some(&checkpoint)).await.unwrap();
    }
    Fixture { _dir: dir, store, signer, chain }
}

async fn raw(store: &SqliteStore) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", store.path().display())).await.unwrap()
}

async fn all_rows(store: &SqliteStore) -> Vec<AuditRow> {
    store.audit_rows(INSTANCE, 0, 10_000).await.unwrap()
}

/// Verifies three ways (`verify_chain` on everything in memory, a
/// `ChainVerifier` fed by hand, and streamed from the store in pages of 7)
/// and checks they agree.
async fn verify(f: &Fixture) -> Result<VerifyReport, ChainBreak> {
    let result = verify_anchored(f, &[]).await;
    let rows = all_rows(&f.store).await;
    let checkpoints = f.store.audit_checkpoints(INSTANCE, 0, 10_000).await.unwrap();
    let in_memory = verify_chain(INSTANCE, &rows, &checkpoints, &f.signer.public_key_sec1());
    assert_eq!(in_memory, result);
    result
}

/// Verifies under `anchors` both ways (a `ChainVerifier` fed everything in
/// memory, and streamed from the store in pages of 7) and checks they
/// agree.
async fn verify_anchored(f: &Fixture, anchors: &[Anchor]) -> Result<VerifyReport, ChainBreak> {
    let rows = all_rows(&f.store).await;
    let checkpoints = f.store.audit_checkpoints(INSTANCE, 0, 10_000).await.unwrap();
    let mut verifier = ChainVerifier::new(INSTANCE, f.signer.verifying_key());
    let in_memory = verifier
        .expect_anchors(anchors)
        .and_then(|()| verifier.push_checkpoints(&checkpoints))
        .and_then(|()| verifier.push_rows(&rows))
        .and_then(|()| verifier.finish());
    let key = f.signer.verifying_key();
    let streamed = match verify_stored_chain(&f.store, INSTANCE, key, anchors, 7).await {
        Ok(report) => Ok(report),
        Err(VerifyStoredError::Broken(broken)) => Err(broken),
        Err(e) => panic!("store failed: {e}"),
    };
    assert_eq!(in_memory, streamed);
    in_memory
}

fn assert_breaks(result: Result<VerifyReport, ChainBreak>, position: i64, reason: BreakReason) {
    let broken = result.expect_err("verification must fail");
    assert_eq!(
        (broken.instance.as_str(), broken.position, broken.reason),
        (INSTANCE, position, reason),
        "{broken}"
    );
}

async fn exec(store: &SqliteStore, sql: &'static str) {
    sqlx::query(sql).execute(&mut raw(store).await).await.unwrap();
}

#[tokio::test]
async fn an_untouched_chain_verifies() {
    let f = fixture().await;
    let report = verify(&f).await.unwrap();
    assert_eq!((report.events, report.checkpoints, report.head_seq), (50, 5, 50));
    assert_eq!((report.last_checkpoint, report.unsigned_tail()), (Some(50), 0));
    assert_eq!(report.head_hash, f.chain.head().1);
    // What was stored reads back as the events that were sealed.
    let rows = all_rows(&f.store).await;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(AuditEvent::from_row(row).unwrap(), event(i as i64 + 1));
    }
    // The chain resumes from the store where it left off.
    let last = f.store.last_audit_row(INSTANCE).await.unwrap();
    assert_eq!(AuditChain::resume(INSTANCE, last.as_ref()).unwrap(), f.chain);
}

#[tokio::test]
async fn an_edited_event_is_named() {
    let f = fixture().await;
    exec(
        &f.store,
        "UPDATE audit_events SET actor = 'spiffe://prod/ns/x/sa/mallory' WHERE seq = 25",
    )
    .await;
    assert_breaks(verify(&f).await, 25, BreakReason::HashMismatch);
}

#[tokio::test]
async fn an_edited_purpose_is_named() {
    let f = fixture().await;
    exec(
        &f.store,
        "UPDATE audit_events SET detail = json_set(detail, '$.purpose', 'research') WHERE seq = 12",
    )
    .await;
    assert_breaks(verify(&f).await, 12, BreakReason::HashMismatch);
}

#[tokio::test]
async fn a_deleted_event_is_named() {
    let f = fixture().await;
    exec(&f.store, "DELETE FROM audit_events WHERE seq = 33").await;
    assert_breaks(verify(&f).await, 33, BreakReason::UnexpectedSeq { found: 34 });
    exec(&f.store, "DELETE FROM audit_events WHERE seq = 1").await;
    assert_breaks(verify(&f).await, 1, BreakReason::UnexpectedSeq { found: 2 });
}

#[tokio::test]
async fn swapped_events_are_named_at_the_first() {
    let f = fixture().await;
    let rows = all_rows(&f.store).await;
    let mut conn = raw(&f.store).await;
    for (seq, from) in [(20, &rows[29]), (30, &rows[19])] {
        sqlx::query(
            "UPDATE audit_events SET ts_ms = ?, actor = ?, action = ?, tenant = ?, kek_version = ?,
                 record_key_ids = ?, outcome = ?, detail = ?, prev_hash = ?, hash = ?
             WHERE instance = ? AND seq = ?",
        )
        .bind(from.ts_ms)
        .bind(&from.actor)
        .bind(&from.action)
        .bind(&from.tenant)
        .bind(from.kek_version)
        .bind(&from.record_key_ids)
        .bind(&from.outcome)
        .bind(&from.detail)
        .bind(&from.prev_hash)
        .bind(&from.hash)
        .bind(INSTANCE)
        .bind(seq)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    assert_breaks(verify(&f).await, 20, BreakReason::BrokenLink);
}

#[tokio::test]
async fn a_consistent_rewrite_is_caught_by_the_next_checkpoint() {
    let f = fixture().await;
    let mut rows = all_rows(&f.store).await;
    // Edit event 25 and recompute every hash after it, as an attacker
    // without the signing key could.
    rows[24].actor = "spiffe://prod/ns/x/sa/mallory".into();
    let mut prev: [u8; HASH_LEN] = rows[23].hash.clone().try_into().unwrap();
    let mut conn = raw(&f.store).await;
    for row in &mut rows[24..] {
        row.prev_hash = prev.to_vec();
        prev = chain_hash(&prev, row);
        row.hash = prev.to_vec();
        sqlx::query("UPDATE audit_events SET actor = ?, prev_hash = ?, hash = ? WHERE instance = ? AND seq = ?")
            .bind(&row.actor)
            .bind(&row.prev_hash)
            .bind(&row.hash)
            .bind(INSTANCE)
            .bind(row.seq)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    assert_breaks(verify(&f).await, 30, BreakReason::CheckpointMismatch);
}

#[tokio::test]
async fn a_forged_checkpoint_is_named() {
    let f = fixture().await;
    // Pointed at another event's hash.
    exec(&f.store, "UPDATE audit_checkpoints SET hash = (SELECT hash FROM audit_events WHERE seq = 21) WHERE seq = 20").await;
    assert_breaks(verify(&f).await, 20, BreakReason::CheckpointMismatch);

    // Re-signed with another key, over the right hash.
    let f = fixture().await;
    let cp = f.store.audit_checkpoints(INSTANCE, 19, 1).await.unwrap().remove(0);
    let forged = AuditSigner::generate()
        .unwrap()
        .sign_checkpoint(INSTANCE, cp.seq, &cp.hash.clone().try_into().unwrap(), cp.ts_ms)
        .unwrap();
    sqlx::query("UPDATE audit_checkpoints SET signature = ? WHERE instance = ? AND seq = 20")
        .bind(&forged.signature)
        .bind(INSTANCE)
        .execute(&mut raw(&f.store).await)
        .await
        .unwrap();
    assert_breaks(verify(&f).await, 20, BreakReason::CheckpointSignature);

    // Its timestamp moved.
    let f = fixture().await;
    exec(&f.store, "UPDATE audit_checkpoints SET ts_ms = ts_ms + 1 WHERE seq = 40").await;
    assert_breaks(verify(&f).await, 40, BreakReason::CheckpointSignature);
}

#[tokio::test]
async fn a_checkpoint_past_the_end_is_named() {
    let f = fixture().await;
    // Correctly signed, but for an event that does not exist.
    let beyond = f.signer.sign_checkpoint(INSTANCE, 60, &[1; 32], 1).unwrap();
    f.store.append_audit_batch(&[], Some(&beyond)).await.unwrap();
    assert_breaks(verify(&f).await, 60, BreakReason::CheckpointPastEnd);
}

#[tokio::test]
async fn truncation_is_caught_up_to_the_last_checkpoint_only() {
    let mut f = fixture().await;
    // Five more events, not yet checkpointed.
    let rows = f.chain.seal_all((51..=55).map(event));
    f.store.append_audit_batch(&rows, None).await.unwrap();
    let report = verify(&f).await.unwrap();
    assert_eq!(
        (report.head_seq, report.last_checkpoint, report.unsigned_tail()),
        (55, Some(50), 5)
    );

    // Cutting the unsigned tail goes unnoticed (the documented limit);
    // the report still says where the last signature is.
    exec(&f.store, "DELETE FROM audit_events WHERE seq > 50").await;
    let report = verify(&f).await.unwrap();
    assert_eq!(
        (report.head_seq, report.last_checkpoint, report.unsigned_tail()),
        (50, Some(50), 0)
    );

    // Cutting into checkpointed events is caught at the orphaned checkpoint.
    exec(&f.store, "DELETE FROM audit_events WHERE seq > 41").await;
    assert_breaks(verify(&f).await, 50, BreakReason::CheckpointPastEnd);
    exec(&f.store, "DELETE FROM audit_events").await;
    assert_breaks(verify(&f).await, 10, BreakReason::CheckpointPastEnd);
}

#[tokio::test]
async fn anchors_catch_a_cut_or_rewritten_tail_that_checkpoints_cannot() {
    let mut f = fixture().await;
    let before_tail = f.chain.clone();
    let rows = f.chain.seal_all((51..=55).map(event));
    f.store.append_audit_batch(&rows, None).await.unwrap();
    let (seq, hash) = f.chain.head();
    let head = Anchor { seq, hash };
    let earlier =
        Anchor { seq: 30, hash: all_rows(&f.store).await[29].hash.clone().try_into().unwrap() };
    let report = verify_anchored(&f, &[head, earlier, head]).await.unwrap();
    assert_eq!((report.head_seq, report.anchors), (55, 2), "repeats count once");
    assert_eq!(verify(&f).await.unwrap().anchors, 0);

    // The unsigned tail rewritten consistently: the chain still verifies
    // alone, not through the anchor.
    exec(&f.store, "DELETE FROM audit_events WHERE seq > 50").await;
    let mut rewritten = before_tail;
    let forged = rewritten.seal_all((51..=55).map(|i| event(i + 1)));
    f.store.append_audit_batch(&forged, None).await.unwrap();
    assert_eq!(verify(&f).await.unwrap().head_seq, 55);
    assert_breaks(verify_anchored(&f, &[earlier, head]).await, 55, BreakReason::AnchorMismatch);
    assert_eq!(verify_anchored(&f, &[earlier]).await.unwrap().anchors, 1);

    // Cut back: unnoticed alone, past the anchor with it.
    exec(&f.store, "DELETE FROM audit_events WHERE seq > 50").await;
    assert_eq!(verify(&f).await.unwrap().head_seq, 50);
    assert_breaks(verify_anchored(&f, &[head]).await, 55, BreakReason::AnchorPastEnd);
    exec(&f.store, "DELETE FROM audit_events").await;
    exec(&f.store, "DELETE FROM audit_checkpoints").await;
    assert_eq!(verify(&f).await.unwrap().head_seq, 0, "an emptied chain verifies alone");
    assert_breaks(verify_anchored(&f, &[earlier]).await, 30, BreakReason::AnchorPastEnd);
}

#[tokio::test]
async fn anchors_that_cannot_hold_are_refused() {
    let f = fixture().await;
    let at = |seq, byte| Anchor { seq, hash: [byte; HASH_LEN] };
    assert_breaks(verify_anchored(&f, &[at(5, 1), at(5, 2)]).await, 5, BreakReason::AnchorMismatch);
    assert_breaks(
        verify_anchored(&f, &[at(0, 1), at(3, 1)]).await,
        0,
        BreakReason::AnchorOutOfOrder,
    );
    assert_breaks(verify_anchored(&f, &[at(7, 9)]).await, 7, BreakReason::AnchorMismatch);
    // Anchors given in two calls are held together.
    let mut verifier = ChainVerifier::new(INSTANCE, f.signer.verifying_key());
    verifier.expect_anchors(&[at(9, 1)]).unwrap();
    let conflict = verifier.expect_anchors(&[at(9, 2)]).unwrap_err();
    assert_eq!((conflict.position, conflict.reason), (9, BreakReason::AnchorMismatch));
    // Anchors come before their events.
    let rows = all_rows(&f.store).await;
    let mut verifier = ChainVerifier::new(INSTANCE, f.signer.verifying_key());
    verifier.push_rows(&rows[..3]).unwrap();
    let late = verifier.expect_anchors(&[at(3, 1)]).unwrap_err();
    assert_eq!((late.position, late.reason), (3, BreakReason::AnchorOutOfOrder));
}

#[tokio::test]
async fn a_row_moved_to_another_instance_is_a_deletion() {
    let f = fixture().await;
    exec(&f.store, "UPDATE audit_events SET instance = 'ks-2' WHERE seq = 7").await;
    assert_breaks(verify(&f).await, 7, BreakReason::UnexpectedSeq { found: 8 });
    assert_eq!(f.store.audit_instances().await.unwrap(), ["ks-1", "ks-2"]);
}

#[tokio::test]
async fn a_checkpoint_is_not_stored_without_its_rows() {
    let mut f = fixture().await;
    let before = f.chain.clone();
    let rows = f.chain.seal_all((51..=53).map(event));
    let (seq, hash) = f.chain.head();
    let checkpoint = f.signer.sign_checkpoint(INSTANCE, seq, &hash, 2).unwrap();
    let mut conn = raw(&f.store).await;
    sqlx::query(
        "CREATE TRIGGER inject_failure BEFORE INSERT ON audit_events WHEN NEW.seq = 53
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let failed = f.store.append_audit_batch(&rows, Some(&checkpoint)).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(f.store.last_audit_row(INSTANCE).await.unwrap().unwrap().seq, 50);
    assert!(f.store.audit_checkpoints(INSTANCE, 50, 10).await.unwrap().is_empty());
    verify(&f).await.unwrap();

    // The writer restores its head and retries: the chain continues.
    sqlx::query("DROP TRIGGER inject_failure").execute(&mut conn).await.unwrap();
    f.chain = before;
    let rows = f.chain.seal_all((51..=53).map(event));
    let (seq, hash) = f.chain.head();
    let checkpoint = f.signer.sign_checkpoint(INSTANCE, seq, &hash, 2).unwrap();
    f.store.append_audit_batch(&rows, Some(&checkpoint)).await.unwrap();
    let report = verify(&f).await.unwrap();
    assert_eq!((report.head_seq, report.checkpoints), (53, 6));
}

#[tokio::test]
async fn checkpoint_pages_and_rows_read_back() {
    let f = fixture().await;
    let page = f.store.audit_checkpoints(INSTANCE, 10, 2).await.unwrap();
    assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), [20, 30]);
    let all: Vec<CheckpointRow> = f.store.audit_checkpoints(INSTANCE, 0, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(f.store.audit_checkpoints("other", 0, 100).await.unwrap().is_empty());
    assert!(f.store.last_audit_row("other").await.unwrap().is_none());
    for c in &all {
        kms_core::audit::verify_checkpoint(&f.signer.public_key_sec1(), c).unwrap();
    }
}

/// Verifying while a writer appends (events and their checkpoint in one
/// commit) never mistakes a checkpoint written after the events were read
/// for a cut tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_a_chain_being_written_reports_no_truncation() {
    let f = fixture().await;
    let store = std::sync::Arc::new(f.store.clone());
    let writer = {
        let signer = AuditSigner::from_key(&f.signer.to_key()).unwrap();
        let (store, mut chain) = (store.clone(), f.chain.clone());
        tokio::spawn(async move {
            for i in 0..300 {
                let rows = chain.seal_all([event(EVENTS + 1 + i)]);
                let (seq, hash) = chain.head();
                let checkpoint = signer.sign_checkpoint(INSTANCE, seq, &hash, 3).unwrap();
                store.append_audit_batch(&rows, Some(&checkpoint)).await.unwrap();
            }
        })
    };
    // At least a few verifications, however fast the writer is, and as many
    // as fit while it writes.
    let mut verified = 0;
    while verified < 3 || !writer.is_finished() {
        let key = f.signer.verifying_key();
        match verify_stored_chain(store.as_ref(), INSTANCE, key, &[], 7).await {
            Ok(report) => assert_eq!(report.unsigned_tail(), 0),
            Err(e) => panic!("verification #{verified} during writes: {e}"),
        }
        verified += 1;
    }
    writer.await.unwrap();
    assert_eq!(verify(&f).await.unwrap().head_seq, EVENTS + 300);
}
