//! payment-svc's database: migrations, the service role's privileges, the append-only
//! audit trail, and start-up against an unreachable server.

use std::collections::BTreeSet;

use sqlx::{Connection, Executor, PgConnection, Row};
use tests::postgres::TestDatabase;
use tests::process::run_to_exit;

async fn error_code(connection: &mut PgConnection, statement: &str) -> Option<String> {
    match connection
        .execute(sqlx::AssertSqlSafe(statement.to_owned()))
        .await
    {
        Ok(_) => None,
        Err(err) => err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned()),
    }
}

#[tokio::test]
async fn migrations_grant_the_service_role_only_what_it_needs() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = database.payment_config();
    payment_svc::db::migrate(&config).await?;
    // Running again is a no-op (replicas may all migrate on start).
    payment_svc::db::migrate(&config).await?;

    let mut service = PgConnection::connect(&database.service_url()).await?;
    service
        .execute(
            "INSERT INTO audit_log (owner_id, principal, action, entity_type, entity_id, request_id) \
             VALUES ('tenant', 'demo', 'test.insert', 'test', '1', 'req-1')",
        )
        .await?;
    let rows = service.fetch_all("SELECT id FROM audit_log").await?;
    assert_eq!(rows.len(), 1);

    // The service role holds no UPDATE/DELETE/TRUNCATE privilege: 42501 insufficient_privilege.
    for statement in [
        "UPDATE audit_log SET action = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        assert_eq!(
            error_code(&mut service, statement).await.as_deref(),
            Some("42501"),
            "{statement}"
        );
    }
    // The owner bypasses privileges, so the triggers refuse it too.
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    for statement in [
        "UPDATE audit_log SET action = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        assert_eq!(
            error_code(&mut owner, statement).await.as_deref(),
            Some("42501"),
            "{statement}"
        );
    }
    let count: i64 = owner
        .fetch_one("SELECT count(*) FROM audit_log")
        .await?
        .try_get(0)?;
    assert_eq!(count, 1);
    Ok(())
}

#[tokio::test]
async fn migrations_give_the_service_role_its_timeouts_in_every_session() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = database.payment_config();
    config.statement_timeout = std::time::Duration::from_millis(4_321);
    config.lock_timeout = std::time::Duration::from_millis(1_234);
    config.idle_in_transaction_timeout = std::time::Duration::from_millis(9_876);
    payment_svc::db::migrate(&config).await?;

    // A plain session of the service role (no connection options) has them.
    let mut service = PgConnection::connect(&database.service_url()).await?;
    for (setting, expected) in [
        ("statement_timeout", "4321ms"),
        ("lock_timeout", "1234ms"),
        ("idle_in_transaction_session_timeout", "9876ms"),
    ] {
        let value: String = service
            .fetch_one(sqlx::AssertSqlSafe(format!("SHOW {setting}")))
            .await?
            .try_get(0)?;
        assert_eq!(value, expected, "{setting}");
    }
    // Scoped to this database: the owner's sessions are untouched.
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let value: String = owner
        .fetch_one("SHOW statement_timeout")
        .await?
        .try_get(0)?;
    assert_eq!(value, "0");
    Ok(())
}

#[tokio::test]
async fn every_table_has_its_service_privileges_declared() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    payment_svc::db::migrate(&database.payment_config()).await?;
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let tables: BTreeSet<String> = owner
        .fetch_all(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations'",
        )
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
    let declared: BTreeSet<String> = payment_svc::db::SERVICE_PRIVILEGES
        .iter()
        .map(|(table, _)| (*table).to_owned())
        .collect();
    assert_eq!(
        tables, declared,
        "db::SERVICE_PRIVILEGES must list exactly the schema's tables"
    );
    Ok(())
}

#[tokio::test]
async fn spawned_migrate_command_applies_migrations_and_exits() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let finished = run_to_exit(
        "payment-svc",
        &[
            ("DATABASE_URL", database.service_url()),
            ("DATABASE_MIGRATION_URL", database.owner_url()),
        ],
        &["migrate"],
    )
    .await?;
    assert!(finished.status.success(), "{finished:?}");
    let mut service = PgConnection::connect(&database.service_url()).await?;
    let rows = service.fetch_all("SELECT id FROM audit_log").await?;
    assert!(rows.is_empty());
    Ok(())
}

