//! The transparent part: one upstream endpoint as a tower service (the cluster of them,
//! behind breakers and p2c, is in [`crate::balance`]).
//!
//! An [`Endpoint`] forwards a call over one shared HTTP/2 connection (hyper's client,
//! plaintext h2 with prior knowledge) and streams the answer back: request and response
//! bodies are handed through frame by frame — messages are never decoded, re-encoded or
//! buffered — and response headers and trailers (including trailers-only responses,
//! whose status rides in the headers of an empty body) are returned as the upstream sent
//! them. Only the request's URI is rewritten to point at the endpoint.
//!
//! Two request-side events need a status of their own, since hyper would only reset the
//! upstream stream:
//! - the request body fails (the message size limit refuses a message from its length
//!   prefix): the caller gets that status — as a trailers-only response when no response
//!   has started, as the trailers of the response otherwise;
//! - the upstream cannot be reached or drops the stream: UNAVAILABLE.
//!
//! [`Endpoint::send`] also says who produced a response ([`Origin`]: the upstream, or the
//! gateway's own refusal) and hands back a call whose connection failed before its body
//! was touched ([`Sent::Unsent`]), so the balancer can judge and re-route.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::oneshot;
use tonic::Status;
use tower::util::BoxCloneSyncService;
use tower_service::Service;

use crate::deadline::CallDeadline;

/// What every stage of the proxy stack is: a gRPC call in, a gRPC response out, and
/// failures answered as gRPC statuses rather than errors.
pub type GrpcService =
    BoxCloneSyncService<Request<tonic::body::Body>, Response<tonic::body::Body>, Infallible>;

/// The future of a [`GrpcService`].
pub type GrpcFuture =
    Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, Infallible>> + Send>>;

/// A status as a complete (trailers-only) gRPC response.
pub fn status_response(status: &Status) -> Response<tonic::body::Body> {
    status.clone().into_http()
}

/// How the gateway connects to endpoints.
#[derive(Debug, Clone, Copy)]
pub struct ConnectSettings {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval on upstream connections (dead peers are noticed).
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the upstream connection.
    pub keepalive_timeout: Duration,
}

/// One upstream endpoint: `http://host:port`.
#[derive(Clone)]
pub struct Endpoint {
    scheme: Scheme,
    authority: Authority,
    client: Client<HttpConnector, WatchedBody>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint at `uri` (scheme and authority; checked by the route table). It
    /// connects on first use and reconnects after a connection is lost.
    pub fn new(uri: &Uri, settings: ConnectSettings) -> Option<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_keep_alive_interval(settings.keepalive_interval)
            .http2_keep_alive_timeout(settings.keepalive_timeout)
            .http2_keep_alive_while_idle(true)
            .set_host(false)
            .build(connector);
        Some(Self {
            scheme: uri.scheme()?.clone(),
            authority: uri.authority()?.clone(),
            client,
        })
    }

    /// `host:port`, for logs.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

/// Who produced a response an [`Endpoint`] returns: what the breaker may judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The upstream answered (or broke while answering): judged by its grpc-status.
    Upstream,
    /// The gateway refused the call itself (its deadline had passed, the request body was
    /// refused): says nothing about the upstream.
    Gateway,
}

/// What became of a call handed to an [`Endpoint`].
pub(crate) enum Sent {
    /// A response to pass on, and who produced it.
    Answered(Response<tonic::body::Body>, Origin),
    /// The endpoint could not be reached and the request body was never touched: the
    /// call may go to another endpoint as it is (the upstream never saw it).
    Unsent {
        /// What the caller gets when no other endpoint takes it.
        status: Status,
        /// The request body, intact.
        body: tonic::body::Body,
    },
}

impl Endpoint {
    /// Sends a call to this endpoint. See [`Sent`] for the outcomes.
    pub(crate) fn send(
        &self,
        mut parts: http::request::Parts,
        body: tonic::body::Body,
    ) -> Pin<Box<dyn Future<Output = Sent> + Send>> {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = Some(path);
        let refuse = |status: Status| -> Pin<Box<dyn Future<Output = Sent> + Send>> {
            Box::pin(std::future::ready(Sent::Answered(
                status_response(&status),
                Origin::Gateway,
            )))
        };
        match Uri::from_parts(uri) {
            Ok(uri) => parts.uri = uri,
            Err(err) => {
                tracing::warn!(error = %err, "cannot address the upstream");
                return refuse(Status::internal("internal error"));
            }
        }
        parts.version = Version::HTTP_2;
        // The upstream's span continues the gateway's (W3C trace context).
        service_kit::telemetry::inject(&mut parts.headers);
        if let Some(deadline) = parts.extensions.get::<CallDeadline>().copied() {
            // The budget left now, after everything the gateway did so far.
            match deadline.remaining() {
                Some(remaining) => {
                    parts
                        .headers
                        .insert("grpc-timeout", grpc_timeout(remaining));
                }
                None => {
                    return refuse(Status::deadline_exceeded(
                        "deadline exceeded before the call was sent",
                    ));
                }
            }
        }
        let (refused_tx, mut refused) = oneshot::channel();
        let untouched = Untouched::new(body);
        let body = WatchedBody {
            untouched: Some(Arc::clone(&untouched)),
            inner: None,
            refused: Some(refused_tx),
        };
        let upstream = self.authority.clone();
        let response = self.client.request(Request::from_parts(parts, body));
        Box::pin(async move {
            // Whichever comes first: the upstream's answer, or our own refusal of the
            // request body (then the upstream stream is reset and its answer is moot).
            let refusal = async {
                match (&mut refused).await {
                    Ok(status) => status,
                    Err(_) => std::future::pending().await,
                }
            };
            tokio::select! {
                status = refusal => Sent::Answered(status_response(&status), Origin::Gateway),
                response = response => match response {
                    Ok(response) => Sent::Answered(
                        response.map(|body| {
                            tonic::body::Body::new(UpstreamBody {
                                inner: body,
                                refused: Some(refused),
                                done: false,
                            })
                        }),
                        Origin::Upstream,
                    ),
                    Err(err) => {
                        if let Ok(status) = refused.try_recv() {
                            return Sent::Answered(status_response(&status), Origin::Gateway);
                        }
                        tracing::debug!(%upstream, error = %err, "upstream call failed");
                        let status = Status::unavailable(format!("upstream {upstream} unavailable"));
                        match untouched.take_back() {
                            Some(body) => Sent::Unsent { status, body },
                            None => Sent::Answered(status_response(&status), Origin::Upstream),
                        }
                    }
                },
            }
        })
    }
}

