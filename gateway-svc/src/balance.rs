//! An upstream cluster: its endpoints, a circuit breaker per endpoint, and power-of-two-
//! choices balancing over the endpoints whose breaker admits a call.
//!
//! Per call, top-down:
//! 1. take a snapshot of the endpoints (DNS re-resolution swaps it; see [`crate::resolve`]);
//! 2. p2c: two distinct endpoints at random, the one with fewer calls in flight first;
//!    its breaker is the readiness gate ([`CircuitBreaker::try_acquire`]). When neither
//!    admits, every other endpoint is asked in turn;
//! 3. no breaker admits: UNAVAILABLE with `ErrorInfo{reason: "CIRCUIT_OPEN"}` and
//!    `RetryInfo`, at once — nothing is queued and the upstream is not contacted;
//! 4. the call goes to the chosen endpoint. If its connection fails before the request
//!    body was touched, the upstream never saw the call: the breaker counts a failure
//!    and the call goes to another endpoint (step 2, without this one);
//! 5. the outcome is judged ([`classify`]) from the grpc-status of a trailers-only
//!    response's headers, or of the trailers through [`JudgedBody`] — so a server stream
//!    is judged when it ends. A body dropped before its trailers, a caller that goes away
//!    before its deadline, and the gateway's own refusals give no verdict. A unary call
//!    abandoned because its deadline passed is a DEADLINE_EXCEEDED failure.
//!
//! Why not `tower::balance::p2c` with the breaker in `poll_ready`: ARCHITECTURE.md.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use service_kit::breaker::{
    BreakerConfig, BreakerSnapshot, CircuitBreaker, Override, Permit, Rejected,
};
use tokio::sync::Notify;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use tower_service::Service;

use crate::deadline::CallDeadline;
use crate::proxy::{Endpoint, GrpcFuture, Origin, Sent, status_response};
use crate::retry::{self, Buffered, MAX_REPLAY_BYTES, MAX_RETRIES, RetryBudget, RetryBudgetConfig};

/// The `ErrorInfo.reason` of a call refused because every breaker is open.
pub const CIRCUIT_OPEN: &str = "CIRCUIT_OPEN";
/// The `ErrorInfo.domain` of the gateway's own refusals.
pub const ERROR_DOMAIN: &str = "gateway.paysuite";

/// What a call's outcome says about the endpoint that answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The endpoint works (callers' mistakes and business refusals included).
    Success,
    /// The endpoint is failing.
    Failure,
    /// Nothing: the caller cancelled.
    NoVerdict,
}

/// Judges a grpc-status: UNAVAILABLE, UNKNOWN, INTERNAL, DATA_LOSS and DEADLINE_EXCEEDED
/// are the endpoint's failures; CANCELLED is the caller's doing; the rest (OK, callers'
/// mistakes, refusals) show a working endpoint.
pub fn classify(code: Code) -> Verdict {
    match code {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::DataLoss
        | Code::DeadlineExceeded => Verdict::Failure,
        Code::Cancelled => Verdict::NoVerdict,
        _ => Verdict::Success,
    }
}

/// The grpc-status in `headers` (a trailers-only response's headers, or trailers).
fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// Counters of one endpoint (for metrics, the admin API and tests).
#[derive(Debug, Default)]
pub struct EndpointCounters {
    /// Calls sent to it.
    pub calls: AtomicU64,
    /// Of those, half-open probes.
    pub probes: AtomicU64,
    /// Calls whose connection failed before they were sent, re-routed elsewhere.
    pub unsent: AtomicU64,
}

/// One endpoint of a cluster and its breaker.
#[derive(Debug)]
pub struct UpstreamEndpoint {
    address: String,
    /// Which configured source (static address or DNS name) it came from.
    pub(crate) source: usize,
    endpoint: Endpoint,
    breaker: CircuitBreaker,
    in_flight: AtomicUsize,
    counters: EndpointCounters,
}

impl UpstreamEndpoint {
    /// `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Its breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Calls in flight to it (a stream counts until it ends).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Its counters.
    pub fn counters(&self) -> &EndpointCounters {
        &self.counters
    }
}

