//! Three key-service replicas on one PostgreSQL database, with sidecars
//! spread over them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keygate_tests::cluster::Cluster;
use keygate_tests::sidecar::Sidecar;
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const AUDITOR: &str = "spiffe://test/auditor";
const SIDECAR: &str = "spiffe://test/sidecar-clinical";

fn patient(i: usize) -> Value {
    json!({"ssn": format!("123-45-{i:04}"), "diagnosis": format!("dx-{i}"), "mrn": format!("M{i}"), "age": i})
}

fn header_version(record: &Value) -> u32 {
    kms_core::record::RecordHeader::parse(record["_kg"].as_str().unwrap()).unwrap().kek_version()
}

fn sidecar(cluster: &Cluster, name: &str, replicas: &[usize], extra: &str) -> Sidecar {
    let urls: Vec<String> = replicas.iter().map(|i| cluster.replicas[*i].url.clone()).collect();
    Sidecar::start_with(&cluster.pki, &urls, &cluster.dir().join(name), SIDECAR, extra)
}

async fn encrypt(sc: &Sidecar, i: usize) -> Result<Value, (u16, Value)> {
    let (status, body) = sc
        .post("/v1/encrypt", &json!({"tenant": "onc", "schema": "patient", "record": patient(i)}))
        .await;
    if status == 200 { Ok(body["record"].clone()) } else { Err((status, body)) }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_rotations_across_replicas_leave_one_active_version() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = std::sync::Arc::new(Cluster::start(dir.path(), 3, ""));
    let (status, body) =
        cluster.replicas[0].post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201, "{body}");
    let sc = sidecar(
        &cluster,
        "s1",
        &[1],
        "[pool]\nbatch = 5\nlow_water = 1\nttl_secs = 1\n[cache]\nttl_secs = 1\n",
    );
    let before = encrypt(&sc, 1).await.unwrap();

    let rotations: Vec<_> = (0..9)
        .map(|i| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                cluster.replicas[i % 3].post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for r in rotations {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
        versions.push(body["version"].as_u64().unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=10).collect::<Vec<_>>(), "each rotation got its own version");
    for replica in &cluster.replicas {
        let (_, text) = replica.get(ADMIN, "/v1/tenants/onc").await;
        let view: Value = serde_json::from_str(&text).unwrap();
        let active: Vec<&Value> = view["versions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] == "active")
            .collect();
        assert_eq!(active.len(), 1, "{view}");
        assert_eq!(view["active_version"], 10);
    }
    // Records from before and after all decrypt, through another replica.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = encrypt(&sc, 2).await.unwrap();
    let other = sidecar(&cluster, "s2", &[2], "");
    for record in [before, after] {
        let (status, body) = other.post("/v1/decrypt", &json!({"record": record})).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_on_one_replica_reaches_a_sidecar_of_another_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Key-service caches hold for 60 s: only the NOTIFY makes replica B see
    // the rotation promptly. The sidecar's own bound is 2 s.
    let cluster = Cluster::start(dir.path(), 2, "[keys]\nkek_ttl_secs = 60\n");
    let (status, _) =
        cluster.replicas[0].post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let sc = sidecar(
        &cluster,
        "s",
        &[1],
        "[pool]\nbatch = 5\nlow_water = 1\nttl_secs = 2\n[cache]\nttl_secs = 2\n",
    );
    assert_eq!(header_version(&encrypt(&sc, 1).await.unwrap()), 1);
    let (status, _) =
        cluster.replicas[0].post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await;
    assert_eq!(status, 200);
    let rotated = Instant::now();
    let bound = Duration::from_secs(2 + 2 + 5); // pool TTL + cache TTL + slack
    loop {
        let record = encrypt(&sc, 2).await.unwrap();
        if header_version(&record) == 2 {
            break;
        }
        assert!(rotated.elapsed() < bound, "the sidecar behind replica B still encrypts under v1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_replica_mid_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), 3, "");
    let (status, _) =
        cluster.replicas[0].post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let extra = "[pool]\nbatch = 3\nlow_water = 1\n[cache]\nttl_secs = 1\n";
    let s1 = sidecar(&cluster, "s1", &[1, 0], extra);
    let s2 = sidecar(&cluster, "s2", &[1, 2], extra);

    let mut acknowledged = Vec::new();
    for i in 0..60 {
        if i == 20 {
            cluster.replicas[1].kill(); // SIGKILL, mid-load
        }
        for sc in [&s1, &s2] {
            // Requests in flight when the replica dies may fail; every
            // record the sidecar returned must be durable.
            if let Ok(record) = encrypt(sc, i).await {
                acknowledged.push(record);
            }
        }
    }
    assert!(
        acknowledged.len() >= 100,
        "the sidecars failed over: {} acknowledged",
        acknowledged.len()
    );

    tokio::time::sleep(Duration::from_millis(1200)).await; // let DEK caches expire
    let checker = sidecar(&cluster, "checker", &[2, 0], "[cache]\nttl_secs = 0\n");
    let mut ids = HashSet::new();
    for chunk in acknowledged.chunks(50) {
        let (status, body) = checker.post("/v1/decrypt", &json!({"records": chunk})).await;
        assert_eq!(status, 200, "every acknowledged record decrypts: {body}");
        for report in body["report"].as_array().unwrap() {
            ids.insert(report["record_key_id"].as_str().unwrap().to_owned());
        }
    }
    // Every DEK behind an acknowledged record has its issue event.
    let (_, export) = cluster.replicas[0].get(AUDITOR, "/v1/audit?tenant=onc&limit=100000").await;
    let mut issued = HashSet::new();
    for line in export.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        if event["action"] == "dek.issue" {
            for id in event["record_key_ids"].as_array().unwrap() {
                issued.insert(id.as_str().unwrap().to_owned());
            }
        }
    }
    assert!(
        ids.is_subset(&issued),
        "{} acknowledged DEKs lack an issue event",
        ids.difference(&issued).count()
    );
    let (_, verify) = cluster.replicas[0].get(AUDITOR, "/v1/audit/verify").await;
    let verify: Value = serde_json::from_str(&verify).unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["instances"].as_array().unwrap().len(), 3, "one chain per replica: {verify}");
}
