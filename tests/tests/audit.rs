//! The audit chain through the running key service: verification, tamper
//! detection, and failing closed when the audit log cannot write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use keygate_tests::keyservice::KeyService;
use serde_json::{Value, json};
use sqlx::Connection;

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";
const DEC: &str = "spiffe://test/decryptor";
const AUDITOR: &str = "spiffe://test/auditor";

async fn verify(ks: &KeyService) -> Value {
    let (status, text) = ks.get(AUDITOR, "/v1/audit/verify").await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn db(ks: &KeyService) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", ks.database().display())).await.unwrap()
}

/// Runs some traffic so the chain has events and checkpoints.
async fn traffic(ks: &KeyService) -> Value {
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let mut last = Value::Null;
    for _ in 0..30 {
        let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 3})).await;
        assert_eq!(status, 200);
        last = body;
    }
    // Wait for the interval checkpoint so the whole chain is signed.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_detects_edits_deletions_swaps_and_forged_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    traffic(&ks).await;
    let report = verify(&ks).await;
    assert_eq!(report["ok"], true, "{report}");
    let events = report["instances"][0]["events"].as_u64().unwrap();
    assert!(events >= 31, "{report}");
    assert!(report["instances"][0]["checkpoints"].as_u64().unwrap() >= 1);

    let mut conn = db(&ks).await;
    let expect_break = |report: Value, position: i64, what: &str| {
        assert_eq!(report["ok"], false, "{what}: {report}");
        assert_eq!(report["first_break"]["position"], position, "{what}: {report}");
    };

    // Edit one row.
    sqlx::query("UPDATE audit_events SET actor = 'spiffe://test/mallory' WHERE seq = 5")
        .execute(&mut conn)
        .await
        .unwrap();
    expect_break(verify(&ks).await, 5, "edited row");
    sqlx::query("UPDATE audit_events SET actor = ? WHERE seq = 5")
        .bind(ENC)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(verify(&ks).await["ok"], true, "restored");

    // Delete one row (keep it to put back).
    sqlx::query("CREATE TABLE saved AS SELECT * FROM audit_events WHERE seq = 7")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_events WHERE seq = 7").execute(&mut conn).await.unwrap();
    expect_break(verify(&ks).await, 7, "deleted row");
    sqlx::query("INSERT INTO audit_events SELECT * FROM saved").execute(&mut conn).await.unwrap();
    sqlx::query("DROP TABLE saved").execute(&mut conn).await.unwrap();
    assert_eq!(verify(&ks).await["ok"], true, "restored");

    // Swap two rows' contents (everything but their position).
    let swap = [
        "CREATE TABLE saved AS SELECT * FROM audit_events WHERE seq IN (10, 12)",
        "UPDATE audit_events SET
            ts_ms = (SELECT ts_ms FROM saved WHERE saved.seq = 22 - audit_events.seq),
            actor = (SELECT actor FROM saved WHERE saved.seq = 22 - audit_events.seq),
            action = (SELECT action FROM saved WHERE saved.seq = 22 - audit_events.seq),
            record_key_ids = (SELECT record_key_ids FROM saved WHERE saved.seq = 22 - audit_events.seq),
            detail = (SELECT detail FROM saved WHERE saved.seq = 22 - audit_events.seq),
            prev_hash = (SELECT prev_hash FROM saved WHERE saved.seq = 22 - audit_events.seq),
            hash = (SELECT hash FROM saved WHERE saved.seq = 22 - audit_events.seq)
         WHERE seq IN (10, 12)",
        "DROP TABLE saved",
    ];
    for statement in swap {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    expect_break(verify(&ks).await, 10, "swapped rows");
    for statement in swap {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    assert_eq!(verify(&ks).await["ok"], true, "swapped back");

    // Forge a checkpoint.
    let cp: i64 = sqlx::query_scalar("SELECT MIN(seq) FROM audit_checkpoints")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_checkpoints SET signature = zeroblob(64) WHERE seq = ?")
        .bind(cp)
        .execute(&mut conn)
        .await
        .unwrap();
    expect_break(verify(&ks).await, cp, "forged checkpoint");
}

#[tokio::test(flavor = "multi_thread")]
async fn unwrap_is_refused_when_the_audit_log_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let issued = traffic(&ks).await;
    let key = &issued["keys"][0];
    let request = json!({"items": [{"record_key_id": key["record_key_id"], "kek_version": 1, "wrapped": key["wrapped"]}]});

    let mut conn = db(&ks).await;
    sqlx::query("CREATE TRIGGER audit_unwritable BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        .execute(&mut conn)
        .await
        .unwrap();
    let (status, body) = ks.post(DEC, "/v1/tenants/onc/datakeys/unwrap", &request).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "audit_unavailable");
    assert!(!body.to_string().contains(key["dek"].as_str().unwrap()), "no DEK returned");
    let (status, _) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 503, "issuing is refused too");
    let (status, readiness) = ks.get(ADMIN, "/readyz").await;
    assert_eq!(status, 503, "{readiness}");
    assert!(readiness.contains("\"audit\":{\"error\":\"audit_unavailable\""), "{readiness}");
    assert!(!readiness.contains("disk full"), "the reason is for the log, not the caller");
    assert!(ks.log().contains("disk full"), "{}", ks.log());

    sqlx::query("DROP TRIGGER audit_unwritable").execute(&mut conn).await.unwrap();
    let (status, body) = ks.post(DEC, "/v1/tenants/onc/datakeys/unwrap", &request).await;
    assert_eq!(status, 200, "recovers by itself: {body}");
    assert_eq!(body["results"][0]["dek"], key["dek"]);
    let (status, _) = ks.get(ADMIN, "/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(verify(&ks).await["ok"], true, "the chain survived the outage intact");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_unwrap_is_exported_with_its_record_key_ids() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let issued = traffic(&ks).await;
    let key = &issued["keys"][1];
    let request = json!({"purpose": "treatment", "items": [{"record_key_id": key["record_key_id"], "kek_version": 1, "wrapped": key["wrapped"]}]});
    let (status, _) = ks.post(DEC, "/v1/tenants/onc/datakeys/unwrap", &request).await;
    assert_eq!(status, 200);
    let (status, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    assert_eq!(status, 200);
    let unwrap: Value = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["action"] == "dek.unwrap")
        .expect("an unwrap event");
    assert_eq!(unwrap["actor"], DEC);
    assert_eq!(unwrap["record_key_ids"], json!([key["record_key_id"]]));
    assert_eq!(unwrap["detail"]["purpose"], "treatment");
    assert!(!export.contains(key["dek"].as_str().unwrap()));
    // Auditors only: an encryptor may not export, nor read how far each
    // chain reaches.
    let (status, _) = ks.get(ENC, "/v1/audit").await;
    assert_eq!(status, 403);
    let (status, body) = ks.get(ENC, "/v1/audit/heads").await;
    assert_eq!(status, 403, "{body}");
}

