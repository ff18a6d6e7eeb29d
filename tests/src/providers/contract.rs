//! The root key provider contract (STYLE 15): one set of checks that every
//! [`RootKeyProvider`] — local, PKCS#11 on SoftHSM2, AWS KMS on moto —
//! must pass. `tests/tests/root_providers.rs` runs each against each.

use std::sync::Arc;

use kms_core::{Key256, KeyPurpose, RootKeyError, RootKeyProvider, WrapContext};

/// A tenant-KEK context.
pub fn context(owner: &str, version: u32) -> WrapContext {
    WrapContext { purpose: KeyPurpose::TenantKek, owner: owner.to_owned(), version }
}

/// Asserts `result` is the opaque `CannotUnwrap`.
pub fn assert_cannot_unwrap(result: Result<Key256, RootKeyError>, what: &str) {
    match result {
        Err(RootKeyError::CannotUnwrap) => {}
        Err(other) => panic!("{what}: expected CannotUnwrap, got {other:?}"),
        Ok(_) => panic!("{what}: unwrapped"),
    }
}

/// Wrap then unwrap gives the key back, for every purpose and a few
/// owners and versions; `describe` is stable and names the provider.
pub async fn round_trip(provider: &dyn RootKeyProvider) {
    let contexts = [
        context("acme", 1),
        context("acme", 2),
        context("clinic-7", u32::MAX),
        WrapContext::index_root(&kms_core::TenantId::new("acme").unwrap()),
        WrapContext { purpose: KeyPurpose::AuditSigning, owner: "node-1".to_owned(), version: 1 },
    ];
    for context in &contexts {
        let key = Key256::generate().unwrap();
        let wrapped = provider.wrap(&key, context).await.unwrap();
        let back = provider.unwrap(&wrapped, context).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret(), "round trip for {context:?}");
    }
    let info = provider.describe();
    assert!(!info.key_ref.is_empty());
    assert_eq!(provider.describe(), info);
    hsm_adapters::check_ready(provider).await.unwrap();
}

/// A blob unwraps only under the exact context it was wrapped with:
/// another purpose, owner or version is `CannotUnwrap`.
pub async fn other_context_fails(provider: &dyn RootKeyProvider) {
    let key = Key256::generate().unwrap();
    let original = context("acme", 3);
    let wrapped = provider.wrap(&key, &original).await.unwrap();
    let others = [
        context("acme", 4),
        context("acme", 2),
        context("acmf", 3),
        context("acme-", 3),
        WrapContext { purpose: KeyPurpose::IndexRoot, ..original.clone() },
        WrapContext { purpose: KeyPurpose::AuditSigning, ..original.clone() },
    ];
    for other in &others {
        assert_cannot_unwrap(provider.unwrap(&wrapped, other).await, &format!("{other:?}"));
    }
    // The right context still works afterwards.
    let back = provider.unwrap(&wrapped, &original).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
}

/// Flipping any bit of any byte, truncating, extending or emptying a blob
/// is `CannotUnwrap`.
pub async fn tampered_blob_fails(provider: &dyn RootKeyProvider) {
    let key = Key256::generate().unwrap();
    let context = context("acme", 1);
    let wrapped = provider.wrap(&key, &context).await.unwrap();
    for position in 0..wrapped.len() {
        for bit in [0x01u8, 0x80] {
            let mut tampered = wrapped.clone();
            if let Some(byte) = tampered.get_mut(position) {
                *byte ^= bit;
            }
            assert_cannot_unwrap(
                provider.unwrap(&tampered, &context).await,
                &format!("bit {bit:#04x} of byte {position} flipped"),
            );
        }
    }
    let mut longer = wrapped.clone();
    longer.push(0);
    let cases: [(&str, &[u8]); 4] = [
        ("empty", &[]),
        ("version byte only", wrapped.get(..1).unwrap()),
        ("truncated by one byte", wrapped.get(..wrapped.len() - 1).unwrap()),
        ("extended by one byte", &longer),
    ];
    for (what, blob) in cases {
        assert_cannot_unwrap(provider.unwrap(blob, &context).await, what);
    }
    let back = provider.unwrap(&wrapped, &context).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
}

/// Wrapping the same key twice under the same context gives different
/// blobs, and both unwrap.
pub async fn wraps_are_randomized(provider: &dyn RootKeyProvider) {
    let key = Key256::generate().unwrap();
    let context = context("acme", 1);
    let first = provider.wrap(&key, &context).await.unwrap();
    let second = provider.wrap(&key, &context).await.unwrap();
    assert_ne!(first, second);
    for blob in [&first, &second] {
        let back = provider.unwrap(blob, &context).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
    }
}

/// 64 tasks wrap and unwrap at once, each its own key and context; all
/// succeed and get their own key back.
pub async fn concurrent_round_trips(provider: Arc<dyn RootKeyProvider>) {
    const TASKS: u32 = 64;
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let provider = Arc::clone(&provider);
        tasks.push(tokio::spawn(async move {
            let key = Key256::generate().unwrap();
            let context = context(&format!("tenant-{i}"), i + 1);
            let wrapped = provider.wrap(&key, &context).await?;
            let back = provider.unwrap(&wrapped, &context).await?;
            assert_eq!(back.expose_secret(), key.expose_secret(), "task {i}");
            Ok::<_, RootKeyError>(())
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        task.await.unwrap().unwrap_or_else(|e| panic!("task {i} failed: {e}"));
    }
}
