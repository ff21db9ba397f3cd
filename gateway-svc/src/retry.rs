//! Retries of unary calls, from a budget shared by all the calls to one upstream cluster.
//!
//! A call is retried — on another endpoint, at most [`MAX_RETRIES`] times — only when all
//! of these hold:
//! - its method's `idempotency_level` allows it (reads, and writes carrying an idempotency
//!   key: a retry is then the same request again, answered once), and it is unary;
//! - its request body, read into memory before the first attempt, is at most
//!   [`MAX_REPLAY_BYTES`] (a larger one is streamed through as usual, and never retried);
//! - the attempt failed before any response headers came from the upstream: the
//!   connection broke after the call was sent, or the upstream answered trailers-only
//!   UNAVAILABLE (it refused the call before starting a response — draining, shedding).
//!   Never on DEADLINE_EXCEEDED, and never once the call's deadline has passed;
//! - the cluster's budget has a token: every call deposits, every retry withdraws, so
//!   retries stay within `UPSTREAM_RETRY_BUDGET_PERCENT` of the traffic over the last
//!   10 s, plus `UPSTREAM_RETRY_MIN_PER_SECOND` for quiet periods. A failing cluster thus
//!   gets at most that much extra load from the gateway, never a retry storm.
//!
//! A call whose connection failed before its body was touched is not a retry: the
//! upstream never saw it, and [`crate::balance`] re-routes it for free.
//!
//! The budget is tower's [`TpsBudget`] (Finagle's design); what is retried and when is
//! decided here, because it depends on gRPC (trailers-only statuses, the contract's
//! idempotency levels) rather than on tower's generic retry policy.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tonic::{Code, Status};
use tower::retry::budget::{Budget as _, TpsBudget};

/// The largest request body kept for a retry.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;
/// The most retries of one call.
pub const MAX_RETRIES: usize = 2;
/// The largest `min_per_second` (beyond it the budget would be no limit at all).
pub const MAX_RETRY_MIN_PER_SECOND: u32 = 1_000_000;
/// How long a call's deposit counts towards the budget.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// How much retrying a cluster may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per 100 calls (0–100).
    pub percent: u32,
    /// Retries allowed per second whatever the traffic.
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            percent: 20,
            min_per_second: 10,
        }
    }
}

/// One cluster's retry budget.
pub struct RetryBudget {
    budget: TpsBudget,
    config: RetryBudgetConfig,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// A budget per `config` (out-of-range values are clamped; the config refuses them).
    pub fn new(config: RetryBudgetConfig) -> Self {
        let percent = config.percent.min(100);
        let min_per_second = config.min_per_second.min(MAX_RETRY_MIN_PER_SECOND);
        Self {
            budget: TpsBudget::new(BUDGET_WINDOW, min_per_second, percent as f32 / 100.0),
            config,
        }
    }

    /// A call arrived.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Takes a token for one retry, if there is one.
    pub fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }
}

/// Whether the RPC at `path` may be retried by the gateway: unary, and declared safe to
/// repeat by its `idempotency_level`.
pub fn retryable_method(path: &str) -> bool {
    proto::policy::method_policy(path).is_some_and(|policy| {
        policy.idempotency_level.is_retryable()
            && !policy.client_streaming
            && !policy.server_streaming
    })
}

/// Whether a response ends the call for good, or leaves it retryable: only an
/// UNAVAILABLE carried by the headers of a trailers-only response (or by the gateway's
/// own answer to a connection that broke before any response came).
pub fn failed_before_headers(response: &Response<tonic::body::Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .is_some_and(|code| Code::from_i32(code) == Code::Unavailable)
}

/// A request body read for a possible retry.
pub(crate) enum Buffered {
    /// The whole body, small enough to send again.
    Replayable(Bytes),
    /// Too large to keep: what was read, followed by the rest, sent once.
    Streamed(tonic::body::Body),
    /// The body failed (e.g. the message size limit refused it): the caller's answer.
    Refused(Status),
}