const OFFICER: &str = "spiffe://test/officer";

/// Every audit event of `action`, in chain order: (outcome, detail).
async fn events_of(ks: &KeyService, action: &str) -> Vec<(String, Value)> {
    let (status, export) = ks.get(AUDITOR, "/v1/audit").await;
    assert_eq!(status, 200, "{export}");
    export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == action)
        .map(|e| (e["outcome"].as_str().unwrap().to_owned(), e["detail"].clone()))
        .collect()
}

async fn tenant_view(ks: &KeyService) -> Value {
    let (status, body) = ks.get(ADMIN, "/v1/tenants/onc").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_admin_change_is_made_when_the_audit_log_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    // Version 1 decrypt-only (so it may be disabled), and a pending shred.
    let (status, _) = ks.post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await;
    assert_eq!(status, 200);
    let (status, pending) =
        ks.post(ADMIN, "/v1/tenants/onc/shred", &json!({"version": 1, "reason": "test"})).await;
    assert_eq!(status, 202, "{pending}");
    let approval = pending["id"].as_str().unwrap().to_owned();
    let before = tenant_view(&ks).await;
    let (_, masters_before) = ks.get(ADMIN, "/v1/master").await;

    let mut conn = db(&ks).await;
    sqlx::query("CREATE TRIGGER audit_unwritable BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        .execute(&mut conn)
        .await
        .unwrap();
    let refused = |(status, body): (u16, Value), what: &str| {
        assert_eq!(status, 503, "{what}: {body}");
        assert_eq!(body["error"]["code"], "audit_unavailable", "{what}: {body}");
    };
    refused(ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "new"})).await, "create");
    refused(ks.post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await, "rotate");
    let disable = json!({"action": "disable"});
    refused(ks.post(ADMIN, "/v1/tenants/onc/keys/1/state", &disable).await, "disable");
    let shred = json!({"version": 1, "reason": "again"});
    refused(ks.post(ADMIN, "/v1/tenants/onc/shred", &shred).await, "shred request");
    let approve = json!({"decision": "approve"});
    refused(ks.post(OFFICER, &format!("/v1/approvals/{approval}"), &approve).await, "approve");
    let to = json!({"to": {
        "provider": "dev_local",
        "key_file": dir.path().join("second-root.key"),
        "create_if_missing": true,
    }});
    refused(ks.post(ADMIN, "/v1/master/rotate", &to).await, "master rotate");
    let response = ks
        .client(ADMIN)
        .put(format!("{}/v1/tenants/onc/keys/auto-rotate", ks.url))
        .json(&json!({"every_secs": 86_400}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "auto-rotate");

    // Nothing changed.
    sqlx::query("DROP TRIGGER audit_unwritable").execute(&mut conn).await.unwrap();
    let (status, _) = ks.get(ADMIN, "/v1/tenants/new").await;
    assert_eq!(status, 404, "the tenant was not created");
    assert_eq!(tenant_view(&ks).await, before, "versions, states and schedule unchanged");
    let (_, approvals) = ks.get(ADMIN, "/v1/approvals").await;
    let approvals: Value = serde_json::from_str(&approvals).unwrap();
    let approvals = approvals["approvals"].as_array().unwrap();
    assert_eq!(approvals.len(), 1, "no second shred request: {approvals:?}");
    assert_eq!(approvals[0]["state"], "pending", "not approved");
    assert_eq!(ks.get(ADMIN, "/v1/master").await.1, masters_before, "no master rotation");
    // (Connecting the target, before the event, created its key file.)
    assert!(dir.path().join("second-root.key").exists());
    assert_eq!(verify(&ks).await["ok"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_change_is_recorded_before_it_is_made_and_again_if_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let (status, body) = ks.post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        ks.post(ADMIN, "/v1/tenants/onc/keys/1/state", &json!({"action": "disable"})).await;
    assert_eq!(status, 200, "{body}");
    // The active version cannot be disabled: refused after its event.
    let (status, body) =
        ks.post(ADMIN, "/v1/tenants/onc/keys/2/state", &json!({"action": "disable"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("invalid_transition")));
    // A tenant that exists already.
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 409);

    let states = events_of(&ks, "kek.state").await;
    let outcomes: Vec<&str> = states.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(outcomes, ["ok", "ok", "invalid"], "{states:?}");
    assert!(states.iter().all(|(_, d)| d["state"] == "disabled"), "{states:?}");
    let creates = events_of(&ks, "tenant.create").await;
    let outcomes: Vec<&str> = creates.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(outcomes, ["ok", "ok", "invalid"], "{creates:?}");
    let (status, export) = ks.get(AUDITOR, "/v1/audit").await;
    assert_eq!(status, 200);
    let rotation: Value = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["action"] == "kek.rotate")
        .unwrap();
    assert_eq!((&rotation["outcome"], &rotation["kek_version"]), (&json!("ok"), &json!(2)));

    // A master rotation: recorded with its target, then what it moved.
    let to = json!({"to": {
        "provider": "dev_local",
        "key_file": dir.path().join("second-root.key"),
        "create_if_missing": true,
    }});
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to).await;
    assert_eq!(status, 200, "{body}");
    let started = events_of(&ks, "master.rotate").await;
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0].0, "ok");
    assert!(started[0].1["to"].as_str().unwrap().starts_with("local:"), "{started:?}");
    let done = events_of(&ks, "master.rotate.done").await;
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!((&done[0].1["tenant_keys"], &done[0].1["index_roots"]), (&json!(2), &json!(1)));
}

