//! Round-trips a patient record through a running keygate sidecar.
//!
//! ```text
//! keygate up                                   # a development sidecar at ./keygate-dev/sidecar.sock
//! cargo run -p keygate-sdk --example quickstart
//! KEYGATE_SIDECAR=http://127.0.0.1:7070 cargo run -p keygate-sdk --example quickstart
//! ```
//!
//! `KEYGATE_SIDECAR` is a socket path or an `http(s)://` URL (default
//! `./keygate-dev/sidecar.sock`); `KEYGATE_SIDECAR_TOKEN_FILE`, if set, names a
//! file holding the sidecar's bearer token. It uses the `demo` tenant and the
//! `patient` schema that `keygate up` creates.

use std::error::Error as _;
use std::process::ExitCode;

use keygate_sdk::{Client, Decrypted, Error};
use serde::{Deserialize, Serialize};

const DEFAULT_SIDECAR: &str = "./keygate-dev/sidecar.sock";
const TENANT: &str = "demo";
const SCHEMA: &str = "patient";

/// A patient as the application sees it. Protected fields may come back
/// withheld (absent) or masked (a string), so they are `Option<String>`.
#[derive(Debug, Serialize, Deserialize)]
struct Patient {
    patient_id: String,
    mrn: Option<String>,
    ssn: Option<String>,
    email: Option<String>,
    diagnosis: Option<String>,
    #[serde(default)]
    allergies: Vec<Option<String>>,
    age: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            if matches!(err, Error::Connect { .. }) {
                eprintln!("is a sidecar running? `keygate up` starts one at {DEFAULT_SIDECAR}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let address = std::env::var("KEYGATE_SIDECAR").unwrap_or_else(|_| DEFAULT_SIDECAR.to_owned());
    let mut builder = Client::builder().endpoint(&address);
    if let Some(path) = std::env::var_os("KEYGATE_SIDECAR_TOKEN_FILE") {
        builder = builder.bearer_token_file(path);
    }
    let client = builder.build()?;
    println!("sidecar:   {address}");
    client.health().await?;
    let readiness = client.ready().await?;
    println!("ready:     {} {}", readiness.ready, readiness.detail);

    let jane = Patient {
        patient_id: "P-42".into(),
        mrn: Some("MRN-000123".into()),
        ssn: Some("123-45-6789".into()),
        email: Some("Jane.Roe@example.org".into()),
        diagnosis: Some("C50.9 malignant neoplasm of breast".into()),
        allergies: vec![Some("penicillin".into()), Some("latex".into())],
        age: 51,
    };
    println!("plaintext: {}", to_json(&jane));

    let stored = client.encrypt(TENANT, SCHEMA, &jane).await?;
    println!("encrypted: {}", to_json(&stored));

    let token = client.index(TENANT, SCHEMA, "/email", " jane.roe@EXAMPLE.org", None).await?;
    let matches = stored.get("email_bidx").and_then(|v| v.as_str()) == Some(token.as_str());
    println!("email index token: {token} (the stored email_bidx member matches: {matches})");
    let pseudonym = client.pseudonym(TENANT, SCHEMA, "P-42").await?;
    println!("pseudonym of P-42: {pseudonym}");

    let view: Decrypted<Patient> = client.decrypt(&stored, Some("treatment")).await?;
    println!("decrypted for treatment: {:?}", view.partial_record());
    print_report(&view);
    // Only a fully revealed record may be edited and encrypted again: a
    // masked or withheld field written back would replace the real value.
    match view.into_record() {
        Ok(patient) => println!("editable:  every field revealed ({})", patient.patient_id),
        Err(err) => println!("read-only: {err}"),
    }

    let others = [
        Patient { patient_id: "P-43".into(), age: 34, ..without_phi() },
        Patient { patient_id: "P-44".into(), ssn: Some("987-65-4321".into()), ..without_phi() },
    ];
    let batch = client.encrypt_batch(TENANT, SCHEMA, &others).await?;
    let views = client.decrypt_batch::<Patient, _>(&batch, Some("treatment")).await?;
    println!("batch: encrypted and decrypted {} records in one round trip each", views.len());

    let rewrapped = client.rewrap(&stored).await?;
    println!(
        "rewrap:    {}",
        if rewrapped.changed { "moved to the active key version" } else { "already current" }
    );
    Ok(())
}

fn without_phi() -> Patient {
    Patient {
        patient_id: String::new(),
        mrn: None,
        ssn: None,
        email: None,
        diagnosis: None,
        allergies: Vec::new(),
        age: 0,
    }
}

fn print_report(view: &Decrypted<Patient>) {
    let report = &view.report;
    println!(
        "report:    key {} (tenant {}, schema {} v{}, KEK v{}{})",
        report.record_key_id,
        report.tenant,
        report.schema,
        report.schema_version,
        report.kek_version,
        if report.stale_key_version { ", stale: rewrap it" } else { "" }
    );
    for field in &report.fields {
        println!("  {:<14} {:<16} {}", field.pointer, field.class, field.outcome);
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"))
}
