//! payment-svc's domain metrics, on the global OpenTelemetry meter (README,
//! "Observability", lists them all).
//!
//! Labels are bounded by construction: statuses, currencies, movement and job kinds,
//! job outcomes — never an id, a key or a principal.
//!
//! Counters of database changes count what committed: inside [`deferred`] (the
//! retried transactions of [`crate::idempotency::run_atomic`]) a recording waits for
//! [`commit`] and is dropped by [`discard`] or when the attempt ends without a commit, so
//! a serialization retry or a refusal that rolls its work back counts nothing. Elsewhere
//! a change is counted when its statement succeeds, right before its transaction commits.
//!
//! With export off nothing is recorded, buffered or queried.

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, ObservableGauge};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::jobs::{JobKind, JobState};
use crate::ledger::MovementKind;
use crate::payments::PaymentStatus;

/// The counters, built on first use (after telemetry is set up).
struct Instruments {
    transitions: Counter<u64>,
    ledger_volume: Counter<u64>,
    replays: Counter<u64>,
    conflicts: Counter<u64>,
    job_attempts: Counter<u64>,
    dead_jobs: Counter<u64>,
}

fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let meter = opentelemetry::global::meter("paysuite.payment");
        Instruments {
            transitions: meter
                .u64_counter("paysuite.payments.transitions")
                .with_unit("{payment}")
                .with_description("Payments entering a status (creation included), by status and currency")
                .build(),
            ledger_volume: meter
                .u64_counter("paysuite.ledger.volume")
                .with_unit("{minor_unit}")
                .with_description("Money moved by ledger movements, in the currency's minor units, by currency and movement kind")
                .build(),
            replays: meter
                .u64_counter("paysuite.idempotency.replays")
                .with_unit("{request}")
                .with_description("Requests answered with the stored answer of an earlier request with the same idempotency key, by method")
                .build(),
            conflicts: meter
                .u64_counter("paysuite.idempotency.conflicts")
                .with_unit("{request}")
                .with_description("Requests refused over their idempotency key (reused with another request, or in use), by method and reason")
                .build(),
            job_attempts: meter
                .u64_counter("paysuite.jobs.attempts")
                .with_unit("{attempt}")
                .with_description("Job attempts recorded, by job kind and the state the attempt left the job in")
                .build(),
            dead_jobs: meter
                .u64_counter("paysuite.jobs.dead")
                .with_unit("{job}")
                .with_description("Jobs that ran out of attempts, by job kind")
                .build(),
        }
    })
}

/// A recording that may wait for its transaction.
#[derive(Debug, Clone, Copy)]
enum Recorded {
    Transition {
        status: PaymentStatus,
        currency: &'static str,
    },
    Posted {
        kind: MovementKind,
        currency: &'static str,
        amount_minor: u64,
    },
}

impl Recorded {
    fn emit(self) {
        let instruments = instruments();
        match self {
            Recorded::Transition { status, currency } => instruments.transitions.add(
                1,
                &[
                    KeyValue::new("status", status.as_str()),
                    KeyValue::new("currency", currency),
                ],
            ),
            Recorded::Posted {
                kind,
                currency,
                amount_minor,
            } => instruments.ledger_volume.add(
                amount_minor,
                &[
                    KeyValue::new("currency", currency),
                    KeyValue::new("kind", kind.as_str()),
                ],
            ),
        }
    }
}

tokio::task_local! {
    /// Recordings of the transaction attempt running in this task, until it commits.
    static PENDING: RefCell<Vec<Recorded>>;
}

fn record(recorded: Recorded) {
    if !service_kit::telemetry::exporting() {
        return;
    }
    let mut recorded = Some(recorded);
    let _ = PENDING.try_with(|pending| {
        if let Some(recorded) = recorded.take() {
            pending.borrow_mut().push(recorded);
        }
    });
    // Outside `deferred`: counted now.
    if let Some(recorded) = recorded {
        recorded.emit();
    }
}

/// Runs one transaction attempt whose recordings wait for [`commit`]; whatever was not
/// committed when it ends is dropped.
pub(crate) async fn deferred<F: Future>(attempt: F) -> F::Output {
    PENDING.scope(RefCell::new(Vec::new()), attempt).await
}

/// The transaction of the current [`deferred`] attempt committed: count its recordings.
pub(crate) fn commit() {
    let committed = PENDING
        .try_with(|pending| std::mem::take(&mut *pending.borrow_mut()))
        .unwrap_or_default();
    for recorded in committed {
        recorded.emit();
    }
}

/// The work of the current [`deferred`] attempt rolled back: forget its recordings.
pub(crate) fn discard() {
    let _ = PENDING.try_with(|pending| pending.borrow_mut().clear());
}

/// A payment entered `status` (created in it, or moved to it).
pub(crate) fn payment_transition(status: PaymentStatus, currency: &'static str) {
    record(Recorded::Transition { status, currency });
}

