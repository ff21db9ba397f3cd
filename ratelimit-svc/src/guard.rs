//! The store behind its protections, so that every caller gets an answer in bounded time:
//!
//! 1. the local cache of over-limit answers — a key refused until some instant is refused
//!    here, without a store round trip, for any cost at least as large (hot keys under
//!    attack cost nothing);
//! 2. a circuit breaker — a store that keeps failing is not called at all until a single
//!    probe finds it back;
//! 3. the store's own deadline on every call (`REDIS_TIMEOUT`);
//! 4. the failure mode — when the store cannot decide, the caller's domain says whether
//!    the request is admitted (fail-open) or refused (fail-closed). Both are counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use service_kit::breaker::{BreakerConfig, CircuitBreaker};
use tokio::time::Instant;

use crate::limiter::{Decision, Limit};
use crate::store::{Clock, Store, SystemClock};

/// What happens to a request when the store cannot decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Admit it: an outage of the limiter does not become an outage of the API.
    #[default]
    Open,
    /// Refuse it: the limit protects something that must not be overrun.
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

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The store decided.
    Store,
    /// A refusal the store gave earlier, still in force.
    Cache,
    /// The store could not decide; admitted by the failure mode.
    FailOpen,
    /// The store could not decide; refused by the failure mode.
    FailClosed,
}

/// A decision and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The decision.
    pub decision: Decision,
    /// Its source.
    pub source: Source,
}