/// Counters of one cluster.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Calls refused with CIRCUIT_OPEN (no endpoint's breaker admitted them).
    pub circuit_open: AtomicU64,
    /// Endpoints added by re-resolution.
    pub endpoints_added: AtomicU64,
    /// Endpoints removed by re-resolution.
    pub endpoints_removed: AtomicU64,
    /// Calls dispatched to the cluster (each deposits into the retry budget).
    pub requests: AtomicU64,
    /// Retries sent (another attempt of a call that failed before any response).
    pub retries: AtomicU64,
    /// Retries the budget refused: the failure went back to the caller.
    pub retries_over_budget: AtomicU64,
}

/// An upstream cluster: interchangeable endpoints serving the same services.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    services: Vec<String>,
    breaker_config: BreakerConfig,
    retry_budget: RetryBudget,
    endpoints: RwLock<Arc<[Arc<UpstreamEndpoint>]>>,
    counters: UpstreamCounters,
    /// Woken when a breaker may have changed state or the endpoints changed.
    changed: Notify,
    random: AtomicU64,
}

impl Upstream {
    /// A cluster named `name` answering `services`, with no endpoints yet.
    pub fn new(
        name: &str,
        services: Vec<String>,
        breaker_config: BreakerConfig,
        retry_budget: RetryBudgetConfig,
    ) -> Self {
        let mut seed = [0u8; 8];
        // Without OS randomness the choices are merely predictable, never unsafe.
        let _ = getrandom::fill(&mut seed);
        Self {
            name: name.to_owned(),
            services,
            breaker_config,
            retry_budget: RetryBudget::new(retry_budget),
            endpoints: RwLock::new(Arc::from(Vec::new())),
            counters: UpstreamCounters::default(),
            changed: Notify::new(),
            random: AtomicU64::new(u64::from_le_bytes(seed) | 1),
        }
    }

    /// Its name, e.g. `payments`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The gRPC services routed to it.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// Its counters.
    pub fn counters(&self) -> &UpstreamCounters {
        &self.counters
    }