#[tokio::test]
async fn spawned_payment_svc_exits_with_one_line_when_database_is_unreachable() -> anyhow::Result<()>
{
    // A port nothing listens on: bind it, note it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let password = "Sup3r-S3cret-pw";
    let finished = run_to_exit(
        "payment-svc",
        &[
            (
                "DATABASE_URL",
                format!("postgres://paysuite:{password}@127.0.0.1:{port}/paysuite"),
            ),
            ("DATABASE_CONNECT_TIMEOUT", "2s".to_owned()),
        ],
        &[],
    )
    .await?;
    assert!(!finished.status.success(), "{finished:?}");
    let lines: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one line on stderr: {:?}",
        finished.stderr
    );
    assert!(
        lines[0].contains(&format!("127.0.0.1:{port}")),
        "names the host: {}",
        lines[0]
    );
    assert!(
        lines[0].starts_with("payment-svc: cannot connect to PostgreSQL"),
        "{}",
        lines[0]
    );
    for output in [&finished.stderr, &finished.stdout] {
        assert!(!output.contains(password), "the password leaked: {output}");
    }
    Ok(())
}

#[tokio::test]
async fn an_account_can_change_only_its_balance() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    payment_svc::db::migrate(&database.payment_config()).await?;
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    owner
        .execute(
            "INSERT INTO accounts (id, owner_id, currency, kind, allow_negative) \
             VALUES ('acct_1', 'alice', 'BRL', 'customer', false)",
        )
        .await?;
    for statement in [
        "UPDATE accounts SET currency = 'USD'",
        "UPDATE accounts SET owner_id = 'mallory'",
        "UPDATE accounts SET allow_negative = true",
    ] {
        assert_eq!(
            error_code(&mut owner, statement).await.as_deref(),
            Some("42501"),
            "{statement}"
        );
    }
    // A balance that would go below zero is refused by the database itself.
    let negative = error_code(&mut owner, "UPDATE accounts SET balance = -1").await;
    assert_eq!(negative.as_deref(), Some("23514"));
    assert_eq!(
        error_code(&mut owner, "UPDATE accounts SET balance = 5").await,
        None
    );
    Ok(())
}

#[tokio::test]
async fn an_exhausted_pool_answers_unavailable_and_recovers() -> anyhow::Result<()> {
    use proto::payments::v1 as pb;
    use std::time::Duration;
    use tests::payments::Tenant;

    let database = TestDatabase::create().await?;
    let service = tests::services::payment_with(&database, |config| {
        config.database.max_connections = 1;
        config.database.acquire_timeout = Duration::from_millis(100);
        config.database.lock_timeout = Duration::from_secs(20);
        config.database.statement_timeout = Duration::from_secs(20);
        // The job runner would compete for the one connection.
        config.jobs.enabled = false;
    })
    .await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    let alice = Tenant::new("alice", channel);
    let account = alice
        .open_account(pb::AccountKind::Customer, "BRL", false)
        .await?
        .id;

    // The pool's only connection waits on a table lock held here…
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let mut lock = owner.begin().await?;
    lock.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await?;
    let blocked = {
        let alice = alice.clone();
        let account = account.clone();
        tokio::spawn(async move { alice.balance(&account).await })
    };
    // Once that call waits on the lock (seen from another session)…
    // (as a superuser: other roles do not see the service role's wait events)
    let mut observer = PgConnection::connect(&database.superuser_url()?).await?;
    tokio::time::timeout(tests::LIVENESS, async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
            )
            .bind(database.name())
            .fetch_one(&mut observer)
            .await?;
            if waiting > 0 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await??;
    // …the next call finds no connection within the acquire timeout: UNAVAILABLE.
    let refused = tokio::time::timeout(tests::LIVENESS, alice.balance(&account))
        .await?
        .err()
        .and_then(|err| err.downcast::<tonic::Status>().ok());
    assert_eq!(
        refused.as_ref().map(|s| (s.code(), s.message())),
        Some((
            tonic::Code::Unavailable,
            "database busy: no connection available"
        ))
    );
    // Releasing the lock lets the blocked call finish and the pool serve again.
    lock.rollback().await?;
    assert_eq!(tokio::time::timeout(tests::LIVENESS, blocked).await???.0, 0);
    // (Within the liveness bound: on a loaded machine another statement may still hold the
    // one connection past the 100 ms acquire timeout.)
    let served = tokio::time::timeout(tests::LIVENESS, async {
        loop {
            match alice.balance(&account).await {
                Ok(balance) => return balance.0,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await?;
    assert_eq!(served, 0);
    service.stop().await
}
