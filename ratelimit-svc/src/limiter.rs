//! Rate-limit decisions: the three algorithms as pure functions of a key's state, the
//! request's cost and the store's clock, so that every store (memory here, Redis's Lua
//! scripts) decides the same way and tests can drive time.
//!
//! - Exact sliding window (default): a key remembers its admissions (time, cost) of the
//!   last window; a request is admitted iff the admitted cost in the trailing window plus
//!   its own stays within the limit. No trailing window of length W ever holds more than
//!   the limit. Memory is O(limit) per key, hence `SLIDING_WINDOW_MAX_LIMIT`.
//! - GCRA: one "theoretical arrival time" per key; a steady rate of limit/W with bursts of
//!   up to `limit`. O(1) per key.
//! - Fixed window (Envoy's semantics): a counter per key and window `⌊t / W⌋`.
//!
//! A refused request changes nothing. A cost of 0 is a peek: it reports without
//! consuming (allowed when at least one unit remains).

use std::collections::VecDeque;
use std::time::Duration;

/// How a limit is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Exact sliding window.
    SlidingWindow,
    /// Generic cell rate algorithm.
    Gcra,
    /// Fixed windows aligned on multiples of the window.
    FixedWindow,
}

impl Algorithm {
    /// Its name in keys and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlidingWindow => "sliding",
            Self::Gcra => "gcra",
            Self::FixedWindow => "fixed",
        }
    }
}

/// A limit: at most `limit` units per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Units per window (> 0).
    pub limit: u64,
    /// The window (> 0).
    pub window: Duration,
    /// How it is enforced.
    pub algorithm: Algorithm,
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is admitted.
    pub allowed: bool,
    /// The limit.
    pub limit: u64,
    /// Units still available now (after this request, if admitted).
    pub remaining: u64,
    /// Until the key is back to its full limit.
    pub reset_after: Duration,
    /// For a refusal: until the same request could be admitted (zero when admitted).
    pub retry_after: Duration,
    /// The store's time of the decision, in microseconds since the Unix epoch.
    pub decided_at_micros: i64,
}

/// What a store keeps per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Admissions of the trailing window: (time µs, cost), oldest first.
    Sliding(VecDeque<(i64, u64)>),
    /// The theoretical arrival time, µs.
    Gcra {
        /// When the key would be fully rested again.
        tat: i64,
    },
    /// The counter of one window.
    Fixed {
        /// `⌊t / W⌋` of the counted window.
        window: i64,
        /// Units admitted in it.
        count: u64,
    },
}

impl KeyState {
    /// Whether the state no longer matters at `now` (the store may forget it).
    pub fn expired(&self, limit: &Limit, now: i64) -> bool {
        let window = micros(limit.window);
        match self {
            Self::Sliding(admissions) => admissions.back().is_none_or(|(t, _)| t + window <= now),
            Self::Gcra { tat } => *tat <= now,
            Self::Fixed { window: index, .. } => (index + 1) * window <= now,
        }
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros())
        .unwrap_or(i64::MAX)
        .max(1)
}

fn duration(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(micros.max(0)).unwrap_or(0))
}

/// Decides `cost` units against `limit` at `now` (µs), updating `state` when admitted.
pub fn decide(state: &mut Option<KeyState>, limit: &Limit, cost: u64, now: i64) -> Decision {
    if state.as_ref().is_some_and(|s| s.expired(limit, now)) {
        *state = None;
    }
    match limit.algorithm {
        Algorithm::SlidingWindow => sliding(state, limit, cost, now),
        Algorithm::Gcra => gcra(state, limit, cost, now),
        Algorithm::FixedWindow => fixed(state, limit, cost, now),
    }
}

fn sliding(state: &mut Option<KeyState>, limit: &Limit, cost: u64, now: i64) -> Decision {
    let window = micros(limit.window);
    let mut admissions = match state.take() {
        Some(KeyState::Sliding(admissions)) => admissions,
        _ => VecDeque::new(),
    };
    while admissions.front().is_some_and(|(t, _)| t + window <= now) {
        admissions.pop_front();
    }
    let used: u64 = admissions.iter().map(|(_, c)| c).sum();
    let wanted = cost.max(u64::from(cost == 0));
    let allowed = used.saturating_add(wanted) <= limit.limit;
    let mut retry_after = 0;
    if allowed && cost > 0 {
        admissions.push_back((now, cost));
    } else if !allowed {
        // The earliest time enough old admissions have left the window.
        let excess = used.saturating_add(wanted) - limit.limit;
        let mut freed = 0;
        for (t, c) in &admissions {
            freed += c;
            if freed >= excess {
                retry_after = t + window - now;
                break;
            }
        }
        if wanted > limit.limit {
            retry_after = window;
        }
    }
    let used_after = used + if allowed { cost } else { 0 };
    let reset_after = admissions.back().map_or(0, |(t, _)| t + window - now);
    let decision = Decision {
        allowed,
        limit: limit.limit,
        remaining: limit.limit.saturating_sub(used_after),
        reset_after: duration(reset_after),
        retry_after: duration(retry_after),
        decided_at_micros: now,
    };
    if !admissions.is_empty() {
        *state = Some(KeyState::Sliding(admissions));
    }
    decision
}

