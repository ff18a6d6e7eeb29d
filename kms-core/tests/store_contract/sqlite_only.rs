//! What only the SQLite store has: a private file in WAL mode.

use std::os::unix::fs::PermissionsExt;

use sqlx::Connection;

use crate::harness::Fixture;

#[tokio::test]
async fn files_are_private_and_journal_is_wal() {
    let f = Fixture::sqlite().await;
    let store = f.open_sqlite().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.path().parent().unwrap()), 0o700);
    assert_eq!(mode(store.path()), 0o600);
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", store.path().display()))
        .await
        .unwrap();
    let journal: String =
        sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
    assert_eq!(journal, "wal");
}

/// After a shred, the database files (main file and WAL) no longer hold
/// the wrapped bytes anywhere, not even in free pages.
#[tokio::test]
async fn shredded_material_leaves_the_files() {
    use kms_core::store::{KeyStore, NewTenant};
    let f = Fixture::sqlite().await;
    let store = f.open_sqlite().await;
    let master = store.register_master(&crate::harness::test_master()).await.unwrap();
    store.activate_master(master).await.unwrap();
    let marker = |b: u8| -> Vec<u8> { (0..48).map(|i| b ^ (i as u8).wrapping_mul(37)).collect() };
    let (kek, root) = (marker(0xA5), marker(0x5A));
    store
        .create_tenant(NewTenant {
            id: crate::harness::tenant("onc"),
            index_root_wrapped: root.clone(),
            kek_wrapped: kek.clone(),
            master,
            created_at: 1,
        })
        .await
        .unwrap();
    let files = || {
        let dir = store.path().parent().unwrap().to_owned();
        std::fs::read_dir(dir)
            .unwrap()
            .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect::<Vec<u8>>()
    };
    let holds = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(holds(&files(), &kek), "the test can see the material before the shred");
    store.destroy_keys(&crate::harness::tenant("onc"), None, 2).await.unwrap();
    let after = files();
    assert!(!holds(&after, &kek), "KEK bytes remain in the database files");
    assert!(!holds(&after, &root), "index root bytes remain in the database files");
}

/// A reader holding a snapshot from before the shred keeps the WAL from
/// being truncated; once it lets go, the store truncates it by itself.
#[tokio::test(flavor = "multi_thread")]
async fn shredded_material_leaves_the_wal_once_an_old_reader_lets_go() {
    use kms_core::store::{KeyStore, NewTenant};
    let f = Fixture::sqlite().await;
    let store = f.open_sqlite().await;
    let master = store.register_master(&crate::harness::test_master()).await.unwrap();
    store.activate_master(master).await.unwrap();
    let kek: Vec<u8> = (0..48).map(|i| 0xC3 ^ (i as u8).wrapping_mul(41)).collect();
    store
        .create_tenant(NewTenant {
            id: crate::harness::tenant("onc"),
            index_root_wrapped: vec![7; 48],
            kek_wrapped: kek.clone(),
            master,
            created_at: 1,
        })
        .await
        .unwrap();
    let wal = store.path().with_extension("sqlite3-wal");
    let in_wal = || {
        let bytes = std::fs::read(&wal).unwrap_or_default();
        bytes.windows(kek.len()).any(|w| w == kek.as_slice())
    };
    assert!(in_wal(), "the test can see the material in the WAL before the shred");

    let mut reader =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", store.path().display()))
            .await
            .unwrap();
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    let _: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tenants").fetch_one(&mut reader).await.unwrap();
    store.destroy_keys(&crate::harness::tenant("onc"), None, 2).await.unwrap();
    assert!(in_wal(), "the old snapshot still needs the WAL's frames");
    sqlx::query("COMMIT").execute(&mut reader).await.unwrap();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while in_wal() {
        assert!(std::time::Instant::now() < deadline, "the WAL was never truncated");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
