//! gateway-svc's settings, read once from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use service_kit::breaker::{BreakerConfig, BreakerEnv};
use service_kit::identity::SigningKey;
use service_kit::{ConfigError, Env, ServerLimits};

use crate::keys::Pepper;
use crate::retry::{MAX_RETRY_MIN_PER_SECOND, RetryBudgetConfig};
use crate::routes::RouteTable;

/// `LISTEN_ADDR`: the gRPC listen address.
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";
/// `TLS_CERT_FILE`: the listener's certificate chain (PEM).
pub const ENV_TLS_CERT_FILE: &str = "TLS_CERT_FILE";
/// `TLS_KEY_FILE`: the listener's private key (PEM).
pub const ENV_TLS_KEY_FILE: &str = "TLS_KEY_FILE";
/// `TLS_PLAINTEXT`: `true` serves without TLS (local development only).
pub const ENV_TLS_PLAINTEXT: &str = "TLS_PLAINTEXT";
/// `ROUTES_FILE`: a YAML routes file; replaces the two `*_SVC_ADDR` clusters.
pub const ENV_ROUTES_FILE: &str = "ROUTES_FILE";
/// `PAYMENT_SVC_ADDR`: payment-svc endpoints, comma-separated `http://host:port`.
pub const ENV_PAYMENT_SVC_ADDR: &str = "PAYMENT_SVC_ADDR";
/// `RATELIMIT_SVC_ADDR`: ratelimit-svc endpoints, comma-separated `http://host:port`.
pub const ENV_RATELIMIT_SVC_ADDR: &str = "RATELIMIT_SVC_ADDR";
/// `API_KEYS_FILE`: the YAML file of API key hashes.
pub const ENV_API_KEYS_FILE: &str = "API_KEYS_FILE";
/// `API_KEY_PEPPER`: the secret the key hashes are keyed with (≥ 32 bytes).
pub const ENV_API_KEY_PEPPER: &str = "API_KEY_PEPPER";
/// `API_KEYS_RELOAD_INTERVAL`: how often the keys file is re-read.
pub const ENV_API_KEYS_RELOAD_INTERVAL: &str = "API_KEYS_RELOAD_INTERVAL";
/// `IDENTITY_SIGNING_KEY`: the Ed25519 key identity tokens are minted with (`kid:base64url`).
pub const ENV_IDENTITY_SIGNING_KEY: &str = "IDENTITY_SIGNING_KEY";
/// `IDENTITY_SIGNING_KEY_FILE`: a file holding that key (read when the variable is unset).
pub const ENV_IDENTITY_SIGNING_KEY_FILE: &str = "IDENTITY_SIGNING_KEY_FILE";
/// `DEADLINE_DEFAULT`: the deadline of unary calls whose caller set none.
pub const ENV_DEADLINE_DEFAULT: &str = "DEADLINE_DEFAULT";
/// `DEADLINE_MAX`: the longest deadline a unary call gets, whatever its caller asked.
pub const ENV_DEADLINE_MAX: &str = "DEADLINE_MAX";
/// `UPSTREAM_CONNECT_TIMEOUT`: how long connecting to an upstream endpoint may take.
pub const ENV_UPSTREAM_CONNECT_TIMEOUT: &str = "UPSTREAM_CONNECT_TIMEOUT";
/// `UPSTREAM_RESOLVE_INTERVAL`: how often endpoints given by DNS name are re-resolved.
pub const ENV_UPSTREAM_RESOLVE_INTERVAL: &str = "UPSTREAM_RESOLVE_INTERVAL";
/// `UPSTREAM_RETRY_BUDGET_PERCENT`: retries allowed per 100 calls to a cluster.
pub const ENV_UPSTREAM_RETRY_BUDGET_PERCENT: &str = "UPSTREAM_RETRY_BUDGET_PERCENT";
/// `UPSTREAM_RETRY_MIN_PER_SECOND`: retries allowed per second whatever the traffic.
pub const ENV_UPSTREAM_RETRY_MIN_PER_SECOND: &str = "UPSTREAM_RETRY_MIN_PER_SECOND";
/// `UPSTREAM_BREAKER_CONSECUTIVE_FAILURES`: failures in a row that trip an endpoint's breaker.
pub const ENV_UPSTREAM_BREAKER_CONSECUTIVE_FAILURES: &str = "UPSTREAM_BREAKER_CONSECUTIVE_FAILURES";
/// `UPSTREAM_BREAKER_FAILURE_RATE_PERCENT`: the failure rate over the window that trips it.
pub const ENV_UPSTREAM_BREAKER_FAILURE_RATE_PERCENT: &str = "UPSTREAM_BREAKER_FAILURE_RATE_PERCENT";
/// `UPSTREAM_BREAKER_MINIMUM_CALLS`: calls in the window before the rate counts.
pub const ENV_UPSTREAM_BREAKER_MINIMUM_CALLS: &str = "UPSTREAM_BREAKER_MINIMUM_CALLS";
/// `UPSTREAM_BREAKER_WINDOW`: the failure rate's sliding window.
pub const ENV_UPSTREAM_BREAKER_WINDOW: &str = "UPSTREAM_BREAKER_WINDOW";
/// `UPSTREAM_BREAKER_BASE_BACKOFF`: how long a tripped breaker waits before its first probe.
pub const ENV_UPSTREAM_BREAKER_BASE_BACKOFF: &str = "UPSTREAM_BREAKER_BASE_BACKOFF";
/// `UPSTREAM_BREAKER_MAX_BACKOFF`: the longest wait between probes.
pub const ENV_UPSTREAM_BREAKER_MAX_BACKOFF: &str = "UPSTREAM_BREAKER_MAX_BACKOFF";

