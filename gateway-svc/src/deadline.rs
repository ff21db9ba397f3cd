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
    /// A deadline at `at`.
    pub fn at(at: Instant) -> Self {
        Self { at }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINES: Deadlines = Deadlines {
        default: Duration::from_secs(10),
        max: Duration::from_secs(60),
    };

    type Seen = Arc<std::sync::Mutex<Option<CallDeadline>>>;

    /// A stage that never answers, recording the deadline it was given.
    fn frozen() -> (crate::proxy::GrpcService, Seen) {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let record = Arc::clone(&seen);
        let service = tower::service_fn(move |request: Request<tonic::body::Body>| {
            if let Ok(mut seen) = record.lock() {
                *seen = request.extensions().get::<CallDeadline>().copied();
            }
            Box::pin(std::future::pending()) as GrpcFuture
        });
        (crate::proxy::GrpcService::new(service), seen)
    }

    fn request(path: &str, timeout: Option<&'static str>) -> Request<tonic::body::Body> {
        let mut request = Request::new(tonic::body::Body::empty());
        *request.uri_mut() = path.parse().unwrap_or_default();
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert("grpc-timeout", http::HeaderValue::from_static(timeout));
        }
        request
    }

    async fn code_after(
        path: &str,
        timeout: Option<&'static str>,
        stats: &Arc<DeadlineStats>,
    ) -> (Option<String>, Option<Duration>) {
        let (inner, seen) = frozen();
        let mut service = DeadlineLayer::new(DEADLINES, Arc::clone(stats)).layer(inner);
        let started = Instant::now();
        let call = service.call(request(path, timeout));
        // Time is paused: the runtime jumps to the next timer once everything waits.
        let answer = tokio::time::timeout(Duration::from_secs(3600), call).await;
        let code = answer.ok().and_then(|response| {
            let response = response.ok()?;
            let status = response.headers().get("grpc-status")?;
            status.to_str().ok().map(str::to_owned)
        });
        let given = seen
            .lock()
            .ok()
            .and_then(|seen| *seen)
            .map(|deadline| deadline.at - started);
        (code, given)
    }

    #[tokio::test(start_paused = true)]
    async fn unary_calls_get_the_default_or_the_cap_and_streams_none() {
        let stats = Arc::new(DeadlineStats::default());
        let unary = "/paysuite.payments.v1.PaymentService/GetPayment";
        assert_eq!(
            code_after(unary, None, &stats).await,
            (Some("4".to_owned()), Some(DEADLINES.default))
        );
        assert_eq!(
            code_after(unary, Some("2H"), &stats).await,
            (Some("4".to_owned()), Some(DEADLINES.max))
        );
        assert_eq!(
            code_after(unary, Some("1500m"), &stats).await,
            (Some("4".to_owned()), Some(Duration::from_millis(1500)))
        );
        // A stream is never cut by the gateway: it is still waiting after an hour.
        let stream = "/paysuite.payments.v1.PaymentService/WatchBalance";
        assert_eq!(code_after(stream, None, &stats).await, (None, None));
        assert_eq!(stats.defaulted.load(Ordering::Relaxed), 1);
        assert_eq!(stats.capped.load(Ordering::Relaxed), 1);
        assert_eq!(stats.exceeded.load(Ordering::Relaxed), 3);
    }
}