    /// The endpoints now.
    pub fn endpoints(&self) -> Arc<[Arc<UpstreamEndpoint>]> {
        Arc::clone(
            &self
                .endpoints
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// The endpoint at `address`.
    pub fn endpoint(&self, address: &str) -> Option<Arc<UpstreamEndpoint>> {
        self.endpoints()
            .iter()
            .find(|endpoint| endpoint.address == address)
            .cloned()
    }

    /// Replaces the endpoints with `wanted` (address → source): endpoints already there
    /// keep their breaker and counters, new ones are built by `connect`.
    pub(crate) fn set_endpoints(
        &self,
        wanted: &[(String, usize)],
        connect: impl Fn(&str) -> Option<Endpoint>,
    ) {
        let current = self.endpoints();
        let mut kept: HashMap<&str, &Arc<UpstreamEndpoint>> = current
            .iter()
            .map(|endpoint| (endpoint.address.as_str(), endpoint))
            .collect();
        let mut next = Vec::with_capacity(wanted.len());
        let mut added = 0;
        for (address, source) in wanted {
            if let Some(existing) = kept.remove(address.as_str()) {
                next.push(Arc::clone(existing));
                continue;
            }
            match connect(address) {
                Some(endpoint) => {
                    tracing::info!(upstream = %self.name, %address, "endpoint added");
                    added += 1;
                    next.push(Arc::new(UpstreamEndpoint {
                        address: address.clone(),
                        source: *source,
                        endpoint,
                        breaker: CircuitBreaker::observed(
                            self.breaker_config.clone(),
                            &self.name,
                            address,
                        ),
                        in_flight: AtomicUsize::new(0),
                        counters: EndpointCounters::default(),
                    }));
                }
                None => tracing::warn!(upstream = %self.name, %address, "endpoint unusable"),
            }
        }
        for address in kept.keys() {
            tracing::info!(upstream = %self.name, %address, "endpoint removed");
        }
        self.counters
            .endpoints_added
            .fetch_add(added, Ordering::Relaxed);
        self.counters
            .endpoints_removed
            .fetch_add(kept.len() as u64, Ordering::Relaxed);
        *self
            .endpoints
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::from(next);
        self.changed.notify_one();
    }

    /// Sets an operator override on the breaker of the endpoint at `address`.
    pub fn set_override(&self, address: &str, forced: Override) -> Option<Arc<UpstreamEndpoint>> {
        let endpoint = self.endpoint(address)?;
        endpoint.breaker.set_override(forced);
        tracing::info!(upstream = %self.name, %address, ?forced, "breaker override");
        self.changed.notify_one();
        Some(endpoint)
    }

    /// Whether every endpoint is tripped (open or half-open), and there is at least one.
    pub fn all_tripped(&self) -> bool {
        let endpoints = self.endpoints();
        !endpoints.is_empty()
            && endpoints.iter().all(|endpoint| {
                endpoint.breaker.snapshot().state != service_kit::breaker::BreakerState::Closed
            })
    }

    /// Waits until a breaker may have changed state or the endpoints changed.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn next_random(&self) -> u64 {
        // xorshift over an atomic: a lost update only repeats a number, which p2c tolerates.
        let mut x = self.random.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.store(x, Ordering::Relaxed);
        x
    }

    /// p2c over `endpoints` not yet `tried`, gated by their breakers.
    fn choose(
        &self,
        endpoints: &[Arc<UpstreamEndpoint>],
        tried: &[usize],
    ) -> Result<(usize, Permit), Option<Duration>> {
        let candidates: Vec<usize> = (0..endpoints.len())
            .filter(|index| !tried.contains(index))
            .collect();
        let mut retry_after: Option<Duration> = None;
        let mut refused = |rejected: Rejected| {
            retry_after =
                Some(retry_after.map_or(rejected.retry_after, |r| r.min(rejected.retry_after)));
        };
        if candidates.is_empty() {
            return Err(None);
        }
        let random = self.next_random();
        let count = candidates.len();
        let first = (random % count as u64) as usize;
        let mut order = vec![first];
        if count > 1 {
            let second = (first + 1 + ((random >> 32) % (count as u64 - 1)) as usize) % count;
            if endpoints[candidates[second]].in_flight() < endpoints[candidates[first]].in_flight()
            {
                order.insert(0, second);
            } else {
                order.push(second);
            }
        }
        // When neither of the two admits, ask the rest rather than refuse.
        order.extend((0..count).map(|offset| (first + offset) % count));
        let mut asked = Vec::with_capacity(count);
        for position in order {
            if asked.contains(&position) {
                continue;
            }
            asked.push(position);
            let index = candidates[position];
            match endpoints[index].breaker.try_acquire() {
                Ok(permit) => return Ok((index, permit)),
                Err(rejected) => refused(rejected),
            }
        }
        Err(retry_after)
    }

    fn circuit_open(&self, retry_after: Duration) -> Response<tonic::body::Body> {
        self.counters.circuit_open.fetch_add(1, Ordering::Relaxed);
        let mut details = ErrorDetails::new();
        details.set_error_info(
            CIRCUIT_OPEN,
            ERROR_DOMAIN,
            HashMap::from([("upstream".to_owned(), self.name.clone())]),
        );
        // A probe in flight reads as zero: tell callers to wait a little anyway.
        details.set_retry_info(Some(retry_after.max(Duration::from_millis(100))));
        status_response(&Status::with_error_details(
            Code::Unavailable,
            format!("upstream {} unavailable: circuit open", self.name),
            details,
        ))
    }
}

/// A call admitted to one endpoint, until its verdict: counts the call in flight, and on
/// drop without a verdict fails it only if its deadline had passed.
struct Attempt {
    endpoint: Arc<UpstreamEndpoint>,
    upstream: Arc<Upstream>,
    permit: Option<Permit>,
    deadline: Option<CallDeadline>,
}

impl Attempt {
    fn new(
        upstream: &Arc<Upstream>,
        endpoint: &Arc<UpstreamEndpoint>,
        permit: Permit,
        deadline: Option<CallDeadline>,
    ) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint.counters.calls.fetch_add(1, Ordering::Relaxed);
        if permit.is_probe() {
            endpoint.counters.probes.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            endpoint: Arc::clone(endpoint),
            upstream: Arc::clone(upstream),
            permit: Some(permit),
            deadline,
        }
    }

