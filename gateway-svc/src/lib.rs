//! gateway-svc: the suite's front door. It authenticates callers by API key and proxies
//! their calls, untouched, to payment-svc and ratelimit-svc with an identity token the
//! upstreams trust.
//!
//! - [`config`]: settings from the environment.
//! - [`routes`]: which upstream cluster answers which paysuite service.
//! - [`keys`]: API keys — HMAC-SHA256 hashes with a pepper, in a file reloaded on change.
//! - [`auth`]: API key → caller → scope check → minted identity; client `x-paysuite-*`
//!   headers stripped.
//! - [`ratelimit`]: rate limiting per principal and method group by tier, through
//!   ratelimit-svc's Envoy RLS v3 API (timeout, breaker, fail-open or fail-closed); the
//!   only module that sees envoy's protobuf types.
//! - [`deadline`]: unary deadlines (default, cap, remaining budget forwarded).
//! - [`proxy`]: an upstream endpoint as a tower service (hyper's HTTP/2 client, bodies
//!   passed through frame by frame).
//! - [`balance`]: a cluster of endpoints, a circuit breaker per endpoint gating p2c
//!   balancing, CIRCUIT_OPEN when every breaker is open, outcomes judged by grpc-status.
//! - [`retry`]: which calls may be retried, their replayable bodies, the retry budget.
//! - [`resolve`]: endpoints from static addresses or DNS names re-resolved periodically.
//! - [`tls`]: the listener's rustls configuration from PEM files.
//! - `metrics`: rate limit decisions and the breaker state gauge (OpenTelemetry).
//! - `grpc`: the admin API (`paysuite.gateway.v1`: list upstreams and breakers, force a
//!   breaker open/closed) — the only module that sees protobuf types.
//!
//! The stack every proxied call passes through, top-down (after service-kit's server
//! stack: load shedding, the caller's `grpc-timeout`, the message size limit):
//! 1. strip client-sent `x-paysuite-*` headers;
//! 2. route by `/package.Service/` to a cluster (unknown → UNIMPLEMENTED);
//! 3. authenticate the API key and check the RPC's `required_scope`;
//! 4. rate limit the caller (when configured): a refusal never reaches the upstream;
//! 5. mint the identity token for the cluster's audience;
//! 6. fix the unary deadline;
//! 7. the cluster: CIRCUIT_OPEN when every endpoint's breaker is open, else p2c over the
//!    endpoints whose breaker admits the call; the outcome feeds the breaker; a unary
//!    call that failed before any response is retried on another endpoint when its
//!    method is idempotent and the cluster's retry budget allows ([`retry`]).
//!
//! Beside the stack, per cluster: a task re-resolving its DNS names, and a task keeping
//! the health status of its services NOT_SERVING while all its endpoints are tripped.
//!
//! Reflection lists every paysuite service, so `grpcurl gateway:50051 list` shows the
//! whole API; health and reflection need no key. [`run`] is the whole service behind a
//! listener; `main` only reads config, sets up telemetry and binds.

pub mod auth;
pub mod balance;
pub mod config;
pub mod deadline;
mod grpc;
pub mod keys;
mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod resolve;
pub mod retry;
pub mod routes;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tower::{ServiceBuilder, ServiceExt as _};
use tower_service::Service;

pub use config::Config;

use service_kit::identity::{GATEWAY_TOKEN_TTL, Minter};

use crate::auth::{AuthenticateLayer, MintIdentityLayer};
use crate::balance::{Balance, Upstream};
use crate::config::Listener;
use crate::deadline::{DeadlineLayer, DeadlineStats};
use crate::keys::{KeyStore, KeysError};
use crate::proxy::{ConnectSettings, GrpcFuture, GrpcService, status_response};
use crate::ratelimit::{RateLimitLayer, RateLimitStats, RateLimiter};
use crate::resolve::Source;
use crate::tls::TlsError;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API keys file or pepper cannot be used.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// The TLS files cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// An upstream endpoint cannot be addressed.
    #[error("upstream endpoint {0} cannot be used")]
    Endpoint(String),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] service_kit::ServeError),
}

