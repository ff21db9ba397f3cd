//! PostgreSQL: the connection pool, migrations, and the service role's privileges.
//!
//! Two roles touch the database. Migrations run as the schema owner
//! (`DATABASE_MIGRATION_URL`); the service runs as a role that owns nothing
//! (`DATABASE_URL`) and holds only the privileges listed in [`SERVICE_PRIVILEGES`],
//! granted by [`migrate`]. An owner bypasses privileges, so append-only tables also
//! refuse changes with triggers.

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::config::DatabaseConfig;

/// A span around one transaction or statement group, named by `group`
/// (`db.operation.name`). SQL text and bound values are never recorded: they hold card
/// data, keys and tenants' metadata.
pub fn span(group: &'static str) -> tracing::Span {
    tracing::info_span!(
        "sql",
        otel.name = group,
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = group,
    )
}

/// The migrations compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the service role may do to each table; nothing else is granted. A test checks
/// that every table of the schema is listed here.
pub const SERVICE_PRIVILEGES: &[(&str, &str)] = &[
    ("audit_log", "SELECT, INSERT"),
    // Balances change in place (debits of non-negative accounts); rows are never deleted.
    ("accounts", "SELECT, INSERT, UPDATE"),
    ("movements", "SELECT, INSERT"),
    ("ledger_entries", "SELECT, INSERT"),
    // Deltas are folded into `accounts.balance` and deleted.
    ("balance_deltas", "SELECT, INSERT, DELETE"),
    ("idempotency_keys", "SELECT, INSERT, UPDATE, DELETE"),
    // Rows are re-encrypted in place by `rotate-card-keys`; never deleted.
    ("cards", "SELECT, INSERT, UPDATE"),
    ("payments", "SELECT, INSERT, UPDATE"),
    ("attempts", "SELECT, INSERT, UPDATE"),
    ("refunds", "SELECT, INSERT, UPDATE"),
    ("payment_events", "SELECT, INSERT"),
    // Finished jobs are reaped after their retention.
    ("jobs", "SELECT, INSERT, UPDATE, DELETE"),
];

/// A database failure at start-up or in a migration.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL could not be parsed (the URL itself is never shown: it holds a password).
    #[error("{variable} is not a valid PostgreSQL URL")]
    InvalidUrl {
        /// The variable holding the URL.
        variable: &'static str,
    },
    /// No connection could be made.
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    Unreachable {
        /// `host:port/database`, never the password.
        target: String,
        /// Why, in words.
        reason: String,
    },
    /// A migration failed.
    #[error("migrating PostgreSQL at {target}: {source}")]
    Migrate {
        /// `host:port/database`.
        target: String,
        /// The migration error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A statement failed.
    #[error("PostgreSQL at {target}: {source}")]
    Query {
        /// `host:port/database`.
        target: String,
        /// The statement error.
        #[source]
        source: sqlx::Error,
    },
}

/// Connects the service's pool and checks that the database answers. Every connection
/// carries the statement, lock and idle-in-transaction timeouts.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, DbError> {
    let options = parse_url(&config.url, crate::config::ENV_DATABASE_URL)?
        .application_name("payment-svc")
        .options([
            ("statement_timeout", millis(config.statement_timeout)),
            ("lock_timeout", millis(config.lock_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(config.idle_in_transaction_timeout),
            ),
        ]);
    let target = describe(&options);
    check_reachable(&options, &target, config.connect_timeout).await?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect_lazy_with(options))
}

/// A small pool for LISTEN connections (job wake-ups, event streams): each listener holds
/// its connection for as long as it runs, so they never take the service pool's.
pub fn listener_pool(config: &DatabaseConfig) -> Result<PgPool, DbError> {
    let options = parse_url(&config.url, crate::config::ENV_DATABASE_URL)?
        .application_name("payment-svc listen");
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(config.connect_timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(options))
}

