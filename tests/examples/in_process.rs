//! keygate's main job, in one process, on embedded defaults: a local root
//! key (development only), the SQLite keystore, one tenant, one record
//! encrypted field by field and decrypted with need-to-know.
//!
//! ```text
//! cargo run -p keygate-tests --example in_process [DATA_DIR]
//! ```
//! With no DATA_DIR a temporary directory is used and removed afterwards;
//! with one, the root key and keystore persist there between runs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // an example, not library code

use std::time::Duration;

use keygate_tests::{PATIENT_SCHEMA, open_hierarchy, tenant};
use kms_core::DekRequest;
use kms_core::record::{Disclosure, EncryptedRecord, encrypt_record};
use kms_core::schema::SchemaSet;
use serde_json::json;

#[tokio::main]
async fn main() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = std::env::args_os().nth(1).map_or_else(|| temp.path().to_owned(), Into::into);
    let hierarchy = open_hierarchy(&dir, Duration::from_secs(60)).await;
    let demo = tenant("demo");
    if hierarchy.tenant(&demo).await.is_err() {
        hierarchy.create_tenant(&demo).await.expect("create tenant");
    }
    let set = SchemaSet::from_toml(PATIENT_SCHEMA, "patient.toml").expect("schema");
    let schema = set.latest("patient").expect("patient schema");
    let keys = hierarchy.schema_keys(&demo, schema).await.expect("index keys");

    let record = json!({
        "ssn": "123-45-6789", "mrn": "MRN-000123", "email": "Jane.Roe@example.org",
        "diagnosis": "C50.9 malignant neoplasm of breast", "patient_id": "P-42",
        "allergies": ["penicillin", "latex"], "age": 51
    });
    let dek = hierarchy.issue_deks(&demo, 1).await.expect("issue DEK").remove(0);
    let encrypted = encrypt_record(record.clone(), &demo, schema, &keys, dek).expect("encrypt");
    println!("DEVELOPMENT SETUP: the root key is a local file, not an HSM or KMS.");
    println!("data dir:  {}", dir.display());
    println!("plaintext: {record}");
    println!("encrypted: {}", serde_json::to_string_pretty(&encrypted).unwrap());

    let parsed = EncryptedRecord::parse(encrypted).expect("parse");
    let header = parsed.header();
    let request = DekRequest {
        record_key_id: *header.record_key_id(),
        kek_version: header.kek_version(),
        wrapped: *header.wrapped_dek(),
    };
    let dek =
        hierarchy.unwrap_deks(&demo, &[request]).await.expect("unwrap").remove(0).expect("DEK");
    // A caller cleared for contact data only: identifiers masked, clinical data withheld.
    let view = parsed
        .decrypt(&dek, schema, &keys, &|field| match field.class.as_str() {
            "pii.contact" | "pii.identifier" => Disclosure::Reveal,
            "phi.identifier" => Disclosure::Mask,
            _ => Disclosure::Withhold,
        })
        .expect("decrypt");
    println!("contact-only view: {}", view.record);
    for field in &view.fields {
        println!("  {:<14} {:<16} {:?}", field.pointer, field.class, field.outcome);
    }
}