/// Events after the last checkpoint are protected by the hash chain alone:
/// someone who can write the keystore can cut the tail back together with
/// its checkpoints and the shorter chain verifies. An anchor taken before
/// (a report's head, kept elsewhere) catches it.
#[tokio::test(flavor = "multi_thread")]
async fn anchors_catch_a_tail_cut_back_with_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    traffic(&ks).await;
    let report = verify(&ks).await;
    let head = &report["instances"][0];
    let (instance, seq) = (head["instance"].as_str().unwrap(), head["head_seq"].as_i64().unwrap());
    let hash = head["head_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 64, "{report}");
    let anchor = json!({"instance": instance, "seq": seq, "hash": hash});
    let anchored = |anchors: Value| {
        let body = json!({ "anchors": anchors });
        let ks = &ks;
        async move { ks.post(AUDITOR, "/v1/audit/verify", &body).await }
    };
    let (status, through) = anchored(json!([anchor, anchor])).await;
    assert_eq!(status, 200, "{through}");
    assert_eq!(
        (through["ok"].as_bool(), through["instances"][0]["anchors"].as_u64()),
        (Some(true), Some(1))
    );

    // Cut back by ten events, with every checkpoint past what is left.
    let mut conn = db(&ks).await;
    let cut = seq - 10;
    for statement in
        ["DELETE FROM audit_events WHERE seq > ?", "DELETE FROM audit_checkpoints WHERE seq > ?"]
    {
        sqlx::query(statement).bind(cut).execute(&mut conn).await.unwrap();
    }
    let alone = verify(&ks).await;
    assert_eq!(alone["ok"], true, "the documented limit: {alone}");
    assert!(alone["instances"][0]["head_seq"].as_i64().unwrap() < seq, "{alone}");
    let (status, caught) = anchored(json!([anchor])).await;
    assert_eq!(status, 200, "{caught}");
    assert_eq!(caught["ok"], false, "{caught}");
    assert_eq!(caught["first_break"]["position"], seq, "{caught}");
    assert!(caught["first_break"]["reason"].as_str().unwrap().contains("past the end"), "{caught}");

    // A chain gone whole: its anchor breaks too.
    let gone = json!({"instance": "ks-gone", "seq": 3, "hash": hash});
    let (_, caught) = anchored(json!([gone])).await;
    assert_eq!(
        (caught["ok"].as_bool(), caught["first_break"]["instance"].as_str()),
        (Some(false), Some("ks-gone"))
    );
    assert!(
        caught["first_break"]["reason"].as_str().unwrap().contains("no chain is stored"),
        "{caught}"
    );

    // Bad anchors are refused before any verification; auditors only.
    let with = |field: &str, value: Value| {
        let mut bad = anchor.clone();
        bad[field] = value;
        json!([bad])
    };
    let too_many = json!(vec![anchor.clone(); 50_001]);
    for (anchors, code) in [
        (json!([]), "invalid_anchor"),
        (too_many, "invalid_anchor"),
        (with("seq", json!(0)), "invalid_anchor"),
        (with("hash", json!(hash.to_uppercase())), "invalid_anchor"),
        (with("hash", json!(&hash[..62])), "invalid_anchor"),
        (with("instance", json!("")), "invalid_anchor"),
        (with("instance", json!("i".repeat(1025))), "invalid_anchor"),
        (with("extra", json!(1)), "invalid_request"),
        (with("seq", json!("7")), "invalid_request"),
    ] {
        let (status, body) = anchored(anchors).await;
        assert_eq!((status / 100, body["error"]["code"].as_str()), (4, Some(code)), "{body}");
    }
    let (status, _) = ks.post(ENC, "/v1/audit/verify", &json!({"anchors": [anchor]})).await;
    assert_eq!(status, 403);
}

