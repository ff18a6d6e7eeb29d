//! Micro-benchmarks of the record format: a whole patient record
//! encrypted and decrypted, each field mode on its own (a one-field record
//! against the empty-record baseline, plus the mode's transform alone),
//! and the header built, encoded and parsed.
//!
//! ```text
//! cargo bench -p kms-core --bench record
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)] // bench code

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kms_core::crypto::Aead;
use kms_core::record::{
    Disclosure, EncryptedRecord, EncryptedText, HeaderContents, ListedField, RecordHeader,
    SchemaKeys, TextWorkspace, blind_index_token, encrypt_record, index_token, pseudonym,
};
use kms_core::schema::{FieldMode, Schema, SchemaSet};
use kms_core::{DekBinding, IssuedDek, Key256, Name, RecordKeyId, SecretBuf, TenantId, wrap_dek};
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// The patient schema of DESIGN §3.4 (every field mode), one schema per
/// mode with a single field `/f`, and `none`, whose one field records lack.
const SCHEMAS: &str = r#"
[[schema]]
name = "patient"
version = 1
fields = [
  { path = "/ssn",         mode = "randomized",    class = "phi.identifier", mask = "last4" },
  { path = "/mrn",         mode = "deterministic", class = "phi.identifier" },
  { path = "/email",       mode = "blind_index", bits = 32, normalize = ["trim", "lowercase"], class = "pii.contact", mask = "email" },
  { path = "/diagnosis",   mode = "randomized",    class = "phi.clinical" },
  { path = "/patient_id",  mode = "pseudonym",     class = "pii.identifier" },
  { path = "/allergies/*", mode = "randomized",    class = "phi.clinical" },
]
[[schema]]
name = "none"
version = 1
fields = [{ path = "/absent", mode = "randomized", class = "c" }]
[[schema]]
name = "randomized"
version = 1
fields = [{ path = "/f", mode = "randomized", class = "c" }]
[[schema]]
name = "deterministic"
version = 1
fields = [{ path = "/f", mode = "deterministic", class = "c" }]
[[schema]]
name = "blind_index"
version = 1
fields = [{ path = "/f", mode = "blind_index", bits = 32, normalize = ["lowercase"], class = "c" }]
[[schema]]
name = "pseudonym"
version = 1
fields = [{ path = "/f", mode = "pseudonym", class = "c" }]
"#;

struct Fixture {
    tenant: TenantId,
    kek: Aead,
    index_root: Key256,
    set: SchemaSet,
}

impl Fixture {
    fn new() -> Self {
        Self {
            tenant: TenantId::new("bench").unwrap(),
            kek: Aead::new(&Key256::from_array(&mut [1; 32])),
            index_root: Key256::from_array(&mut [2; 32]),
            set: SchemaSet::from_toml(SCHEMAS, "bench").unwrap(),
        }
    }

    fn schema(&self, name: &str) -> &Schema {
        self.set.latest(name).unwrap()
    }

    fn keys(&self, schema: &Schema) -> SchemaKeys {
        SchemaKeys::derive(&self.index_root, &self.tenant, schema)
    }

    fn dek(&self) -> IssuedDek {
        let id = RecordKeyId::generate().unwrap();
        let dek = Key256::generate().unwrap();
        let binding = DekBinding { tenant: &self.tenant, kek_version: 1, record_key_id: &id };
        let wrapped = wrap_dek(&self.kek, &binding, &dek).unwrap();
        IssuedDek::new(id, 1, wrapped, dek)
    }
}

fn patient() -> Value {
    json!({
        "name": "Jane Roe", "birth_date": "1974-03-21", "sex": "F",
        "address": {"street": "1200 Elm Street", "city": "Springfield", "postal_code": "01103", "country": "US"},
        "phone": "+1 413 555 0142",
        "ssn": "123-45-6789", "mrn": "MRN-00012345", "email": "Jane.Roe@example.org",
        "diagnosis": "C50.911 Malignant neoplasm of unspecified site of right female breast",
        "patient_id": "P-0000042", "allergies": ["penicillin"], "age": 51,
        "insurance": {"payer": "Acme Health", "plan": "PPO-2", "member_since": "2009-11-01"},
    })
}

fn reveal(_: &kms_core::schema::FieldSpec) -> Disclosure {
    Disclosure::Reveal
}