fn gcra(state: &mut Option<KeyState>, limit: &Limit, cost: u64, now: i64) -> Decision {
    let window = micros(limit.window);
    let interval = (window / i64::try_from(limit.limit).unwrap_or(i64::MAX)).max(1);
    let tat = match state {
        Some(KeyState::Gcra { tat }) => (*tat).max(now),
        _ => now,
    };
    let wanted = i64::try_from(cost.max(u64::from(cost == 0))).unwrap_or(i64::MAX);
    let new_tat = tat.saturating_add(wanted.saturating_mul(interval));
    // Admitted when the new arrival time stays within one window of now.
    let allow_at = new_tat - window;
    let allowed = allow_at <= now;
    let current = if allowed && cost > 0 { new_tat } else { tat };
    if allowed && cost > 0 {
        *state = Some(KeyState::Gcra { tat: new_tat });
    } else if tat > now {
        *state = Some(KeyState::Gcra { tat });
    }
    let remaining = (window - (current - now)).max(0) / interval;
    Decision {
        allowed,
        limit: limit.limit,
        remaining: u64::try_from(remaining).unwrap_or(0).min(limit.limit),
        reset_after: duration(current - now),
        retry_after: duration(if allowed { 0 } else { allow_at - now }),
        decided_at_micros: now,
    }
}

