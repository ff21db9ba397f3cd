//! ratelimit-svc's settings, read once from the environment.

use std::net::SocketAddr;

use service_kit::breaker::BreakerConfig;
use service_kit::{ConfigError, Env, IdentityConfig, ServerLimits};

use crate::guard::FailureMode;
use crate::store::RedisSettings;

/// `LISTEN_ADDR`: the gRPC listen address.
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";

/// `SLIDING_WINDOW_MAX_LIMIT`: the largest limit the exact sliding window accepts (its
/// memory is O(limit) per key).
pub const ENV_SLIDING_WINDOW_MAX_LIMIT: &str = "SLIDING_WINDOW_MAX_LIMIT";

/// `REDIS_URL`: the shared store (`redis://`, `rediss://` for TLS); with `REDIS_CLUSTER`
/// a comma-separated list of seed nodes; unset = the embedded memory store.
pub const ENV_REDIS_URL: &str = "REDIS_URL";
/// `REDIS_CLUSTER`: whether `REDIS_URL` names Redis Cluster nodes.
pub const ENV_REDIS_CLUSTER: &str = "REDIS_CLUSTER";
/// `REDIS_TLS_CA_FILE`: a PEM file of the CA that signed the Redis servers' certificates.
pub const ENV_REDIS_TLS_CA_FILE: &str = "REDIS_TLS_CA_FILE";
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
    /// The shared store, when configured: one URL, or with `redis_cluster` a
    /// comma-separated list of seed nodes.
    pub redis_url: Option<String>,
    /// Whether `redis_url` names Redis Cluster nodes.
    pub redis_cluster: bool,
    /// The CA of the Redis servers' certificates, for a private CA (`rediss://`).
    pub redis_tls_ca_file: Option<std::path::PathBuf>,
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
        let redis_cluster = env.bool_or(ENV_REDIS_CLUSTER, false)?;
        if !redis_cluster && env.raw(ENV_REDIS_URL).is_some_and(|url| url.contains(',')) {
            return Err(ConfigError::new(
                ENV_REDIS_URL,
                "several URLs name cluster nodes: set REDIS_CLUSTER=true",
            ));
        }
        Ok(Self {
            listen_addr: env.parse_or(ENV_LISTEN_ADDR, default_addr)?,
            identity: IdentityConfig::from_env(env, AUDIENCE)?,
            sliding_window_max_limit: env.parse_or(ENV_SLIDING_WINDOW_MAX_LIMIT, 1_000)?,
            redis_url: env
                .raw(ENV_REDIS_URL)
                .filter(|url| !url.is_empty())
                .map(str::to_owned),
            redis_cluster,
            redis_tls_ca_file: env.raw(ENV_REDIS_TLS_CA_FILE).map(std::path::PathBuf::from),
            redis_timeout: env
                .duration_or(ENV_REDIS_TIMEOUT, std::time::Duration::from_millis(250))?,
            redis_breaker: BreakerConfig::default(),
            failure_mode: env.parse_or(ENV_FAILURE_MODE, FailureMode::default())?,
            ratelimit_config: env.raw(ENV_RATELIMIT_CONFIG).map(Into::into),
            limits: ServerLimits::from_env(env)?,
        })
    }

    /// How to reach Redis, when it is configured.
    pub fn redis_settings(&self) -> Option<RedisSettings> {
        let urls = self.redis_url.as_deref()?;
        Some(RedisSettings {
            urls: urls
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect(),
            cluster: self.redis_cluster,
            tls_ca_file: self.redis_tls_ca_file.clone(),
            timeout: self.redis_timeout,
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
            redis_cluster: false,
            redis_tls_ca_file: None,
            redis_timeout: std::time::Duration::from_millis(250),
            redis_breaker: BreakerConfig::default(),
            failure_mode: FailureMode::default(),
            ratelimit_config: None,
            limits: ServerLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let key = service_kit::identity::SigningKey::generate("test")
            .map(|key| key.public_key().to_string())
            .unwrap_or_default();
        let mut all = vec![("IDENTITY_PUBLIC_KEYS".to_owned(), key)];
        all.extend(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Env::from_pairs(all)
    }

    #[test]
    fn redis_is_memory_one_server_or_cluster_seeds() {
        let memory = Config::from_env(&env(&[("REDIS_URL", "")])).ok();
        assert_eq!(memory.and_then(|config| config.redis_settings()), None);

        let single = Config::from_env(&env(&[("REDIS_URL", "rediss://cache:6380")]))
            .ok()
            .and_then(|config| config.redis_settings());
        assert_eq!(
            single.map(|settings| (settings.urls, settings.cluster)),
            Some((vec!["rediss://cache:6380".to_owned()], false))
        );

        let cluster = Config::from_env(&env(&[
            ("REDIS_URL", "redis://a:6379, redis://b:6379,"),
            ("REDIS_CLUSTER", "true"),
            ("REDIS_TLS_CA_FILE", "/etc/redis/ca.pem"),
        ]))
        .ok()
        .and_then(|config| config.redis_settings());
        assert_eq!(
            cluster.map(|settings| (settings.urls, settings.cluster, settings.tls_ca_file)),
            Some((
                vec!["redis://a:6379".to_owned(), "redis://b:6379".to_owned()],
                true,
                Some(std::path::PathBuf::from("/etc/redis/ca.pem"))
            ))
        );
    }

    #[test]
    fn several_urls_without_cluster_are_refused_naming_the_variable() {
        let refused = Config::from_env(&env(&[("REDIS_URL", "redis://a:1,redis://b:2")]))
            .err()
            .map(|err| err.to_string());
        assert!(
            refused.as_deref().is_some_and(
                |message| message.starts_with("REDIS_URL") && !message.contains("redis://a")
            ),
            "{refused:?}"
        );
        let bad_flag = Config::from_env(&env(&[("REDIS_CLUSTER", "maybe")]))
            .err()
            .map(|err| err.to_string());
        assert!(
            bad_flag
                .as_deref()
                .is_some_and(|message| message.starts_with("REDIS_CLUSTER")),
            "{bad_flag:?}"
        );
    }
}