/// Appends to `instance`'s chain, straight into the database, an event
/// linked and hashed as the key service would: what someone with write
/// access to the keystore, but without the signing key, can do.
async fn forge_event(conn: &mut sqlx::SqliteConnection, instance: &str) -> i64 {
    use kms_core::audit::{AuditChain, AuditEvent, Outcome};
    use kms_core::store::AuditRow;
    use sqlx::Row;
    let last =
        sqlx::query("SELECT * FROM audit_events WHERE instance = ? ORDER BY seq DESC LIMIT 1")
            .bind(instance)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let last = AuditRow {
        instance: last.get("instance"),
        seq: last.get("seq"),
        ts_ms: last.get("ts_ms"),
        actor: last.get("actor"),
        action: last.get("action"),
        tenant: last.get("tenant"),
        kek_version: last.get("kek_version"),
        record_key_ids: last.get("record_key_ids"),
        outcome: last.get("outcome"),
        detail: last.get("detail"),
        prev_hash: last.get("prev_hash"),
        hash: last.get("hash"),
    };
    let mut chain = AuditChain::resume(instance, Some(&last)).unwrap();
    let forged = chain.seal(AuditEvent::new(
        last.ts_ms,
        "spiffe://test/officer",
        "tenant.shred",
        Outcome::Ok,
    ));
    sqlx::query("INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        .bind(&forged.instance)
        .bind(forged.seq)
        .bind(forged.ts_ms)
        .bind(&forged.actor)
        .bind(&forged.action)
        .bind(&forged.tenant)
        .bind(forged.kek_version)
        .bind(&forged.record_key_ids)
        .bind(&forged.outcome)
        .bind(&forged.detail)
        .bind(&forged.prev_hash)
        .bind(&forged.hash)
        .execute(&mut *conn)
        .await
        .unwrap();
    forged.seq
}

/// The writer continues after a failed commit only from a head it wrote:
/// an event slipped into the database behind its back is never signed
/// over, and nothing more is recorded (so nothing audited is done) until
/// a restart.
#[tokio::test(flavor = "multi_thread")]
async fn the_writer_stops_at_events_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    traffic(&ks).await;
    let forged = forge_event(&mut db(&ks).await, "ks-test").await;

    // The next commit collides with the forged event and fails.
    let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!((status, &body["error"]["code"]), (503, &json!("audit_unavailable")), "{body}");
    // It does not carry on from there.
    for _ in 0..3 {
        let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
        assert_eq!(status, 503, "{body}");
    }
    let (status, _) = ks.get(ADMIN, "/readyz").await;
    assert_eq!(status, 503);
    assert!(ks.log().contains("which this writer did not write"), "{}", ks.log());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut conn = db(&ks).await;
    let (head, signed): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT MAX(seq) FROM audit_events), (SELECT MAX(seq) FROM audit_checkpoints)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(head, forged, "nothing was chained onto the forged event");
    assert!(signed.unwrap() < forged, "no checkpoint signs the forged event");

    // Restarted, it takes the chain as it is, and says in it which events
    // no signature covered when it came up.
    let mut ks = ks;
    ks.restart();
    let resume = resumes(&ks).await;
    assert_eq!(resume.len(), 1, "{resume:?}");
    assert_eq!(resume[0]["detail"]["unsigned_to"], forged);
    assert!(resume[0]["detail"]["unsigned_from"].as_i64().unwrap() <= forged);
    let (status, _) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 200);
    assert_eq!(verify(&ks).await["ok"], true);
}

