//! The gRPC floor: `paysuite.ratelimit.v1.RateLimitService` served by plain tonic, answering
//! every Check and Peek with a fixed "allowed" decision, without a store, identity check or
//! any of service-kit's layers. What ratelimit-svc costs beyond this is the limiter itself
//! (validation, identity, Redis, the guard around the store).
//!
//! `xtask bench-noop-server --listen ADDR` (hidden; the limiter scenario starts it pinned).

use std::net::SocketAddr;
use std::time::SystemTime;

use anyhow::Context as _;
use proto::ratelimit::v1 as pb;
use proto::ratelimit::v1::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use tonic::{Request, Response, Status};

/// The no-op service.
#[derive(Debug, Clone, Copy)]
struct NoopLimiter;

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
        Ok(Response::new(pb::CheckResponse {
            decision: Some(fixed_decision(request.get_ref().limit.as_ref())),
        }))
    }

    async fn peek(
        &self,
        request: Request<pb::PeekRequest>,
    ) -> Result<Response<pb::PeekResponse>, Status> {
        Ok(Response::new(pb::PeekResponse {
            decision: Some(fixed_decision(request.get_ref().limit.as_ref())),
        }))
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
            .add_service(RateLimitServiceServer::new(NoopLimiter))
            .serve_with_incoming_shutdown(incoming, shutdown())
            .await
            .context("serving")
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
