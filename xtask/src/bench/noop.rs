//! The gRPC floor: `paysuite.ratelimit.v1.RateLimitService` served by plain tonic, answering
//! every Check and Peek with a fixed "allowed" decision, without a store, identity check or
//! any of service-kit's layers. What ratelimit-svc costs beyond this is the limiter itself
//! (validation, identity, Redis, the guard around the store); what a proxy in front of it
//! costs is the proxy.
//!
//! It counts the Checks it answers, and among them those that carried an identity token
//! (`x-paysuite-identity`, which only the gateway mints: the generator sends none to the
//! gateway and nginx targets): every Peek answer carries both counts in its headers
//! ([`HEADER_CHECKS`], [`HEADER_CHECKS_WITH_IDENTITY`]), which [`counters`] reads. That is
//! how a scenario proves which path its calls took. The token itself is never checked.
//!
//! `xtask bench-noop-server --listen ADDR` (hidden; the scenarios start it pinned).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use proto::ratelimit::v1 as pb;
use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use proto::ratelimit::v1::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use tonic::{Request, Response, Status};

/// Peek answers: the Checks answered so far.
pub const HEADER_CHECKS: &str = "x-bench-noop-checks";
/// Peek answers: the Checks answered so far that carried an identity token.
pub const HEADER_CHECKS_WITH_IDENTITY: &str = "x-bench-noop-checks-with-identity";

/// The no-op service.
#[derive(Debug, Clone, Default)]
struct NoopLimiter {
    checks: Arc<AtomicU64>,
    checks_with_identity: Arc<AtomicU64>,
}

/// The same decision for every call; only the limit echoes the request, so the answer
/// has the shape and size of a real one.
fn fixed_decision(limit: Option<&pb::Limit>) -> pb::Decision {
    let limit = limit.map_or(1, |limit| limit.limit);
    pb::Decision {
        allowed: true,
        limit,
        remaining: limit.saturating_sub(1),
        reset_after: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        retry_after: Some(prost_types::Duration::default()),
        decide_time: Some(prost_types::Timestamp::from(SystemTime::now())),
        source: pb::DecisionSource::Unspecified.into(),
    }
}

#[tonic::async_trait]
impl RateLimitService for NoopLimiter {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        if request
            .metadata()
            .contains_key(service_kit::identity::IDENTITY_HEADER)
        {
            self.checks_with_identity.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(pb::CheckResponse {
            decision: Some(fixed_decision(request.get_ref().limit.as_ref())),
        }))
    }

    async fn peek(
        &self,
        request: Request<pb::PeekRequest>,
    ) -> Result<Response<pb::PeekResponse>, Status> {
        let mut response = Response::new(pb::PeekResponse {
            decision: Some(fixed_decision(request.get_ref().limit.as_ref())),
        });
        for (header, counter) in [
            (HEADER_CHECKS, &self.checks),
            (HEADER_CHECKS_WITH_IDENTITY, &self.checks_with_identity),
        ] {
            response
                .metadata_mut()
                .insert(header, counter.load(Ordering::Relaxed).into());
        }
        Ok(response)
    }
}

/// Serves until SIGINT or SIGTERM, on tokio's default (multi-threaded) runtime like the
/// services: pinned to one CPU, it runs one worker thread, as they do.
pub fn main(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(NoopLimiter::default()))
            .serve_with_incoming_shutdown(incoming, shutdown())
            .await
            .context("serving")
    })
}

/// What the no-op service has counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub checks: u64,
    pub checks_with_identity: u64,
}

impl std::ops::Sub for Counters {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            checks: self.checks.saturating_sub(earlier.checks),
            checks_with_identity: self
                .checks_with_identity
                .saturating_sub(earlier.checks_with_identity),
        }
    }
}

/// The counters of the no-op service at `address` (`host:port`), from one Peek.
pub fn counters(address: &str) -> anyhow::Result<Counters> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a runtime")?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to the no-op service at {address}"))?;
        let mut request = Request::new(pb::PeekRequest {
            key: "bench-counters".to_owned(),
            limit: None,
        });
        request.set_timeout(Duration::from_secs(5));
        let response = RateLimitServiceClient::new(channel)
            .peek(request)
            .await
            .context("reading the no-op service's counters")?;
        let read = |header: &str| -> anyhow::Result<u64> {
            response
                .metadata()
                .get(header)
                .and_then(|value| value.to_str().ok()?.parse().ok())
                .with_context(|| format!("the no-op service's answer has no {header}"))
        };
        Ok(Counters {
            checks: read(HEADER_CHECKS)?,
            checks_with_identity: read(HEADER_CHECKS_WITH_IDENTITY)?,
        })
    })
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
