//! The binary forms of `POST /v1/tenants/{t}/datakeys/unwrap` and of the
//! answer to `POST /v1/tenants/{t}/datakeys` (what the sidecar sends and
//! asks for) against a real key service: the bytes are assembled and read
//! here by hand, so the layouts are pinned independently of
//! `gateway::unwrap_binary` and `gateway::issue_binary`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use keygate_tests::keyservice::KeyService;
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";
const DEC: &str = "spiffe://test/decryptor";
const AUDITOR: &str = "spiffe://test/auditor";
const BINARY: &str = "application/vnd.keygate.unwrap.v1";
const ISSUED: &str = "application/vnd.keygate.datakeys.v1";
const PATH: &str = "/v1/tenants/onc/datakeys/unwrap";

/// A key service with tenant `onc`, batches of at most 4 and bodies of at
/// most 4 KiB; and three issued keys.
async fn started() -> (tempfile::TempDir, KeyService, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "[limits]\nmax_batch = 4\nmax_body_bytes = 4096\n");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let (status, issued) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 3})).await;
    assert_eq!(status, 200, "{issued}");
    (dir, ks, issued["keys"].as_array().unwrap().clone())
}

/// One request item: record key id, KEK version (big-endian), wrapped DEK.
fn item(key: &Value, version: u32, tamper: bool) -> Vec<u8> {
    let mut out = HEXLOWER.decode(key["record_key_id"].as_str().unwrap().as_bytes()).unwrap();
    out.extend_from_slice(&version.to_be_bytes());
    let mut wrapped = BASE64URL_NOPAD.decode(key["wrapped"].as_str().unwrap().as_bytes()).unwrap();
    if tamper {
        wrapped[30] ^= 1;
    }
    assert_eq!((out.len(), wrapped.len()), (20, 60));
    out.extend_from_slice(&wrapped);
    out
}

/// A request: the purpose's length, the purpose, the items.
fn request(purpose: &str, items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![u8::try_from(purpose.len()).unwrap()];
    out.extend_from_slice(purpose.as_bytes());
    items.iter().for_each(|i| out.extend_from_slice(i));
    out
}

/// POSTs `body` as `content_type`; status, media type and body.
async fn post(
    ks: &KeyService,
    identity: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, String, Vec<u8>) {
    let response = ks
        .client(identity)
        .post(format!("{}{PATH}", ks.url))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    answer(response).await
}

/// Status, media type and body of an answer.
async fn answer(response: reqwest::Response) -> (u16, String, Vec<u8>) {
    let status = response.status().as_u16();
    let media = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, media, response.bytes().await.unwrap().to_vec())
}

fn error_code(body: &[u8]) -> String {
    let body: Value = serde_json::from_slice(body).unwrap();
    body["error"]["code"].as_str().unwrap().to_owned()
}

