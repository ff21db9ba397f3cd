//! payment-svc: payments, the double-entry ledger, idempotency, background jobs and
//! balance/event streams, on PostgreSQL.
//!
//! - [`config`]: settings from the environment.
//! - [`domain`]: money, keys and the other types business code works with — no IO, no protobuf.
//! - [`db`]: the connection pool, migrations and the service role's privileges.
//! - [`ledger`]: accounts and the double-entry, append-only ledger.
//! - [`notify`]: LISTEN/NOTIFY wake-ups for streams on every replica.
//! - [`idempotency`]: idempotency keys — claim, fingerprint, stored answers, replay.
//! - [`audit`]: the append-only audit trail.
//! - [`jobs`]: the durable job queue and its workers.
//! - [`metrics`]: the domain metrics (payments, ledger, idempotency, jobs).
//! - [`reconcile`]: `reconcile`, the acquirer's operations against attempts, payments and the ledger.
//! - [`rotation`]: `rotate-card-keys`, re-encryption of the card vault under the active key.
//! - [`error`]: the one error type and its one mapping to gRPC statuses.
//! - `grpc`: the gRPC edge — the only module that sees protobuf types.
//!
//! [`run`] is the whole service behind a listener; `main` only reads config, sets up
//! telemetry and binds.

pub mod acquirer;
pub mod audit;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod failpoint;
mod grpc;
pub mod idempotency;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod payments;
pub mod reconcile;
pub mod rotation;
pub mod vault;

use std::future::Future;
use std::sync::Arc;

use service_kit::serve;
use tokio::net::TcpListener;

pub use config::Config;
pub use grpc::START_CURSOR_HEADER;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] db::DbError),
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] service_kit::ServeError),
    /// The remote acquirer's URL is unusable.
    #[error(transparent)]
    Acquirer(#[from] acquirer::remote::RemoteError),
    /// The card vault's keys are unusable.
    #[error("card vault: {0}")]
    Vault(#[from] vault::VaultError),
}

/// Connects to PostgreSQL (migrating first when configured), then serves gRPC on
/// `listener` until `shutdown` completes, with the configured acquirer.
pub async fn run<F>(listener: TcpListener, config: Config, shutdown: F) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    let acquirer = acquirer_from_config(&config)?;
    run_with_acquirer(listener, config, acquirer, shutdown).await
}

/// The acquirer `config` names: remote (`ACQUIRER_URL`) behind its timeout and breaker,
/// or the in-process sandbox.
pub fn acquirer_from_config(config: &Config) -> Result<Arc<dyn acquirer::Acquirer>, RunError> {
    Ok(match &config.acquirer_url {
        Some(url) => Arc::new(acquirer::remote::RemoteAcquirer::new(
            url,
            config.acquirer_connect_timeout,
            config.acquirer_timeout,
            config.acquirer_breaker.clone(),
        )?),
        None => Arc::new(acquirer::sandbox::Sandbox::new(
            acquirer::sandbox::SandboxSettings {
                slow_answer: config.sandbox_slow_answer,
                ..acquirer::sandbox::SandboxSettings::default()
            },
        )),
    })
}

/// [`run`] with a given acquirer connector (tests observe a sandbox through it).
pub async fn run_with_acquirer<F>(
    listener: TcpListener,
    config: Config,
    acquirer: Arc<dyn acquirer::Acquirer>,
    shutdown: F,
) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    let vault = Arc::new(config.vault.vault()?);
    if config.database.migrate_on_start {
        db::migrate(&config.database).await?;
    }
    let pool = db::connect(&config.database).await?;
    let payments = payments::Payments {
        pool: pool.clone(),
        acquirer,
        vault,
        acquirer_timeout: config.acquirer_timeout,
        lease: config.idempotency_lease,
        jobs: config.jobs.clone(),
    };
    let settings = grpc::ApiSettings {
        max_amount_minor: config.max_amount_minor,
        payments: payments.clone(),
    };
    // One shutdown signal for the server, the workers and the stream notifier.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener_pool = db::listener_pool(&config.database)?;
    let streams = grpc::StreamSettings {
        notifier: notify::Notifier::start(listener_pool.clone(), stop_rx.clone()),
        poll_interval: config.stream_poll_interval,
    };
    let services = grpc::services(pool.clone(), settings, streams)
        .require_identity(config.identity.verifier());
    let workers = if config.jobs.enabled {
        Some(tokio::spawn(jobs::runner::run(
            pool.clone(),
            listener_pool,
            Arc::new(payments::PaymentJobs::new(payments, config.jobs.void_after)),
            jobs::runner::RunnerConfig {
                worker_id: format!("payment-svc-{}", uuid::Uuid::new_v4().simple()),
                concurrency: config.jobs.concurrency,
                lease: config.jobs.lease,
                poll_interval: config.jobs.poll_interval,
                backoff: (config.jobs.backoff_base, config.jobs.backoff_max),
                drain_timeout: config.limits.drain_timeout,
                retention: config.jobs.retention,
                maintenance_interval: config.jobs.maintenance_interval,
            },
            Arc::new(jobs::runner::RunnerCounters::default()),
            stop_rx.clone(),
        )))
    } else {
        None
    };
    // Kept for as long as the service runs; its refresh task ends with the stop signal.
    let _queue_gauges = metrics::start_queue_gauges(
        pool.clone(),
        service_kit::telemetry::metric_export_interval(),
        stop_rx.clone(),
    );
    let mut server_stop = stop_rx;
    let stopped = async move {
        while !*server_stop.borrow_and_update() {
            if server_stop.changed().await.is_err() {
                break;
            }
        }
    };
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let (served, ()) = tokio::join!(serve(listener, services, &config.limits, stopped), signal);
    if let Some(workers) = workers {
        // Finishes or hands back the jobs it holds (bounded by the drain timeout).
        let _ = workers.await;
    }
    served?;
    pool.close().await;
    Ok(())
}
