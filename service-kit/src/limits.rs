//! [`ServerLimits`]: every resource bound a gRPC server enforces, in one place.
//!
//! tonic and hyper leave several of these unlimited by default (header list size, local
//! error resets, open connections, idle connections). Every server of the suite is built
//! from this one struct by [`crate::server::serve`], so no server can forget a bound.

use std::time::Duration;

use crate::config::{ConfigError, Env};

/// `GRPC_MAX_MESSAGE_BYTES`: the largest request message accepted.
pub const ENV_MAX_MESSAGE_BYTES: &str = "GRPC_MAX_MESSAGE_BYTES";
/// `GRPC_MAX_CONCURRENT_STREAMS`: HTTP/2 streams per connection.
pub const ENV_MAX_CONCURRENT_STREAMS: &str = "GRPC_MAX_CONCURRENT_STREAMS";
/// `GRPC_MAX_HEADER_LIST_BYTES`: the largest request header block (metadata).
pub const ENV_MAX_HEADER_LIST_BYTES: &str = "GRPC_MAX_HEADER_LIST_BYTES";
/// `GRPC_MAX_LOCAL_ERROR_RESETS`: stream resets a client may cause before the connection is closed.
pub const ENV_MAX_LOCAL_ERROR_RESETS: &str = "GRPC_MAX_LOCAL_ERROR_RESETS";
/// `GRPC_MAX_PENDING_ACCEPT_RESETS`: remotely reset streams queued before the connection is closed.
pub const ENV_MAX_PENDING_ACCEPT_RESETS: &str = "GRPC_MAX_PENDING_ACCEPT_RESETS";
/// `GRPC_MAX_CONNECTIONS`: open connections per process.
pub const ENV_MAX_CONNECTIONS: &str = "GRPC_MAX_CONNECTIONS";
/// `GRPC_HANDSHAKE_TIMEOUT`: time a new connection has to send the HTTP/2 preface.
pub const ENV_HANDSHAKE_TIMEOUT: &str = "GRPC_HANDSHAKE_TIMEOUT";
/// `GRPC_IDLE_TIMEOUT`: a connection with no call in flight for this long is closed (GOAWAY).
pub const ENV_IDLE_TIMEOUT: &str = "GRPC_IDLE_TIMEOUT";
/// `GRPC_TCP_KEEPALIVE`: TCP keepalive time on accepted sockets.
pub const ENV_TCP_KEEPALIVE: &str = "GRPC_TCP_KEEPALIVE";
/// `GRPC_KEEPALIVE_INTERVAL`: HTTP/2 PING interval.
pub const ENV_KEEPALIVE_INTERVAL: &str = "GRPC_KEEPALIVE_INTERVAL";
/// `GRPC_KEEPALIVE_TIMEOUT`: a PING unanswered for this long closes the connection.
pub const ENV_KEEPALIVE_TIMEOUT: &str = "GRPC_KEEPALIVE_TIMEOUT";
/// `GRPC_MAX_CONNECTION_AGE`: connections are asked to go away after this long (rebalancing).
pub const ENV_MAX_CONNECTION_AGE: &str = "GRPC_MAX_CONNECTION_AGE";
/// `GRPC_MAX_CONNECTION_AGE_GRACE`: time an aged connection gets to finish its calls.
pub const ENV_MAX_CONNECTION_AGE_GRACE: &str = "GRPC_MAX_CONNECTION_AGE_GRACE";
/// `GRPC_MAX_UNARY_PER_CONNECTION`: unary calls in flight per connection; more are shed.
pub const ENV_MAX_UNARY_PER_CONNECTION: &str = "GRPC_MAX_UNARY_PER_CONNECTION";
/// `SHUTDOWN_DRAIN_TIMEOUT`: on SIGTERM, how long calls in flight get to finish.
pub const ENV_DRAIN_TIMEOUT: &str = "SHUTDOWN_DRAIN_TIMEOUT";