/// The variables of the upstream endpoints' breakers.
pub const UPSTREAM_BREAKER_ENV: BreakerEnv = BreakerEnv {
    consecutive_failures: ENV_UPSTREAM_BREAKER_CONSECUTIVE_FAILURES,
    failure_rate_percent: ENV_UPSTREAM_BREAKER_FAILURE_RATE_PERCENT,
    minimum_calls: ENV_UPSTREAM_BREAKER_MINIMUM_CALLS,
    window: ENV_UPSTREAM_BREAKER_WINDOW,
    base_backoff: ENV_UPSTREAM_BREAKER_BASE_BACKOFF,
    max_backoff: ENV_UPSTREAM_BREAKER_MAX_BACKOFF,
};

/// `RATELIMIT_ENABLED`: `false` turns rate limiting off even when `RATELIMIT_SVC_ADDR` is set.
pub const ENV_RATELIMIT_ENABLED: &str = "RATELIMIT_ENABLED";
/// `RATELIMIT_DOMAIN`: the Envoy RLS domain the gateway's descriptors belong to.
pub const ENV_RATELIMIT_DOMAIN: &str = "RATELIMIT_DOMAIN";
/// `RATELIMIT_TIMEOUT`: how long one rate limit decision may take before the failure
/// mode answers.
pub const ENV_RATELIMIT_TIMEOUT: &str = "RATELIMIT_TIMEOUT";
/// `RATELIMIT_FAILURE_MODE`: `open` (admit) or `closed` (refuse) when ratelimit-svc
/// cannot decide.
pub const ENV_RATELIMIT_FAILURE_MODE: &str = "RATELIMIT_FAILURE_MODE";

