//! What only the PostgreSQL store has: concurrent migration, timeouts,
//! TLS, advisory job locks that die with their session, and LISTEN/NOTIFY
//! across replicas.

use std::time::Duration;

use kms_core::StateChange;
use kms_core::store::{
    Durability, Invalidation, Invalidations, KeyStore, NewTenant, PgStoreOptions, PostgresStore,
    StoreError,
};
use sqlx::{AssertSqlSafe, Connection};

use crate::harness::{Fixture, eventually, tenant, test_master};

/// "Promptly": a change is seen by the other replicas within this.
const PROMPTLY: Duration = Duration::from_secs(2);

async fn next(subscription: &mut Invalidations) -> Invalidation {
    tokio::time::timeout(PROMPTLY, subscription.recv())
        .await
        .expect("an invalidation within a few seconds")
        .expect("the subscription is open")
}

async fn with_tenant(store: &PostgresStore, name: &str) -> kms_core::store::MasterKeyId {
    let master = store.register_master(&test_master()).await.unwrap();
    store.activate_master(master).await.unwrap();
    let new = NewTenant {
        id: tenant(name),
        index_root_wrapped: vec![1; 40],
        kek_wrapped: vec![2; 40],
        master,
        created_at: 1,
    };
    store.create_tenant(new).await.unwrap();
    master
}

