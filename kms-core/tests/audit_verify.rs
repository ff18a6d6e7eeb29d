//! The chain verifier on in-memory chains: streaming, checkpoint order,
//! incremental verification from an anchor, and every break reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use kms_core::audit::{
    AuditChain, AuditEvent, AuditSigner, BreakReason, ChainBreak, ChainVerifier, GENESIS_HASH,
    Outcome, verify_chain,
};
use kms_core::store::{AuditRow, CheckpointRow};

fn chain(n: i64, every: i64, signer: &AuditSigner) -> (Vec<AuditRow>, Vec<CheckpointRow>) {
    let mut chain = AuditChain::new("ks");
    let mut rows = Vec::new();
    let mut checkpoints = Vec::new();
    for i in 1..=n {
        rows.push(
            chain.seal(AuditEvent::new(i, "actor", "dek.issue", Outcome::Ok).with_detail("n", i)),
        );
        if i % every == 0 {
            let (seq, hash) = chain.head();
            checkpoints.push(signer.sign_checkpoint("ks", seq, &hash, i).unwrap());
        }
    }
    (rows, checkpoints)
}

fn breaks(result: Result<impl std::fmt::Debug, ChainBreak>) -> (i64, BreakReason) {
    let broken = result.expect_err("must fail");
    (broken.position, broken.reason)
}

#[test]
fn streaming_page_by_page_matches_one_call() {
    let signer = AuditSigner::generate().unwrap();
    let (rows, checkpoints) = chain(100, 9, &signer);
    let whole = verify_chain("ks", &rows, &checkpoints, &signer.public_key_sec1()).unwrap();
    assert_eq!((whole.events, whole.checkpoints, whole.last_checkpoint), (100, 11, Some(99)));
    assert_eq!(whole.unsigned_tail(), 1);

    let mut verifier = ChainVerifier::new("ks", signer.verifying_key());
    let mut next_checkpoint = 0;
    for page in rows.chunks(13) {
        let upto = page.last().unwrap().seq;
        while next_checkpoint < checkpoints.len() && checkpoints[next_checkpoint].seq <= upto {
            verifier.push_checkpoint(&checkpoints[next_checkpoint]).unwrap();
            next_checkpoint += 1;
        }
        verifier.push_rows(page).unwrap();
    }
    assert_eq!(verifier.finish().unwrap(), whole);
}

#[test]
fn an_empty_chain_verifies() {
    let signer = AuditSigner::generate().unwrap();
    let report = verify_chain("ks", &[], &[], &signer.public_key_sec1()).unwrap();
    assert_eq!((report.events, report.head_seq, report.head_hash), (0, 0, GENESIS_HASH));
    assert_eq!(report.last_checkpoint, None);
}

#[test]
fn a_checkpoint_for_the_head_may_come_late_but_not_older_ones() {
    let signer = AuditSigner::generate().unwrap();
    let (rows, checkpoints) = chain(20, 10, &signer);
    let mut verifier = ChainVerifier::new("ks", signer.verifying_key());
    verifier.push_rows(&rows[..10]).unwrap();
    verifier.push_checkpoint(&checkpoints[0]).unwrap(); // seq 10 = head
    assert_eq!(
        breaks(verifier.clone().push_checkpoint(&checkpoints[0])),
        (10, BreakReason::CheckpointOutOfOrder)
    );
    verifier.push_rows(&rows[10..]).unwrap();
    assert_eq!(verifier.clone().finish().unwrap().checkpoints, 1);
    let late =
        breaks(verifier.push_checkpoint(&CheckpointRow { seq: 15, ..checkpoints[1].clone() }));
    assert_eq!(late, (15, BreakReason::CheckpointOutOfOrder));

    // Descending checkpoints are refused too.
    let mut verifier = ChainVerifier::new("ks", signer.verifying_key());
    verifier.push_checkpoint(&checkpoints[1]).unwrap();
    assert_eq!(
        breaks(verifier.push_checkpoint(&checkpoints[0])),
        (10, BreakReason::CheckpointOutOfOrder)
    );
}

