//! The PostgreSQL keystore when the server goes silent (a partition, a
//! failover): no RST, no FIN, just nothing, which no server-side timeout
//! notices on the client's behalf. Through a loopback proxy that is frozen
//! mid-operation. Also: concurrent usage flushes do not deadlock, and URL
//! parameters the driver would log with their value are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use keygate_tests::cluster::{PgSchema, pg_url};
use keygate_tests::providers::logs::Logs;
use keygate_tests::providers::tcp_proxy::TcpProxy;
use kms_core::ProviderInfo;
use kms_core::TenantId;
use kms_core::store::{
    KeyStore, MasterKeyId, NewTenant, PgStoreOptions, PgTarget, PostgresStore, StoreError,
    UsageDelta,
};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn options(schema: &str, app: &str, statement: Duration, acquire: Duration) -> PgStoreOptions {
    let mut options = PgStoreOptions::default().with_schema(schema);
    options.application_name = app.to_owned();
    options.statement_timeout = statement;
    options.acquire_timeout = acquire;
    options
}

/// The test server's address, and its URL with the proxy's address in
/// its place.
fn via(proxy: Option<&TcpProxy>) -> (SocketAddr, String) {
    let url = pg_url();
    let (user, rest) = url.split_once('@').expect("a URL with user@host");
    let (host, path) = rest.split_once('/').expect("a URL with a database");
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:5432") };
    let target = host.to_socket_addrs().unwrap().next().unwrap();
    let url = match proxy {
        Some(proxy) => format!("{user}@{}/{path}", proxy.addr()),
        None => url.clone(),
    };
    (target, url)
}

/// A store straight to the server, a master key and tenant `t`.
async fn setup(schema: &str) -> (PostgresStore, MasterKeyId, TenantId) {
    let store = PostgresStore::connect(&pg_url(), options(schema, "kg-direct", secs(20), secs(5)))
        .await
        .unwrap();
    let master =
        store.register_master(&ProviderInfo { kind: "local", key_ref: "silent".into() }).await;
    let master = master.unwrap();
    store.activate_master(master).await.unwrap();
    let tenant = TenantId::new("t").unwrap();
    store
        .create_tenant(NewTenant {
            id: tenant.clone(),
            index_root_wrapped: vec![1; 8],
            kek_wrapped: vec![2; 8],
            master,
            created_at: 1,
        })
        .await
        .unwrap();
    (store, master, tenant)
}

/// A session of the test's own, straight to the server, in `schema`.
async fn side_session(schema: &str) -> PgConnection {
    let mut conn = PgConnection::connect(&pg_url()).await.unwrap();
    let path = format!("SET search_path = {schema}");
    sqlx::raw_sql(AssertSqlSafe(path)).execute(&mut conn).await.unwrap();
    conn
}