/// What the limiter did, for operators and for tests that prove which path ran.
#[derive(Debug, Default)]
pub struct Counters {
    store_errors: AtomicU64,
    breaker_rejections: AtomicU64,
    fail_open: AtomicU64,
    fail_closed: AtomicU64,
    cache_hits: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterValues {
    /// Store calls that failed or timed out.
    pub store_errors: u64,
    /// Store calls not made because the breaker was open.
    pub breaker_rejections: u64,
    /// Requests admitted because the store could not decide.
    pub fail_open: u64,
    /// Requests refused because the store could not decide.
    pub fail_closed: u64,
    /// Refusals answered from the local cache.
    pub cache_hits: u64,
}

impl Counters {
    /// The current values.
    pub fn values(&self) -> CounterValues {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CounterValues {
            store_errors: read(&self.store_errors),
            breaker_rejections: read(&self.breaker_rejections),
            fail_open: read(&self.fail_open),
            fail_closed: read(&self.fail_closed),
            cache_hits: read(&self.cache_hits),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long a fail-closed refusal tells the caller to wait when the breaker gives no
/// better figure.
const FAIL_CLOSED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Above this many cached refusals, expired ones are swept on the next insert.
const CACHE_SWEEP_ABOVE: usize = 100_000;

/// A refusal the store gave: in force for costs ≥ `cost` until `until`.
#[derive(Debug, Clone, Copy)]
struct CachedRefusal {
    cost: u64,
    at: Instant,
    until: Instant,
    decision: Decision,
}

/// Cached refusals by key (looked up by `&str`, without an allocation), then by limit (a
/// key has few).
type Refusals = HashMap<String, Vec<(Limit, CachedRefusal)>>;

/// The store with its breaker, cache and failure modes; cheap to clone.
#[derive(Debug, Clone)]
pub struct Limiter {
    store: Store,
    breaker: CircuitBreaker,
    refusals: Arc<Mutex<Refusals>>,
    counters: Arc<Counters>,
    clock: Arc<dyn Clock>,
    failure_log: Arc<FailureLog>,
}

/// How often a failing store is logged at most; the calls in between are counted.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Store failures logged at most once per [`FAILURE_LOG_INTERVAL`] — an outage fails every
/// call, and a line per call would bury everything else (the counters keep the total).
#[derive(Debug, Default)]
struct FailureLog {
    /// When the last line was written.
    last: Mutex<Option<Instant>>,
    /// Failures since then that were not logged.
    suppressed: AtomicU64,
}

impl FailureLog {
    fn record(&self, err: &crate::store::StoreError, mode: FailureMode) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| now.duration_since(at) < FAILURE_LOG_INTERVAL) {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = Some(now);
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            error = %err,
            failure_mode = ?mode,
            unlogged_since_last = suppressed,
            "rate limit store failed"
        );
    }
}

impl Limiter {
    /// `store` behind a breaker configured by `breaker`, counting into `counters`.
    pub fn new(store: Store, breaker: BreakerConfig, counters: Arc<Counters>) -> Self {
        Self {
            store,
            breaker: CircuitBreaker::observed(breaker, "ratelimit-store", "store"),
            refusals: Arc::default(),
            counters,
            clock: Arc::new(SystemClock),
            failure_log: Arc::default(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Decides `cost` units of `key` against `limit` (0 peeks); when the store cannot
    /// decide, `mode` does. Never fails and never waits longer than the store's deadline.
    pub async fn decide(&self, key: &str, limit: &Limit, cost: u64, mode: FailureMode) -> Outcome {
        // A peek asks whether one unit would pass.
        let asked = cost.max(1);
        if let Some(decision) = self.cached_refusal(key, limit, asked) {
            Counters::bump(&self.counters.cache_hits);
            return Outcome {
                decision,
                source: Source::Cache,
            };
        }
        let permit = match self.breaker.try_acquire() {
            Ok(permit) => permit,
            Err(rejected) => {
                Counters::bump(&self.counters.breaker_rejections);
                return self.fallback(limit, cost, mode, rejected.retry_after);
            }
        };
        match self.store.decide(key, limit, cost).await {
            Ok(decision) => {
                permit.success();
                if !decision.allowed {
                    self.remember_refusal(key, limit, asked, decision);
                }
                Outcome {
                    decision,
                    source: Source::Store,
                }
            }
            Err(err) => {
                permit.failure();
                Counters::bump(&self.counters.store_errors);
                crate::metrics::store_error();
                self.failure_log.record(&err, mode);
                self.fallback(limit, cost, mode, Duration::ZERO)
            }
        }
    }

    /// The answer of the failure mode.
    fn fallback(&self, limit: &Limit, cost: u64, mode: FailureMode, wait: Duration) -> Outcome {
        let decided_at_micros = self.clock.now_micros();
        match mode {
            FailureMode::Open => {
                Counters::bump(&self.counters.fail_open);
                crate::metrics::failure_mode_decision(true);
                Outcome {
                    decision: Decision {
                        allowed: true,
                        limit: limit.limit,
                        remaining: limit.limit.saturating_sub(cost),
                        reset_after: Duration::ZERO,
                        retry_after: Duration::ZERO,
                        decided_at_micros,
                    },
                    source: Source::FailOpen,
                }
            }
            FailureMode::Closed => {
                Counters::bump(&self.counters.fail_closed);
                crate::metrics::failure_mode_decision(false);
                let retry_after = wait.max(FAIL_CLOSED_RETRY_AFTER);
                Outcome {
                    decision: Decision {
                        allowed: false,
                        limit: limit.limit,
                        remaining: 0,
                        reset_after: retry_after,
                        retry_after,
                        decided_at_micros,
                    },
                    source: Source::FailClosed,
                }
            }
        }
    }

    fn cached_refusal(&self, key: &str, limit: &Limit, asked: u64) -> Option<Decision> {
        let now = Instant::now();
        let refusals = self
            .refusals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (_, refusal) = refusals
            .get(key)?
            .iter()
            .find(|(cached, _)| cached == limit)?;
        if now >= refusal.until || asked < refusal.cost {
            return None;
        }
        let elapsed = now - refusal.at;
        let mut decision = refusal.decision;
        decision.retry_after = decision.retry_after.saturating_sub(elapsed);
        decision.reset_after = decision.reset_after.saturating_sub(elapsed);
        decision.decided_at_micros = decision
            .decided_at_micros
            .saturating_add(i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX));
        Some(decision)
    }

    fn remember_refusal(&self, key: &str, limit: &Limit, asked: u64, decision: Decision) {
        if decision.retry_after.is_zero() {
            return;
        }
        let now = Instant::now();
        let refusal = CachedRefusal {
            cost: asked,
            at: now,
            until: now + decision.retry_after,
            decision,
        };
        let mut refusals = self
            .refusals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if refusals.len() > CACHE_SWEEP_ABOVE {
            refusals.retain(|_, cached| {
                cached.retain(|(_, refusal)| refusal.until > now);
                !cached.is_empty()
            });
        }
        let cached = refusals.entry(key.to_owned()).or_default();
        match cached.iter_mut().find(|(cached, _)| cached == limit) {
            // The smaller refused cost covers more requests.
            Some((_, cached)) if cached.until <= now || asked <= cached.cost => *cached = refusal,
            Some(_) => {}
            None => cached.push((*limit, refusal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Algorithm;
    use crate::store::MemoryStore;

    /// The store's clock follows tokio's (paused) clock, so the test drives both.
    #[derive(Debug)]
    struct TokioClock(Instant);

    impl Clock for TokioClock {
        fn now_micros(&self) -> i64 {
            1_700_000_000_000_000 + i64::try_from(self.0.elapsed().as_micros()).unwrap_or(0)
        }
    }

    fn limiter() -> Limiter {
        let store = Store::Memory(MemoryStore::new(Arc::new(TokioClock(Instant::now()))));
        Limiter::new(store, BreakerConfig::default(), Arc::default())
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_cached_for_costs_at_least_as_large_until_they_could_pass() {
        let limiter = limiter();
        let limit = Limit {
            limit: 3,
            window: Duration::from_secs(10),
            algorithm: Algorithm::SlidingWindow,
        };
        let decide = |cost| limiter.decide("k", &limit, cost, FailureMode::Closed);
        assert_eq!(decide(2).await.source, Source::Store);
        // One unit left: a cost of 2 is refused by the store, then by the cache.
        let refused = decide(2).await;
        assert_eq!(
            (refused.decision.allowed, refused.source),
            (false, Source::Store)
        );
        let cached = decide(3).await;
        assert_eq!(
            (cached.decision.allowed, cached.source),
            (false, Source::Cache)
        );
        // A smaller cost might pass, so the store is asked (and admits it).
        let smaller = decide(1).await;
        assert_eq!(
            (smaller.decision.allowed, smaller.source),
            (true, Source::Store)
        );
        // The refusal of a cost of 1 now covers peeks too.
        assert_eq!(decide(1).await.source, Source::Store);
        let peek = decide(0).await;
        assert_eq!((peek.decision.allowed, peek.source), (false, Source::Cache));
        tokio::time::advance(Duration::from_secs(3)).await;
        let later = decide(1).await;
        assert_eq!(later.source, Source::Cache);
        assert_eq!(
            later.decision.retry_after,
            refused.decision.retry_after - Duration::from_secs(3),
            "a cached refusal counts down"
        );
        // Once the window has passed the cache steps aside and the store admits again.
        tokio::time::advance(Duration::from_secs(8)).await;
        let after = decide(1).await;
        assert_eq!(
            (after.decision.allowed, after.source),
            (true, Source::Store)
        );
        let counted = limiter.counters().values();
        assert_eq!(counted.cache_hits, 3);
        assert_eq!(
            (counted.fail_open, counted.fail_closed, counted.store_errors),
            (0, 0, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keys_and_limits_are_cached_apart() {
        let limiter = limiter();
        let one = Limit {
            limit: 1,
            window: Duration::from_secs(60),
            algorithm: Algorithm::Gcra,
        };
        let two = Limit { limit: 2, ..one };
        assert!(
            limiter
                .decide("a", &one, 1, FailureMode::Open)
                .await
                .decision
                .allowed
        );
        assert_eq!(
            limiter.decide("a", &one, 1, FailureMode::Open).await.source,
            Source::Store
        );
        assert_eq!(
            limiter.decide("a", &one, 1, FailureMode::Open).await.source,
            Source::Cache
        );
        let other_limit = limiter.decide("a", &two, 1, FailureMode::Open).await;
        assert_eq!(
            (other_limit.decision.allowed, other_limit.source),
            (true, Source::Store)
        );
        let other_key = limiter.decide("b", &one, 1, FailureMode::Open).await;
        assert_eq!(
            (other_key.decision.allowed, other_key.source),
            (true, Source::Store)
        );
    }
}
