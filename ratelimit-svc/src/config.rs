//! ratelimit-svc's settings, read once from the environment.

use std::net::SocketAddr;

use service_kit::breaker::BreakerConfig;
use service_kit::{ConfigError, Env, IdentityConfig, ServerLimits};

use crate::guard::FailureMode;

/// `LISTEN_ADDR`: the gRPC listen address.
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";

/// `SLIDING_WINDOW_MAX_LIMIT`: the largest limit the exact sliding window accepts (its
/// memory is O(limit) per key).
pub const ENV_SLIDING_WINDOW_MAX_LIMIT: &str = "SLIDING_WINDOW_MAX_LIMIT";

/// `REDIS_URL`: the shared store (`redis://`, `rediss://` for TLS); unset = the embedded memory store.
pub const ENV_REDIS_URL: &str = "REDIS_URL";
/// `REDIS_TIMEOUT`: the deadline of every Redis call.
pub const ENV_REDIS_TIMEOUT: &str = "REDIS_TIMEOUT";

/// `FAILURE_MODE`: what a request gets when the store cannot decide (`open` admits,
/// `closed` refuses): the own API's mode and the default of Envoy domains.
pub const ENV_FAILURE_MODE: &str = "FAILURE_MODE";

/// `RATELIMIT_CONFIG`: the rules of Envoy's rate limit API in envoyproxy/ratelimit's YAML
/// format — a file, or a directory of `*.yaml` files; unset = no Envoy domain.
pub const ENV_RATELIMIT_CONFIG: &str = "RATELIMIT_CONFIG";

/// The default gRPC listen address.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50053";

/// The audience ratelimit-svc's identity tokens name.
pub const AUDIENCE: &str = "ratelimit-svc";

/// Everything ratelimit-svc needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `main` binds the gRPC listener.
    pub listen_addr: SocketAddr,
    /// How callers' identity tokens are verified (for `paysuite.ratelimit.v1`; Envoy's
    /// RLS API carries no paysuite identity).
    pub identity: IdentityConfig,
    /// The largest sliding-window limit.
    pub sliding_window_max_limit: u64,
    /// The shared store, when configured.
    pub redis_url: Option<String>,
    /// The deadline of every Redis call.
    pub redis_timeout: std::time::Duration,
    /// The breaker in front of the store.
    pub redis_breaker: BreakerConfig,
    /// What a request gets when the store cannot decide.
    pub failure_mode: FailureMode,
    /// Where the rules of Envoy's rate limit API are (read at start).
    pub ratelimit_config: Option<std::path::PathBuf>,
    /// Server hardening.
    pub limits: ServerLimits,
}

impl Config {
    /// Reads the configuration; fails naming the first bad variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let default_addr: SocketAddr = DEFAULT_LISTEN_ADDR
            .parse()
            .map_err(|err| ConfigError::new(ENV_LISTEN_ADDR, err))?;
        Ok(Self {
            listen_addr: env.parse_or(ENV_LISTEN_ADDR, default_addr)?,
            identity: IdentityConfig::from_env(env, AUDIENCE)?,
            sliding_window_max_limit: env.parse_or(ENV_SLIDING_WINDOW_MAX_LIMIT, 1_000)?,
            redis_url: env.raw(ENV_REDIS_URL).map(str::to_owned),
            redis_timeout: env
                .duration_or(ENV_REDIS_TIMEOUT, std::time::Duration::from_millis(250))?,
            redis_breaker: BreakerConfig::default(),
            failure_mode: env.parse_or(ENV_FAILURE_MODE, FailureMode::default())?,
            ratelimit_config: env.raw(ENV_RATELIMIT_CONFIG).map(Into::into),
            limits: ServerLimits::from_env(env)?,
        })
    }

    /// The defaults, listening on `listen_addr` and trusting `identity` (tests build
    /// configs this way).
    pub fn new(listen_addr: SocketAddr, identity: IdentityConfig) -> Self {
        Self {
            listen_addr,
            identity,
            sliding_window_max_limit: 1_000,
            redis_url: None,
            redis_timeout: std::time::Duration::from_millis(250),
            redis_breaker: BreakerConfig::default(),
            failure_mode: FailureMode::default(),
            ratelimit_config: None,
            limits: ServerLimits::default(),
        }
    }
}
