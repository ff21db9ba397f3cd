//! payment-svc's settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use service_kit::{ConfigError, Env, IdentityConfig, ServerLimits};

/// `LISTEN_ADDR`: the gRPC listen address.
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";
/// `DATABASE_URL`: PostgreSQL URL of the service role (not the tables' owner).
pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
/// `DATABASE_MIGRATION_URL`: PostgreSQL URL of the role that owns the schema; defaults to `DATABASE_URL`.
pub const ENV_DATABASE_MIGRATION_URL: &str = "DATABASE_MIGRATION_URL";
/// `MIGRATE_ON_START`: run migrations before serving (`false` when a Job migrates).
pub const ENV_MIGRATE_ON_START: &str = "MIGRATE_ON_START";
/// `DATABASE_MAX_CONNECTIONS`: size of the connection pool.
pub const ENV_DATABASE_MAX_CONNECTIONS: &str = "DATABASE_MAX_CONNECTIONS";
/// `DATABASE_CONNECT_TIMEOUT`: bound on establishing a connection.
pub const ENV_DATABASE_CONNECT_TIMEOUT: &str = "DATABASE_CONNECT_TIMEOUT";
/// `DATABASE_ACQUIRE_TIMEOUT`: bound on waiting for a pooled connection; beyond it calls answer UNAVAILABLE.
pub const ENV_DATABASE_ACQUIRE_TIMEOUT: &str = "DATABASE_ACQUIRE_TIMEOUT";
/// `DATABASE_STATEMENT_TIMEOUT`: PostgreSQL `statement_timeout` of service connections.
pub const ENV_DATABASE_STATEMENT_TIMEOUT: &str = "DATABASE_STATEMENT_TIMEOUT";
/// `DATABASE_LOCK_TIMEOUT`: PostgreSQL `lock_timeout` of service connections.
pub const ENV_DATABASE_LOCK_TIMEOUT: &str = "DATABASE_LOCK_TIMEOUT";
/// `DATABASE_IDLE_IN_TRANSACTION_TIMEOUT`: PostgreSQL `idle_in_transaction_session_timeout`.
pub const ENV_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT: &str = "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT";

/// `ACQUIRER_TIMEOUT`: bound on each acquirer call (beyond it the outcome is unknown).
pub const ENV_ACQUIRER_TIMEOUT: &str = "ACQUIRER_TIMEOUT";
/// `ACQUIRER_URL`: the remote acquirer (`paysuite.acquirer.v1`); unset = the in-process sandbox.
pub const ENV_ACQUIRER_URL: &str = "ACQUIRER_URL";
/// `ACQUIRER_CONNECT_TIMEOUT`: bound on connecting to the remote acquirer.
pub const ENV_ACQUIRER_CONNECT_TIMEOUT: &str = "ACQUIRER_CONNECT_TIMEOUT";
/// `ACQUIRER_BREAKER_CONSECUTIVE_FAILURES`: the breaker opens after this many failures in a row.
pub const ENV_ACQUIRER_BREAKER_CONSECUTIVE_FAILURES: &str = "ACQUIRER_BREAKER_CONSECUTIVE_FAILURES";
/// `ACQUIRER_BREAKER_FAILURE_RATE_PERCENT`: …or at this failure rate over the window…
pub const ENV_ACQUIRER_BREAKER_FAILURE_RATE_PERCENT: &str = "ACQUIRER_BREAKER_FAILURE_RATE_PERCENT";
/// `ACQUIRER_BREAKER_MINIMUM_CALLS`: …with at least this many calls in it.
pub const ENV_ACQUIRER_BREAKER_MINIMUM_CALLS: &str = "ACQUIRER_BREAKER_MINIMUM_CALLS";
/// `ACQUIRER_BREAKER_WINDOW`: the failure-rate window.
pub const ENV_ACQUIRER_BREAKER_WINDOW: &str = "ACQUIRER_BREAKER_WINDOW";
/// `ACQUIRER_BREAKER_BASE_BACKOFF`: how long the breaker stays open after its first trip.
pub const ENV_ACQUIRER_BREAKER_BASE_BACKOFF: &str = "ACQUIRER_BREAKER_BASE_BACKOFF";
/// `ACQUIRER_BREAKER_MAX_BACKOFF`: the longest it stays open.
pub const ENV_ACQUIRER_BREAKER_MAX_BACKOFF: &str = "ACQUIRER_BREAKER_MAX_BACKOFF";
/// `IDEMPOTENCY_LEASE`: how long a request holds its idempotency key between phases.
pub const ENV_IDEMPOTENCY_LEASE: &str = "IDEMPOTENCY_LEASE";
/// `SANDBOX_SLOW_ANSWER`: how long the sandbox's slow test card takes to answer.
pub const ENV_SANDBOX_SLOW_ANSWER: &str = "SANDBOX_SLOW_ANSWER";