/// The default gRPC listen address.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50051";
/// payment-svc when `PAYMENT_SVC_ADDR` is unset (`cargo xtask up`'s port).
pub const DEFAULT_PAYMENT_SVC_ADDR: &str = "http://127.0.0.1:50052";
/// ratelimit-svc when `RATELIMIT_SVC_ADDR` is unset.
pub const DEFAULT_RATELIMIT_SVC_ADDR: &str = "http://127.0.0.1:50053";
/// Default of `API_KEYS_RELOAD_INTERVAL`.
pub const DEFAULT_API_KEYS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Default of `DEADLINE_DEFAULT`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// Default of `DEADLINE_MAX`.
pub const DEFAULT_DEADLINE_MAX: Duration = Duration::from_secs(60);
/// Default of `UPSTREAM_CONNECT_TIMEOUT`.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default of `RATELIMIT_DOMAIN` (the domain of `ratelimit-svc/rules/gateway.yaml`).
pub const DEFAULT_RATELIMIT_DOMAIN: &str = "paysuite-gateway";
/// Default of `RATELIMIT_TIMEOUT`: a decision is one Redis round trip away.
pub const DEFAULT_RATELIMIT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default of `UPSTREAM_RESOLVE_INTERVAL`.
pub const DEFAULT_UPSTREAM_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

/// How the listener speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    /// TLS with this certificate chain and key (PEM files, e.g. a mounted Secret).
    Tls {
        /// The certificate chain.
        cert_file: PathBuf,
        /// The private key.
        key_file: PathBuf,
    },
    /// No TLS: only for local development (`TLS_PLAINTEXT=true`).
    Plaintext,
}

/// Deadlines of unary calls (streams are long-lived by design and exempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// When the caller sets none.
    pub default: Duration,
    /// The most any call gets.
    pub max: Duration,
}

/// What a call gets when ratelimit-svc cannot decide (timeout, error, open breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Admit it: an outage of the limiter does not become an outage of the API.
    #[default]
    Open,
    /// Refuse it (UNAVAILABLE): the limit protects something that must not be overrun.
    Closed,
}

impl std::str::FromStr for FailureMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            _ => Err("must be `open` or `closed`".to_owned()),
        }
    }
}

/// Rate limiting through ratelimit-svc's Envoy RLS v3 API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimiting {
    /// ratelimit-svc endpoints (`http://host:port`), balanced.
    pub endpoints: Vec<Uri>,
    /// The RLS domain of the gateway's descriptors.
    pub domain: String,
    /// How long one decision may take.
    pub timeout: Duration,
    /// What a call gets when no decision came.
    pub failure_mode: FailureMode,
    /// The breaker in front of ratelimit-svc.
    pub breaker: BreakerConfig,
}

impl RateLimiting {
    /// The defaults around `endpoints` (tests build settings this way).
    pub fn new(endpoints: Vec<Uri>) -> Self {
        Self {
            endpoints,
            domain: DEFAULT_RATELIMIT_DOMAIN.to_owned(),
            timeout: DEFAULT_RATELIMIT_TIMEOUT,
            failure_mode: FailureMode::Open,
            breaker: BreakerConfig::default(),
        }
    }
}

/// Everything gateway-svc needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `main` binds the gRPC listener.
    pub listen_addr: SocketAddr,
    /// Server hardening.
    pub limits: ServerLimits,
    /// TLS or plaintext.
    pub listener: Listener,
    /// The upstream clusters.
    pub routes: RouteTable,
    /// The API keys file.
    pub api_keys_file: PathBuf,
    /// The secret the key hashes are keyed with.
    pub api_key_pepper: Pepper,
    /// How often the keys file is re-read.
    pub api_keys_reload_interval: Duration,
    /// The key identity tokens are minted with.
    pub signing_key: Arc<SigningKey>,
    /// Unary deadlines.
    pub deadlines: Deadlines,
    /// How long connecting to an upstream endpoint may take.
    pub upstream_connect_timeout: Duration,
    /// Rate limiting; `None`: off.
    pub rate_limiting: Option<RateLimiting>,
    /// How often endpoints given by DNS name are re-resolved.
    pub upstream_resolve_interval: Duration,
    /// How each upstream endpoint's breaker trips and recovers.
    pub upstream_breaker: BreakerConfig,
    /// How much each upstream cluster may be retried.
    pub upstream_retry_budget: RetryBudgetConfig,
}

