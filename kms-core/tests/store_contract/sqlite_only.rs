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