/// tonic's default `max_decoding_message_size`, which generated servers apply on their own.
pub const TONIC_MAX_DECODING_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The bounds a gRPC server enforces. No field is optional: every limit is finite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest request message (the gRPC length prefix); larger → RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: bounds request metadata.
    pub max_header_list_bytes: u32,
    /// Resets caused by the client's misbehaviour tolerated per connection (CVE-2023-44487 class).
    pub max_local_error_resets: usize,
    /// Remotely reset streams queued for accept before the connection is closed (rapid reset).
    pub max_pending_accept_resets: usize,
    /// Open connections per process; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// Time a new connection has to send the HTTP/2 client preface.
    pub handshake_timeout: Duration,
    /// A connection with no call in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// TCP keepalive time set on every accepted socket (with TCP_NODELAY).
    pub tcp_keepalive: Duration,
    /// HTTP/2 PING interval, to detect dead peers.
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
    /// Connections are sent GOAWAY after this age so clients rebalance across replicas.
    pub max_connection_age: Duration,
    /// Time an aged connection gets to finish its calls before it is closed.
    pub max_connection_age_grace: Duration,
    /// Unary calls in flight per connection; beyond it calls are shed with UNAVAILABLE.
    /// Streaming calls are exempt: they are long-lived by design.
    pub max_unary_per_connection: usize,
    /// On shutdown, how long calls in flight get to finish before connections are dropped.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: TONIC_MAX_DECODING_MESSAGE_BYTES,
            max_concurrent_streams: 256,
            max_header_list_bytes: 16 * 1024,
            max_local_error_resets: 256,
            max_pending_accept_resets: 64,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            tcp_keepalive: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(30),
            max_unary_per_connection: 512,
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl ServerLimits {
    /// The defaults, overridden by any `GRPC_*` / `SHUTDOWN_DRAIN_TIMEOUT` variable set.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let d = Self::default();
        let limits = Self {
            max_message_bytes: env.parse_or(ENV_MAX_MESSAGE_BYTES, d.max_message_bytes)?,
            max_concurrent_streams: env
                .parse_or(ENV_MAX_CONCURRENT_STREAMS, d.max_concurrent_streams)?,
            max_header_list_bytes: env
                .parse_or(ENV_MAX_HEADER_LIST_BYTES, d.max_header_list_bytes)?,
            max_local_error_resets: env
                .parse_or(ENV_MAX_LOCAL_ERROR_RESETS, d.max_local_error_resets)?,
            max_pending_accept_resets: env
                .parse_or(ENV_MAX_PENDING_ACCEPT_RESETS, d.max_pending_accept_resets)?,
            max_connections: env.parse_or(ENV_MAX_CONNECTIONS, d.max_connections)?,
            handshake_timeout: env.duration_or(ENV_HANDSHAKE_TIMEOUT, d.handshake_timeout)?,
            idle_timeout: env.duration_or(ENV_IDLE_TIMEOUT, d.idle_timeout)?,
            tcp_keepalive: env.duration_or(ENV_TCP_KEEPALIVE, d.tcp_keepalive)?,
            keepalive_interval: env.duration_or(ENV_KEEPALIVE_INTERVAL, d.keepalive_interval)?,
            keepalive_timeout: env.duration_or(ENV_KEEPALIVE_TIMEOUT, d.keepalive_timeout)?,
            max_connection_age: env.duration_or(ENV_MAX_CONNECTION_AGE, d.max_connection_age)?,
            max_connection_age_grace: env
                .duration_or(ENV_MAX_CONNECTION_AGE_GRACE, d.max_connection_age_grace)?,
            max_unary_per_connection: env
                .parse_or(ENV_MAX_UNARY_PER_CONNECTION, d.max_unary_per_connection)?,
            drain_timeout: env.duration_or(ENV_DRAIN_TIMEOUT, d.drain_timeout)?,
        };
        limits.validate()?;
        Ok(limits)
    }

    /// Refuses zero limits: a zero would either disable a bound or refuse all traffic.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            (ENV_MAX_MESSAGE_BYTES, self.max_message_bytes),
            (
                ENV_MAX_CONCURRENT_STREAMS,
                self.max_concurrent_streams as usize,
            ),
            (
                ENV_MAX_HEADER_LIST_BYTES,
                self.max_header_list_bytes as usize,
            ),
            (ENV_MAX_LOCAL_ERROR_RESETS, self.max_local_error_resets),
            (
                ENV_MAX_PENDING_ACCEPT_RESETS,
                self.max_pending_accept_resets,
            ),
            (ENV_MAX_CONNECTIONS, self.max_connections),
            (ENV_MAX_UNARY_PER_CONNECTION, self.max_unary_per_connection),
        ];
        let durations = [
            (ENV_HANDSHAKE_TIMEOUT, self.handshake_timeout),
            (ENV_IDLE_TIMEOUT, self.idle_timeout),
            (ENV_TCP_KEEPALIVE, self.tcp_keepalive),
            (ENV_KEEPALIVE_INTERVAL, self.keepalive_interval),
            (ENV_KEEPALIVE_TIMEOUT, self.keepalive_timeout),
            (ENV_MAX_CONNECTION_AGE, self.max_connection_age),
            (ENV_MAX_CONNECTION_AGE_GRACE, self.max_connection_age_grace),
            (ENV_DRAIN_TIMEOUT, self.drain_timeout),
        ];
        for (name, value) in counts {
            if value == 0 {
                return Err(ConfigError::new(name, "must be greater than zero"));
            }
        }
        // tonic decodes at most its own 4 MiB per message whatever we allow, and answers
        // OUT_OF_RANGE beyond it: a larger setting would be a limit silently not applied.
        if self.max_message_bytes > TONIC_MAX_DECODING_MESSAGE_BYTES {
            return Err(ConfigError::new(
                ENV_MAX_MESSAGE_BYTES,
                format!(
                    "must be at most {TONIC_MAX_DECODING_MESSAGE_BYTES} (tonic's decoding limit)"
                ),
            ));
        }
        for (name, value) in durations {
            if value.is_zero() {
                return Err(ConfigError::new(name, "must be greater than zero"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every default is a finite, non-zero bound (a zero or "unlimited" default would leave a
    /// server open to the resource exhaustion these limits exist to stop).
    #[test]
    fn every_default_is_set_to_a_finite_value() {
        let limits = ServerLimits::default();
        assert!(limits.validate().is_ok());
        // Destructure so a new field cannot be added without being checked here.
        let ServerLimits {
            max_message_bytes,
            max_concurrent_streams,
            max_header_list_bytes,
            max_local_error_resets,
            max_pending_accept_resets,
            max_connections,
            handshake_timeout,
            idle_timeout,
            tcp_keepalive,
            keepalive_interval,
            keepalive_timeout,
            max_connection_age,
            max_connection_age_grace,
            max_unary_per_connection,
            drain_timeout,
        } = limits;
        assert!((1..=64 * 1024 * 1024).contains(&max_message_bytes));
        assert!((1..=10_000).contains(&max_concurrent_streams));
        assert!((1..=1024 * 1024).contains(&max_header_list_bytes));
        assert!((1..=100_000).contains(&max_local_error_resets));
        assert!((1..=100_000).contains(&max_pending_accept_resets));
        assert!((1..=1_000_000).contains(&max_connections));
        assert!((1..=1_000_000).contains(&max_unary_per_connection));
        let hour = Duration::from_secs(3600);
        for duration in [
            handshake_timeout,
            idle_timeout,
            tcp_keepalive,
            keepalive_interval,
            keepalive_timeout,
            max_connection_age,
            max_connection_age_grace,
            drain_timeout,
        ] {
            assert!(!duration.is_zero() && duration <= 24 * hour, "{duration:?}");
        }
    }

    #[test]
    fn environment_overrides_and_zero_is_refused() {
        let env = Env::from_pairs([
            (ENV_MAX_MESSAGE_BYTES, "1024"),
            (ENV_DRAIN_TIMEOUT, "500ms"),
        ]);
        let limits = ServerLimits::from_env(&env).ok();
        assert_eq!(limits.as_ref().map(|l| l.max_message_bytes), Some(1024));
        assert_eq!(
            limits.map(|l| l.drain_timeout),
            Some(Duration::from_millis(500))
        );

        let over_tonic = Env::from_pairs([(ENV_MAX_MESSAGE_BYTES, "4194305")]);
        assert!(ServerLimits::from_env(&over_tonic).is_err());

        let zero = Env::from_pairs([(ENV_MAX_CONNECTIONS, "0")]);
        let err = ServerLimits::from_env(&zero).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("GRPC_MAX_CONNECTIONS: must be greater than zero")
        );
    }
}