/// `JOBS_ENABLED`: run background workers in this process.
pub const ENV_JOBS_ENABLED: &str = "JOBS_ENABLED";
/// `JOB_CONCURRENCY`: jobs one process runs at once.
pub const ENV_JOB_CONCURRENCY: &str = "JOB_CONCURRENCY";
/// `JOB_LEASE`: how long a claim holds a job (renewed while it runs).
pub const ENV_JOB_LEASE: &str = "JOB_LEASE";
/// `JOB_POLL_INTERVAL`: the safety-net poll; workers wake on NOTIFY.
pub const ENV_JOB_POLL_INTERVAL: &str = "JOB_POLL_INTERVAL";
/// `JOB_MAX_ATTEMPTS`: attempts before a job is dead (one still settling an open acquirer
/// attempt goes on until it is settled).
pub const ENV_JOB_MAX_ATTEMPTS: &str = "JOB_MAX_ATTEMPTS";
/// `JOB_BACKOFF_BASE`: the first retry's backoff (doubled per attempt, ±25 % jitter).
pub const ENV_JOB_BACKOFF_BASE: &str = "JOB_BACKOFF_BASE";
/// `JOB_BACKOFF_MAX`: the longest retry backoff.
pub const ENV_JOB_BACKOFF_MAX: &str = "JOB_BACKOFF_MAX";
/// `JOB_RETENTION`: how long finished jobs are kept.
pub const ENV_JOB_RETENTION: &str = "JOB_RETENTION";
/// `JOB_MAINTENANCE_INTERVAL`: how often workers reap finished jobs and expired keys and hand abandoned requests to jobs.
pub const ENV_JOB_MAINTENANCE_INTERVAL: &str = "JOB_MAINTENANCE_INTERVAL";
/// `IDEMPOTENCY_RETENTION`: how long idempotency keys (and their answers) are kept.
pub const ENV_IDEMPOTENCY_RETENTION: &str = "IDEMPOTENCY_RETENTION";
/// `AUTHORIZATION_VOID_AFTER`: uncaptured authorizations are voided after this.
pub const ENV_AUTHORIZATION_VOID_AFTER: &str = "AUTHORIZATION_VOID_AFTER";

/// `STREAM_POLL_INTERVAL`: the safety-net poll of balance and event streams (they wake on NOTIFY).
pub const ENV_STREAM_POLL_INTERVAL: &str = "STREAM_POLL_INTERVAL";

/// Background jobs.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Run workers in this process.
    pub enabled: bool,
    /// Jobs run at once.
    pub concurrency: usize,
    /// How long a claim holds a job.
    pub lease: Duration,
    /// The safety-net poll.
    pub poll_interval: Duration,
    /// Attempts before a job is dead.
    pub max_attempts: i32,
    /// First retry backoff.
    pub backoff_base: Duration,
    /// Longest retry backoff.
    pub backoff_max: Duration,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// Uncaptured authorizations are voided after this.
    pub void_after: Duration,
    /// How often the upkeep runs.
    pub maintenance_interval: Duration,
    /// How long idempotency keys are kept.
    pub idempotency_retention: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            concurrency: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            retention: Duration::from_secs(7 * 24 * 3600),
            void_after: Duration::from_secs(7 * 24 * 3600),
            maintenance_interval: Duration::from_secs(30),
            idempotency_retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl JobsConfig {
    /// Reads the `JOB_*`, `JOBS_ENABLED` and `AUTHORIZATION_VOID_AFTER` variables.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let concurrency: usize = env.parse_or(ENV_JOB_CONCURRENCY, defaults.concurrency)?;
        if concurrency == 0 {
            return Err(ConfigError::new(
                ENV_JOB_CONCURRENCY,
                "must be greater than zero",
            ));
        }
        let max_attempts: i32 = env.parse_or(ENV_JOB_MAX_ATTEMPTS, defaults.max_attempts)?;
        if max_attempts <= 0 {
            return Err(ConfigError::new(
                ENV_JOB_MAX_ATTEMPTS,
                "must be greater than zero",
            ));
        }
        let lease = env.duration_or(ENV_JOB_LEASE, defaults.lease)?;
        if lease < Duration::from_millis(30) {
            return Err(ConfigError::new(ENV_JOB_LEASE, "must be at least 30ms"));
        }
        Ok(Self {
            enabled: env.bool_or(ENV_JOBS_ENABLED, defaults.enabled)?,
            concurrency,
            lease,
            poll_interval: env.duration_or(ENV_JOB_POLL_INTERVAL, defaults.poll_interval)?,
            max_attempts,
            backoff_base: env.duration_or(ENV_JOB_BACKOFF_BASE, defaults.backoff_base)?,
            backoff_max: env.duration_or(ENV_JOB_BACKOFF_MAX, defaults.backoff_max)?,
            retention: env.duration_or(ENV_JOB_RETENTION, defaults.retention)?,
            void_after: env.duration_or(ENV_AUTHORIZATION_VOID_AFTER, defaults.void_after)?,
            maintenance_interval: env
                .duration_or(ENV_JOB_MAINTENANCE_INTERVAL, defaults.maintenance_interval)?,
            idempotency_retention: env
                .duration_or(ENV_IDEMPOTENCY_RETENTION, defaults.idempotency_retention)?,
        })
    }
}