/// Handles on what the gateway counts (for metrics, and tests proving which path ran).
#[derive(Debug, Clone)]
pub struct GatewayStats {
    /// The API keys in force (reload counters).
    pub keys: KeyStore,
    /// What the deadline layer did.
    pub deadlines: Arc<DeadlineStats>,
    /// What the server's limits did.
    pub server: Arc<service_kit::ServerStats>,
    /// What the rate limiting layer did (all zero when rate limiting is off).
    pub ratelimit: Arc<RateLimitStats>,
    /// The upstream clusters: endpoints, breakers and their counters.
    pub upstreams: Arc<[Arc<Upstream>]>,
}

impl GatewayStats {
    /// The upstream cluster named `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams
            .iter()
            .find(|upstream| upstream.name() == name)
    }
}

/// The gateway, built and ready to serve.
#[derive(Debug)]
pub struct Gateway {
    services: service_kit::ServiceSet,
    stats: GatewayStats,
    config: Config,
    /// Each cluster's configured endpoints, for re-resolution.
    sources: Vec<Vec<Source>>,
    connect: ConnectSettings,
    /// `paysuite.breaker.state` over the upstreams, for as long as the gateway lives.
    _breaker_gauge: metrics::BreakerGauge,
}

impl Gateway {
    /// Loads the API keys and TLS files and builds the proxy stack.
    pub async fn new(config: Config) -> Result<Self, Error> {
        let keys = KeyStore::load(&config.api_keys_file, config.api_key_pepper.clone()).await?;
        let deadline_stats = Arc::new(DeadlineStats::default());
        let connect = ConnectSettings {
            connect_timeout: config.upstream_connect_timeout,
            keepalive_interval: config.limits.keepalive_interval,
            keepalive_timeout: config.limits.keepalive_timeout,
        };
        let ratelimit_stats = Arc::new(RateLimitStats::default());
        let limiter = config.rate_limiting.as_ref().map(|settings| {
            tracing::info!(
                endpoints = ?settings.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
                domain = %settings.domain,
                timeout = ?settings.timeout,
                failure_mode = ?settings.failure_mode,
                "rate limiting through ratelimit-svc"
            );
            RateLimiter::new(settings, Arc::clone(&ratelimit_stats))
        });
        let mut routes: HashMap<String, GrpcService> = HashMap::new();
        let minter = Arc::new(Minter::new(
            Arc::clone(&config.signing_key),
            GATEWAY_TOKEN_TTL,
        ));
        let mut upstreams = Vec::new();
        let mut sources = Vec::new();
        for cluster in config.routes.clusters() {
            let cluster_sources = cluster
                .endpoints
                .iter()
                .map(|uri| Source::from_uri(uri).ok_or_else(|| Error::Endpoint(uri.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let upstream = Arc::new(Upstream::new(
                &cluster.name,
                cluster.services.clone(),
                config.upstream_breaker.clone(),
                config.upstream_retry_budget,
            ));
            // The first resolution, before serving; a name that does not resolve yet leaves
            // the cluster empty (UNAVAILABLE) until a re-resolution finds it.
            resolve::refresh(&upstream, &cluster_sources, connect).await;
            let stack = ServiceBuilder::new()
                // Who is calling: the API key's caller, holding the RPC's scope.
                .layer(AuthenticateLayer::new(keys.clone()))
                // How much the caller may still do, before any work is done for it.
                .layer(RateLimitLayer::new(limiter.clone()))
                // What the upstream trusts: an identity token for its audience.
                .layer(MintIdentityLayer::new(
                    Arc::clone(&minter),
                    &cluster.audience,
                ))
                // Unary calls get a bounded deadline; the rest of it travels upstream.
                .layer(DeadlineLayer::new(
                    config.deadlines,
                    Arc::clone(&deadline_stats),
                ))
                // The endpoints: breakers gate p2c; all open → CIRCUIT_OPEN at once.
                .service(Balance::new(Arc::clone(&upstream)));
            let stack = GrpcService::new(stack);
            for service in &cluster.services {
                routes.insert(service.clone(), stack.clone());
            }
            tracing::info!(
                cluster = %cluster.name,
                endpoints = ?cluster.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
                resolved = ?upstream.endpoints().iter().map(|e| e.address().to_owned()).collect::<Vec<_>>(),
                services = ?cluster.services,
                "upstream cluster"
            );
            upstreams.push(upstream);
            sources.push(cluster_sources);
        }
        let upstreams: Arc<[Arc<Upstream>]> = Arc::from(upstreams);
        // The admin API is answered here, behind the same authentication.
        routes.insert(
            grpc::ADMIN_SERVICE.to_owned(),
            GrpcService::new(
                ServiceBuilder::new()
                    .layer(AuthenticateLayer::new(keys.clone()))
                    .layer(RateLimitLayer::new(limiter.clone()))
                    .service(grpc::admin_service(Arc::clone(&upstreams))),
            ),
        );
        let mut served: Vec<String> = routes.keys().cloned().collect();
        served.sort();
        let router = Router {
            routes: Arc::new(routes),
        };
        let mut services = grpc::services(GrpcService::new(router), served);
        if let Listener::Tls {
            cert_file,
            key_file,
        } = &config.listener
        {
            services = services.tls(tls::server_config(cert_file, key_file)?);
        }
        let stats = GatewayStats {
            keys,
            deadlines: deadline_stats,
            server: services.stats(),
            ratelimit: ratelimit_stats,
            upstreams,
        };
        let breaker_gauge = metrics::breaker_gauge(Arc::clone(&stats.upstreams));
        Ok(Self {
            services,
            stats,
            config,
            sources,
            connect,
            _breaker_gauge: breaker_gauge,
        })
    }

    /// Handles on the gateway's counters.
    pub fn stats(&self) -> GatewayStats {
        self.stats.clone()
    }

    /// Serves on `listener` until `shutdown` completes, reloading the API keys meanwhile.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> Result<(), Error>
    where
        F: Future<Output = ()> + Send,
    {
        let stop = CancellationToken::new();
        let keys = self.stats.keys.clone();
        let interval = self.config.api_keys_reload_interval;
        let watcher = {
            let stop = stop.clone();
            tokio::spawn(async move { keys.watch(interval, stop.cancelled_owned()).await })
        };
        let mut tasks = Vec::new();
        let health = self.services.health();
        for (upstream, sources) in self.stats.upstreams.iter().zip(self.sources) {
            let resolver = resolve::watch(
                Arc::clone(upstream),
                sources,
                self.connect,
                self.config.upstream_resolve_interval,
            );
            let health = report_health(Arc::clone(upstream), health.clone());
            for task in [
                Box::pin(resolver) as Pin<Box<dyn Future<Output = ()> + Send>>,
                Box::pin(health),
            ] {
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::select! {
                        () = task => {}
                        () = stop.cancelled() => {}
                    }
                }));
            }
        }
        let shutdown = {
            let stop = stop.clone();
            async move {
                shutdown.await;
                // Before the server marks everything NOT_SERVING, so that stays.
                stop.cancel();
            }
        };
        let served =
            service_kit::serve(listener, self.services, &self.config.limits, shutdown).await;
        stop.cancel();
        let _ = watcher.await;
        if self.config.rate_limiting.is_some() {
            self.stats.ratelimit.log();
        }
        for task in tasks {
            let _ = task.await;
        }
        Ok(served?)
    }
}

