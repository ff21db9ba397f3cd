//! gateway-svc: the suite's front door. It authenticates callers, rate-limits them, and
//! proxies their calls to payment-svc and ratelimit-svc behind circuit breakers.
//!
//! - [`config`]: settings from the environment.
//! - `grpc`: the admin API (`paysuite.gateway.v1`) — the only module that sees protobuf types.
//!
//! Reflection lists every paysuite service, so `grpcurl gateway:50051 list` shows the
//! whole API. [`run`] is the whole service behind a listener; `main` only reads config,
//! sets up telemetry and binds.

pub mod config;
mod grpc;

use std::future::Future;

use tokio::net::TcpListener;

pub use config::Config;

/// Serves gRPC on `listener` until `shutdown` completes.
pub async fn run<F>(
    listener: TcpListener,
    config: Config,
    shutdown: F,
) -> Result<(), service_kit::ServeError>
where
    F: Future<Output = ()> + Send,
{
    service_kit::serve(listener, grpc::services(), &config.limits, shutdown).await
}