/// Terminates the sessions of this fixture's schema named `application`.
async fn kill_sessions(f: &Fixture, application: &str, query_like: &str) -> i64 {
    let mut conn = f.pg().connect().await;
    let killed: i64 = sqlx::query_scalar(
        // Pick first, then kill: in one WHERE the planner may call
        // pg_terminate_backend before the other tests have filtered.
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM (
             SELECT pid FROM pg_stat_activity
             WHERE application_name = $1 AND query LIKE $2 AND pid <> pg_backend_pid()
             OFFSET 0
         ) AS chosen",
    )
    .bind(application)
    .bind(query_like)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_migrate_once() {
    let f = Fixture::postgres().await;
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let (url, options) = (f.pg().url.clone(), f.pg_options());
            tokio::spawn(async move { PostgresStore::connect(&url, options).await })
        })
        .collect();
    let mut stores = Vec::new();
    for start in starts {
        // A second run of a migration would fail on its CREATE TABLE.
        stores.push(start.await.unwrap().expect("every replica starts"));
    }
    let mut conn = f.pg().connect().await;
    let applied: Vec<(i64, bool)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT version, success FROM {}._sqlx_migrations ORDER BY version",
        f.pg().name
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    let expected: Vec<(i64, bool)> = (1..=shipped as i64).map(|v| (v, true)).collect();
    assert_eq!(applied, expected, "each migration once, in the test schema");
    let elsewhere: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'kek_versions' AND schemaname = $1",
    )
    .bind(&f.pg().name)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(elsewhere, 1);
    assert_eq!(stores[0].schema(), Some(f.pg().name.as_str()));
    assert!(format!("{:?}", stores[0]).contains(&f.pg().name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_reach_every_replica_promptly() {
    let f = Fixture::postgres().await;
    let (a, b) = (f.open_pg().await, f.open_pg().await);
    let master = with_tenant(&a, "onc").await;
    let mut seen_by_b = b.subscribe_invalidations().await.unwrap().unwrap();
    let mut seen_by_a = a.subscribe_invalidations().await.unwrap().unwrap();
    let onc = Invalidation::Tenant(tenant("onc"));

    a.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 2).await.unwrap();
    assert_eq!(next(&mut seen_by_b).await, onc, "rotation");
    assert_eq!(next(&mut seen_by_a).await, onc, "the writer's own listener too");
    b.change_kek_state(&tenant("onc"), 1, StateChange::Disable, 3).await.unwrap();
    assert_eq!(next(&mut seen_by_b).await, onc, "state change");
    a.notify_tenant_changed(&tenant("derm")).await.unwrap();
    assert_eq!(next(&mut seen_by_b).await, Invalidation::Tenant(tenant("derm")), "explicit");

    // What fails or rolls back announces nothing.
    let conflict = a.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 4).await;
    assert!(matches!(conflict, Err(StoreError::VersionConflict(_))));
    f.fail_kek_inserts(Some(3)).await;
    assert!(a.add_kek_version(&tenant("onc"), 3, &[3; 40], master, 5).await.is_err());
    a.notify_tenant_changed(&tenant("marker")).await.unwrap();
    assert_eq!(next(&mut seen_by_b).await, Invalidation::Tenant(tenant("marker")));

    // A second subscription of one store shares its listener.
    let mut again = b.subscribe_invalidations().await.unwrap().unwrap();
    a.notify_tenant_changed(&tenant("x")).await.unwrap();
    assert_eq!(next(&mut again).await, Invalidation::Tenant(tenant("x")));

    // The subscription ends with the store.
    drop(b);
    let ended =
        tokio::time::timeout(PROMPTLY, async { while seen_by_b.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the subscription closes once the store is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_listener_reconnects_and_flushes_everything() {
    let f = Fixture::postgres().await;
    let (a, b) = (f.open_pg().await, f.open_pg().await);
    let mut subscription = b.subscribe_invalidations().await.unwrap().unwrap();
    let killed = kill_sessions(&f, "keygate-listener", &format!("LISTEN %{}%", f.pg().name)).await;
    assert_eq!(killed, 1, "one listener for store b (none yet for a)");

    assert_eq!(next(&mut subscription).await, Invalidation::All, "connection lost");
    assert_eq!(next(&mut subscription).await, Invalidation::All, "listening again");
    // Listening again means announcements arrive again.
    a.notify_tenant_changed(&tenant("onc")).await.unwrap();
    assert_eq!(next(&mut subscription).await, Invalidation::Tenant(tenant("onc")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_listener_is_probed_and_keeps_listening() {
    let f = Fixture::postgres().await;
    let mut options = f.pg_options();
    options.listener_probe = Duration::from_millis(100);
    let (a, b) = (f.open_pg().await, f.open_pg_with(options).await);
    let mut subscription = b.subscribe_invalidations().await.unwrap().unwrap();
    for round in 0..3 {
        // Several probes pass in the silence, and none loses anything.
        tokio::time::sleep(Duration::from_millis(350)).await;
        let name = format!("t{round}");
        a.notify_tenant_changed(&tenant(&name)).await.unwrap();
        assert_eq!(next(&mut subscription).await, Invalidation::Tenant(tenant(&name)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_lock_dies_with_its_session() {
    let f = Fixture::postgres().await;
    let mut options = f.pg_options();
    options.application_name = format!("kg-{}", &f.pg().name);
    let (a, b) = (f.open_pg_with(options).await, f.open_pg().await);
    let mut held = a.try_job_lock("auto-rotate").await.unwrap().unwrap();
    assert!(b.try_job_lock("auto-rotate").await.unwrap().is_none());
    let application = format!("kg-{}-job-lock", f.pg().name);
    assert_eq!(kill_sessions(&f, &application, "%").await, 1);

    assert!(matches!(held.check().await, Err(StoreError::Unavailable(_))), "the holder learns");
    let taken =
        eventually(PROMPTLY, || async { b.try_job_lock("auto-rotate").await.unwrap() }).await;
    assert!(taken.is_some(), "another replica takes over");
    held.release().await.unwrap_or_default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_blocked_past_the_statement_timeout_is_unavailable() {
    let f = Fixture::postgres().await;
    let mut options = f.pg_options();
    options.statement_timeout = Duration::from_millis(300);
    let store = f.open_pg_with(options).await;
    let master = with_tenant(&store, "onc").await;

    // Another session holds the tenant's row lock.
    let mut blocker = f.pg().connect().await;
    sqlx::raw_sql("BEGIN; SELECT id FROM tenants WHERE id = 'onc' FOR UPDATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let blocked = store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 2).await;
    assert!(matches!(blocked, Err(StoreError::Unavailable(_))), "{blocked:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let blocked = store.change_kek_state(&tenant("onc"), 1, StateChange::Disable, 2).await;
    assert!(matches!(blocked, Err(StoreError::Unavailable(_))), "{blocked:?}");

    sqlx::raw_sql("ROLLBACK").execute(&mut blocker).await.unwrap();
    store.add_kek_version(&tenant("onc"), 2, &[3; 40], master, 2).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_in_time() {
    let mut options = PgStoreOptions::default();
    options.acquire_timeout = Duration::from_secs(2);
    let started = std::time::Instant::now();
    // Port 1 on loopback: nothing listens there.
    let refused = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test", options).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let bad = PostgresStore::connect("mysql://x@127.0.0.1/test", PgStoreOptions::default()).await;
    assert!(matches!(bad, Err(StoreError::Config(_))), "{bad:?}");
}

/// Whether commits can be lost is read from the session, wherever it was
/// set (each spelling of the URL's options, a role's own settings), and
/// tables of its schema made UNLOGGED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weakened_commits_are_seen_wherever_they_are_set() {
    let f = Fixture::postgres().await;
    let durability = |param: &str| {
        let url = f.pg().url_with(param);
        let options = f.pg_options();
        async move { PostgresStore::connect(&url, options).await.unwrap().durability().await.unwrap() }
    };
    for param in [
        "options=-c%20synchronous_commit%3Doff",
        "options=-c%20synchronous_commit%3Dlocal",
        "options[synchronous_commit]=off",
    ] {
        let Durability::Weakened(why) = durability(param).await else {
            panic!("{param}: durable");
        };
        assert!(why.contains("synchronous_commit="), "{param}: {why}");
    }
    assert!(matches!(durability("application_name=x").await, Durability::Durable(_)));

    // A role whose own settings weaken commits: what its sessions run with
    // counts, though neither the URL nor the server says so.
    let role = format!("{}_weak", f.pg().name);
    let schema = &f.pg().name;
    f.exec(&format!(
        "CREATE ROLE {role} LOGIN; ALTER ROLE {role} SET synchronous_commit = off;
         GRANT ALL ON SCHEMA {schema} TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {role}"
    ))
    .await;
    let as_role = durability(&format!("user={role}")).await;
    f.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await;
    let Durability::Weakened(why) = as_role else {
        panic!("a role's synchronous_commit=off passed")
    };
    assert!(why.contains("synchronous_commit=off"), "{why}");

    // A keystore table made UNLOGGED (someone with DDL rights) loses its
    // rows in a crash whatever the settings say.
    f.exec("ALTER TABLE audit_events SET UNLOGGED").await;
    let Durability::Weakened(why) = durability("application_name=x").await else {
        panic!("an UNLOGGED audit table passed");
    };
    assert!(why.contains("UNLOGGED") && why.contains("audit_events"), "{why}");
}

/// The URL's `sslmode` decides: `disable` is plain text, `require`
/// encrypts (or fails, on a server without TLS), `verify-full` refuses a
/// certificate that no trusted root signed (the machine's server has a
/// self-signed one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_follows_the_url() {
    let f = Fixture::postgres().await;
    let mut conn = f.pg().connect().await;
    let server_tls: String = sqlx::query_scalar("SHOW ssl").fetch_one(&mut conn).await.unwrap();
    let connect = |param: &str| {
        let url = f.pg().url_with(param);
        let options = f.pg_options();
        async move { PostgresStore::connect(&url, options).await }
    };

    let plain = connect("sslmode=disable").await.unwrap();
    assert!(!plain.uses_tls().await.unwrap());
    match (server_tls.as_str(), connect("sslmode=require").await) {
        ("on", Ok(store)) => assert!(store.uses_tls().await.unwrap()),
        ("off", Err(StoreError::Unavailable(_))) => {}
        (tls, other) => panic!("ssl = {tls}, sslmode=require gave {other:?}"),
    }
    let unverified = connect("sslmode=verify-full").await;
    assert!(matches!(unverified, Err(StoreError::Unavailable(_))), "{unverified:?}");
}