    fn judge(&mut self, verdict: Verdict) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let probe = permit.is_probe();
        match verdict {
            Verdict::Success => permit.success(),
            Verdict::Failure => permit.failure(),
            Verdict::NoVerdict => drop(permit),
        }
        // Only a failure or a probe's outcome can change a breaker's state.
        if verdict == Verdict::Failure || probe {
            self.upstream.changed.notify_one();
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let expired = self
            .deadline
            .is_some_and(|deadline| deadline.remaining().is_none());
        self.judge(if expired {
            Verdict::Failure
        } else {
            Verdict::NoVerdict
        });
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The cluster as the last stage of the proxy stack.
#[derive(Debug, Clone)]
pub struct Balance {
    upstream: Arc<Upstream>,
}

impl Balance {
    /// Balances over `upstream`'s endpoints.
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Self { upstream }
    }
}

impl Service<Request<tonic::body::Body>> for Balance {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GrpcFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never queue: the breakers are asked per call, and refuse at once.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let upstream = Arc::clone(&self.upstream);
        Box::pin(async move { Ok(dispatch(upstream, request).await) })
    }
}

async fn dispatch(
    upstream: Arc<Upstream>,
    request: Request<tonic::body::Body>,
) -> Response<tonic::body::Body> {
    let endpoints = upstream.endpoints();
    if endpoints.is_empty() {
        return status_response(&Status::unavailable(format!(
            "upstream {} has no endpoint",
            upstream.name
        )));
    }
    upstream.counters.requests.fetch_add(1, Ordering::Relaxed);
    upstream.retry_budget.deposit();
    let deadline = request.extensions().get::<CallDeadline>().copied();
    let retryable = retry::retryable_method(request.uri().path());
    let (parts, body) = request.into_parts();
    // A call that may be retried keeps its (small) body to send again.
    let (mut body, replay) = if retryable {
        match retry::buffer(body, MAX_REPLAY_BYTES).await {
            Buffered::Replayable(bytes) => (replay_body(&bytes), Some(bytes)),
            Buffered::Streamed(body) => (body, None),
            Buffered::Refused(status) => return status_response(&status),
        }
    } else {
        (body, None)
    };
    let mut tried: Vec<usize> = Vec::new();
    let mut last_unsent: Option<Status> = None;
    let mut last_failed: Option<Response<tonic::body::Body>> = None;
    let mut retries = 0;
    loop {
        let (index, permit) = match upstream.choose(&endpoints, &tried) {
            Ok(chosen) => chosen,
            Err(retry_after) => {
                return match (last_failed, last_unsent, retry_after) {
                    // An attempt failed and no endpoint is left for a retry: its answer.
                    (Some(response), _, _) => response,
                    // Some endpoint was tried and unreachable: that is the answer.
                    (None, Some(status), _) => status_response(&status),
                    (None, None, retry_after) => {
                        upstream.circuit_open(retry_after.unwrap_or_default())
                    }
                };
            }
        };
        let endpoint = &endpoints[index];
        let mut attempt = Attempt::new(&upstream, endpoint, permit, deadline);
        // Keep the request head for another attempt only while one may follow.
        let head = if replay.is_some() || tried.len() + 1 < endpoints.len() {
            parts.clone()
        } else {
            return answer(attempt, endpoint.endpoint.send(parts, body).await);
        };
        match endpoint.endpoint.send(head, body).await {
            Sent::Unsent { status, body: back } => {
                endpoint.counters.unsent.fetch_add(1, Ordering::Relaxed);
                // A connection error: the endpoint's failure, though the call lives on.
                attempt.judge(Verdict::Failure);
                drop(attempt);
                tried.push(index);
                last_unsent = Some(status);
                body = back;
            }
            sent => {
                let response = answer(attempt, sent);
                tried.push(index);
                let Some(bytes) = replay.as_ref().filter(|_| {
                    retries < MAX_RETRIES
                        && tried.len() < endpoints.len()
                        && retry::failed_before_headers(&response)
                        && deadline.is_none_or(|deadline| deadline.remaining().is_some())
                }) else {
                    return response;
                };
                if !upstream.retry_budget.withdraw() {
                    upstream
                        .counters
                        .retries_over_budget
                        .fetch_add(1, Ordering::Relaxed);
                    return response;
                }
                upstream.counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(upstream = %upstream.name, endpoint = %endpoint.address, "retrying on another endpoint");
                retries += 1;
                last_failed = Some(response);
                body = replay_body(bytes);
            }
        }
    }
}