/// Reads `body` into memory while it stays within `limit` bytes.
pub(crate) async fn buffer(mut body: tonic::body::Body, limit: usize) -> Buffered {
    let mut read = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Buffered::Replayable(read.freeze()),
            Some(Err(status)) => return Buffered::Refused(status),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    read.extend_from_slice(&data);
                    if read.len() > limit {
                        return Buffered::Streamed(Prefixed::body(
                            vec![Frame::data(read.freeze())],
                            body,
                        ));
                    }
                }
                // Request trailers are not part of gRPC: a body sending them is not
                // replayed but passed on as it is.
                Err(frame) => {
                    return Buffered::Streamed(Prefixed::body(
                        vec![Frame::data(read.freeze()), frame],
                        body,
                    ));
                }
            },
        }
    }
}

/// A body from frames already read, then the rest.
struct Prefixed {
    pending: VecDeque<Frame<Bytes>>,
    rest: tonic::body::Body,
}

impl Prefixed {
    fn body(pending: Vec<Frame<Bytes>>, rest: tonic::body::Body) -> tonic::body::Body {
        let pending = pending
            .into_iter()
            .filter(|frame| frame.data_ref().is_none_or(|data| !data.is_empty()))
            .collect();
        tonic::body::Body::new(Self { pending, rest })
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(frame) = self.pending.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let pending: u64 = self
            .pending
            .iter()
            .filter_map(Frame::data_ref)
            .map(|data| data.len() as u64)
            .sum();
        hint.set_lower(hint.lower() + pending);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: &[&'static [u8]]) -> tonic::body::Body {
        let frames: Vec<Result<Frame<Bytes>, Status>> = chunks
            .iter()
            .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk))))
            .collect();
        tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    async fn collected(body: tonic::body::Body) -> Vec<u8> {
        body.collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_small_body_is_kept_whole_and_a_large_one_passes_through_intact() {
        match buffer(body_of(&[b"abc", b"def"]), 8).await {
            Buffered::Replayable(bytes) => assert_eq!(&bytes[..], b"abcdef"),
            _ => panic!("a body within the limit is replayable"),
        }
        match buffer(body_of(&[b"abcd", b"efgh", b"ij"]), 6).await {
            Buffered::Streamed(body) => assert_eq!(collected(body).await, b"abcdefghij"),
            _ => panic!("a body over the limit is streamed"),
        }
    }

    #[tokio::test]
    async fn a_refused_body_is_the_answer() {
        let frames: Vec<Result<Frame<Bytes>, Status>> =
            vec![Err(Status::resource_exhausted("too big"))];
        let body =
            tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
        match buffer(body, 8).await {
            Buffered::Refused(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            _ => panic!("a failing body is refused"),
        }
    }

    #[test]
    fn only_unary_methods_declared_safe_to_repeat_are_retryable() {
        assert!(retryable_method(
            "/paysuite.payments.v1.PaymentService/GetPayment"
        ));
        assert!(retryable_method(
            "/paysuite.payments.v1.PaymentService/CreatePayment"
        ));
        // A stream is never retried, whatever its level.
        assert!(!retryable_method(
            "/paysuite.payments.v1.PaymentService/WatchBalance"
        ));
        assert!(!retryable_method("/unknown.Service/Method"));
        let unknown_level = proto::policy::method_policies().values().find(|policy| {
            policy.idempotency_level == proto::policy::IdempotencyLevel::Unknown
                && !policy.client_streaming
                && !policy.server_streaming
        });
        if let Some(policy) = unknown_level {
            assert!(!retryable_method(&policy.path), "{}", policy.path);
        }
    }

    #[test]
    fn only_unavailable_before_any_response_is_retryable() {
        let answer = |status: Status| status.into_http::<tonic::body::Body>();
        assert!(failed_before_headers(&answer(Status::unavailable("down"))));
        assert!(!failed_before_headers(&answer(Status::deadline_exceeded(
            "late"
        ))));
        assert!(!failed_before_headers(&answer(Status::internal("bug"))));
        // A response that started (headers without a status) is committed.
        let started = Response::new(tonic::body::Body::empty());
        assert!(!failed_before_headers(&started));
    }

    #[test]
    fn the_budget_allows_the_configured_share_and_no_more() {
        let budget = RetryBudget::new(RetryBudgetConfig {
            percent: 20,
            min_per_second: 0,
        });
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 20);
        let none = RetryBudget::new(RetryBudgetConfig {
            percent: 0,
            min_per_second: 0,
        });
        none.deposit();
        assert!(!none.withdraw());
    }
}