impl Config {
    /// Reads the configuration; fails naming the first bad variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let default_addr: SocketAddr = DEFAULT_LISTEN_ADDR
            .parse()
            .map_err(|err| ConfigError::new(ENV_LISTEN_ADDR, err))?;
        let pepper = env.required_secret(ENV_API_KEY_PEPPER)?;
        let deadlines = Deadlines {
            default: env.duration_or(ENV_DEADLINE_DEFAULT, DEFAULT_DEADLINE)?,
            max: env.duration_or(ENV_DEADLINE_MAX, DEFAULT_DEADLINE_MAX)?,
        };
        if deadlines.default.is_zero() || deadlines.default > deadlines.max {
            return Err(ConfigError::new(
                ENV_DEADLINE_DEFAULT,
                format!("must be positive and at most {ENV_DEADLINE_MAX}"),
            ));
        }
        Ok(Self {
            listen_addr: env.parse_or(ENV_LISTEN_ADDR, default_addr)?,
            limits: ServerLimits::from_env(env)?,
            listener: listener_from_env(env)?,
            routes: routes_from_env(env)?,
            api_keys_file: env.required(ENV_API_KEYS_FILE)?,
            api_key_pepper: Pepper::new(pepper)
                .map_err(|err| ConfigError::new(ENV_API_KEY_PEPPER, err))?,
            api_keys_reload_interval: env.duration_or(
                ENV_API_KEYS_RELOAD_INTERVAL,
                DEFAULT_API_KEYS_RELOAD_INTERVAL,
            )?,
            signing_key: Arc::new(signing_key_from_env(env)?),
            deadlines,
            upstream_connect_timeout: env.duration_or(
                ENV_UPSTREAM_CONNECT_TIMEOUT,
                DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            )?,
            rate_limiting: rate_limiting_from_env(env)?,
            upstream_resolve_interval: positive(
                env,
                ENV_UPSTREAM_RESOLVE_INTERVAL,
                DEFAULT_UPSTREAM_RESOLVE_INTERVAL,
            )?,
            upstream_breaker: BreakerConfig::from_env(env, &UPSTREAM_BREAKER_ENV)?,
            upstream_retry_budget: retry_budget_from_env(env)?,
        })
    }

    /// The defaults around what a test must choose (tests build configs this way).
    pub fn new(
        listen_addr: SocketAddr,
        listener: Listener,
        routes: RouteTable,
        api_keys_file: PathBuf,
        api_key_pepper: Pepper,
        signing_key: Arc<SigningKey>,
    ) -> Self {
        Self {
            listen_addr,
            limits: ServerLimits::default(),
            listener,
            routes,
            api_keys_file,
            api_key_pepper,
            api_keys_reload_interval: DEFAULT_API_KEYS_RELOAD_INTERVAL,
            signing_key,
            deadlines: Deadlines {
                default: DEFAULT_DEADLINE,
                max: DEFAULT_DEADLINE_MAX,
            },
            upstream_connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            rate_limiting: None,
            upstream_resolve_interval: DEFAULT_UPSTREAM_RESOLVE_INTERVAL,
            upstream_breaker: BreakerConfig::default(),
            upstream_retry_budget: RetryBudgetConfig::default(),
        }
    }
}

/// On when `RATELIMIT_SVC_ADDR` names ratelimit-svc (the variable also routes its own
/// API), unless `RATELIMIT_ENABLED=false`.
fn rate_limiting_from_env(env: &Env) -> Result<Option<RateLimiting>, ConfigError> {
    if !env.bool_or(ENV_RATELIMIT_ENABLED, true)? {
        return Ok(None);
    }
    let Some(list) = env.raw(ENV_RATELIMIT_SVC_ADDR) else {
        return Ok(None);
    };
    let endpoints = crate::routes::split_list(list)
        .iter()
        .map(|endpoint| crate::routes::parse_endpoint(endpoint))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| ConfigError::new(ENV_RATELIMIT_SVC_ADDR, err))?;
    if endpoints.is_empty() {
        return Err(ConfigError::new(
            ENV_RATELIMIT_SVC_ADDR,
            "names no endpoint",
        ));
    }
    let mut settings = RateLimiting::new(endpoints);
    if let Some(domain) = env.raw(ENV_RATELIMIT_DOMAIN) {
        domain.clone_into(&mut settings.domain);
    }
    settings.timeout = env.duration_or(ENV_RATELIMIT_TIMEOUT, DEFAULT_RATELIMIT_TIMEOUT)?;
    if settings.timeout.is_zero() {
        return Err(ConfigError::new(ENV_RATELIMIT_TIMEOUT, "must be positive"));
    }
    settings.failure_mode = env.parse_or(ENV_RATELIMIT_FAILURE_MODE, FailureMode::Open)?;
    Ok(Some(settings))
}

