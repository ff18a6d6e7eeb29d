//! Micro-benchmarks of the primitives under every field: AES-256-GCM-SIV
//! seal/open (a randomized field), HMAC (blind index, pseudonym,
//! deterministic nonce), HKDF, SHA-256, DEK wrap/unwrap and key generation.
//!
//! ```text
//! cargo bench -p kms-core --bench crypto
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)] // bench code

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kms_core::crypto::{Aead, kdf, mac, rng, sha256};
use kms_core::{DekBinding, Key256, RecordKeyId, TenantId, unwrap_dek, wrap_dek};

fn key(byte: u8) -> Key256 {
    Key256::from_array(&mut [byte; 32])
}

fn aead(c: &mut Criterion) {
    let cipher = Aead::new(&key(1));
    let aad = [7u8; 48];
    let mut group = c.benchmark_group("aead");
    for size in [16usize, 64, 1024] {
        let plaintext = vec![0x5au8; size];
        let mut sealed = Vec::new();
        cipher.seal_random(&aad, &plaintext, &mut sealed).unwrap();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal_random", size), &plaintext, |b, p| {
            let mut out = Vec::with_capacity(size + 28);
            b.iter(|| {
                out.clear();
                cipher.seal_random(black_box(&aad), black_box(p), &mut out).unwrap();
            });
        });
        group.bench_with_input(BenchmarkId::new("seal_with_nonce", size), &plaintext, |b, p| {
            let mut out = Vec::with_capacity(size + 28);
            b.iter(|| {
                out.clear();
                cipher.seal_with_nonce(&[3; 12], black_box(&aad), black_box(p), &mut out);
            });
        });
        group.bench_with_input(BenchmarkId::new("open", size), &sealed, |b, s| {
            b.iter(|| cipher.open(black_box(s), black_box(&aad)).unwrap());
        });
    }
    group.bench_function("key_setup", |b| {
        let k = key(2);
        b.iter(|| Aead::new(black_box(&k)));
    });
    group.finish();
}

fn macs_and_kdf(c: &mut Criterion) {
    let k = key(3);
    let mut group = c.benchmark_group("mac_kdf");
    group.bench_function("hmac_sha256_32B", |b| b.iter(|| mac::hmac(&k, &[black_box(&[1u8; 32])])));
    group.bench_function("hkdf_sha256_derive", |b| {
        b.iter(|| kdf::derive(&k, black_box(b"keygate/v1/header")))
    });
    group.bench_function("sha256_200B", |b| b.iter(|| sha256(black_box(&[9u8; 200]))));
    group.finish();
}

fn randomness(c: &mut Criterion) {
    let mut group = c.benchmark_group("random");
    group.bench_function("nonce_12B", |b| b.iter(rng::array::<12>));
    group.bench_function("key_generate", |b| b.iter(Key256::generate));
    group.bench_function("record_key_id", |b| b.iter(RecordKeyId::generate));
    group.finish();
}

fn dek_wrap(c: &mut Criterion) {
    let kek = Aead::new(&key(4));
    let tenant = TenantId::new("bench").unwrap();
    let id = RecordKeyId::from_bytes([5; 16]);
    let binding = DekBinding { tenant: &tenant, kek_version: 1, record_key_id: &id };
    let dek = key(6);
    let wrapped = wrap_dek(&kek, &binding, &dek).unwrap();
    let mut group = c.benchmark_group("dek");
    group.bench_function("wrap", |b| b.iter(|| wrap_dek(&kek, black_box(&binding), &dek).unwrap()));
    group.bench_function("unwrap", |b| {
        b.iter(|| unwrap_dek(&kek, black_box(&binding), black_box(&wrapped)).unwrap())
    });
    group.bench_function("issue (generate id + key, wrap)", |b| {
        b.iter(|| {
            let id = RecordKeyId::generate().unwrap();
            let dek = Key256::generate().unwrap();
            let binding = DekBinding { tenant: &tenant, kek_version: 1, record_key_id: &id };
            wrap_dek(&kek, &binding, &dek).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, aead, macs_and_kdf, randomness, dek_wrap);
criterion_main!(benches);