/// The `audit.resume` events in the export.
async fn resumes(ks: &KeyService) -> Vec<Value> {
    let (status, export) = ks.get(AUDITOR, "/v1/audit").await;
    assert_eq!(status, 200);
    export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "audit.resume")
        .collect()
}

/// After a crash, the events its last checkpoint did not reach are named
/// at start-up; a clean stop leaves none. Signed events deleted stop
/// start-up.
#[tokio::test(flavor = "multi_thread")]
async fn start_up_names_an_unsigned_tail_and_refuses_a_cut_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyService::start(dir.path(), "");
    traffic(&ks).await;
    // The interval checkpoint came during the wait; these two commits,
    // made at once, are not signed before the process dies.
    for _ in 0..2 {
        let (status, _) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
        assert_eq!(status, 200);
    }
    ks.kill();
    ks.resume();
    let resume = resumes(&ks).await;
    assert_eq!(resume.len(), 1, "{resume:?}");
    let (from, to) = (&resume[0]["detail"]["unsigned_from"], &resume[0]["detail"]["unsigned_to"]);
    let unsigned = to.as_i64().unwrap() - from.as_i64().unwrap() + 1;
    assert!((1..=2).contains(&unsigned), "{resume:?}");
    assert_eq!(verify(&ks).await["ok"], true);
    ks.restart();
    assert_eq!(resumes(&ks).await.len(), 1, "a clean stop signs its head");

    ks.stop();
    let mut conn = db(&ks).await;
    sqlx::query(
        "DELETE FROM audit_events WHERE seq > (SELECT MAX(seq) FROM audit_checkpoints) - 3",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    let config = dir.path().join("keygate.toml");
    let args = [std::ffi::OsStr::new("server"), "--config".as_ref(), config.as_os_str()];
    let (ok, stderr) = keygate_tests::keyservice::run_to_exit(&args, &[]);
    assert!(!ok, "started on a cut chain: {stderr}");
    assert!(stderr.contains("signed events were deleted"), "{stderr}");
}