/// A request body that sends `bytes` again.
fn replay_body(bytes: &Bytes) -> tonic::body::Body {
    tonic::body::Body::new(http_body_util::Full::new(bytes.clone()))
}

/// The response to pass on, with the attempt judged now (trailers-only) or when the
/// body's trailers arrive.
fn answer(mut attempt: Attempt, sent: Sent) -> Response<tonic::body::Body> {
    match sent {
        Sent::Unsent { status, .. } => {
            attempt.judge(Verdict::Failure);
            status_response(&status)
        }
        Sent::Answered(response, Origin::Gateway) => {
            attempt.judge(Verdict::NoVerdict);
            response
        }
        Sent::Answered(response, Origin::Upstream) => {
            if let Some(code) = grpc_status(response.headers()) {
                attempt.judge(classify(code));
                return response;
            }
            if response.status() != http::StatusCode::OK {
                // Not a gRPC answer at all (a proxy's error page): the endpoint is broken.
                attempt.judge(Verdict::Failure);
                return response;
            }
            response.map(|body| {
                tonic::body::Body::new(JudgedBody {
                    inner: body,
                    attempt: Some(attempt),
                })
            })
        }
    }
}

/// A response body on its way to the caller: frames pass through, and the trailers'
/// grpc-status judges the call. Dropped before them, it gives no verdict.
pub(crate) struct JudgedBody {
    inner: tonic::body::Body,
    attempt: Option<Attempt>,
}

