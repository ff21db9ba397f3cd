//! A circuit breaker: stop calling a dependency that keeps failing, and probe it gently
//! until it recovers.
//!
//! - `Closed`: calls flow. The breaker trips on `consecutive_failures` failures in a row,
//!   or when, over the last `window`, at least `minimum_calls` were made and the failure
//!   rate reached `failure_rate_percent`.
//! - `Open`: calls are refused at once (the caller answers UNAVAILABLE/CIRCUIT_OPEN) until
//!   a backoff passes: exponential in the number of consecutive trips, capped, with
//!   jitter so that replicas do not probe in lockstep.
//! - `HalfOpen`: exactly one probe call is let through. Success closes the breaker; failure
//!   reopens it with a longer backoff. A probe dropped without an outcome (the caller
//!   cancelled) frees the slot for the next caller without judging the dependency.
//!
//! A breaker built with [`CircuitBreaker::observed`] counts its state changes in
//! `paysuite.breaker.transitions` (`upstream`, `endpoint`, `from`, `to`; nothing is
//! recorded while export is off).
//!
//! Operators can force a breaker open or closed. Time comes from `tokio::time::Instant`,
//! so tests drive it with a paused clock. Written here because the breaker is core to the
//! product's behaviour under faults and the crates on offer do not combine a
//! single-probe half-open state, a windowed failure rate and operator overrides.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use tokio::time::Instant;

/// How a breaker trips and recovers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Trip after this many failures in a row.
    pub consecutive_failures: u32,
    /// Trip when the failure rate over the window reaches this many percent…
    pub failure_rate_percent: u32,
    /// …with at least this many calls in the window.
    pub minimum_calls: u32,
    /// The sliding window of the failure rate.
    pub window: Duration,
    /// Backoff after the first trip; doubled after each failed probe.
    pub base_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate_percent: 50,
            minimum_calls: 20,
            window: Duration::from_secs(10),
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The environment variables a service reads a [`BreakerConfig`] from.
#[derive(Debug, Clone, Copy)]
pub struct BreakerEnv {
    /// Of [`BreakerConfig::consecutive_failures`].
    pub consecutive_failures: &'static str,
    /// Of [`BreakerConfig::failure_rate_percent`].
    pub failure_rate_percent: &'static str,
    /// Of [`BreakerConfig::minimum_calls`].
    pub minimum_calls: &'static str,
    /// Of [`BreakerConfig::window`].
    pub window: &'static str,
    /// Of [`BreakerConfig::base_backoff`].
    pub base_backoff: &'static str,
    /// Of [`BreakerConfig::max_backoff`].
    pub max_backoff: &'static str,
}

impl BreakerConfig {
    /// Reads the variables `names`, defaulting each unset one; checks the values.
    pub fn from_env(env: &crate::Env, names: &BreakerEnv) -> Result<Self, crate::ConfigError> {
        let defaults = Self::default();
        let config = Self {
            consecutive_failures: env
                .parse_or(names.consecutive_failures, defaults.consecutive_failures)?,
            failure_rate_percent: env
                .parse_or(names.failure_rate_percent, defaults.failure_rate_percent)?,
            minimum_calls: env.parse_or(names.minimum_calls, defaults.minimum_calls)?,
            window: env.duration_or(names.window, defaults.window)?,
            base_backoff: env.duration_or(names.base_backoff, defaults.base_backoff)?,
            max_backoff: env.duration_or(names.max_backoff, defaults.max_backoff)?,
        };
        if config.consecutive_failures == 0 {
            return Err(crate::ConfigError::new(
                names.consecutive_failures,
                "must be greater than zero",
            ));
        }
        if !(1..=100).contains(&config.failure_rate_percent) {
            return Err(crate::ConfigError::new(
                names.failure_rate_percent,
                "must be between 1 and 100",
            ));
        }
        if config.window.is_zero() {
            return Err(crate::ConfigError::new(names.window, "must be positive"));
        }
        if config.base_backoff.is_zero() || config.base_backoff > config.max_backoff {
            return Err(crate::ConfigError::new(
                names.base_backoff,
                format_args!("must be positive and at most {}", names.max_backoff),
            ));
        }
        Ok(config)
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are refused until the backoff passes.
    Open,
    /// One probe call is in flight or allowed.
    HalfOpen,
}

impl BreakerState {
    /// Every state, in the order of [`BreakerState::as_str`]'s names.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    /// The state's name in metrics: `closed`, `open`, `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Where an observed breaker records its state changes.
#[derive(Debug)]
struct Observer {
    transitions: Counter<u64>,
    /// `upstream` and `endpoint`.
    labels: [KeyValue; 2],
}

impl Observer {
    fn transition(&self, from: BreakerState, to: BreakerState) {
        let [upstream, endpoint] = self.labels.clone();
        self.transitions.add(
            1,
            &[
                upstream,
                endpoint,
                KeyValue::new("from", from.as_str()),
                KeyValue::new("to", to.as_str()),
            ],
        );
    }
}

/// An operator's override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Override {
    /// The breaker follows outcomes.
    #[default]
    Automatic,
    /// Every call is refused.
    ForcedOpen,
    /// Every call is let through; outcomes are still recorded.
    ForcedClosed,
}

/// A refused call: the breaker is open (or its probe is taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// When a call may be let through again (zero while a probe is in flight).
    pub retry_after: Duration,
}

