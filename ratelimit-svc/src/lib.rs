//! ratelimit-svc: distributed rate limiting, with its own API (`paysuite.ratelimit.v1`)
//! and Envoy's `envoy.service.ratelimit.v3.RateLimitService`.
//!
//! - [`config`]: settings from the environment.
//! - `grpc`: the gRPC edge of our API — with `envoy`, the only modules that see protobuf
//!   types.
//! - `envoy`: Envoy's rate limit service (RLS v3), configured by [`rules`].
//! - [`rules`]: envoyproxy/ratelimit's YAML configuration, parsed into rule trees.
//! - [`limiter`]: the three algorithms as pure decisions.
//! - [`store`]: where state lives — memory (one replica) or Redis (shared).
//! - `metrics`: decisions by domain and result, store errors, failure-mode decisions.
//! - [`guard`]: the store behind the over-limit cache, a circuit breaker and the failure
//!   modes, so every request is answered in bounded time.
//!
//! [`run`] is the whole service behind a listener; `main` only reads config, sets up
//! telemetry and binds.

pub mod config;
mod envoy;
mod grpc;
pub mod guard;
pub mod limiter;
mod metrics;
pub mod rules;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Serves gRPC on `listener` until `shutdown` completes.
pub async fn run<F>(listener: TcpListener, config: Config, shutdown: F) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    run_with_counters(listener, config, Arc::default(), shutdown).await
}

/// [`run`], counting into `counters` (tests read them to prove which path ran). The
/// counters are also logged when the service stops.
pub async fn run_with_counters<F>(
    listener: TcpListener,
    config: Config,
    counters: Arc<guard::Counters>,
    shutdown: F,
) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    // Bad rules stop the service before it serves anything.
    let envoy_rules = match &config.ratelimit_config {
        Some(path) => {
            rules::Rules::load(path, config.sliding_window_max_limit).map_err(RunError::Rules)?
        }
        None => rules::Rules::default(),
    };
    tracing::info!(domains = envoy_rules.len(), "envoy rate limit rules loaded");
    let store = match config.redis_settings() {
        Some(settings) => store::Store::Redis(store::RedisStore::connect_with(&settings).await?),
        None => store::Store::Memory(store::MemoryStore::new(std::sync::Arc::new(
            store::SystemClock,
        ))),
    };
    let limiter = guard::Limiter::new(store, config.redis_breaker.clone(), Arc::clone(&counters));
    let services = grpc::services(
        limiter,
        config.failure_mode,
        config.sliding_window_max_limit,
        Arc::new(envoy_rules),
    )
    .require_identity(config.identity.verifier());
    let served = service_kit::serve(listener, services, &config.limits, shutdown).await;
    let counted = counters.values();
    tracing::info!(
        store_errors = counted.store_errors,
        breaker_rejections = counted.breaker_rejections,
        fail_open = counted.fail_open,
        fail_closed = counted.fail_closed,
        cache_hits = counted.cache_hits,
        "ratelimit-svc counters at shutdown"
    );
    served?;
    Ok(())
}

/// Why ratelimit-svc stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The Envoy rules cannot be used (not a `#[source]`: the message already holds it,
    /// and `main` prints the chain).
    #[error("RATELIMIT_CONFIG: {0}")]
    Rules(rules::RulesError),
    /// Redis could not be reached at start (not a `#[source]` either, for the same reason).
    #[error("REDIS_URL: {0}")]
    Store(store::StoreError),
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] service_kit::ServeError),
}

impl From<store::StoreError> for RunError {
    fn from(err: store::StoreError) -> Self {
        Self::Store(err)
    }
}