/// The card vault's key material, as configured (secrets).
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// `CARD_ENCRYPTION_KEYS`.
    pub encryption_keys: SecretString,
    /// `CARD_ENCRYPTION_ACTIVE_KEY`.
    pub active_key: Option<String>,
    /// `CARD_FINGERPRINT_KEY`.
    pub fingerprint_key: SecretString,
}

impl VaultConfig {
    /// The vault these keys describe.
    pub fn vault(&self) -> Result<crate::vault::Vault, crate::vault::VaultError> {
        use secrecy::ExposeSecret as _;
        crate::vault::Vault::from_config(
            self.encryption_keys.expose_secret(),
            self.active_key.as_deref(),
            self.fingerprint_key.expose_secret(),
        )
    }
}

/// `PAYMENT_MAX_AMOUNT_MINOR`: the largest amount one request may move, in minor units.
pub const ENV_MAX_AMOUNT_MINOR: &str = "PAYMENT_MAX_AMOUNT_MINOR";
/// Default of `PAYMENT_MAX_AMOUNT_MINOR`: 1,000,000,000 minor units (10 million BRL).
pub const DEFAULT_MAX_AMOUNT_MINOR: i64 = 1_000_000_000;

/// The default gRPC listen address.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50052";

/// Everything payment-svc needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `main` binds the gRPC listener.
    pub listen_addr: SocketAddr,
    /// PostgreSQL settings.
    pub database: DatabaseConfig,
    /// How callers' identity tokens are verified.
    pub identity: IdentityConfig,
    /// The largest amount a request may move, in minor units.
    pub max_amount_minor: i64,
    /// The card vault's keys.
    pub vault: VaultConfig,
    /// Bound on each acquirer call; beyond it the outcome is unknown.
    pub acquirer_timeout: Duration,
    /// The remote acquirer, when one is configured.
    pub acquirer_url: Option<String>,
    /// Bound on connecting to the remote acquirer.
    pub acquirer_connect_timeout: Duration,
    /// The remote acquirer's circuit breaker.
    pub acquirer_breaker: service_kit::breaker::BreakerConfig,
    /// How long a request holds its idempotency key between phases.
    pub idempotency_lease: Duration,
    /// How long the in-process sandbox's slow test card takes to answer.
    pub sandbox_slow_answer: Duration,
    /// Background jobs.
    pub jobs: JobsConfig,
    /// The safety-net poll of streams.
    pub stream_poll_interval: Duration,
    /// Server hardening.
    pub limits: ServerLimits,
}

/// The audience payment-svc's identity tokens name.
pub const AUDIENCE: &str = "payment-svc";

/// PostgreSQL settings.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// The service role's URL (may carry `sslmode=verify-full&sslrootcert=…`).
    pub url: SecretString,
    /// The schema owner's URL, for migrations; `None` means `url`.
    pub migration_url: Option<SecretString>,
    /// Run migrations before serving.
    pub migrate_on_start: bool,
    /// Pool size.
    pub max_connections: u32,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on waiting for a pooled connection.
    pub acquire_timeout: Duration,
    /// `statement_timeout` of every service connection.
    pub statement_timeout: Duration,
    /// `lock_timeout` of every service connection.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout` of every service connection.
    pub idle_in_transaction_timeout: Duration,
}

