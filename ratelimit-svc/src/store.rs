//! Where limiter state lives. The memory store is the embedded default (one replica);
//! the Redis store (shared by replicas) lands next with the same decisions in Lua.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

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
}

/// Limiter state in Redis, shared by every replica: each decision is one atomic Lua
/// script (EVALSHA, falling back to EVAL when Redis lost its script cache) on Redis's
/// own clock, and keys expire by TTL. Keys are hash-tagged on the caller's key, so a
/// Redis Cluster keeps each key's state in one slot.
#[derive(Clone)]
pub struct RedisStore {
    connection: redis::aio::ConnectionManager,
    timeout: std::time::Duration,
    sliding: Arc<redis::Script>,
    gcra: Arc<redis::Script>,
    fixed: Arc<redis::Script>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://` or `rediss://`); the connection reconnects by itself.
    pub async fn connect(url: &str, timeout: std::time::Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(std::time::Duration::from_secs(1))));
        let connection = tokio::time::timeout(
            timeout.max(std::time::Duration::from_secs(5)),
            redis::aio::ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Timeout(timeout))??;
        Ok(Self {
            connection,
            timeout,
            sliding: Arc::new(redis::Script::new(include_str!("lua/sliding.lua"))),
            gcra: Arc::new(redis::Script::new(include_str!("lua/gcra.lua"))),
            fixed: Arc::new(redis::Script::new(include_str!("lua/fixed.lua"))),
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

    /// Decides `cost` units of `key` against `limit` (a cost of 0 peeks).
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
        let mut connection = self.connection.clone();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(Self::redis_key(key, limit))
            .arg(limit.limit)
            .arg(u64::try_from(limit.window.as_micros()).unwrap_or(u64::MAX))
            .arg(cost);
        let reply: (i64, i64, i64, i64, i64) =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))??;
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