/// A chain whose signing key row is gone is not signed with a new key:
/// that would vouch for whatever its events say now.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_signing_key_is_not_replaced_over_existing_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyService::start(dir.path(), "");
    traffic(&ks).await;
    ks.stop();
    let mut conn = db(&ks).await;
    sqlx::query("DELETE FROM audit_signing_keys").execute(&mut conn).await.unwrap();
    drop(conn);
    let config = dir.path().join("keygate.toml");
    let args = [std::ffi::OsStr::new("server"), "--config".as_ref(), config.as_os_str()];
    let (ok, stderr) = keygate_tests::keyservice::run_to_exit(&args, &[]);
    assert!(!ok, "started with a new signing key: {stderr}");
    assert!(stderr.contains("no signing key"), "{stderr}");
}

/// A change the keystore did not confirm (its COMMIT lost, or no answer
/// in time) may have been made: its failure event says `outcome_unknown`,
/// so the chain does not claim a failure that may not be one. A change
/// that certainly failed says no such thing.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_of_unknown_outcome_is_audited_as_such() {
    use gateway::audit_log::AuditLog;
    use gateway::error::{ApiError, store_error};
    use kms_core::audit::{AuditEvent, Outcome};
    use kms_core::store::StoreError;

    let dir = tempfile::tempdir().unwrap();
    let hierarchy =
        keygate_tests::open_hierarchy(dir.path(), std::time::Duration::from_secs(60)).await;
    let config = gateway::config::AuditConfig::default();
    let metrics = std::sync::Arc::new(gateway::metrics::Metrics::default());
    let (log, _writer) = AuditLog::start(&hierarchy, "ks-a", &config, metrics).await.unwrap();
    for (error, code, unknown) in [
        (StoreError::OutcomeUnknown("COMMIT lost".into()), "outcome_unknown", true),
        (StoreError::Unavailable("refused".into()), "store_unavailable", false),
    ] {
        let refusal = store_error(&error);
        let event = |outcome: Outcome| AuditEvent::new(1, ADMIN, "kek.rotate", outcome);
        let result: Result<(), ApiError> = log.before(event, async move { Err(refusal) }).await;
        assert_eq!(result.unwrap_err().code(), code);
        let row = hierarchy.store().last_audit_row("ks-a").await.unwrap().unwrap();
        assert_eq!((row.action.as_str(), row.outcome.as_str()), ("kek.rotate", "error"));
        let detail: Value = serde_json::from_str(&row.detail).unwrap();
        assert_eq!(detail.get("outcome_unknown") == Some(&json!(true)), unknown, "{detail}");
    }
}
