//! gateway-svc's own metrics beside the per-call RED histogram (README, "Observability").
//!
//! - `paysuite.gateway.ratelimit.decisions`: what the rate limiting layer did with each
//!   call, by `result` (`ok`, `over_limit`, and without a decision `fail_open` or
//!   `fail_closed`).
//! - `paysuite.breaker.state`: the state of each upstream endpoint's breaker (1 for the
//!   state it is in, 0 for the others), read from the breakers at each export. Endpoints
//!   come from configuration (or its DNS names), so the label sets stay bounded; state
//!   changes themselves are counted by the breakers (`paysuite.breaker.transitions`).
//!
//! With export off nothing is recorded and no callback is registered.

use std::sync::{Arc, OnceLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, ObservableGauge};
use service_kit::breaker::BreakerState;

use crate::balance::Upstream;

fn decisions() -> &'static Counter<u64> {
    static DECISIONS: OnceLock<Counter<u64>> = OnceLock::new();
    DECISIONS.get_or_init(|| {
        opentelemetry::global::meter("paysuite.gateway")
            .u64_counter("paysuite.gateway.ratelimit.decisions")
            .with_unit("{call}")
            .with_description("Calls the rate limiting layer decided, by result: ok, over_limit, fail_open, fail_closed")
            .build()
    })
}

/// The rate limiting layer decided a call: `ok`, `over_limit`, `fail_open` or
/// `fail_closed`.
pub(crate) fn ratelimit_decision(result: &'static str) {
    if service_kit::telemetry::exporting() {
        decisions().add(1, &[KeyValue::new("result", result)]);
    }
}

/// The breaker state gauge over `upstreams`; keep it for as long as the gateway runs.
pub(crate) struct BreakerGauge {
    _state: Option<ObservableGauge<i64>>,
}

impl std::fmt::Debug for BreakerGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerGauge").finish_non_exhaustive()
    }
}

/// Registers `paysuite.breaker.state` over the endpoints of `upstreams` (as they are at
/// each export: re-resolution adds and removes endpoints).
pub(crate) fn breaker_gauge(upstreams: Arc<[Arc<Upstream>]>) -> BreakerGauge {
    if !service_kit::telemetry::exporting() {
        return BreakerGauge { _state: None };
    }
    let state = opentelemetry::global::meter("paysuite.gateway")
        .i64_observable_gauge("paysuite.breaker.state")
        .with_unit("1")
        .with_description("Whether an upstream endpoint's circuit breaker is in a state (1) or not (0), by upstream, endpoint and state")
        .with_callback(move |observer| {
            for upstream in upstreams.iter() {
                for endpoint in upstream.endpoints().iter() {
                    // A short lock of the breaker's own mutex; nothing here awaits.
                    let current = endpoint.breaker().snapshot().state;
                    for state in BreakerState::ALL {
                        observer.observe(
                            i64::from(state == current),
                            &[
                                KeyValue::new("upstream", upstream.name().to_owned()),
                                KeyValue::new("endpoint", endpoint.address().to_owned()),
                                KeyValue::new("state", state.as_str()),
                            ],
                        );
                    }
                }
            }
        })
        .build();
    BreakerGauge {
        _state: Some(state),
    }
}