fn retry_budget_from_env(env: &Env) -> Result<RetryBudgetConfig, ConfigError> {
    let defaults = RetryBudgetConfig::default();
    let budget = RetryBudgetConfig {
        percent: env.parse_or(ENV_UPSTREAM_RETRY_BUDGET_PERCENT, defaults.percent)?,
        min_per_second: env.parse_or(ENV_UPSTREAM_RETRY_MIN_PER_SECOND, defaults.min_per_second)?,
    };
    if budget.percent > 100 {
        return Err(ConfigError::new(
            ENV_UPSTREAM_RETRY_BUDGET_PERCENT,
            "must be between 0 and 100",
        ));
    }
    if budget.min_per_second > MAX_RETRY_MIN_PER_SECOND {
        return Err(ConfigError::new(
            ENV_UPSTREAM_RETRY_MIN_PER_SECOND,
            format!("must be at most {MAX_RETRY_MIN_PER_SECOND}"),
        ));
    }
    Ok(budget)
}

fn positive(env: &Env, name: &str, default: Duration) -> Result<Duration, ConfigError> {
    let value = env.duration_or(name, default)?;
    if value.is_zero() {
        return Err(ConfigError::new(name, "must be positive"));
    }
    Ok(value)
}

fn listener_from_env(env: &Env) -> Result<Listener, ConfigError> {
    let plaintext = env.bool_or(ENV_TLS_PLAINTEXT, false)?;
    let cert_file: Option<PathBuf> = env.optional(ENV_TLS_CERT_FILE)?;
    let key_file: Option<PathBuf> = env.optional(ENV_TLS_KEY_FILE)?;
    match (plaintext, cert_file, key_file) {
        (true, None, None) => Ok(Listener::Plaintext),
        (true, _, _) => Err(ConfigError::new(
            ENV_TLS_PLAINTEXT,
            format!("set either {ENV_TLS_PLAINTEXT}=true or the TLS files, not both"),
        )),
        (false, Some(cert_file), Some(key_file)) => Ok(Listener::Tls {
            cert_file,
            key_file,
        }),
        (false, None, _) => Err(ConfigError::new(
            ENV_TLS_CERT_FILE,
            format!("is required (or {ENV_TLS_PLAINTEXT}=true for local development)"),
        )),
        (false, Some(_), None) => Err(ConfigError::new(ENV_TLS_KEY_FILE, "is required")),
    }
}

fn routes_from_env(env: &Env) -> Result<RouteTable, ConfigError> {
    if let Some(path) = env.optional::<PathBuf>(ENV_ROUTES_FILE)? {
        let text = std::fs::read_to_string(&path).map_err(|err| {
            ConfigError::new(
                ENV_ROUTES_FILE,
                format!("cannot read {}: {err}", path.display()),
            )
        })?;
        return RouteTable::from_yaml(&text).map_err(|err| {
            ConfigError::new(ENV_ROUTES_FILE, format!("{}: {err}", path.display()))
        });
    }
    let payment = env
        .raw(ENV_PAYMENT_SVC_ADDR)
        .unwrap_or(DEFAULT_PAYMENT_SVC_ADDR);
    let ratelimit = env
        .raw(ENV_RATELIMIT_SVC_ADDR)
        .unwrap_or(DEFAULT_RATELIMIT_SVC_ADDR);
    RouteTable::standard(payment, ratelimit).map_err(|err| {
        // Name the variable the bad endpoint came from.
        let variable = if err.starts_with(&format!("cluster {}:", crate::routes::RATELIMIT)) {
            ENV_RATELIMIT_SVC_ADDR
        } else {
            ENV_PAYMENT_SVC_ADDR
        };
        ConfigError::new(variable, err)
    })
}