#[test]
fn the_first_break_latches() {
    let signer = AuditSigner::generate().unwrap();
    let (mut rows, checkpoints) = chain(5, 5, &signer);
    rows[1].action = "dek.unwrap".into();
    let mut verifier = ChainVerifier::new("ks", signer.verifying_key());
    verifier.push_checkpoints(&checkpoints).unwrap();
    assert_eq!(breaks(verifier.push_rows(&rows)), (2, BreakReason::HashMismatch));
    assert_eq!(breaks(verifier.push_row(&rows[2])), (2, BreakReason::HashMismatch));
    assert_eq!(breaks(verifier.finish()), (2, BreakReason::HashMismatch));
}

#[test]
fn incremental_verification_from_a_checkpoint() {
    let signer = AuditSigner::generate().unwrap();
    let (rows, checkpoints) = chain(30, 10, &signer);
    let mut verifier =
        ChainVerifier::from_checkpoint(signer.verifying_key(), &checkpoints[1]).unwrap();
    verifier.push_checkpoints(&checkpoints[2..]).unwrap();
    verifier.push_rows(&rows[20..]).unwrap();
    let report = verifier.finish().unwrap();
    assert_eq!((report.events, report.checkpoints, report.head_seq), (10, 1, 30));

    let forged = CheckpointRow { hash: rows[18].hash.clone(), ..checkpoints[1].clone() };
    let refused = ChainVerifier::from_checkpoint(signer.verifying_key(), &forged);
    assert_eq!(breaks(refused), (20, BreakReason::CheckpointSignature));
    // Starting after 20 and feeding 20 again is a repeated event.
    let mut verifier =
        ChainVerifier::from_checkpoint(signer.verifying_key(), &checkpoints[1]).unwrap();
    assert_eq!(
        breaks(verifier.push_row(&rows[19])),
        (21, BreakReason::UnexpectedSeq { found: 20 })
    );
}

#[test]
fn every_row_level_break_is_named() {
    let signer = AuditSigner::generate().unwrap();
    let key = signer.public_key_sec1();
    let (rows, checkpoints) = chain(6, 3, &signer);
    let verify = |rows: &[AuditRow]| breaks(verify_chain("ks", rows, &checkpoints, &key));

    let mut foreign = rows.clone();
    foreign[3].instance = "other".into();
    assert_eq!(verify(&foreign), (4, BreakReason::WrongInstance));

    let mut repeated = rows.clone();
    repeated.insert(2, rows[1].clone());
    assert_eq!(verify(&repeated), (3, BreakReason::UnexpectedSeq { found: 2 }));

    let mut reordered = rows.clone();
    reordered.swap(3, 4);
    assert_eq!(verify(&reordered), (4, BreakReason::UnexpectedSeq { found: 5 }));

    let mut short = rows.clone();
    short[4].hash.truncate(31);
    assert_eq!(verify(&short), (5, BreakReason::MalformedHash));
    let mut short = rows.clone();
    short[0].prev_hash.clear();
    assert_eq!(verify(&short), (1, BreakReason::MalformedHash));

    let mut relinked = rows.clone();
    relinked[2].prev_hash = rows[0].hash.clone();
    assert_eq!(verify(&relinked), (3, BreakReason::BrokenLink));

    let mut edited = rows.clone();
    edited[5].kek_version = Some(1);
    assert_eq!(verify(&edited), (6, BreakReason::HashMismatch));

    let truncated = &rows[..5];
    assert_eq!(verify(truncated), (6, BreakReason::CheckpointPastEnd));

    assert_eq!(
        breaks(verify_chain("ks", &rows, &checkpoints, &[4; 65])),
        (0, BreakReason::InvalidPublicKey)
    );
    let other = AuditSigner::generate().unwrap().public_key_sec1();
    assert_eq!(
        breaks(verify_chain("ks", &rows, &checkpoints, &other)),
        (3, BreakReason::CheckpointSignature)
    );
    let foreign_checkpoint = [CheckpointRow { instance: "other".into(), ..checkpoints[0].clone() }];
    assert_eq!(
        breaks(verify_chain("ks", &rows, &foreign_checkpoint, &key)),
        (3, BreakReason::WrongInstance)
    );
}
