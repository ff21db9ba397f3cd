//! A fresh database per test, with the two roles of DESIGN §4: a schema owner that runs
//! migrations and a service role that owns nothing.
//!
//! Databases are not dropped: the whole throwaway cluster is removed by `cargo xtask test`.

use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection};

use crate::{ENV_PG_URL, provided};

/// Role that owns the schema and runs migrations.
pub const OWNER_ROLE: &str = "paysuite_test_owner";
/// Role the service connects as.
pub const SERVICE_ROLE: &str = "paysuite_test_app";
/// Password of both test roles (the cluster only listens on 127.0.0.1 and lives for one run).
pub const TEST_PASSWORD: &str = "paysuite-test-password";

/// One test's database.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    host: String,
    port: u16,
    superuser_url: String,
}

/// Serializes the test roles' setup between tests running in parallel.
const ROLES_LOCK: i64 = 0x7465_7374_726f_6c65;

impl TestDatabase {
    /// Creates an empty database owned by [`OWNER_ROLE`].
    pub async fn create() -> anyhow::Result<Self> {
        let superuser_url = provided(ENV_PG_URL)?;
        let parsed = url::Url::parse(&superuser_url)?;
        let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
        let port = parsed.port().unwrap_or(5432);
        let mut admin = PgConnection::connect(&superuser_url).await?;
        // Tests run in parallel, and concurrent changes to one role fail ("tuple
        // concurrently updated"): one test at a time sets the roles up, once.
        let mut setup = admin.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ROLES_LOCK)
            .execute(&mut *setup)
            .await?;
        for role in [OWNER_ROLE, SERVICE_ROLE] {
            let statement = format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN \
                 CREATE ROLE {role} LOGIN PASSWORD '{TEST_PASSWORD}'; END IF; END $$"
            );
            setup.execute(sqlx::AssertSqlSafe(statement)).await?;
        }
        // The owner sets the service role's timeouts when it migrates (CREATEROLE).
        setup
            .execute(sqlx::AssertSqlSafe(format!(
                "DO $$ BEGIN IF NOT (SELECT rolcreaterole FROM pg_roles WHERE rolname = '{OWNER_ROLE}') THEN \
                 ALTER ROLE {OWNER_ROLE} CREATEROLE; END IF; END $$"
            )))
            .await?;
        setup.commit().await?;
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {name} OWNER {OWNER_ROLE}"
            )))
            .await?;
        admin.close().await?;
        Ok(Self {
            name,
            host,
            port,
            superuser_url,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// URL of the schema owner.
    pub fn owner_url(&self) -> String {
        self.url_for(OWNER_ROLE)
    }

    /// URL of the service role.
    pub fn service_url(&self) -> String {
        self.url_for(SERVICE_ROLE)
    }

    /// URL of the cluster's superuser, on this database.
    pub fn superuser_url(&self) -> anyhow::Result<String> {
        let mut url = url::Url::parse(&self.superuser_url)?;
        url.set_path(&self.name);
        Ok(url.to_string())
    }

    /// The sum of every account's balance (folded balance plus unfolded deltas), read as
    /// the owner: 0 when the books balance (the currencies of one test never mix here).
    pub async fn books_sum(&self) -> anyhow::Result<i64> {
        let mut owner = PgConnection::connect(&self.owner_url()).await?;
        Ok(sqlx::query_scalar(
            "SELECT coalesce(sum(a.balance + coalesce((SELECT sum(d.amount) FROM balance_deltas d \
             WHERE d.account_id = a.id), 0)), 0)::bigint FROM accounts a",
        )
        .fetch_one(&mut owner)
        .await?)
    }

    /// payment-svc's database settings: service role for serving, owner for migrations.
    pub fn payment_config(&self) -> payment_svc::config::DatabaseConfig {
        let mut config =
            payment_svc::config::DatabaseConfig::with_url(SecretString::from(self.service_url()));
        config.migration_url = Some(SecretString::from(self.owner_url()));
        config
    }

    fn url_for(&self, role: &str) -> String {
        format!(
            "postgres://{role}:{TEST_PASSWORD}@{}:{}/{}",
            self.host, self.port, self.name
        )
    }
}