/// Keeps the health status of `upstream`'s services NOT_SERVING while all its endpoints
/// are tripped, SERVING otherwise.
async fn report_health(upstream: Arc<Upstream>, health: service_kit::Health) {
    let mut serving = true;
    loop {
        upstream.changed().await;
        let now_serving = !upstream.all_tripped();
        if now_serving != serving {
            serving = now_serving;
            tracing::info!(upstream = %upstream.name(), serving, "upstream health");
            for service in upstream.services() {
                health.set_service_serving(service, serving).await;
            }
        }
    }
}

/// Serves gRPC on `listener` until `shutdown` completes.
pub async fn run<F>(listener: TcpListener, config: Config, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send,
{
    Gateway::new(config).await?.serve(listener, shutdown).await
}

/// The top of the stack: strips client-sent internal headers and routes by service.
#[derive(Clone)]
struct Router {
    routes: Arc<HashMap<String, GrpcService>>,
}

impl Service<Request<tonic::body::Body>> for Router {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GrpcFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        auth::strip_internal_headers(request.headers_mut());
        let path = request.uri().path();
        let service = path
            .strip_prefix('/')
            .and_then(|rest| rest.split_once('/'))
            .map(|(service, _)| service)
            .unwrap_or_default();
        match self.routes.get(service) {
            // `oneshot` waits for readiness: breakers will gate there.
            Some(route) => Box::pin(route.clone().oneshot(request)),
            None => Box::pin(std::future::ready(Ok(status_response(
                &Status::unimplemented(format!("unknown method {path}")),
            )))),
        }
    }
}