fn whole_record(c: &mut Criterion) {
    let fx = Fixture::new();
    let schema = fx.schema("patient");
    let keys = fx.keys(schema);
    let record = patient();
    let issued = fx.dek();
    let dek = issued.dek().duplicate();
    let encrypted = encrypt_record(record.clone(), &fx.tenant, schema, &keys, issued).unwrap();
    let text = serde_json::to_string(&encrypted).unwrap();
    let mut group = c.benchmark_group("record/patient");
    group.bench_function("encrypt", |b| {
        b.iter_batched(
            || (record.clone(), fx.dek()),
            |(r, d)| encrypt_record(r, &fx.tenant, schema, &keys, d).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("decrypt", |b| {
        b.iter_batched(
            || encrypted.clone(),
            |r| EncryptedRecord::parse(r).unwrap().decrypt(&dek, schema, &keys, &reveal).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("decrypt from JSON text", |b| {
        b.iter(|| {
            let r: Value = serde_json::from_str(black_box(&text)).unwrap();
            let out =
                EncryptedRecord::parse(r).unwrap().decrypt(&dek, schema, &keys, &reveal).unwrap();
            serde_json::to_vec(&out.record).unwrap()
        })
    });
    // JSON text to JSON text, as the sidecar does: through a tree, and
    // through the text path.
    let plain_text = serde_json::to_string(&record).unwrap();
    let plain_raw = RawValue::from_string(plain_text.clone()).unwrap();
    let mut ws = TextWorkspace::default();
    let mut out = SecretBuf::with_capacity(4096);
    // Decrypted as the sidecar sees records: as the text path wrote them
    // (members in order, `_kg` last).
    let issued = fx.dek();
    let text_dek = issued.dek().duplicate();
    ws.encrypt(&plain_raw, &fx.tenant, schema, &keys, issued, &mut out).unwrap();
    let encrypted_raw =
        RawValue::from_string(String::from_utf8(out.as_slice().to_vec()).unwrap()).unwrap();
    group.bench_function("encrypt from JSON text (tree)", |b| {
        b.iter_batched(
            || fx.dek(),
            |d| {
                let r: Value = serde_json::from_str(black_box(&plain_text)).unwrap();
                let out = encrypt_record(r, &fx.tenant, schema, &keys, d).unwrap();
                serde_json::to_vec(&out).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("encrypt from JSON text (text path)", |b| {
        b.iter_batched(
            || fx.dek(),
            |d| {
                out.clear();
                ws.encrypt(black_box(&plain_raw), &fx.tenant, schema, &keys, d, &mut out).unwrap();
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("header from JSON text (text path)", |b| {
        b.iter(|| EncryptedText::parse(black_box(&encrypted_raw)).unwrap())
    });
    group.bench_function("decrypt from JSON text (text path)", |b| {
        b.iter(|| {
            out.clear();
            let parsed = EncryptedText::parse(black_box(&encrypted_raw)).unwrap();
            ws.decrypt(parsed, &text_dek, schema, &keys, &reveal, &mut out).unwrap().len()
        })
    });
    group.finish();
}

fn per_mode(c: &mut Criterion) {
    let fx = Fixture::new();
    let mut group = c.benchmark_group("record/one_field");
    for name in ["none", "randomized", "deterministic", "blind_index", "pseudonym"] {
        let schema = fx.schema(name);
        let keys = fx.keys(schema);
        let record = json!({"f": "Jane.Roe@example.org", "other": 1});
        group.bench_function(format!("{name}/encrypt"), |b| {
            b.iter_batched(
                || (record.clone(), fx.dek()),
                |(r, d)| encrypt_record(r, &fx.tenant, schema, &keys, d).unwrap(),
                BatchSize::SmallInput,
            )
        });
        let issued = fx.dek();
        let dek = issued.dek().duplicate();
        let encrypted = encrypt_record(record.clone(), &fx.tenant, schema, &keys, issued).unwrap();
        group.bench_function(format!("{name}/decrypt"), |b| {
            b.iter_batched(
                || encrypted.clone(),
                |r| {
                    EncryptedRecord::parse(r)
                        .unwrap()
                        .decrypt(&dek, schema, &keys, &reveal)
                        .unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    // The value transforms alone.
    let schema = fx.schema("patient");
    let keys = fx.keys(schema);
    let key = Key256::from_array(&mut [3; 32]);
    let bidx = schema.fields[2].blind_index.clone().unwrap();
    let value = json!("Jane.Roe@example.org");
    let mut group = c.benchmark_group("transform");
    group.bench_function("deterministic token", |b| {
        b.iter(|| index_token(schema, &keys, "/mrn", black_box(&value)).unwrap())
    });
    group.bench_function("blind index token", |b| {
        b.iter(|| blind_index_token(&key, &bidx, black_box(&value)))
    });
    group.bench_function("pseudonym", |b| b.iter(|| pseudonym(&key, black_box(&value))));
    group.finish();
}

fn header(c: &mut Criterion) {
    let fx = Fixture::new();
    let schema_name = Name::new("patient").unwrap();
    let issued = fx.dek();
    let pointers = ["/allergies/0", "/diagnosis", "/email", "/mrn", "/patient_id", "/ssn"];
    let modes = [
        FieldMode::Randomized,
        FieldMode::Randomized,
        FieldMode::BlindIndex,
        FieldMode::Deterministic,
        FieldMode::Pseudonym,
        FieldMode::Randomized,
    ];
    let fields: Vec<ListedField<'_>> =
        pointers.iter().zip(modes).map(|(p, mode)| ListedField { pointer: p, mode }).collect();
    let contents = || HeaderContents {
        tenant: &fx.tenant,
        schema: &schema_name,
        schema_version: 1,
        record_key_id: issued.record_key_id,
        fields: fields.clone(),
        kek_version: 1,
        wrapped_dek: issued.wrapped,
    };
    let bound = ["kg1d:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "kgp:AAAAAAAAAAAAAAAAAAAAAAAAAA"];
    let encoded = contents().layout().unwrap().sign(issued.dek(), &bound).encode();
    let mut group = c.benchmark_group("header");
    group.bench_function("build (layout + sign + encode)", |b| {
        b.iter(|| contents().layout().unwrap().sign(issued.dek(), black_box(&bound)).encode())
    });
    group.bench_function("parse", |b| b.iter(|| RecordHeader::parse(black_box(&encoded)).unwrap()));
    let parsed = RecordHeader::parse(&encoded).unwrap();
    group.bench_function("verify", |b| {
        b.iter(|| parsed.verify(issued.dek(), black_box(&bound)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, whole_record, per_mode, header);
criterion_main!(benches);
