//! Where limiter state lives: the embedded memory store (one replica), or Redis — one
//! server or a Cluster — shared by replicas, with the same decisions as Lua scripts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::Instrument as _;

use crate::limiter::{self, Decision, KeyState, Limit};

/// The store's clock, in microseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now_micros(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// Above this many keys, expired ones are swept on the next decision.
const SWEEP_ABOVE: usize = 100_000;

/// Limiter state in this process's memory.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    keys: Arc<Mutex<HashMap<(String, Limit), KeyState>>>,
}

impl MemoryStore {
    /// An empty store on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            keys: Arc::default(),
        }
    }

    /// Decides `cost` units of `key` against `limit` (a cost of 0 peeks). A key's state is
    /// per limit: the same key under another limit or algorithm is another key.
    pub fn decide(&self, key: &str, limit: &Limit, cost: u64) -> Decision {
        let now = self.clock.now_micros();
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if keys.len() > SWEEP_ABOVE {
            keys.retain(|(_, limit), state| !state.expired(limit, now));
        }
        let id = (key.to_owned(), *limit);
        let mut state = keys.remove(&id);
        let decision = limiter::decide(&mut state, limit, cost, now);
        if let Some(state) = state {
            keys.insert(id, state);
        }
        decision
    }
}

/// A store's failure: the decision could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis did not answer within the deadline.
    #[error("redis did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The Redis settings cannot work (a CA file that does not read, no cluster node).
    #[error("{0}")]
    Settings(String),
}

/// Where the Redis store connects, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URLs: the server, or with `cluster` the seed nodes.
    pub urls: Vec<String>,
    /// Whether `urls` are seeds of a Redis Cluster.
    pub cluster: bool,
    /// A PEM file of the CA that signed the servers' certificates (`rediss://`); without
    /// it the Mozilla roots (webpki-roots) are trusted.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// The deadline of every call.
    pub timeout: std::time::Duration,
}

/// The connection a store holds: one server, or a cluster routed by key slot. Both
/// reconnect by themselves; the cluster client follows MOVED and ASK redirections and
/// refreshes its slot map when the cluster is resharded.
#[derive(Clone)]
enum Connection {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Limiter state in Redis, shared by every replica: each decision is one atomic Lua
/// script on Redis's own clock, and keys expire by TTL. The script is sent as EVALSHA and,
/// when the server answers NOSCRIPT (restarted, failed over, SCRIPT FLUSH), once more as
/// EVAL, which also caches it there; both carry the key, so on a cluster they reach the
/// node owning its slot. Keys are hash-tagged on the caller's key, so every key of one
/// limit lives in one slot.
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    timeout: std::time::Duration,
    sliding: Arc<LuaScript>,
    gcra: Arc<LuaScript>,
    fixed: Arc<LuaScript>,
}

/// A decision script: its source (for EVAL) and its SHA-1 (for EVALSHA).
#[derive(Debug)]
struct LuaScript {
    body: &'static str,
    hash: String,
}