/// A ledger movement of `amount_minor` was posted.
pub(crate) fn ledger_posted(kind: MovementKind, currency: &'static str, amount_minor: i64) {
    record(Recorded::Posted {
        kind,
        currency,
        amount_minor: u64::try_from(amount_minor).unwrap_or(0),
    });
}

/// A request of `method` was answered from its idempotency key's stored answer.
pub(crate) fn idempotent_replay(method: &str) {
    if service_kit::telemetry::exporting() {
        instruments().replays.add(
            1,
            &[KeyValue::new(
                "rpc.method",
                service_kit::rpc_telemetry::method_name(method),
            )],
        );
    }
}

/// A request of `method` was refused over its idempotency key: `reused` with another
/// request, or `in_use` by one still running.
pub(crate) fn idempotency_conflict(method: &str, reason: &'static str) {
    if service_kit::telemetry::exporting() {
        instruments().conflicts.add(
            1,
            &[
                KeyValue::new(
                    "rpc.method",
                    service_kit::rpc_telemetry::method_name(method),
                ),
                KeyValue::new("reason", reason),
            ],
        );
    }
}

/// A job attempt of `kind` was recorded, leaving the job in `state`.
pub(crate) fn job_attempt(kind: JobKind, state: JobState) {
    if !service_kit::telemetry::exporting() {
        return;
    }
    let instruments = instruments();
    instruments.job_attempts.add(
        1,
        &[
            KeyValue::new("kind", kind.as_str()),
            KeyValue::new("outcome", state.as_str()),
        ],
    );
    if state == JobState::Dead {
        job_dead(kind);
    }
}

/// A job of `kind` is dead: out of attempts.
pub(crate) fn job_dead(kind: JobKind) {
    if service_kit::telemetry::exporting() {
        instruments()
            .dead_jobs
            .add(1, &[KeyValue::new("kind", kind.as_str())]);
    }
}

/// The queue as last read, for the gauges' callbacks (which must not block: they run on
/// the exporter's collection, so they read these instead of the database).
#[derive(Debug, Default)]
struct QueueReading {
    ready: AtomicI64,
    executing: AtomicI64,
    waiting: AtomicI64,
    dead: AtomicI64,
    oldest_ready_ms: AtomicI64,
}

/// The job queue gauges and the task that keeps their reading fresh; dropping it
/// stops nothing the gauges need (the task ends with the service's stop signal).
pub struct QueueGauges {
    _depth: ObservableGauge<i64>,
    _oldest_age: ObservableGauge<f64>,
}

impl std::fmt::Debug for QueueGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGauges").finish_non_exhaustive()
    }
}

/// Starts the queue gauges (`paysuite.jobs.depth`, `paysuite.jobs.oldest_age`) when export
/// is on: one cheap aggregate query every `interval` (the metric export interval) until
/// `stop` turns true. `None` when export is off: no task and no query.
pub fn start_queue_gauges(
    pool: PgPool,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> Option<QueueGauges> {
    if !service_kit::telemetry::exporting() {
        return None;
    }
    let reading = Arc::new(QueueReading::default());
    let meter = opentelemetry::global::meter("paysuite.payment");
    let depth = {
        let reading = Arc::clone(&reading);
        meter
            .i64_observable_gauge("paysuite.jobs.depth")
            .with_unit("{job}")
            .with_description("Jobs in the queue by state: ready (due, waiting for a worker), executing, waiting (backoff or scheduled), dead")
            .with_callback(move |observer| {
                for (state, value) in [
                    ("ready", &reading.ready),
                    ("executing", &reading.executing),
                    ("waiting", &reading.waiting),
                    ("dead", &reading.dead),
                ] {
                    observer.observe(value.load(Ordering::Relaxed), &[KeyValue::new("state", state)]);
                }
            })
            .build()
    };
    let oldest_age = {
        let reading = Arc::clone(&reading);
        meter
            .f64_observable_gauge("paysuite.jobs.oldest_age")
            .with_unit("s")
            .with_description("How long the oldest due job has waited for a worker (0 when none)")
            .with_callback(move |observer| {
                #[allow(clippy::cast_precision_loss)]
                let seconds = reading.oldest_ready_ms.load(Ordering::Relaxed) as f64 / 1000.0;
                observer.observe(seconds, &[]);
            })
            .build()
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            }
            match crate::jobs::stats(&pool).await {
                Ok(stats) => {
                    reading.ready.store(stats.ready, Ordering::Relaxed);
                    reading.executing.store(stats.executing, Ordering::Relaxed);
                    reading.waiting.store(stats.waiting, Ordering::Relaxed);
                    reading.dead.store(stats.dead, Ordering::Relaxed);
                    reading
                        .oldest_ready_ms
                        .store(stats.oldest_ready_ms, Ordering::Relaxed);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "reading the job queue for metrics failed")
                }
            }
        }
    });
    Some(QueueGauges {
        _depth: depth,
        _oldest_age: oldest_age,
    })
}
