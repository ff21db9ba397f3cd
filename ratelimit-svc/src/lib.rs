//! ratelimit-svc: distributed rate limiting, with its own API (`paysuite.ratelimit.v1`)
//! and Envoy's `envoy.service.ratelimit.v3.RateLimitService`.
//!
//! - [`config`]: settings from the environment.
//! - `grpc`: the gRPC edge — the only module that sees protobuf types.
//!
//! [`run`] is the whole service behind a listener; `main` only reads config, sets up
//! telemetry and binds.

pub mod config;
mod grpc;
pub mod limiter;
pub mod store;

use std::future::Future;

use tokio::net::TcpListener;

pub use config::Config;

/// Serves gRPC on `listener` until `shutdown` completes.
pub async fn run<F>(listener: TcpListener, config: Config, shutdown: F) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    let store = match &config.redis_url {
        Some(url) => {
            store::Store::Redis(store::RedisStore::connect(url, config.redis_timeout).await?)
        }
        None => store::Store::Memory(store::MemoryStore::new(std::sync::Arc::new(
            store::SystemClock,
        ))),
    };
    let services = grpc::services(store, config.sliding_window_max_limit)
        .require_identity(config.identity.verifier());
    service_kit::serve(listener, services, &config.limits, shutdown).await?;
    Ok(())
}

/// Why ratelimit-svc stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Redis could not be reached at start.
    #[error("REDIS_URL: {0}")]
    Store(#[from] store::StoreError),
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] service_kit::ServeError),
}
