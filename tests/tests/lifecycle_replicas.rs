//! The lifecycle across key-service replicas on one PostgreSQL database:
//! a shred reaches every replica's cache at once (NOTIFY), scheduled
//! rotations run on one replica, once per period, and a master rotation
//! run on one replica is followed by the others.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::time::{Duration, Instant};

use keygate_tests::cluster::Cluster;
use keygate_tests::keyservice::write_private;
use keygate_tests::providers::softhsm2::{self, SoftHsm2};
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const OFFICER: &str = "spiffe://test/officer";
const AUDITOR: &str = "spiffe://test/auditor";
const ENCRYPTOR: &str = "spiffe://test/encryptor";
const DECRYPTOR: &str = "spiffe://test/decryptor";

#[tokio::test(flavor = "multi_thread")]
async fn a_shred_on_one_replica_empties_every_replicas_cache_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // KEKs stay cached for 10 minutes: only the notification can explain
    // the other replica forgetting them.
    let cluster = Cluster::start(dir.path(), 2, "[keys]\nkek_ttl_secs = 600\n");
    let (a, b) = (&cluster.replicas[0], &cluster.replicas[1]);
    for tenant in ["onc", "t-keep"] {
        let (status, body) = a.post(ADMIN, "/v1/tenants", &json!({"tenant": tenant})).await;
        assert_eq!(status, 201, "{body}");
    }
    let mut items = Vec::new();
    for tenant in ["onc", "t-keep"] {
        let (_, issued) = a
            .post(ENCRYPTOR, &format!("/v1/tenants/{tenant}/datakeys"), &json!({"count": 1}))
            .await;
        let key = &issued["keys"][0];
        items.push(json!({"record_key_id": key["record_key_id"], "kek_version": 1,
                          "wrapped": key["wrapped"]}));
    }
    let unwrap = |tenant: &str, item: &Value| {
        let body = json!({"items": [item]});
        let path = format!("/v1/tenants/{tenant}/datakeys/unwrap");
        async move { b.post(DECRYPTOR, &path, &body).await }
    };
    assert_eq!(unwrap("onc", &items[0]).await.0, 200, "B caches onc's KEK");

    let (status, request) =
        a.post(ADMIN, "/v1/tenants/onc/shred", &json!({"reason": "erasure request"})).await;
    assert_eq!(status, 202, "{request}");
    let id = request["id"].as_str().unwrap();
    // The approval may come through the other replica.
    let (status, done) =
        b.post(OFFICER, &format!("/v1/approvals/{id}"), &json!({"decision": "approve"})).await;
    assert_eq!((status, done["state"].as_str()), (200, Some("executed")), "{done}");
    let deadline = Instant::now() + Duration::from_secs(5);
    for replica in [a, b] {
        loop {
            let body = json!({"items": [items[0].clone()]});
            let (status, answer) =
                replica.post(DECRYPTOR, "/v1/tenants/onc/datakeys/unwrap", &body).await;
            if status == 410 {
                assert_eq!(answer["error"]["code"], "key_destroyed");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a replica still serves the shredded tenant: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(unwrap("t-keep", &items[1]).await.0, 200, "the other tenant is untouched");
    let (_, verify) = a.get(AUDITOR, "/v1/audit/verify").await;
    assert!(verify.contains("\"ok\":true"), "{verify}");
}

/// One replica (a scheduler round every 100 ms) with a shred of `onc`
/// requested, and the scheduler's job lock held from another store, as a
/// round on another replica holds it; the request's id.
async fn a_shred_request_and_a_round_elsewhere(
    dir: &std::path::Path,
) -> (Cluster, String, kms_core::store::JobLock) {
    use kms_core::store::{KeyStore, PgStoreOptions, PostgresStore};
    let cluster = Cluster::start(dir, 1, "[lifecycle]\nscheduler_interval_ms = 100\n");
    let a = &cluster.replicas[0];
    let (status, _) = a.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let (_, request) = a.post(ADMIN, "/v1/tenants/onc/shred", &json!({"reason": "erasure"})).await;
    let id = request["id"].as_str().unwrap().to_owned();
    let mut options = PgStoreOptions::default();
    options.schema = Some(cluster.schema.name.clone());
    let elsewhere =
        PostgresStore::connect(&keygate_tests::cluster::pg_url(), options).await.unwrap();
    // The replica's own scheduler takes the lock every 100 ms, briefly.
    for _ in 0..100 {
        if let Some(lock) = elsewhere.try_job_lock("lifecycle").await.unwrap() {
            return (cluster, id, lock);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the lock is never free between scheduler rounds");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shred_approved_during_a_scheduler_round_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, id, lock) = a_shred_request_and_a_round_elsewhere(dir.path()).await;
    let (a, id) = (&cluster.replicas[0], id.as_str());
    let (status, decided) =
        a.post(OFFICER, &format!("/v1/approvals/{id}"), &json!({"decision": "approve"})).await;
    assert_eq!(
        (status, decided["state"].as_str()),
        (200, Some("approved")),
        "left to the scheduler, not run beside it: {decided}"
    );
    drop(lock);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, all) = a.get(OFFICER, "/v1/approvals").await;
        if all.contains("\"executed\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the scheduler never ran it: {all}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, export) = a.get(AUDITOR, "/v1/audit").await;
    let shreds = export.lines().filter(|l| l.contains("\"tenant.shred\"")).count();
    assert_eq!(shreds, 1, "{export}");
}

/// An officer's withdrawal does not wait for a scheduler round (one over
/// thousands of due tenants can take long), and still wins over the round
/// that would have run the shred: the keystore makes the two exclusive.
#[tokio::test(flavor = "multi_thread")]
async fn a_shred_is_withdrawn_while_a_scheduler_round_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, id, lock) = a_shred_request_and_a_round_elsewhere(dir.path()).await;
    let (a, id) = (&cluster.replicas[0], id.as_str());
    let (status, decided) =
        a.post(OFFICER, &format!("/v1/approvals/{id}"), &json!({"decision": "approve"})).await;
    assert_eq!((status, decided["state"].as_str()), (200, Some("approved")), "{decided}");
    // A mistaken approval, withdrawn while the round still runs.
    let started = Instant::now();
    let body = json!({"decision": "reject", "comment": "wrong tenant"});
    let (status, withdrawn) = a.post(OFFICER, &format!("/v1/approvals/{id}"), &body).await;
    assert_eq!((status, withdrawn["state"].as_str()), (200, Some("rejected")), "{withdrawn}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    drop(lock);

    // Rounds run again, and leave the tenant's keys alone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, issued) =
        a.post(ENCRYPTOR, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 200, "{issued}");
    let (_, export) = a.get(AUDITOR, "/v1/audit").await;
    assert!(!export.contains("\"tenant.shred\""), "{export}");
    assert!(export.contains("\"shred.withdraw\""), "{export}");
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_rotation_runs_once_per_period_across_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 3, "[lifecycle]\nscheduler_interval_ms = 100\n");
    let first = &cluster.replicas[0];
    let (status, _) = first.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let response = first
        .client(ADMIN)
        .put(format!("{}/v1/tenants/onc/keys/auto-rotate", first.url))
        .json(&json!({"every_secs": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    let (_, body) = first.get(ADMIN, "/v1/tenants/onc").await;
    let tenant: Value = serde_json::from_str(&body).unwrap();
    let created: Vec<i64> = tenant["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["created_at"].as_i64().unwrap())
        .collect();
    assert!(created.len() >= 3 && created.len() <= 5, "{created:?}");
    for pair in created.windows(2) {
        assert!(pair[1] - pair[0] >= 2, "two rotations within one period: {created:?}");
    }
    // Each rotation was done (and audited) by exactly one replica.
    let (_, export) = first.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let scheduled: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["actor"] == "keygate:scheduler" && e["outcome"] == "ok")
        .collect();
    let mut versions: Vec<i64> =
        scheduled.iter().map(|e| e["kek_version"].as_i64().unwrap()).collect();
    versions.sort_unstable();
    let expected: Vec<i64> = (2..=created.len() as i64).collect();
    assert_eq!(versions, expected, "one scheduled event per new version");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_master_rotation_on_one_replica_is_followed_by_every_replica() {
    let token = SoftHsm2::new_token();
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    write_private(&pin, softhsm2::USER_PIN);
    let conf = token.conf();
    let create = dir.path().join("create.toml");
    std::fs::write(
        &create,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[tls]\ncert = \"x\"\nkey = \"x\"\nclient_ca = \"x\"\n{}\
             [policy]\nfile = \"p\"\n",
            token.root_section(&pin.display().to_string())
        ),
    )
    .unwrap();
    token.create_key_with_cli(&create);
    // Replica B keeps unwrapped KEKs for one second only: after the
    // rotation it must unwrap them again, from whichever master holds them.
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap())];
    // Both replicas run with a local root, so the HSM's module is listed.
    let extra = format!(
        "[keys]\nkek_ttl_secs = 1\n[trusted_masters]\npkcs11_modules = [{:?}]\n",
        token.module()
    );
    let cluster = Cluster::start_with_env(dir.path(), 2, &extra, &env);
    let (a, b) = (&cluster.replicas[0], &cluster.replicas[1]);

    let mut deks = Vec::new();
    for i in 0..20 {
        let tenant = format!("t-{i:02}");
        let (status, body) = a.post(ADMIN, "/v1/tenants", &json!({"tenant": tenant})).await;
        assert_eq!(status, 201, "{body}");
        let (status, issued) = a
            .post(ENCRYPTOR, &format!("/v1/tenants/{tenant}/datakeys"), &json!({"count": 1}))
            .await;
        assert_eq!(status, 200, "{issued}");
        deks.push((tenant, issued["keys"][0].clone()));
    }
    let unwrap_all_on = |replica: &'static str| {
        let ks = if replica == "a" { a } else { b };
        let deks = deks.clone();
        async move {
            for (tenant, key) in deks {
                let item = json!({"record_key_id": key["record_key_id"], "kek_version": 1,
                                  "wrapped": key["wrapped"]});
                let (status, body) = ks
                    .post(
                        DECRYPTOR,
                        &format!("/v1/tenants/{tenant}/datakeys/unwrap"),
                        &json!({"items": [item]}),
                    )
                    .await;
                assert_eq!(status, 200, "{replica} {tenant}: {body}");
                assert_eq!(body["results"][0]["dek"], key["dek"], "{replica} {tenant}");
            }
        }
    };
    unwrap_all_on("b").await;

    let to = json!({"to": {
        "provider": "pkcs11",
        "module": token.module(),
        "token_label": softhsm2::TOKEN_LABEL,
        "key_label": softhsm2::KEY_LABEL,
        "pin_file": pin,
    }});
    let (status, done) = a.post(ADMIN, "/v1/master/rotate", &to).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!((done["state"].as_str(), done["remaining"].as_u64()), (Some("complete"), Some(0)));

    // B learns the new master from the keystore: it unwraps every tenant's
    // KEK under it, wraps a new tenant's keys under it, and reports it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    unwrap_all_on("b").await;
    let (status, body) = b.post(ADMIN, "/v1/tenants", &json!({"tenant": "t-after"})).await;
    assert_eq!(status, 201, "{body}");
    let (_, masters) = b.get(AUDITOR, "/v1/master").await;
    let masters: Value = serde_json::from_str(&masters).unwrap();
    assert_eq!(masters["active"]["kind"], "pkcs11", "{masters}");
    let wrapped: Vec<(String, u64)> = masters["masters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["kind"].as_str().unwrap().to_owned(), m["keys_wrapped"].as_u64().unwrap()))
        .collect();
    // 21 tenants (KEK v1 + index root each) and one audit signing key per
    // replica, all under the HSM key; nothing left under the old one.
    assert!(wrapped.contains(&("pkcs11".to_owned(), 2 * 21 + 2)), "{wrapped:?}");
    assert!(wrapped.contains(&("local".to_owned(), 0)), "{wrapped:?}");
    unwrap_all_on("a").await;
    for replica in [a, b] {
        let (_, verify) = replica.get(AUDITOR, "/v1/audit/verify").await;
        assert!(verify.contains("\"ok\":true"), "{verify}");
    }
}