/// Runs pending migrations as the schema owner, then grants the service role its
/// privileges (skipped when both URLs name the same role).
pub async fn migrate(config: &DatabaseConfig) -> Result<(), DbError> {
    let (owner_url, owner_variable) = match &config.migration_url {
        Some(url) => (url, crate::config::ENV_DATABASE_MIGRATION_URL),
        None => (&config.url, crate::config::ENV_DATABASE_URL),
    };
    let owner_options =
        parse_url(owner_url, owner_variable)?.application_name("payment-svc migrate");
    let service_options = parse_url(&config.url, crate::config::ENV_DATABASE_URL)?;
    let target = describe(&owner_options);
    check_reachable(&owner_options, &target, config.connect_timeout).await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(config.connect_timeout)
        .connect_lazy_with(owner_options.clone());

    MIGRATOR
        .run(&pool)
        .await
        .map_err(|source| DbError::Migrate {
            target: target.clone(),
            source,
        })?;

    let service_role = service_options.get_username();
    if service_role != owner_options.get_username() {
        let role = quote_identifier(service_role);
        let mut statements = vec![format!("GRANT USAGE ON SCHEMA public TO {role}")];
        for (table, privileges) in SERVICE_PRIVILEGES {
            statements.push(format!(
                "GRANT {privileges} ON TABLE {} TO {role}",
                quote_identifier(table)
            ));
        }
        // Replicas migrate on start at the same time: one at a time past this point
        // (concurrent ALTER ROLE on one role fails with "tuple concurrently updated").
        let query_error = |source| DbError::Query {
            target: target.clone(),
            source,
        };
        let mut transaction = pool.begin().await.map_err(query_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(GRANTS_LOCK)
            .execute(&mut *transaction)
            .await
            .map_err(query_error)?;
        for statement in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&mut *transaction)
                .await
                .map_err(query_error)?;
        }
        set_role_timeouts(&mut transaction, service_role, config, &target).await?;
        transaction.commit().await.map_err(query_error)?;
    }
    tracing::info!(database = %target, "migrations applied");
    pool.close().await;
    Ok(())
}

/// Makes the statement, lock and idle-in-transaction timeouts the service role's defaults
/// in this database, so that every session of the role has them — also one opened by
/// hand or by a tool that does not send the service's connection options. Needs the
/// CREATEROLE attribute; without it the service's own connections still carry the
/// timeouts, and a warning says what the operator should set.
async fn set_role_timeouts(
    connection: &mut PgConnection,
    role: &str,
    config: &DatabaseConfig,
    target: &str,
) -> Result<(), DbError> {
    let settings = [
        ("statement_timeout", config.statement_timeout),
        ("lock_timeout", config.lock_timeout),
        (
            "idle_in_transaction_session_timeout",
            config.idle_in_transaction_timeout,
        ),
    ];
    // A refusal must not abort the caller's transaction.
    sqlx::raw_sql("SAVEPOINT role_timeouts")
        .execute(&mut *connection)
        .await
        .map_err(|source| DbError::Query {
            target: target.to_owned(),
            source,
        })?;
    for (setting, value) in settings {
        let statement = format!(
            "DO $do$ BEGIN EXECUTE format('ALTER ROLE %I IN DATABASE %I SET {setting} = %L', \
             {}, current_database(), '{}'); END $do$",
            quote_literal(role),
            millis(value)
        );
        match sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *connection)
            .await
        {
            Ok(_) => {}
            Err(sqlx::Error::Database(err))
                if err.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) =>
            {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT role_timeouts")
                    .execute(&mut *connection)
                    .await
                    .map_err(|source| DbError::Query {
                        target: target.to_owned(),
                        source,
                    })?;
                tracing::warn!(
                    database = %target,
                    role,
                    setting,
                    "the migration role may not set the service role's defaults (it lacks CREATEROLE): \
                     set them with ALTER ROLE … IN DATABASE … SET; the service's own connections carry them anyway"
                );
                return Ok(());
            }
            Err(source) => {
                return Err(DbError::Query {
                    target: target.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The advisory lock that serializes granting and role settings between replicas.
const GRANTS_LOCK: i64 = 0x7061_7973_7569_7465;

/// SQLSTATE of a refused privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

fn parse_url(url: &SecretString, variable: &'static str) -> Result<PgConnectOptions, DbError> {
    PgConnectOptions::from_str(url.expose_secret()).map_err(|_| DbError::InvalidUrl { variable })
}

/// Opens one connection to report exactly why the server cannot be used (a pool would
/// only say that it timed out).
async fn check_reachable(
    options: &PgConnectOptions,
    target: &str,
    timeout: Duration,
) -> Result<(), DbError> {
    let connect = PgConnection::connect_with(options);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(connection)) => {
            // Closing politely is best effort; the check already succeeded.
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(err)) => Err(DbError::Unreachable {
            target: target.to_owned(),
            reason: one_line(&err),
        }),
        Err(_) => Err(DbError::Unreachable {
            target: target.to_owned(),
            reason: format!("no answer within {}", millis(timeout)),
        }),
    }
}

/// `host:port/database` — what operators need to find the server, and no secret.
fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    )
}

/// An error and its causes on one line (start-up failures are printed as one line).
fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
