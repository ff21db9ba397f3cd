//! ratelimit-svc's metrics beside the per-call RED histogram (README, "Observability").
//!
//! - `paysuite.ratelimit.decisions`: answered requests by `domain` (a configured Envoy
//!   domain, `unknown` for any other, `api` for paysuite's own Check/Peek) and `result`
//!   (`ok`, `over_limit`);
//! - `paysuite.ratelimit.store.errors`: store (Redis) calls that failed or timed out;
//! - `paysuite.ratelimit.fail_open` / `paysuite.ratelimit.fail_closed`: decisions the
//!   failure mode made because the store could not.
//!
//! Keys and descriptor values are never labels. With export off nothing is recorded.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;

/// The `domain` of paysuite's own API (its requests name no domain).
pub(crate) const API_DOMAIN: &str = "api";
/// The `domain` of a request naming a domain the rules do not have.
pub(crate) const UNKNOWN_DOMAIN: &str = "unknown";

struct Instruments {
    decisions: Counter<u64>,
    store_errors: Counter<u64>,
    fail_open: Counter<u64>,
    fail_closed: Counter<u64>,
}

fn instruments() -> Option<&'static Instruments> {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    if !service_kit::telemetry::exporting() {
        return None;
    }
    Some(INSTRUMENTS.get_or_init(|| {
        let meter = opentelemetry::global::meter("paysuite.ratelimit");
        Instruments {
            decisions: meter
                .u64_counter("paysuite.ratelimit.decisions")
                .with_unit("{request}")
                .with_description(
                    "Rate limit requests answered, by domain and result (ok, over_limit)",
                )
                .build(),
            store_errors: meter
                .u64_counter("paysuite.ratelimit.store.errors")
                .with_unit("{error}")
                .with_description("Store (Redis) calls that failed or timed out")
                .build(),
            fail_open: meter
                .u64_counter("paysuite.ratelimit.fail_open")
                .with_unit("{decision}")
                .with_description(
                    "Decisions admitted by the failure mode because the store could not decide",
                )
                .build(),
            fail_closed: meter
                .u64_counter("paysuite.ratelimit.fail_closed")
                .with_unit("{decision}")
                .with_description(
                    "Decisions refused by the failure mode because the store could not decide",
                )
                .build(),
        }
    }))
}

/// A request of `domain` (bounded: see the module docs) was answered.
pub(crate) fn decision(domain: &str, over_limit: bool) {
    if let Some(instruments) = instruments() {
        instruments.decisions.add(
            1,
            &[
                KeyValue::new("domain", domain.to_owned()),
                KeyValue::new("result", if over_limit { "over_limit" } else { "ok" }),
            ],
        );
    }
}

/// A store call failed or timed out.
pub(crate) fn store_error() {
    if let Some(instruments) = instruments() {
        instruments.store_errors.add(1, &[]);
    }
}

/// The failure mode decided: admitted (`open`) or refused.
pub(crate) fn failure_mode_decision(open: bool) {
    if let Some(instruments) = instruments() {
        if open {
            instruments.fail_open.add(1, &[]);
        } else {
            instruments.fail_closed.add(1, &[]);
        }
    }
}