/// Number of buckets the failure-rate window is split into (memory is O(1) per breaker).
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
enum Phase {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Trips since the breaker last closed: the backoff's exponent.
    trips: u32,
    buckets: [Option<Bucket>; BUCKETS],
    forced: Override,
    /// State of the jitter generator (xorshift; quality is irrelevant, spread is not).
    jitter: u64,
    transitions: u64,
    counts: TransitionCounts,
}

/// How often a breaker changed state, by the state it entered (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransitionCounts {
    /// Entries into `Open` (trips, including failed probes).
    pub opened: u64,
    /// Entries into `HalfOpen` (each lets exactly one probe through).
    pub half_opened: u64,
    /// Entries into `Closed` from `HalfOpen` (successful probes).
    pub closed: u64,
}

/// What a breaker looks like now, read under one lock (for operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSnapshot {
    /// The effective state (an override wins).
    pub state: BreakerState,
    /// The operator override in force.
    pub forced: Override,
    /// Failures in a row while closed.
    pub consecutive_failures: u32,
    /// Calls in the sliding window.
    pub window_calls: u32,
    /// Failures in the sliding window.
    pub window_failures: u32,
    /// While open: the time until a probe is let through.
    pub retry_after: Option<Duration>,
    /// Whether a call would be admitted now (without taking a permit).
    pub admits: bool,
}

/// A circuit breaker for one endpoint; cheap to clone (clones share state).
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: Arc<BreakerConfig>,
    inner: Arc<Mutex<Inner>>,
    observer: Option<Arc<Observer>>,
}