fn signing_key_from_env(env: &Env) -> Result<SigningKey, ConfigError> {
    let (variable, text) = match env.secret(ENV_IDENTITY_SIGNING_KEY) {
        Some(text) => (ENV_IDENTITY_SIGNING_KEY, text),
        None => {
            let path: PathBuf = env
                .optional(ENV_IDENTITY_SIGNING_KEY_FILE)?
                .ok_or_else(|| {
                    ConfigError::new(
                        ENV_IDENTITY_SIGNING_KEY,
                        format!("is required (or {ENV_IDENTITY_SIGNING_KEY_FILE})"),
                    )
                })?;
            let text = std::fs::read_to_string(&path).map_err(|err| {
                ConfigError::new(
                    ENV_IDENTITY_SIGNING_KEY_FILE,
                    format!("cannot read {}: {err}", path.display()),
                )
            })?;
            (ENV_IDENTITY_SIGNING_KEY_FILE, text.trim().to_owned().into())
        }
    };
    SigningKey::parse(&text).map_err(|err| ConfigError::new(variable, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_limiting(pairs: &[(&str, &str)]) -> Result<Option<RateLimiting>, ConfigError> {
        rate_limiting_from_env(&Env::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn rate_limiting_is_on_only_with_an_address_and_not_disabled() -> anyhow::Result<()> {
        assert_eq!(rate_limiting(&[])?, None);
        let addr = (
            ENV_RATELIMIT_SVC_ADDR,
            "http://rl-0:50053, http://rl-1:50053",
        );
        assert_eq!(
            rate_limiting(&[addr, (ENV_RATELIMIT_ENABLED, "false")])?,
            None
        );
        let defaults = rate_limiting(&[addr])?.unwrap_or_else(|| RateLimiting::new(Vec::new()));
        assert_eq!(defaults.endpoints.len(), 2);
        assert_eq!(defaults.domain, DEFAULT_RATELIMIT_DOMAIN);
        assert_eq!(defaults.timeout, DEFAULT_RATELIMIT_TIMEOUT);
        assert_eq!(defaults.failure_mode, FailureMode::Open);
        let tuned = rate_limiting(&[
            addr,
            (ENV_RATELIMIT_DOMAIN, "edge"),
            (ENV_RATELIMIT_TIMEOUT, "20ms"),
            (ENV_RATELIMIT_FAILURE_MODE, "closed"),
        ])?
        .unwrap_or_else(|| RateLimiting::new(Vec::new()));
        assert_eq!(
            (tuned.domain.as_str(), tuned.timeout, tuned.failure_mode),
            ("edge", Duration::from_millis(20), FailureMode::Closed)
        );
        Ok(())
    }

    #[test]
    fn bad_rate_limiting_settings_name_their_variable() {
        let addr = (ENV_RATELIMIT_SVC_ADDR, "http://rl:50053");
        for (pairs, variable) in [
            (
                vec![(ENV_RATELIMIT_SVC_ADDR, "rl:50053")],
                ENV_RATELIMIT_SVC_ADDR,
            ),
            (
                vec![addr, (ENV_RATELIMIT_FAILURE_MODE, "maybe")],
                ENV_RATELIMIT_FAILURE_MODE,
            ),
            (
                vec![addr, (ENV_RATELIMIT_TIMEOUT, "0s")],
                ENV_RATELIMIT_TIMEOUT,
            ),
            (
                vec![addr, (ENV_RATELIMIT_ENABLED, "perhaps")],
                ENV_RATELIMIT_ENABLED,
            ),
        ] {
            let err = rate_limiting(&pairs).err().map(|err| err.to_string());
            assert!(
                err.as_deref().is_some_and(|err| err.starts_with(variable)),
                "{pairs:?}: {err:?}"
            );
        }
    }
}