impl Service<Request<tonic::body::Body>> for Endpoint {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GrpcFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // hyper's pool queues on its own connection; the breakers gate in `balance`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let sent = self.send(parts, body);
        Box::pin(async move {
            Ok(match sent.await {
                Sent::Answered(response, _) => response,
                Sent::Unsent { status, .. } => status_response(&status),
            })
        })
    }
}

/// `grpc-timeout` for `remaining`, in milliseconds rounded up (8 digits at most).
fn grpc_timeout(remaining: Duration) -> HeaderValue {
    let millis = remaining.as_micros().div_ceil(1000).clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{millis}m")).unwrap_or(HeaderValue::from_static("1m"))
}

/// A request body not yet touched by hyper, which the sender can take back.
struct Untouched {
    body: Mutex<Option<tonic::body::Body>>,
    /// Set by any look at the body (hyper may have sent END_STREAM from it).
    touched: AtomicBool,
}

impl Untouched {
    fn new(body: tonic::body::Body) -> Arc<Self> {
        Arc::new(Self {
            body: Mutex::new(Some(body)),
            touched: AtomicBool::new(false),
        })
    }

    fn body(&self) -> std::sync::MutexGuard<'_, Option<tonic::body::Body>> {
        self.body
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The body, if nothing ever looked at it.
    fn take_back(&self) -> Option<tonic::body::Body> {
        if self.touched.load(Ordering::Acquire) {
            return None;
        }
        self.body().take()
    }
}

/// The request body on its way upstream: frames pass through; a failure (a refused
/// message) is reported to the response side before hyper resets the stream. Until hyper
/// first looks at it, the body stays where the sender can take it back: a call whose
/// connection failed before that was never sent, and may go elsewhere.
pub(crate) struct WatchedBody {
    untouched: Option<Arc<Untouched>>,
    inner: Option<tonic::body::Body>,
    refused: Option<oneshot::Sender<Status>>,
}

impl WatchedBody {
    fn inner(&mut self) -> Option<&mut tonic::body::Body> {
        if let Some(untouched) = self.untouched.take() {
            untouched.touched.store(true, Ordering::Release);
            self.inner = untouched.body().take();
        }
        self.inner.as_mut()
    }

    /// Reads the body without taking it, marking it touched.
    fn peek<T>(&self, read: impl FnOnce(Option<&tonic::body::Body>) -> T) -> T {
        match (&self.untouched, &self.inner) {
            (_, Some(inner)) => read(Some(inner)),
            (Some(untouched), None) => {
                untouched.touched.store(true, Ordering::Release);
                read(untouched.body().as_ref())
            }
            (None, None) => read(None),
        }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        if let Some(Err(status)) = &frame
            && let Some(refused) = this.refused.take()
        {
            let _ = refused.send(status.clone());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.peek(|body| body.is_none_or(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        self.peek(|body| body.map_or_else(|| SizeHint::with_exact(0), Body::size_hint))
    }
}

pin_project_lite::pin_project! {
    /// The upstream's response body on its way to the caller: frames pass through. If the
    /// upstream stream breaks, the caller gets trailers instead of a reset: the request's
    /// own refusal when there was one, UNAVAILABLE otherwise.
    struct UpstreamBody {
        #[pin]
        inner: hyper::body::Incoming,
        refused: Option<oneshot::Receiver<Status>>,
        done: bool,
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            None => Poll::Ready(None),
            Some(Err(err)) => {
                *this.done = true;
                let status = this
                    .refused
                    .take()
                    .and_then(|mut refused| refused.try_recv().ok())
                    .unwrap_or_else(|| {
                        tracing::debug!(error = %err, "upstream stream broke");
                        Status::unavailable("upstream stream broke")
                    });
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The trailers that carry `status`.
fn trailers(status: &Status) -> HeaderMap {
    // `into_http` puts the status in the headers of a trailers-only response: the same
    // fields are the trailers of a response that has started.
    let (parts, _) = status.clone().into_http::<()>().into_parts();
    let mut trailers = parts.headers;
    trailers.remove(http::header::CONTENT_TYPE);
    trailers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_is_whole_milliseconds_rounded_up_within_eight_digits() {
        let header = |d| {
            grpc_timeout(d)
                .to_str()
                .map(str::to_owned)
                .unwrap_or_default()
        };
        assert_eq!(header(Duration::from_millis(1500)), "1500m");
        assert_eq!(header(Duration::from_micros(1)), "1m");
        assert_eq!(header(Duration::from_micros(2_001)), "3m");
        assert_eq!(header(Duration::from_secs(365 * 24 * 3600)), "99999999m");
    }

    #[test]
    fn a_status_becomes_trailers_without_a_content_type() {
        let trailers = trailers(&Status::resource_exhausted("too big"));
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"8"[..])
        );
        assert!(trailers.contains_key("grpc-message"));
        assert!(!trailers.contains_key(http::header::CONTENT_TYPE));
    }
}
