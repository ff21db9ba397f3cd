//! payment-svc: payments, the double-entry ledger, idempotency, background jobs and
//! balance/event streams, on PostgreSQL.
//!
//! - [`config`]: settings from the environment.
//! - [`domain`]: money, keys and the other types business code works with — no IO, no protobuf.
//! - [`db`]: the connection pool, migrations and the service role's privileges.
//! - [`ledger`]: accounts and the double-entry, append-only ledger.
//! - [`idempotency`]: idempotency keys — claim, fingerprint, stored answers, replay.
//! - [`audit`]: the append-only audit trail.
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
mod grpc;
pub mod idempotency;
pub mod ledger;
pub mod vault;

use std::future::Future;

use service_kit::serve;
use tokio::net::TcpListener;

pub use config::Config;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] db::DbError),
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] service_kit::ServeError),
}

/// Connects to PostgreSQL (migrating first when configured), then serves gRPC on
/// `listener` until `shutdown` completes.
pub async fn run<F>(listener: TcpListener, config: Config, shutdown: F) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    if config.database.migrate_on_start {
        db::migrate(&config.database).await?;
    }
    let pool = db::connect(&config.database).await?;
    let settings = grpc::ApiSettings {
        max_amount_minor: config.max_amount_minor,
    };
    let services =
        grpc::services(pool.clone(), settings).require_identity(config.identity.verifier());
    serve(listener, services, &config.limits, shutdown).await?;
    pool.close().await;
    Ok(())
}
