//! The test harness: real PostgreSQL, real Redis, real service binaries.
//!
//! `cargo xtask test` starts a throwaway PostgreSQL and Redis and tells the tests where
//! they are through environment variables; every test then gets its own database
//! ([`postgres::TestDatabase`]), its own Redis key space ([`redis::TestRedis`]) or its
//! own Redis processes to freeze and kill ([`redis::PrivateRedis`],
//! [`redis::RedisCluster`]), the whole suite under a seeded fault schedule
//! ([`bank::Bank`]), and
//! services on port 0 — in-process through each crate's `run`, or as spawned binaries
//! ([`process::SpawnedService`]) when a test must signal or kill a process. Tests of
//! telemetry run their own OTLP collector ([`otlp::Collector`]).
//!
//! The tests themselves live in `tests/suite/`, one module per area, compiled into one
//! binary.

pub mod acquirer;
pub mod bank;
pub mod gateway;
pub mod grpcurl;
pub mod hostile;
pub mod identity;
pub mod otlp;
pub mod payments;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod services;

use std::time::Duration;

/// `PAYSUITE_TEST_PG_URL`: a superuser URL of the throwaway PostgreSQL.
pub const ENV_PG_URL: &str = "PAYSUITE_TEST_PG_URL";
/// `PAYSUITE_TEST_REDIS_URL`: the throwaway Redis.
pub const ENV_REDIS_URL: &str = "PAYSUITE_TEST_REDIS_URL";
/// `PAYSUITE_REDIS_SERVER`: the redis-server binary, for tests that run their own.
pub const ENV_REDIS_SERVER: &str = "PAYSUITE_REDIS_SERVER";
/// `PAYSUITE_REDIS_CLI`: the redis-cli binary (it creates test clusters).
pub const ENV_REDIS_CLI: &str = "PAYSUITE_REDIS_CLI";
/// `PAYSUITE_GRPCURL`: the grpcurl binary.
pub const ENV_GRPCURL: &str = "PAYSUITE_GRPCURL";
/// `PAYSUITE_BIN_DIR`: where the service binaries were built.
pub const ENV_BIN_DIR: &str = "PAYSUITE_BIN_DIR";

/// A liveness bound for things configured to happen "soon": tests assert behaviour,
/// never speed, and this machine is shared (DESIGN §10).
pub const LIVENESS: Duration = Duration::from_secs(30);

/// Reads a variable that `cargo xtask test` provides, with a message saying so.
pub fn provided(variable: &str) -> anyhow::Result<String> {
    std::env::var(variable).map_err(|_| {
        anyhow::anyhow!(
            "{variable} is not set: run the tests through `cargo xtask test`, which provisions it"
        )
    })
}