impl Body for JudgedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let verdict = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| grpc_status(trailers).map_or(Verdict::Failure, classify)),
            Some(Err(_)) => Some(Verdict::Failure),
            // The end without trailers: not a gRPC answer, but nothing to blame either.
            None => Some(Verdict::NoVerdict),
        };
        if let Some(verdict) = verdict
            && let Some(mut attempt) = this.attempt.take()
        {
            attempt.judge(verdict);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An endpoint as operators see it.
#[derive(Debug, Clone)]
pub struct EndpointView {
    /// `host:port`.
    pub address: String,
    /// Its breaker.
    pub breaker: BreakerSnapshot,
    /// Calls in flight.
    pub in_flight: usize,
}

impl From<&UpstreamEndpoint> for EndpointView {
    fn from(endpoint: &UpstreamEndpoint) -> Self {
        Self {
            address: endpoint.address.clone(),
            breaker: endpoint.breaker.snapshot(),
            in_flight: endpoint.in_flight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_the_endpoints_fault_and_nothing_else() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::DataLoss,
            Code::DeadlineExceeded,
        ] {
            assert_eq!(classify(code), Verdict::Failure, "{code:?}");
        }
        assert_eq!(classify(Code::Cancelled), Verdict::NoVerdict);
        for code in [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::ResourceExhausted,
            Code::OutOfRange,
            Code::Unimplemented,
        ] {
            assert_eq!(classify(code), Verdict::Success, "{code:?}");
        }
    }

    #[test]
    fn the_status_is_read_from_headers_or_trailers() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&headers), Some(Code::Unavailable));
        headers.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&headers), None);
    }

    fn upstream(addresses: &[&str]) -> Arc<Upstream> {
        let upstream = Arc::new(Upstream::new(
            "payments",
            vec![],
            BreakerConfig {
                consecutive_failures: 1,
                ..BreakerConfig::default()
            },
            RetryBudgetConfig::default(),
        ));
        let wanted: Vec<(String, usize)> = addresses.iter().map(|a| ((*a).to_owned(), 0)).collect();
        upstream.set_endpoints(&wanted, |address| {
            let uri: http::Uri = format!("http://{address}").parse().ok()?;
            Endpoint::new(
                &uri,
                crate::proxy::ConnectSettings {
                    connect_timeout: Duration::from_secs(1),
                    keepalive_interval: Duration::from_secs(10),
                    keepalive_timeout: Duration::from_secs(10),
                },
            )
        });
        upstream
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_skips_open_breakers_and_refuses_only_when_all_are_open() {
        let upstream = upstream(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let endpoints = upstream.endpoints();
        endpoints[0].breaker.set_override(Override::ForcedOpen);
        endpoints[2].breaker.set_override(Override::ForcedOpen);
        for _ in 0..20 {
            let chosen = upstream.choose(&endpoints, &[]).map(|(index, _)| index);
            assert_eq!(chosen.ok(), Some(1));
        }
        assert!(upstream.choose(&endpoints, &[1]).is_err(), "1 was tried");
        assert!(!upstream.all_tripped());
        endpoints[1].breaker.set_override(Override::ForcedOpen);
        assert!(upstream.all_tripped());
        let response = dispatch(
            Arc::clone(&upstream),
            Request::new(tonic::body::Body::empty()),
        )
        .await;
        let status = Status::from_header_map(response.headers());
        assert_eq!(status.as_ref().map(Status::code), Some(Code::Unavailable));
        let reason = status
            .map(|s| s.get_details_error_info().map(|info| info.reason))
            .unwrap_or_default();
        assert_eq!(reason.as_deref(), Some(CIRCUIT_OPEN));
        assert_eq!(upstream.counters.circuit_open.load(Ordering::Relaxed), 1);
        assert!(
            endpoints
                .iter()
                .all(|e| e.counters.calls.load(Ordering::Relaxed) == 0),
            "no endpoint was contacted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_endpoint_with_fewer_calls_in_flight() {
        let upstream = upstream(&["127.0.0.1:1", "127.0.0.1:2"]);
        let endpoints = upstream.endpoints();
        endpoints[0].in_flight.store(5, Ordering::Relaxed);
        for _ in 0..20 {
            let chosen = upstream.choose(&endpoints, &[]).map(|(index, _)| index);
            assert_eq!(chosen.ok(), Some(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn re_resolution_keeps_breakers_of_endpoints_that_stay() {
        let upstream = upstream(&["127.0.0.1:1", "127.0.0.1:2"]);
        let kept = upstream.endpoint("127.0.0.1:2");
        if let Some(kept) = &kept {
            kept.breaker.set_override(Override::ForcedOpen);
        }
        upstream.set_endpoints(
            &[("127.0.0.1:2".to_owned(), 0), ("127.0.0.1:3".to_owned(), 0)],
            // Kept endpoints are not rebuilt; this test builds no new ones.
            |_| None,
        );
        let addresses: Vec<String> = upstream
            .endpoints()
            .iter()
            .map(|e| e.address.clone())
            .collect();
        // 127.0.0.1:3 could not be built by this test's `connect`: it is skipped.
        assert_eq!(addresses, ["127.0.0.1:2"]);
        assert_eq!(
            upstream
                .endpoint("127.0.0.1:2")
                .map(|e| e.breaker.override_state()),
            Some(Override::ForcedOpen)
        );
        assert_eq!(
            upstream.counters.endpoints_removed.load(Ordering::Relaxed),
            1
        );
    }

    /// A response body: one message, then trailers with `code`.
    struct Streamed {
        frames: Vec<Frame<Bytes>>,
    }

    impl Body for Streamed {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            let this = self.get_mut();
            Poll::Ready((!this.frames.is_empty()).then(|| Ok(this.frames.remove(0))))
        }
    }

    fn streamed(code: Code) -> Response<tonic::body::Body> {
        let mut trailers = HeaderMap::new();
        if let Ok(value) = http::HeaderValue::from_str(&(code as i32).to_string()) {
            trailers.insert("grpc-status", value);
        }
        Response::new(tonic::body::Body::new(Streamed {
            frames: vec![
                Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                Frame::trailers(trailers),
            ],
        }))
    }

    async fn next_frame(body: &mut tonic::body::Body) -> Option<Result<Frame<Bytes>, Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    fn attempt(upstream: &Arc<Upstream>, deadline: Option<CallDeadline>) -> Option<Attempt> {
        let endpoint = upstream.endpoints().first().cloned()?;
        let permit = endpoint.breaker.try_acquire().ok()?;
        Some(Attempt::new(upstream, &endpoint, permit, deadline))
    }

    fn window(upstream: &Upstream) -> (u32, u32) {
        upstream.endpoints()[0].breaker.window_counts()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_is_judged_by_its_trailers_and_a_dropped_body_not_at_all() {
        let upstream = upstream(&["127.0.0.1:1"]);
        // Judged when the trailers pass, not when the headers arrive.
        let Some(judged) = attempt(&upstream, None) else {
            panic!("a closed breaker admits")
        };
        let mut body = answer(
            judged,
            Sent::Answered(streamed(Code::Unavailable), Origin::Upstream),
        )
        .into_body();
        assert!(next_frame(&mut body).await.is_some());
        assert_eq!(window(&upstream), (0, 0), "not judged before the trailers");
        assert_eq!(
            upstream.endpoints()[0].in_flight(),
            1,
            "in flight until they pass"
        );
        assert!(next_frame(&mut body).await.is_some());
        assert_eq!(window(&upstream), (1, 1));
        assert_eq!(upstream.endpoints()[0].in_flight(), 0);
        drop(body);

        // Dropped before its trailers: no verdict.
        let upstream = self::upstream(&["127.0.0.1:1"]);
        let Some(dropped) = attempt(&upstream, None) else {
            panic!("a closed breaker admits")
        };
        let mut body = answer(
            dropped,
            Sent::Answered(streamed(Code::Internal), Origin::Upstream),
        )
        .into_body();
        assert!(next_frame(&mut body).await.is_some());
        drop(body);
        assert_eq!(window(&upstream), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn trailers_only_answers_and_the_gateways_own_refusals_are_judged_at_once() {
        let upstream = upstream(&["127.0.0.1:1"]);
        let refusal = |code| status_response(&Status::new(code, "x"));
        // A caller's mistake: the endpoint works.
        if let Some(judged) = attempt(&upstream, None) {
            drop(answer(
                judged,
                Sent::Answered(refusal(Code::InvalidArgument), Origin::Upstream),
            ));
        }
        assert_eq!(window(&upstream), (1, 0));
        // The gateway's own DEADLINE_EXCEEDED (nothing was sent): no verdict.
        if let Some(judged) = attempt(&upstream, None) {
            drop(answer(
                judged,
                Sent::Answered(refusal(Code::DeadlineExceeded), Origin::Gateway),
            ));
        }
        assert_eq!(window(&upstream), (1, 0));
        // The upstream's DATA_LOSS trips it (one failure is the threshold here).
        if let Some(judged) = attempt(&upstream, None) {
            drop(answer(
                judged,
                Sent::Answered(refusal(Code::DataLoss), Origin::Upstream),
            ));
        }
        assert_eq!(window(&upstream), (2, 1));
        assert_eq!(
            upstream.endpoints()[0].breaker.state(),
            service_kit::breaker::BreakerState::Open
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_abandoned_at_its_deadline_fails_one_cancelled_before_does_not() {
        let upstream = upstream(&["127.0.0.1:1"]);
        let deadline = CallDeadline::at(tokio::time::Instant::now() + Duration::from_secs(1));
        // The caller went away with time left: no verdict.
        drop(attempt(&upstream, Some(deadline)));
        assert_eq!(window(&upstream), (0, 0));
        // The deadline layer dropped it when the deadline passed: the upstream was too slow.
        let abandoned = attempt(&upstream, Some(deadline));
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(abandoned);
        assert_eq!(window(&upstream), (1, 1));
    }
}