impl LuaScript {
    fn new(body: &'static str) -> Self {
        Self {
            body,
            hash: redis::Script::new(body).get_hash().to_owned(),
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "cluster",
                &matches!(self.connection, Connection::Cluster(_)),
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The shortest bound on connecting at start (a short `REDIS_TIMEOUT` is for calls, not
/// for TCP and TLS handshakes).
const MIN_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// The bound on the whole start-up connection (every seed node of a cluster).
const MIN_STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest pause between reconnection attempts of a standalone connection: a Redis
/// back from a restart is used within about this long.
const MAX_RECONNECT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

impl RedisStore {
    /// Connects to one server at `url` (`redis://` or `rediss://`); the connection
    /// reconnects by itself.
    pub async fn connect(url: &str, timeout: std::time::Duration) -> Result<Self, StoreError> {
        Self::connect_with(&RedisSettings {
            urls: vec![url.to_owned()],
            cluster: false,
            tls_ca_file: None,
            timeout,
        })
        .await
    }

    /// Connects as `settings` say: one server, or a cluster through its seed nodes.
    pub async fn connect_with(settings: &RedisSettings) -> Result<Self, StoreError> {
        let timeout = settings.timeout;
        let certificates = tls_certificates(settings)?;
        let connecting = async {
            if settings.cluster {
                if settings.urls.is_empty() {
                    return Err(StoreError::Settings("no cluster node given".to_owned()));
                }
                let mut builder = redis::cluster::ClusterClientBuilder::new(settings.urls.clone())
                    .connection_timeout(timeout.max(MIN_CONNECT_TIMEOUT))
                    .response_timeout(timeout);
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                let client = builder.build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            } else {
                let [url] = settings.urls.as_slice() else {
                    return Err(StoreError::Settings(
                        "one URL without REDIS_CLUSTER (a comma-separated list names cluster nodes)"
                            .to_owned(),
                    ));
                };
                let client = match certificates {
                    Some(certificates) => {
                        redis::Client::build_with_tls(url.as_str(), certificates)?
                    }
                    None => redis::Client::open(url.as_str())?,
                };
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout.max(MIN_CONNECT_TIMEOUT)))
                    .set_max_delay(MAX_RECONNECT_DELAY);
                Ok(Connection::Single(
                    redis::aio::ConnectionManager::new_with_config(client, config).await?,
                ))
            }
        };
        install_crypto_provider(settings);
        let connection = tokio::time::timeout(timeout.max(MIN_STARTUP_TIMEOUT), connecting)
            .await
            .map_err(|_| StoreError::Timeout(timeout.max(MIN_STARTUP_TIMEOUT)))??;
        Ok(Self {
            connection,
            timeout,
            sliding: Arc::new(LuaScript::new(include_str!("lua/sliding.lua"))),
            gcra: Arc::new(LuaScript::new(include_str!("lua/gcra.lua"))),
            fixed: Arc::new(LuaScript::new(include_str!("lua/fixed.lua"))),
        })
    }

    /// The Redis key of `key` under `limit`: `rl:{key}:algorithm:limit:window_us`.
    pub fn redis_key(key: &str, limit: &Limit) -> String {
        format!(
            "rl:{{{key}}}:{}:{}:{}",
            limit.algorithm.as_str(),
            limit.limit,
            limit.window.as_micros()
        )
    }

    /// Decides `cost` units of `key` against `limit` (a cost of 0 peeks), within the
    /// deadline whatever happens underneath (reconnects, redirections, NOSCRIPT).
    pub async fn decide(
        &self,
        key: &str,
        limit: &Limit,
        cost: u64,
    ) -> Result<Decision, StoreError> {
        let script = match limit.algorithm {
            crate::limiter::Algorithm::SlidingWindow => &self.sliding,
            crate::limiter::Algorithm::Gcra => &self.gcra,
            crate::limiter::Algorithm::FixedWindow => &self.fixed,
        };
        let redis_key = Self::redis_key(key, limit);
        let window = u64::try_from(limit.window.as_micros()).unwrap_or(u64::MAX);
        let invoke = |command: &str, body: &str| {
            let mut cmd = redis::cmd(command);
            cmd.arg(body)
                .arg(1)
                .arg(&redis_key)
                .arg(limit.limit)
                .arg(window)
                .arg(cost);
            cmd
        };
        let evalsha = invoke("EVALSHA", &script.hash);
        let call = async {
            match self.query(&evalsha).await {
                Err(err)
                    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.query(&invoke("EVAL", script.body)).await
                }
                other => other,
            }
        };
        // The key is not recorded: it is built from the caller's descriptor values.
        let span = tracing::info_span!(
            "redis",
            otel.name = "redis.evalsha",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system.name = "redis",
            db.operation.name = "EVALSHA",
            ratelimit.algorithm = limit.algorithm.as_str(),
        );
        let reply: Result<(i64, i64, i64, i64, i64), StoreError> =
            tokio::time::timeout(self.timeout, call)
                .instrument(span.clone())
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))
                .and_then(|reply| reply.map_err(StoreError::from));
        if reply.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        let reply = reply?;
        let (allowed, remaining, reset_after, retry_after, now) = reply;
        let micros =
            |us: i64| std::time::Duration::from_micros(u64::try_from(us.max(0)).unwrap_or(0));
        Ok(Decision {
            allowed: allowed == 1,
            limit: limit.limit,
            remaining: u64::try_from(remaining.max(0)).unwrap_or(0),
            reset_after: micros(reset_after),
            retry_after: micros(retry_after),
            decided_at_micros: now,
        })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match &self.connection {
            Connection::Single(connection) => cmd.query_async(&mut connection.clone()).await,
            Connection::Cluster(connection) => cmd.query_async(&mut connection.clone()).await,
        }
    }
}

/// The CA of `settings`, read once at start.
fn tls_certificates(
    settings: &RedisSettings,
) -> Result<Option<redis::TlsCertificates>, StoreError> {
    let Some(path) = &settings.tls_ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|err| {
        StoreError::Settings(format!("cannot read the CA file {}: {err}", path.display()))
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// rustls needs a process-wide crypto provider before its first `rediss://` handshake;
/// ring is the one this workspace links (a provider someone installed first stays).
fn install_crypto_provider(settings: &RedisSettings) {
    if settings.urls.iter().any(|url| url.starts_with("rediss://")) {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Where decisions are made: memory (one replica) or Redis (shared).
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded memory store.
    Memory(MemoryStore),
    /// Redis, shared by replicas.
    Redis(RedisStore),
}

impl Store {
    /// Decides `cost` units of `key` against `limit`.
    pub async fn decide(
        &self,
        key: &str,
        limit: &Limit,
        cost: u64,
    ) -> Result<Decision, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.decide(key, limit, cost)),
            Self::Redis(store) => store.decide(key, limit, cost).await,
        }
    }
}