/// The `dek.unwrap` events of the exported chain.
async fn unwrap_events(ks: &KeyService) -> Vec<Value> {
    let (status, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    assert_eq!(status, 200);
    export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "dek.unwrap")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_form_answers_like_json_and_is_audited_alike() {
    let (_dir, ks, keys) = started().await;
    let body = request(
        "treatment",
        &[item(&keys[0], 1, false), item(&keys[1], 1, true), item(&keys[2], 9, false)],
    );
    let (status, media, answer) = post(&ks, DEC, BINARY, body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(media, BINARY, "answered in the form it was asked in");

    // The active version, then per item a key (tag 0) or a code.
    assert_eq!(&answer[..4], &1u32.to_be_bytes());
    let dek = BASE64URL_NOPAD.decode(keys[0]["dek"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(answer[4], 0);
    assert_eq!(&answer[5..37], &dek[..], "the issued DEK");
    let mut rest = &answer[37..];
    let mut codes = Vec::new();
    while let Some((&len, after)) = rest.split_first() {
        let (code, after) = after.split_at(usize::from(len));
        codes.push(String::from_utf8(code.to_vec()).unwrap());
        rest = after;
    }
    assert_eq!(codes, ["cannot_decrypt", "unknown_version"]);

    // The same items as JSON give the same key and codes.
    let json_items: Vec<Value> = [(0, 1), (2, 9)]
        .iter()
        .map(|&(i, v)| json!({"record_key_id": keys[i]["record_key_id"], "kek_version": v, "wrapped": keys[i]["wrapped"]}))
        .collect();
    let (status, json_answer) = ks.post(DEC, PATH, &json!({"items": json_items})).await;
    assert_eq!(status, 200);
    assert_eq!(json_answer["results"][0]["dek"], keys[0]["dek"]);
    assert_eq!(json_answer["results"][1]["error"], "unknown_version");

    // One event for the binary call: the key that left, the failures, the purpose.
    let events = unwrap_events(&ks).await;
    assert_eq!(events.len(), 2, "{events:?}");
    let event = &events[0];
    assert_eq!(event["actor"], DEC);
    assert_eq!(event["record_key_ids"], json!([keys[0]["record_key_id"]]));
    assert_eq!(event["detail"]["failed"], 2);
    assert_eq!(event["detail"]["purpose"], "treatment");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_binary_request_is_refused_before_any_key_is_unwrapped() {
    let (_dir, ks, keys) = started().await;
    let one = item(&keys[0], 1, false);
    let good = request("", std::slice::from_ref(&one));
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("empty", DEC, vec![], 400, "malformed_body"),
        ("cut short", DEC, good[..good.len() - 1].to_vec(), 400, "malformed_body"),
        ("a byte too many", DEC, [&good[..], &[0]].concat(), 400, "malformed_body"),
        ("purpose longer than the body", DEC, vec![40, b'a'], 400, "malformed_body"),
        (
            "purpose not a name",
            DEC,
            request("Care!", std::slice::from_ref(&one)),
            400,
            "malformed_body",
        ),
        ("over max_batch", DEC, request("", &vec![one.clone(); 5]), 400, "batch_too_large"),
        ("over max_body_bytes", DEC, request("", &vec![one.clone(); 52]), 413, "body_too_large"),
        ("not a decryptor", ENC, good.clone(), 403, "forbidden"),
    ];
    for (what, identity, body, status, code) in cases {
        let (got, media, answer) = post(&ks, identity, BINARY, body).await;
        assert_eq!((got, error_code(&answer).as_str()), (status, code), "{what}");
        assert_eq!(media, "application/json", "{what}: errors are JSON");
    }
    // Another media type is neither form.
    let (status, _, answer) = post(&ks, DEC, "application/octet-stream", good.clone()).await;
    assert_eq!((status, error_code(&answer).as_str()), (415, "unsupported_media_type"));
    assert!(unwrap_events(&ks).await.is_empty(), "nothing was unwrapped");

    // The good one still works, with its media type's parameters too.
    let (status, _, answer) = post(&ks, DEC, &format!("{BINARY}; charset=binary"), good).await;
    assert_eq!((status, answer.len()), (200, 4 + 33));
    assert_eq!(unwrap_events(&ks).await.len(), 1);
}

/// Asks `identity` for `count` keys with `accept` (none if empty); status,
/// media type and body.
async fn issue(
    ks: &KeyService,
    identity: &str,
    accept: &str,
    count: usize,
) -> (u16, String, Vec<u8>) {
    let mut request = ks
        .client(identity)
        .post(format!("{}/v1/tenants/onc/datakeys", ks.url))
        .json(&json!({ "count": count }));
    if !accept.is_empty() {
        request = request.header("accept", accept);
    }
    answer(request.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn issued_keys_come_in_the_binary_form_only_when_asked_and_unwrap_like_json_ones() {
    let (_dir, ks, _) = started().await;
    let (status, media, answer) = issue(&ks, ENC, ISSUED, 3).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(media, ISSUED);
    // The version, then per key: id (16), wrapped DEK (60), DEK (32).
    assert_eq!(answer.len(), 4 + 3 * 108);
    assert_eq!(&answer[..4], &1u32.to_be_bytes());
    let keys: Vec<&[u8]> = answer[4..].chunks(108).collect();
    let ids: Vec<String> = keys.iter().map(|k| HEXLOWER.encode(&k[..16])).collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "fresh ids");
    assert!(keys[0][76..] != keys[1][76..], "fresh keys");

    // Each wrapped DEK unwraps (as JSON) to the DEK that came with it.
    let items: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({
                "record_key_id": HEXLOWER.encode(&k[..16]),
                "kek_version": 1,
                "wrapped": BASE64URL_NOPAD.encode(&k[16..76]),
            })
        })
        .collect();
    let (status, unwrapped) = ks.post(DEC, PATH, &json!({ "items": items })).await;
    assert_eq!(status, 200, "{unwrapped}");
    for (result, key) in unwrapped["results"].as_array().unwrap().iter().zip(&keys) {
        assert_eq!(result["dek"], BASE64URL_NOPAD.encode(&key[76..]));
    }

    // Audited like a JSON issue: the ids that left.
    let (status, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    assert_eq!(status, 200);
    let issues: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "dek.issue")
        .collect();
    assert_eq!(issues.last().unwrap()["record_key_ids"], json!(ids));

    // Not asked, asked never, or JSON preferred: the answer is JSON.
    for accept in [
        "",
        "application/json",
        "*/*",
        &format!("{ISSUED};q=0, application/json"),
        &format!("application/json, {ISSUED};q=0.1"),
    ] {
        let (status, media, answer) = issue(&ks, ENC, accept, 2).await;
        assert_eq!((status, media.as_str()), (200, "application/json"), "{accept:?}");
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["keys"].as_array().unwrap().len(), 2, "{accept:?}");
    }
    // What the sidecar sends.
    let (_, media, answer) = issue(&ks, ENC, &format!("{ISSUED}, application/json;q=0.5"), 1).await;
    assert_eq!((media.as_str(), answer.len()), (ISSUED, 4 + 108));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_issue_is_a_json_error_whatever_was_asked() {
    let (_dir, ks, _) = started().await;
    let (_, before) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    for (what, identity, count, status, code) in [
        ("not an encryptor", DEC, 1, 403, "forbidden"),
        ("over max_batch", ENC, 5, 400, "batch_too_large"),
        ("no key", ENC, 0, 400, "batch_too_large"),
    ] {
        let (got, media, answer) = issue(&ks, identity, ISSUED, count).await;
        assert_eq!((got, error_code(&answer).as_str()), (status, code), "{what}");
        assert_eq!(media, "application/json", "{what}: errors are JSON");
    }
    let (_, after) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let issued = |export: &str| export.lines().filter(|l| l.contains("\"dek.issue\"")).count();
    assert_eq!(issued(&after), issued(&before), "no key was issued");
}