impl Config {
    /// Reads the configuration; fails naming the first bad variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let default_addr: SocketAddr = DEFAULT_LISTEN_ADDR
            .parse()
            .map_err(|err| ConfigError::new(ENV_LISTEN_ADDR, err))?;
        Ok(Self {
            listen_addr: env.parse_or(ENV_LISTEN_ADDR, default_addr)?,
            database: DatabaseConfig::from_env(env)?,
            identity: IdentityConfig::from_env(env, AUDIENCE)?,
            vault: VaultConfig {
                encryption_keys: env.required_secret(crate::vault::ENV_ENCRYPTION_KEYS)?,
                active_key: env.raw(crate::vault::ENV_ACTIVE_KEY).map(str::to_owned),
                fingerprint_key: env.required_secret(crate::vault::ENV_FINGERPRINT_KEY)?,
            },
            acquirer_timeout: env.duration_or(ENV_ACQUIRER_TIMEOUT, Duration::from_secs(5))?,
            acquirer_url: env.raw(ENV_ACQUIRER_URL).map(str::to_owned),
            acquirer_connect_timeout: env
                .duration_or(ENV_ACQUIRER_CONNECT_TIMEOUT, Duration::from_secs(2))?,
            acquirer_breaker: breaker_from_env(env)?,
            idempotency_lease: env.duration_or(ENV_IDEMPOTENCY_LEASE, Duration::from_secs(30))?,
            sandbox_slow_answer: env
                .duration_or(ENV_SANDBOX_SLOW_ANSWER, Duration::from_secs(30))?,
            max_amount_minor: {
                let max: i64 = env.parse_or(ENV_MAX_AMOUNT_MINOR, DEFAULT_MAX_AMOUNT_MINOR)?;
                if max <= 0 {
                    return Err(ConfigError::new(
                        ENV_MAX_AMOUNT_MINOR,
                        "must be greater than zero",
                    ));
                }
                max
            },
            jobs: JobsConfig::from_env(env)?,
            stream_poll_interval: env
                .duration_or(ENV_STREAM_POLL_INTERVAL, Duration::from_secs(10))?,
            limits: ServerLimits::from_env(env)?,
        })
    }
}

impl DatabaseConfig {
    /// Reads the `DATABASE_*` and `MIGRATE_ON_START` variables.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Self::with_url(SecretString::from(String::new()));
        let max_connections =
            env.parse_or(ENV_DATABASE_MAX_CONNECTIONS, defaults.max_connections)?;
        if max_connections == 0 {
            return Err(ConfigError::new(
                ENV_DATABASE_MAX_CONNECTIONS,
                "must be greater than zero",
            ));
        }
        Ok(Self {
            url: env.required_secret(ENV_DATABASE_URL)?,
            migration_url: env.secret(ENV_DATABASE_MIGRATION_URL),
            migrate_on_start: env.bool_or(ENV_MIGRATE_ON_START, defaults.migrate_on_start)?,
            max_connections,
            connect_timeout: env
                .duration_or(ENV_DATABASE_CONNECT_TIMEOUT, defaults.connect_timeout)?,
            acquire_timeout: env
                .duration_or(ENV_DATABASE_ACQUIRE_TIMEOUT, defaults.acquire_timeout)?,
            statement_timeout: env
                .duration_or(ENV_DATABASE_STATEMENT_TIMEOUT, defaults.statement_timeout)?,
            lock_timeout: env.duration_or(ENV_DATABASE_LOCK_TIMEOUT, defaults.lock_timeout)?,
            idle_in_transaction_timeout: env.duration_or(
                ENV_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT,
                defaults.idle_in_transaction_timeout,
            )?,
        })
    }

    /// The defaults for a database at `url` (tests build configs this way).
    pub fn with_url(url: SecretString) -> Self {
        Self {
            url,
            migration_url: None,
            migrate_on_start: true,
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(2),
            idle_in_transaction_timeout: Duration::from_secs(10),
        }
    }
}

fn breaker_from_env(env: &Env) -> Result<service_kit::breaker::BreakerConfig, ConfigError> {
    let defaults = service_kit::breaker::BreakerConfig::default();
    let config = service_kit::breaker::BreakerConfig {
        consecutive_failures: env.parse_or(
            ENV_ACQUIRER_BREAKER_CONSECUTIVE_FAILURES,
            defaults.consecutive_failures,
        )?,
        failure_rate_percent: env.parse_or(
            ENV_ACQUIRER_BREAKER_FAILURE_RATE_PERCENT,
            defaults.failure_rate_percent,
        )?,
        minimum_calls: env.parse_or(ENV_ACQUIRER_BREAKER_MINIMUM_CALLS, defaults.minimum_calls)?,
        window: env.duration_or(ENV_ACQUIRER_BREAKER_WINDOW, defaults.window)?,
        base_backoff: env.duration_or(ENV_ACQUIRER_BREAKER_BASE_BACKOFF, defaults.base_backoff)?,
        max_backoff: env.duration_or(ENV_ACQUIRER_BREAKER_MAX_BACKOFF, defaults.max_backoff)?,
    };
    if config.consecutive_failures == 0 {
        return Err(ConfigError::new(
            ENV_ACQUIRER_BREAKER_CONSECUTIVE_FAILURES,
            "must be greater than zero",
        ));
    }
    if !(1..=100).contains(&config.failure_rate_percent) {
        return Err(ConfigError::new(
            ENV_ACQUIRER_BREAKER_FAILURE_RATE_PERCENT,
            "must be between 1 and 100",
        ));
    }
    Ok(config)
}
