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
