//! The workers: claim due jobs, run each under a renewed lease, record its outcome.
//!
//! Workers wake on NOTIFY (`jobs::CHANNEL`, sent when a job commits), when a running job
//! finishes (a slot is free), and on a slow poll that is only a safety net (scheduled
//! jobs, backoffs, leases that ran out). On shutdown they stop claiming, give running
//! jobs the drain timeout to finish, and hand the rest back ([`super::release`]), so no
//! job stays executing past its lease because this process went away.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use super::{CHANNEL, Claimed, JobOutcome, JobState};
use crate::error::Error;

/// Runs one job attempt. Every write it makes goes through [`super::fence`].
#[tonic::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Performs `claimed` and says how the attempt ended.
    async fn perform(&self, claimed: &Claimed) -> JobOutcome;

    /// Periodic upkeep beside the jobs (every `maintenance_interval`).
    async fn maintain(&self) {}
}

/// How the workers behave.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// This process's name in `locked_by`.
    pub worker_id: String,
    /// Jobs run at once.
    pub concurrency: usize,
    /// How long a claim holds a job; renewed at a third of it while the job runs.
    pub lease: Duration,
    /// The safety-net poll.
    pub poll_interval: Duration,
    /// Retry backoff: base and cap.
    pub backoff: (Duration, Duration),
    /// How long running jobs get to finish at shutdown.
    pub drain_timeout: Duration,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// How often finished jobs are reaped and the handler's upkeep runs.
    pub maintenance_interval: Duration,
}

/// What the workers did (tests prove which path ran with these).
#[derive(Debug, Default)]
pub struct RunnerCounters {
    /// Jobs claimed.
    pub claimed: std::sync::atomic::AtomicU64,
    /// Claims that took over a job whose lease ran out.
    pub takeovers: std::sync::atomic::AtomicU64,
    /// Outcomes recorded.
    pub finished: std::sync::atomic::AtomicU64,
    /// Outcomes refused because the claim was lost.
    pub stale: std::sync::atomic::AtomicU64,
    /// Leases renewed while a job ran.
    pub renewals: std::sync::atomic::AtomicU64,
    /// Renewals that failed or found the lease lost.
    pub renewal_failures: std::sync::atomic::AtomicU64,
    /// Jobs handed back at shutdown.
    pub released: std::sync::atomic::AtomicU64,
    /// Wake-ups by notification.
    pub notified: std::sync::atomic::AtomicU64,
}