fn fixed(state: &mut Option<KeyState>, limit: &Limit, cost: u64, now: i64) -> Decision {
    let window = micros(limit.window);
    let index = now.div_euclid(window);
    let count = match state {
        Some(KeyState::Fixed { window: w, count }) if *w == index => *count,
        _ => 0,
    };
    let wanted = cost.max(u64::from(cost == 0));
    let allowed = count.saturating_add(wanted) <= limit.limit;
    let count_after = if allowed { count + cost } else { count };
    if count_after > 0 {
        *state = Some(KeyState::Fixed {
            window: index,
            count: count_after,
        });
    }
    let reset_after = (index + 1) * window - now;
    Decision {
        allowed,
        limit: limit.limit,
        remaining: limit.limit.saturating_sub(count_after),
        reset_after: duration(reset_after),
        retry_after: duration(if allowed {
            0
        } else if wanted > limit.limit {
            window
        } else {
            reset_after
        }),
        decided_at_micros: now,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECOND: i64 = 1_000_000;

    fn limit(algorithm: Algorithm, limit: u64, window_ms: u64) -> Limit {
        Limit {
            limit,
            window: Duration::from_millis(window_ms),
            algorithm,
        }
    }

    /// (time step in ms, cost) pairs, with bursts at window edges likely.
    fn requests() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec(
            (
                prop_oneof![3 => Just(0u64), 3 => 0u64..50, 1 => 995u64..1005, 1 => 0u64..3000],
                prop_oneof![6 => Just(1u64), 2 => 2u64..5, 1 => Just(0u64), 1 => 5u64..12],
            ),
            1..200,
        )
    }

    proptest! {
        #[test]
        fn the_sliding_window_matches_its_model_and_never_overfills_a_window(
            max in 1u64..20,
            window_ms in prop_oneof![Just(1000u64), 1u64..5000],
            requests in requests(),
        ) {
            let limit = limit(Algorithm::SlidingWindow, max, window_ms);
            let window = i64::try_from(window_ms).unwrap_or(1) * 1000;
            let mut state = None;
            let mut admitted: Vec<(i64, u64)> = Vec::new();
            let mut now = 0i64;
            for (step, cost) in requests {
                now += i64::try_from(step).unwrap_or(0) * 1000;
                let decision = decide(&mut state, &limit, cost, now);
                // The model: everything admitted in (now − W, now].
                let used: u64 = admitted.iter().filter(|(t, _)| t + window > now).map(|(_, c)| c).sum();
                let expected = used + cost.max(1) <= max;
                prop_assert_eq!(decision.allowed, expected);
                if decision.allowed && cost > 0 {
                    admitted.push((now, cost));
                }
                prop_assert_eq!(decision.remaining, max - used - if decision.allowed { cost } else { 0 });
                if !decision.allowed && cost <= max {
                    // Retrying after retry_after succeeds (and not one µs earlier).
                    let mut probe = state.clone();
                    let later = now + i64::try_from(decision.retry_after.as_micros()).unwrap_or(0);
                    prop_assert!(decide(&mut probe, &limit, cost, later).allowed);
                    let mut early = state.clone();
                    prop_assert!(!decide(&mut early, &limit, cost, later - 1).allowed);
                }
            }
            // No trailing window holds more than the limit.
            for (end, _) in &admitted {
                let inside: u64 = admitted.iter().filter(|(t, _)| t <= end && t + window > *end).map(|(_, c)| c).sum();
                prop_assert!(inside <= max, "{inside} > {max} in the window ending at {end}");
            }
        }

        #[test]
        fn the_fixed_window_counts_per_window(
            max in 1u64..20,
            window_ms in 1u64..3000,
            requests in requests(),
        ) {
            let limit = limit(Algorithm::FixedWindow, max, window_ms);
            let window = i64::try_from(window_ms).unwrap_or(1) * 1000;
            let mut state = None;
            let mut counts = std::collections::BTreeMap::<i64, u64>::new();
            let mut now = 0i64;
            for (step, cost) in requests {
                now += i64::try_from(step).unwrap_or(0) * 1000;
                let decision = decide(&mut state, &limit, cost, now);
                let count = counts.entry(now / window).or_default();
                let expected = *count + cost.max(1) <= max;
                prop_assert_eq!(decision.allowed, expected);
                if expected {
                    *count += cost;
                }
                prop_assert_eq!(decision.remaining, max - *count);
                prop_assert_eq!(decision.reset_after.as_micros(), u128::try_from((now / window + 1) * window - now).unwrap_or(0));
            }
        }

        #[test]
        fn gcra_never_admits_more_than_the_rate_plus_one_burst(
            max in 1u64..20,
            window_ms in 10u64..3000,
            requests in requests(),
        ) {
            let limit = limit(Algorithm::Gcra, max, window_ms);
            let window = i64::try_from(window_ms).unwrap_or(1) * 1000;
            let interval = (window / i64::try_from(max).unwrap_or(1)).max(1);
            let mut state = None;
            let mut admitted: Vec<(i64, u64)> = Vec::new();
            let mut now = 0i64;
            for (step, cost) in requests {
                now += i64::try_from(step).unwrap_or(0) * 1000;
                let decision = decide(&mut state, &limit, cost, now);
                if decision.allowed && cost > 0 {
                    admitted.push((now, cost));
                }
                if !decision.allowed {
                    let mut probe = state.clone();
                    let later = now + i64::try_from(decision.retry_after.as_micros()).unwrap_or(0);
                    prop_assert!(decide(&mut probe, &limit, cost, later).allowed || cost > max);
                }
            }
            // Over any span D from an admission on: at most one burst plus D at the rate.
            for (i, (start, _)) in admitted.iter().enumerate() {
                let mut total = 0u64;
                for (t, c) in &admitted[i..] {
                    total += c;
                    let span = t - start;
                    let bound = max + u64::try_from(span / interval).unwrap_or(0);
                    prop_assert!(total <= bound, "{total} admitted in {span} µs (bound {bound})");
                }
            }
        }
    }

    #[test]
    fn a_peek_consumes_nothing() {
        for algorithm in [
            Algorithm::SlidingWindow,
            Algorithm::Gcra,
            Algorithm::FixedWindow,
        ] {
            let limit = limit(algorithm, 2, 1000);
            let mut state = None;
            for _ in 0..5 {
                let peek = decide(&mut state, &limit, 0, SECOND);
                assert!(peek.allowed, "{algorithm:?}");
                assert_eq!(peek.remaining, 2, "{algorithm:?}");
            }
            assert!(decide(&mut state, &limit, 2, SECOND).allowed);
            let peek = decide(&mut state, &limit, 0, SECOND);
            assert!(!peek.allowed, "{algorithm:?}");
            assert_eq!(peek.remaining, 0);
        }
    }

    #[test]
    fn a_cost_near_the_integer_limit_is_refused_not_wrapped() {
        for algorithm in [
            Algorithm::SlidingWindow,
            Algorithm::Gcra,
            Algorithm::FixedWindow,
        ] {
            let limit = limit(algorithm, 5, 1000);
            let mut state = None;
            assert!(decide(&mut state, &limit, 1, SECOND).allowed);
            let huge = decide(&mut state, &limit, u64::MAX, SECOND);
            assert!(!huge.allowed, "{algorithm:?}");
            assert!(
                decide(&mut state, &limit, 4, SECOND).allowed,
                "{algorithm:?}"
            );
        }
    }
}
