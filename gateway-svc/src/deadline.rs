//! Deadlines of unary calls: the caller's, capped, or a default when it set none.
//!
//! [`Deadline`] fixes the call's deadline when it arrives and puts it in the request's
//! extensions; the endpoint forwards what is left of it as `grpc-timeout` at the moment
//! it sends (so time spent in the gateway — and later, in retries — is not handed to the
//! upstream twice), and the caller gets DEADLINE_EXCEEDED when the upstream has not
//! answered by then. Streaming calls are exempt: a WatchBalance stream lives as long as
//! its caller wants, and the caller's own `grpc-timeout`, if any, passes through.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::config::Deadlines;
use crate::proxy::{GrpcFuture, status_response};

/// When a unary call must be answered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline {
    at: Instant,
}

impl CallDeadline {
    /// The time left, or `None` when it has passed.
    pub fn remaining(&self) -> Option<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }
}

/// Counters of what the deadline layer did.
#[derive(Debug, Default)]
pub struct DeadlineStats {
    /// Unary calls that got the default deadline (their caller set none).
    pub defaulted: AtomicU64,
    /// Unary calls whose caller's deadline was cut to the maximum.
    pub capped: AtomicU64,
    /// Unary calls answered DEADLINE_EXCEEDED by the gateway.
    pub exceeded: AtomicU64,
}

/// Adds [`Deadline`] to a stack.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    deadlines: Deadlines,
    stats: Arc<DeadlineStats>,
}

impl DeadlineLayer {
    /// Deadlines per `deadlines`, counted in `stats`.
    pub fn new(deadlines: Deadlines, stats: Arc<DeadlineStats>) -> Self {
        Self { deadlines, stats }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            deadlines: self.deadlines,
            stats: Arc::clone(&self.stats),
        }
    }
}

/// Fixes each unary call's deadline and answers DEADLINE_EXCEEDED when it passes.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    deadlines: Deadlines,
    stats: Arc<DeadlineStats>,
}

impl<S> Service<Request<tonic::body::Body>> for Deadline<S>
where
    S: Service<
            Request<tonic::body::Body>,
            Response = Response<tonic::body::Body>,
            Error = Infallible,
            Future = GrpcFuture,
        >,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GrpcFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        let streaming = proto::policy::method_policy(request.uri().path())
            .is_some_and(|policy| policy.client_streaming || policy.server_streaming);
        if streaming {
            return self.inner.call(request);
        }
        let budget = match service_kit::deadline::grpc_timeout(request.headers()) {
            None => {
                self.stats.defaulted.fetch_add(1, Ordering::Relaxed);
                self.deadlines.default
            }
            Some(asked) if asked > self.deadlines.max => {
                self.stats.capped.fetch_add(1, Ordering::Relaxed);
                self.deadlines.max
            }
            Some(asked) => asked,
        };
        let at = Instant::now() + budget;
        request.extensions_mut().insert(CallDeadline { at });
        let call = self.inner.call(request);
        let stats = Arc::clone(&self.stats);
        Box::pin(async move {
            match tokio::time::timeout_at(at, call).await {
                Ok(response) => response,
                Err(_) => {
                    stats.exceeded.fetch_add(1, Ordering::Relaxed);
                    Ok(status_response(&Status::deadline_exceeded(
                        "deadline exceeded before the upstream answered",
                    )))
                }
            }
        })
    }
}