/// Waits until a session named `app` waits for a lock.
async fn until_waiting(app: &str) {
    let mut probe = PgConnection::connect(&pg_url()).await.unwrap();
    let deadline = Instant::now() + secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(app)
        .fetch_one(&mut probe)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{app} never waited for the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operation_whose_server_goes_silent_fails_in_bounded_time() {
    let schema = PgSchema::create();
    let (_direct, _, tenant) = setup(&schema.name).await;
    let (target, _) = via(None);
    let proxy = TcpProxy::start(target);
    let app = format!("{}-a", schema.name);
    let silent =
        PostgresStore::connect(&via(Some(&proxy)).1, options(&schema.name, &app, secs(4), secs(2)))
            .await
            .unwrap();

    // The operation waits, server side, for a row another session holds.
    let mut side = side_session(&schema.name).await;
    let mut held = side.begin().await.unwrap();
    sqlx::query("SELECT id FROM tenants WHERE id = 't' FOR UPDATE")
        .execute(&mut *held)
        .await
        .unwrap();
    let started = Instant::now();
    let op = tokio::spawn({
        let (silent, tenant) = (silent.clone(), tenant.clone());
        async move { silent.set_rotation_period(&tenant, Some(3600)).await }
    });
    until_waiting(&app).await;
    // Then the server goes silent, and its answer never arrives.
    proxy.freeze();
    held.commit().await.unwrap();

    let result = tokio::time::timeout(secs(20), op)
        .await
        .expect("the operation waited for ever on a silent server")
        .unwrap();
    // A write: the client cannot tell whether the server had its COMMIT.
    assert!(matches!(result, Err(StoreError::OutcomeUnknown(_))), "{result:?}");
    assert!(started.elapsed() < secs(15), "{:?}", started.elapsed());

    // Once the server answers again, so does the store.
    proxy.thaw();
    tokio::time::timeout(secs(10), silent.ping()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_replicas_tenant_lock_does_not_outlive_it() {
    let schema = PgSchema::create();
    let (direct, master, tenant) = setup(&schema.name).await;
    let (target, _) = via(None);
    let proxy = TcpProxy::start(target);
    let app = format!("{}-a", schema.name);
    let replica_a =
        PostgresStore::connect(&via(Some(&proxy)).1, options(&schema.name, &app, secs(3), secs(2)))
            .await
            .unwrap();

    // Replica A locks the tenant, then waits for the master key's row.
    let mut side = side_session(&schema.name).await;
    let mut held = side.begin().await.unwrap();
    sqlx::query("SELECT id FROM master_keys FOR UPDATE").execute(&mut *held).await.unwrap();
    let _rotation = tokio::spawn({
        let tenant = tenant.clone();
        async move { replica_a.add_kek_version(&tenant, 2, &[3; 8], master, 2).await }
    });
    until_waiting(&app).await;
    // A vanishes without a word, inside its transaction.
    proxy.freeze();
    held.commit().await.unwrap();

    // Another replica can still change the tenant.
    let started = Instant::now();
    let changed = tokio::time::timeout(secs(30), direct.set_rotation_period(&tenant, Some(60)))
        .await
        .expect("the other replica's change hung");
    assert!(changed.is_ok(), "the vanished replica kept the tenant's lock: {changed:?}");
    assert!(started.elapsed() < secs(15), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_usage_flushes_in_any_order_do_not_deadlock() {
    let schema = PgSchema::create();
    let (url, options) = (pg_url(), options(&schema.name, "kg-usage", secs(20), secs(5)));
    let x = PostgresStore::connect(&url, options.clone()).await.unwrap();
    let y = PostgresStore::connect(&url, options).await.unwrap();
    let tenant = TenantId::new("t").unwrap();
    let deltas: Vec<UsageDelta> = (0..40)
        .map(|hour| UsageDelta {
            tenant: tenant.clone(),
            version: 1,
            hour,
            issued: 1,
            unwraps: 0,
            last_unwrap_at: None,
        })
        .collect();
    let reversed: Vec<UsageDelta> = deltas.iter().rev().cloned().collect();
    for round in 0..10 {
        let (a, b) = tokio::join!(x.add_usage(&deltas), y.add_usage(&reversed));
        assert!(a.is_ok() && b.is_ok(), "round {round}: {a:?} {b:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn url_parameters_the_driver_would_log_are_refused_unlogged() {
    let logs = Logs::capture();
    // Something is logged (sqlx logs its statements), so the check below
    // proves something.
    let schema = PgSchema::create();
    let store =
        PostgresStore::connect(&pg_url(), options(&schema.name, "kg-url", secs(20), secs(5)))
            .await
            .unwrap();
    store.ping().await.unwrap();

    let (_, url) = via(None);
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}sslpassword=s3cret");
    let Err(StoreError::Config(target)) = PgTarget::of(&url) else {
        panic!("a parameter the driver ignores was accepted");
    };
    let connect = PostgresStore::connect(&url, options(&schema.name, "kg-url", secs(20), secs(5)));
    let Err(StoreError::Config(connect)) = connect.await else {
        panic!("a parameter the driver ignores was accepted");
    };
    for error in [target, connect] {
        assert!(error.contains("sslpassword") && !error.contains("s3cret"), "{error}");
    }
    logs.assert_free_of(&["s3cret"]);
}
