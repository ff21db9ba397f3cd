//! The span and the RED metrics of every call a server answers.
//!
//! [`RpcTelemetryLayer`] is the outermost layer of every connection (see [`crate::server`]),
//! so calls the server refuses itself (identity, shedding, deadlines) are seen too. Per
//! call it:
//! - opens a server span named after the method (`rpc.method`), continuing the caller's
//!   W3C trace when export is on; the span stays open until the response body ends, and
//!   records the gRPC status (`rpc.grpc.status_code`, from the headers of a
//!   trailers-only answer or from the trailers), the caller's `rpc.principal` (recorded
//!   by whoever authenticates it, see [`crate::telemetry::record_principal`]) and the
//!   caller's `x-request-id` — never a header value that could hold a credential;
//! - records the call's duration in `rpc.server.call.duration` by method and status
//!   (requests, errors and latency from one histogram).
//!
//! Cardinality stays bounded: a path that is not a known method is named `other`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use tower_layer::Layer;
use tower_service::Service;

use crate::telemetry;

/// The name given to a path that is not a known method.
const OTHER_METHOD: &str = "other";

/// Methods every server has besides the paysuite ones (health, reflection, Envoy's rate
/// limit service).
const INFRASTRUCTURE_METHODS: [&str; 6] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
];

/// Latency buckets in seconds: sub-millisecond cache answers up to slow acquirers.
const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// gRPC status `CANCELLED`: the caller went away before the answer ended.
const CANCELLED: i64 = 1;
/// gRPC status `UNKNOWN`: no status could be read from the answer.
const UNKNOWN: i64 = 2;

/// The method name used in spans and metrics for `path`: itself when it is a known
/// method, `other` otherwise.
pub fn method_name(path: &str) -> &'static str {
    if let Some((known, _)) = proto::policy::method_policies().get_key_value(path) {
        return known.as_str();
    }
    INFRASTRUCTURE_METHODS
        .iter()
        .find(|known| **known == path)
        .copied()
        .unwrap_or(OTHER_METHOD)
}

/// Whether a server span with `code` is an error (the OpenTelemetry gRPC conventions:
/// the server's fault, not the caller's).
fn is_server_error(code: i64) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The instruments, taken from the global meter provider (no-ops when export is off).
#[derive(Clone)]
struct RpcMetrics {
    duration: Histogram<f64>,
}

impl RpcMetrics {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("paysuite.rpc");
        Self {
            duration: meter
                .f64_histogram("rpc.server.call.duration")
                .with_unit("s")
                .with_description("Duration of calls answered, by method and gRPC status")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
        }
    }
}

/// Adds [`RpcTelemetry`] to a service.
#[derive(Clone)]
pub struct RpcTelemetryLayer {
    metrics: RpcMetrics,
}

impl std::fmt::Debug for RpcTelemetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTelemetryLayer").finish_non_exhaustive()
    }
}

impl RpcTelemetryLayer {
    /// A layer recording into the global meter provider; build it after
    /// [`telemetry::init`].
    pub fn new() -> Self {
        Self {
            metrics: RpcMetrics::new(),
        }
    }
}

impl Default for RpcTelemetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RpcTelemetryLayer {
    type Service = RpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTelemetry {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct RpcTelemetry<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S> std::fmt::Debug for RpcTelemetry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTelemetry").finish_non_exhaustive()
    }
}

impl<S, RequestBody, ResponseBody> Service<Request<RequestBody>> for RpcTelemetry<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    ResponseBody: Body,
{
    type Response = Response<ObservedBody<ResponseBody>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let method = method_name(request.uri().path());
        let span = tracing::info_span!(
            "rpc",
            otel.name = method,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            rpc.principal = tracing::field::Empty,
            request_id = tracing::field::Empty,
        );
        telemetry::set_parent(&span, telemetry::extract(request.headers()));
        if let Some(request_id) = request_id(request.headers()) {
            span.record("request_id", request_id);
        }
        let inner = span.in_scope(|| self.inner.call(request));
        ObservedFuture {
            inner,
            call: Some(CallRecord {
                span,
                method,
                started: Instant::now(),
                metrics: self.metrics.clone(),
                finished: false,
            }),
        }
    }
}

/// The caller's `x-request-id` when it is a plausible id (short, printable ASCII): it is
/// logged, so nothing else is taken from it.
fn request_id(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("x-request-id")?.to_str().ok()?;
    let plausible = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    plausible.then_some(value)
}

/// The gRPC status in a header map (`grpc-status`), when there is one.
fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
}

/// One call being observed; finished once, with its status, when its answer ends (or
/// as CANCELLED when the answer is dropped first).
struct CallRecord {
    span: tracing::Span,
    method: &'static str,
    started: Instant,
    metrics: RpcMetrics,
    finished: bool,
}

impl CallRecord {
    fn finish(&mut self, code: i64) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.span.record("rpc.grpc.status_code", code);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        self.metrics.duration.record(
            self.started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("rpc.method", self.method),
                KeyValue::new("rpc.grpc.status_code", code),
            ],
        );
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future, polled inside the call's span.
    pub struct ObservedFuture<F> {
        #[pin]
        inner: F,
        call: Option<CallRecord>,
    }
}

impl<F, B, E> Future for ObservedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<ObservedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.call.as_ref() {
            Some(call) => {
                let _entered = call.span.enter();
                std::task::ready!(this.inner.poll(cx))
            }
            None => std::task::ready!(this.inner.poll(cx)),
        };
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only answer carries its status in the headers.
                if let (Some(call), Some(code)) = (call.as_mut(), grpc_status(response.headers())) {
                    call.finish(code);
                }
                Ok(response.map(|inner| ObservedBody { inner, call }))
            }
            Err(err) => {
                if let Some(call) = call.as_mut() {
                    call.finish(UNKNOWN);
                }
                Err(err)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its call's record at the trailers (and keeps the
    /// span open, and entered while producing messages, until then).
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<CallRecord>,
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = match this.call.as_ref() {
            Some(call) => {
                let _entered = call.span.enter();
                this.inner.poll_frame(cx)
            }
            None => this.inner.poll_frame(cx),
        };
        if let (Poll::Ready(frame), Some(call)) = (&polled, this.call.as_mut()) {
            match frame {
                Some(Ok(frame)) => {
                    if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                        call.finish(code);
                    }
                }
                Some(Err(_)) | None => call.finish(UNKNOWN),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_name() {
        assert_eq!(
            method_name("/paysuite.payments.v1.PaymentService/CreatePayment"),
            "/paysuite.payments.v1.PaymentService/CreatePayment"
        );
        assert_eq!(
            method_name("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(method_name("/made.up.Service/Anything"), OTHER_METHOD);
        assert_eq!(method_name("/a-random-path-0123"), OTHER_METHOD);
    }

    #[test]
    fn only_plausible_request_ids_are_taken() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-request-id",
            http::HeaderValue::from_static("req-01J9:abc"),
        );
        assert_eq!(request_id(&headers), Some("req-01J9:abc"));
        headers.insert(
            "x-request-id",
            http::HeaderValue::from_static("Bearer abc def"),
        );
        assert_eq!(request_id(&headers), None);
    }
}
