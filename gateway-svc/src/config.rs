//! gateway-svc's settings, read once from the environment.

use std::net::SocketAddr;

use service_kit::{ConfigError, Env, ServerLimits};

/// `LISTEN_ADDR`: the gRPC listen address.
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";

/// The default gRPC listen address.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50051";

/// Everything gateway-svc needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `main` binds the gRPC listener.
    pub listen_addr: SocketAddr,
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
            limits: ServerLimits::from_env(env)?,
        })
    }

    /// The defaults, listening on `listen_addr` (tests build configs this way).
    pub fn with_listen_addr(listen_addr: SocketAddr) -> Self {
        Self {
            listen_addr,
            limits: ServerLimits::default(),
        }
    }
}