/// Permission to make one call. Report its outcome with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unreported means "no verdict" (e.g. the caller
/// cancelled), which neither trips nor closes the breaker.
#[derive(Debug)]
pub struct Permit {
    breaker: CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl Permit {
    /// Whether this is the half-open state's single probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The call succeeded (or failed in a way that says nothing about the dependency).
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, false);
    }

    /// The call failed because of the dependency.
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, true);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            let mut inner = self.breaker.lock();
            if let Phase::HalfOpen { probe_in_flight } = &mut inner.phase {
                *probe_in_flight = false;
            }
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        let mut seed = [0u8; 8];
        // Without OS randomness the jitter is merely predictable, never unsafe.
        let _ = getrandom::fill(&mut seed);
        Self {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(Inner {
                phase: Phase::Closed {
                    consecutive_failures: 0,
                },
                trips: 0,
                buckets: [None; BUCKETS],
                forced: Override::Automatic,
                jitter: u64::from_le_bytes(seed) | 1,
                transitions: 0,
                counts: TransitionCounts::default(),
            })),
            observer: None,
        }
    }

    /// A closed breaker whose state changes are counted under `upstream` and `endpoint`
    /// (both from configuration: their number is bounded). Build it after telemetry is
    /// set up; with export off it records nothing.
    pub fn observed(config: BreakerConfig, upstream: &str, endpoint: &str) -> Self {
        let mut breaker = Self::new(config);
        if crate::telemetry::exporting() {
            let transitions = opentelemetry::global::meter("paysuite.breaker")
                .u64_counter("paysuite.breaker.transitions")
                .with_unit("{transition}")
                .with_description("Circuit breaker state changes, by upstream, endpoint, and the states left and entered")
                .build();
            breaker.observer = Some(Arc::new(Observer {
                transitions,
                labels: [
                    KeyValue::new("upstream", upstream.to_owned()),
                    KeyValue::new("endpoint", endpoint.to_owned()),
                ],
            }));
        }
        breaker
    }

    fn transition(&self, from: BreakerState, to: BreakerState) {
        if let Some(observer) = &self.observer {
            observer.transition(from, to);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the state half-updated in a way
        // that matters more than refusing to work, so a poisoned lock is recovered.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks to make a call.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.forced {
            Override::ForcedOpen => {
                return Err(Rejected {
                    retry_after: Duration::ZERO,
                });
            }
            Override::ForcedClosed => return Ok(self.permit(false)),
            Override::Automatic => {}
        }
        match inner.phase {
            Phase::Closed { .. } => Ok(self.permit(false)),
            Phase::Open { until } if now >= until => {
                inner.phase = Phase::HalfOpen {
                    probe_in_flight: true,
                };
                inner.transitions += 1;
                inner.counts.half_opened += 1;
                self.transition(BreakerState::Open, BreakerState::HalfOpen);
                Ok(self.permit(true))
            }
            Phase::Open { until } => Err(Rejected {
                retry_after: until - now,
            }),
            Phase::HalfOpen {
                probe_in_flight: false,
            } => {
                inner.phase = Phase::HalfOpen {
                    probe_in_flight: true,
                };
                Ok(self.permit(true))
            }
            Phase::HalfOpen {
                probe_in_flight: true,
            } => Err(Rejected {
                retry_after: Duration::ZERO,
            }),
        }
    }

    fn permit(&self, probe: bool) -> Permit {
        Permit {
            breaker: self.clone(),
            probe,
            reported: false,
        }
    }

    /// The current state (an elapsed backoff still reads `Open` until a call asks).
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.forced {
            Override::ForcedOpen => return BreakerState::Open,
            Override::ForcedClosed => return BreakerState::Closed,
            Override::Automatic => {}
        }
        match inner.phase {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// The operator override in force.
    pub fn override_state(&self) -> Override {
        self.lock().forced
    }

    /// Sets an operator override; `Automatic` returns to following outcomes from Closed.
    pub fn set_override(&self, forced: Override) {
        let mut inner = self.lock();
        if forced == Override::Automatic && inner.forced != Override::Automatic {
            inner.phase = Phase::Closed {
                consecutive_failures: 0,
            };
            inner.trips = 0;
            inner.buckets = [None; BUCKETS];
        }
        inner.forced = forced;
    }

    /// How many state changes happened (for metrics and tests).
    pub fn transitions(&self) -> u64 {
        self.lock().transitions
    }

    /// State changes by the state entered.
    pub fn transition_counts(&self) -> TransitionCounts {
        self.lock().counts
    }

    /// Everything an operator wants to see, consistently.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let inner = self.lock();
        let (window_calls, window_failures) = self.window_totals(&inner, now);
        let (phase_state, consecutive_failures, retry_after, phase_admits) = match inner.phase {
            Phase::Closed {
                consecutive_failures,
            } => (BreakerState::Closed, consecutive_failures, None, true),
            Phase::Open { until } => (
                BreakerState::Open,
                0,
                Some(until.saturating_duration_since(now)),
                now >= until,
            ),
            Phase::HalfOpen { probe_in_flight } => {
                (BreakerState::HalfOpen, 0, None, !probe_in_flight)
            }
        };
        let (state, admits) = match inner.forced {
            Override::Automatic => (phase_state, phase_admits),
            Override::ForcedOpen => (BreakerState::Open, false),
            Override::ForcedClosed => (BreakerState::Closed, true),
        };
        BreakerSnapshot {
            state,
            forced: inner.forced,
            consecutive_failures,
            window_calls,
            window_failures,
            retry_after: if inner.forced == Override::Automatic {
                retry_after
            } else {
                None
            },
            admits,
        }
    }

    /// Calls and failures in the current window.
    pub fn window_counts(&self) -> (u32, u32) {
        let now = Instant::now();
        let inner = self.lock();
        self.window_totals(&inner, now)
    }

    fn window_totals(&self, inner: &Inner, now: Instant) -> (u32, u32) {
        inner
            .buckets
            .iter()
            .flatten()
            .filter(|bucket| now.saturating_duration_since(bucket.start) < self.config.window)
            .fold((0, 0), |(calls, failures), b| {
                (calls + b.calls, failures + b.failures)
            })
    }

    fn record(&self, probe: bool, failed: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.count(&mut inner, now, failed);
        if inner.forced != Override::Automatic {
            return;
        }
        match inner.phase {
            Phase::HalfOpen { .. } if probe => {
                if failed {
                    self.open(&mut inner, now);
                } else {
                    inner.phase = Phase::Closed {
                        consecutive_failures: 0,
                    };
                    inner.trips = 0;
                    inner.buckets = [None; BUCKETS];
                    inner.transitions += 1;
                    inner.counts.closed += 1;
                    self.transition(BreakerState::HalfOpen, BreakerState::Closed);
                }
            }
            Phase::Closed {
                consecutive_failures,
            } => {
                let consecutive_failures = if failed { consecutive_failures + 1 } else { 0 };
                inner.phase = Phase::Closed {
                    consecutive_failures,
                };
                let (calls, failures) = self.window_totals(&inner, now);
                let rate_tripped = calls >= self.config.minimum_calls
                    && u64::from(failures) * 100
                        >= u64::from(self.config.failure_rate_percent) * u64::from(calls);
                if failed
                    && (consecutive_failures >= self.config.consecutive_failures || rate_tripped)
                {
                    self.open(&mut inner, now);
                }
            }
            // Outcomes of calls admitted before the breaker opened say nothing new.
            Phase::Open { .. } | Phase::HalfOpen { .. } => {}
        }
    }

    fn count(&self, inner: &mut Inner, now: Instant, failed: bool) {
        let width = self.config.window / BUCKETS as u32;
        let slot = inner
            .buckets
            .iter()
            .position(|b| b.is_some_and(|b| now.saturating_duration_since(b.start) < width));
        let index = match slot {
            Some(index) => index,
            None => {
                // Reuse the oldest (or an empty) bucket for the current slice of time.
                let index = inner
                    .buckets
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.map(|b| b.start))
                    .map_or(0, |(index, _)| index);
                inner.buckets[index] = Some(Bucket {
                    start: now,
                    calls: 0,
                    failures: 0,
                });
                index
            }
        };
        if let Some(bucket) = inner.buckets[index].as_mut() {
            bucket.calls += 1;
            bucket.failures += u32::from(failed);
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        let from = match inner.phase {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        let exponent = inner.trips.min(20);
        let backoff = self
            .config
            .base_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.config.max_backoff);
        // Equal jitter: half the backoff, plus a random share of the other half.
        inner.jitter ^= inner.jitter << 13;
        inner.jitter ^= inner.jitter >> 7;
        inner.jitter ^= inner.jitter << 17;
        let half = backoff / 2;
        let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
        let delay = half + Duration::from_micros(inner.jitter % spread);
        inner.phase = Phase::Open { until: now + delay };
        inner.trips = inner.trips.saturating_add(1);
        inner.transitions += 1;
        inner.counts.opened += 1;
        self.transition(from, BreakerState::Open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate_percent: 50,
            minimum_calls: 10,
            window: Duration::from_secs(10),
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
        }
    }

    fn call(breaker: &CircuitBreaker, fail: bool) -> Result<(), Rejected> {
        let permit = breaker.try_acquire()?;
        if fail {
            permit.failure()
        } else {
            permit.success()
        }
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_trip_and_a_success_resets_the_count() {
        let breaker = CircuitBreaker::new(config());
        for fail in [true, true, false, true, true] {
            assert!(call(&breaker, fail).is_ok());
        }
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "the success reset the run"
        );
        assert!(call(&breaker, true).is_ok());
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.try_acquire().is_err(), "open refuses at once");
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_over_the_window_trips_only_with_enough_calls() {
        let breaker = CircuitBreaker::new(config());
        // Alternate: never 3 in a row, but a 50% failure rate.
        for i in 0..9 {
            assert!(call(&breaker, i % 2 == 0).is_ok());
        }
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "9 calls < minimum_calls"
        );
        assert!(call(&breaker, false).is_ok());
        assert!(call(&breaker, true).is_ok());
        assert_eq!(breaker.state(), BreakerState::Open, "11 calls, 6 failures");
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let breaker = CircuitBreaker::new(config());
        for i in 0..10 {
            assert!(call(&breaker, i % 2 == 0).is_ok());
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(breaker.window_counts(), (0, 0));
        assert!(call(&breaker, true).is_ok());
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_one_probe_through_after_the_backoff() {
        let breaker = CircuitBreaker::new(config());
        for _ in 0..3 {
            assert!(call(&breaker, true).is_ok());
        }
        // Equal jitter: the first backoff lies in [0.5 s, 1 s].
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(breaker.try_acquire().is_err());
        tokio::time::advance(Duration::from_millis(501)).await;
        let probe = breaker.try_acquire();
        assert!(probe.is_ok());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(
            breaker.try_acquire().is_err(),
            "a second caller waits for the probe"
        );
        if let Ok(probe) = probe {
            probe.success();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(call(&breaker, false).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_with_a_longer_capped_backoff() {
        let breaker = CircuitBreaker::new(config());
        for _ in 0..3 {
            assert!(call(&breaker, true).is_ok());
        }
        let mut previous_upper = Duration::from_secs(1);
        for trip in 1..6u32 {
            tokio::time::advance(previous_upper).await;
            assert!(call(&breaker, true).is_ok(), "probe {trip} admitted");
            assert_eq!(breaker.state(), BreakerState::Open);
            let upper = (Duration::from_secs(1) * 2u32.pow(trip)).min(Duration::from_secs(8));
            let retry_after = breaker.try_acquire().err().map(|r| r.retry_after);
            assert!(
                retry_after.is_some_and(|r| r >= upper / 2 && r <= upper),
                "trip {trip}: {retry_after:?} outside [{:?}, {upper:?}]",
                upper / 2
            );
            previous_upper = upper;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_the_slot_without_a_verdict() {
        let breaker = CircuitBreaker::new(config());
        for _ in 0..3 {
            assert!(call(&breaker, true).is_ok());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(breaker.try_acquire());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(call(&breaker, false).is_ok(), "the next caller may probe");
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_per_backoff_is_counted_and_the_snapshot_agrees() {
        let breaker = CircuitBreaker::new(config());
        for _ in 0..3 {
            assert!(call(&breaker, true).is_ok());
        }
        let snapshot = breaker.snapshot();
        assert_eq!(snapshot.state, BreakerState::Open);
        assert!(!snapshot.admits);
        assert!(
            snapshot
                .retry_after
                .is_some_and(|r| r <= Duration::from_secs(1))
        );
        let mut probes = 0;
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(8)).await;
            assert!(breaker.snapshot().admits, "the backoff has passed");
            // Many callers at once: one probe, the rest refused.
            let permits: Vec<_> = (0..10).filter_map(|_| breaker.try_acquire().ok()).collect();
            assert_eq!(permits.len(), 1);
            assert!(permits.iter().all(Permit::is_probe));
            probes += permits.len();
            permits.into_iter().for_each(Permit::failure);
        }
        let counts = breaker.transition_counts();
        assert_eq!(counts.half_opened, 4);
        assert_eq!(counts.opened, 5, "the trip, then each failed probe");
        assert_eq!(probes, 4);
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(call(&breaker, false).is_ok());
        assert_eq!(breaker.transition_counts().closed, 1);
        assert_eq!(breaker.snapshot().consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn operators_can_force_open_and_closed() {
        let breaker = CircuitBreaker::new(config());
        breaker.set_override(Override::ForcedOpen);
        assert!(breaker.try_acquire().is_err());
        assert_eq!(breaker.state(), BreakerState::Open);
        breaker.set_override(Override::ForcedClosed);
        for _ in 0..10 {
            assert!(
                call(&breaker, true).is_ok(),
                "forced closed ignores failures"
            );
        }
        breaker.set_override(Override::Automatic);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(call(&breaker, false).is_ok());
        assert!(breaker.transitions() == 0, "overrides are not transitions");
    }

    #[test]
    fn the_config_is_read_from_the_named_variables_and_checked() {
        const NAMES: BreakerEnv = BreakerEnv {
            consecutive_failures: "B_FAILURES",
            failure_rate_percent: "B_RATE",
            minimum_calls: "B_MIN",
            window: "B_WINDOW",
            base_backoff: "B_BASE",
            max_backoff: "B_MAX",
        };
        let read = |pairs: &[(&str, &str)]| {
            BreakerConfig::from_env(&crate::Env::from_pairs(pairs.iter().copied()), &NAMES)
        };
        assert_eq!(read(&[]).ok(), Some(BreakerConfig::default()));
        let config = read(&[("B_FAILURES", "2"), ("B_BASE", "50ms"), ("B_MAX", "1s")]).ok();
        assert_eq!(config.as_ref().map(|c| c.consecutive_failures), Some(2));
        assert_eq!(
            config.map(|c| (c.base_backoff, c.max_backoff)),
            Some((Duration::from_millis(50), Duration::from_secs(1)))
        );
        for (pairs, variable) in [
            (&[("B_FAILURES", "0")][..], "B_FAILURES"),
            (&[("B_RATE", "101")][..], "B_RATE"),
            (&[("B_WINDOW", "0s")][..], "B_WINDOW"),
            (&[("B_BASE", "2m")][..], "B_BASE"),
        ] {
            let err = read(pairs).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with(variable), "{pairs:?}: {err}");
        }
    }
}