/// Runs workers until `shutdown` turns true.
pub async fn run(
    pool: PgPool,
    listener_pool: PgPool,
    handler: Arc<dyn Handler>,
    config: RunnerConfig,
    counters: Arc<RunnerCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;

    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut running: JoinSet<()> = JoinSet::new();
    let mut listener = connect_listener(&listener_pool).await;
    let mut last_reap = tokio::time::Instant::now();
    let (release_tx, mut release_rx) = tokio::sync::mpsc::unbounded_channel::<Claimed>();
    loop {
        if *shutdown.borrow() {
            break;
        }
        // Claim as many jobs as there are free slots.
        let free = slots.available_permits();
        if free > 0 {
            match super::claim(
                &pool,
                &config.worker_id,
                config.lease,
                i64::try_from(free).unwrap_or(1),
            )
            .await
            {
                Ok(claimed) => {
                    for job in claimed {
                        counters.claimed.fetch_add(1, Relaxed);
                        if job.takeover {
                            counters.takeovers.fetch_add(1, Relaxed);
                        }
                        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                            // Cannot happen (we claimed at most `free`); hand it back.
                            let _ = release_tx.send(job);
                            continue;
                        };
                        let pool = pool.clone();
                        let handler = Arc::clone(&handler);
                        let config = config.clone();
                        let counters = Arc::clone(&counters);
                        let shutdown = shutdown.clone();
                        let release_tx = release_tx.clone();
                        let span = tracing::info_span!(
                            "job",
                            job_id = job.job.id,
                            kind = job.job.kind.as_str(),
                            attempt = job.job.attempt
                        );
                        // A trace of its own, linked to the request that enqueued it.
                        if let Some(traceparent) = &job.job.traceparent {
                            service_kit::telemetry::add_link(&span, traceparent);
                        }
                        running.spawn(
                            async move {
                                run_one(
                                    &pool,
                                    handler.as_ref(),
                                    &config,
                                    &counters,
                                    shutdown,
                                    release_tx,
                                    job,
                                )
                                .await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                }
                Err(err) => tracing::warn!(error = %err, "claiming jobs failed"),
            }
        }
        if last_reap.elapsed() >= config.maintenance_interval {
            last_reap = tokio::time::Instant::now();
            match super::reap(&pool, config.retention).await {
                Ok(0) => {}
                Ok(reaped) => tracing::info!(reaped, "finished jobs reaped"),
                Err(err) => tracing::warn!(error = %err, "reaping jobs failed"),
            }
            handler.maintain().await;
        }
        // Wait for a reason to claim again: a notification, a free slot, or the next job
        // falling due; the poll is only a safety net.
        let wait = match super::next_due(&pool).await {
            Ok(Some(due)) => due.min(config.poll_interval),
            Ok(None) => config.poll_interval,
            Err(err) => {
                tracing::warn!(error = %err, "reading the queue failed");
                config.poll_interval
            }
        };
        // Due jobs that could not be claimed (no free slot) wait for a slot instead.
        let wait = if wait.is_zero() && slots.available_permits() > 0 {
            Duration::from_millis(10)
        } else if wait.is_zero() {
            config.poll_interval
        } else {
            wait
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            Some(job) = release_rx.recv() => {
                release(&pool, &counters, &job).await;
            }
            woke = next_notification(&mut listener, &listener_pool) => {
                if woke {
                    counters.notified.fetch_add(1, Relaxed);
                }
            }
            () = tokio::time::sleep(wait.min(config.maintenance_interval)) => {}
        }
    }
    // Shutdown: let running jobs finish within the drain timeout; the rest are handed back
    // by their tasks when they see the shutdown.
    // Each task hands its job back by itself at the drain timeout; the margin only
    // guards against a task stuck outside its own bound.
    let drained = tokio::time::timeout(config.drain_timeout + Duration::from_secs(5), async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        running.shutdown().await;
    }
    while let Ok(job) = release_rx.try_recv() {
        release(&pool, &counters, &job).await;
    }
}

async fn release(pool: &PgPool, counters: &RunnerCounters, claimed: &Claimed) {
    match super::release(pool, &claimed.job).await {
        Ok(()) => {
            counters
                .released
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(job_id = claimed.job.id, "job handed back");
        }
        Err(err) => {
            tracing::warn!(job_id = claimed.job.id, error = %err, "handing a job back failed")
        }
    }
}

/// Runs one claimed job: the handler under a renewed lease, then its outcome. At
/// shutdown past the drain timeout the job is handed back instead.
async fn run_one(
    pool: &PgPool,
    handler: &dyn Handler,
    config: &RunnerConfig,
    counters: &RunnerCounters,
    mut shutdown: watch::Receiver<bool>,
    release_tx: tokio::sync::mpsc::UnboundedSender<Claimed>,
    claimed: Claimed,
) {
    use std::sync::atomic::Ordering::Relaxed;

    let job = &claimed.job;
    let perform = handler.perform(&claimed);
    tokio::pin!(perform);
    // The renewal is polled beside the handler, never awaited in turn with it: the handler
    // may hold the job's row lock in a fenced transaction, and a renewal waiting for that
    // lock must not keep the handler from committing (it would wait out `lock_timeout`,
    // again and again, while the job stands still).
    let renewal = keep_leased(pool, job, config.lease, counters);
    tokio::pin!(renewal);
    let mut drain_deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let outcome = loop {
        tokio::select! {
            outcome = &mut perform => break Some(outcome),
            never = &mut renewal => match never {},
            _ = shutdown.changed(), if drain_deadline.is_none() => {
                drain_deadline = Some(Box::pin(tokio::time::sleep(config.drain_timeout)));
            }
            () = async { if let Some(deadline) = drain_deadline.as_mut() { deadline.await } }, if drain_deadline.is_some() => {
                break None;
            }
        }
    };
    let Some(outcome) = outcome else {
        let _ = release_tx.send(claimed.clone());
        return;
    };
    match record(pool, job, &outcome, config.backoff).await {
        Ok(state) => {
            counters.finished.fetch_add(1, Relaxed);
            crate::metrics::job_attempt(job.kind, state);
            if state == JobState::Dead {
                tracing::error!(error = ?outcome, "job is dead: out of attempts");
            } else {
                tracing::info!(state = state.as_str(), "job attempt finished");
            }
        }
        Err(Error::StaleJob(_)) => {
            counters.stale.fetch_add(1, Relaxed);
            tracing::warn!("outcome refused: another worker holds the job now");
        }
        Err(err) => {
            tracing::warn!(error = %err, "recording the job's outcome failed; its lease will expire")
        }
    }
}

/// Renews `job`'s lease every third of it, for as long as it is polled.
async fn keep_leased(
    pool: &PgPool,
    job: &super::Job,
    lease: Duration,
    counters: &RunnerCounters,
) -> std::convert::Infallible {
    use std::sync::atomic::Ordering::Relaxed;

    let mut renew = tokio::time::interval(lease / 3);
    // A late renewal is followed by one a full period later, not by a burst.
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renew.tick().await;
    loop {
        renew.tick().await;
        match super::renew(pool, job, lease).await {
            Ok(true) => {
                counters.renewals.fetch_add(1, Relaxed);
            }
            Ok(false) => {
                counters.renewal_failures.fetch_add(1, Relaxed);
                tracing::warn!("lease lost while running; the outcome will be refused");
            }
            Err(err) => {
                counters.renewal_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %err, "renewing the lease failed");
            }
        }
    }
}

async fn record(
    pool: &PgPool,
    job: &super::Job,
    outcome: &JobOutcome,
    backoff: (Duration, Duration),
) -> Result<JobState, Error> {
    let mut transaction = pool.begin().await?;
    let state = super::finish(&mut transaction, job, outcome, backoff).await?;
    transaction.commit().await?;
    Ok(state)
}

async fn connect_listener(listener_pool: &PgPool) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(listener_pool).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for job notifications; polling only");
            return None;
        }
    };
    match listener.listen(CHANNEL).await {
        Ok(()) => Some(listener),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for job notifications; polling only");
            None
        }
    }
}

/// Waits for a notification: `true` when one came, `false` on a reconnect (a reason to
/// look at the table anyway). Without a listener, waits forever (the poll runs).
async fn next_notification(listener: &mut Option<PgListener>, listener_pool: &PgPool) -> bool {
    match listener {
        Some(active) => match active.try_recv().await {
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(err) => {
                tracing::warn!(error = %err, "job notifications lost; reconnecting");
                *listener = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
                *listener = connect_listener(listener_pool).await;
                false
            }
        },
        None => std::future::pending().await,
    }
}
