//! Rate limiting through ratelimit-svc's Envoy RLS v3 API
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`).
//!
//! [`RateLimit`] runs after authentication: it asks ratelimit-svc about the authenticated
//! [`Caller`] before the call goes anywhere, with two descriptors in the configured
//! domain (`paysuite-gateway` by default):
//! 1. `[tier=<tier>, principal=<principal>]`: everything one principal does;
//! 2. `[tier=<tier>, principal=<principal>, group=<group>]`: one *method group* of it.
//!
//! A method's group is its `required_scope` from the contract (`payments:read`,
//! `payments:write`, `admin`, `ratelimit:check`): the scope already says what kind of
//! work a method is (reads and streams vs writes vs operator calls), it is declared for
//! every RPC, and a new RPC joins a group without a gateway change. The rules file
//! (`ratelimit-svc/rules/gateway.yaml`) gives each tier its numbers; a tier or group
//! without a rule is not limited on that descriptor.
//!
//! Every answer — the upstream's (headers of a response or of a trailers-only error) and
//! the gateway's refusal — carries `x-ratelimit-limit`, `x-ratelimit-remaining` and
//! `x-ratelimit-reset` (whole seconds, rounded up) of the most restrictive descriptor. A
//! refusal is RESOURCE_EXHAUSTED with `QuotaFailure`, `RetryInfo` and `retry-after`, and
//! the upstream never sees the call. When no decision comes (timeout, error, the
//! breaker open) the failure mode answers: open admits without headers, closed refuses
//! with UNAVAILABLE. [`RateLimitStats`] counts which path each call took.
//!
//! This module is the gateway's client edge of the RLS API: only it sees envoy's
//! protobuf types.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code as RlsCode, DescriptorStatus,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use http::{HeaderMap, HeaderValue, Request, Response};
use service_kit::breaker::CircuitBreaker;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use tower_layer::Layer;
use tower_service::Service;

use crate::config::{FailureMode, RateLimiting};
use crate::keys::Caller;
use crate::proxy::{GrpcFuture, status_response};

/// The limit of the most restrictive descriptor (requests per unit).
pub const HEADER_LIMIT: &str = "x-ratelimit-limit";
/// Requests left in it.
pub const HEADER_REMAINING: &str = "x-ratelimit-remaining";
/// Whole seconds until it resets (rounded up).
pub const HEADER_RESET: &str = "x-ratelimit-reset";
/// Whole seconds a refused caller should wait (at least 1).
pub const HEADER_RETRY_AFTER: &str = "retry-after";

/// Descriptor entry: the caller's tier.
pub const KEY_TIER: &str = "tier";
/// Descriptor entry: the caller's principal.
pub const KEY_PRINCIPAL: &str = "principal";
/// Descriptor entry: the method group.
pub const KEY_GROUP: &str = "group";

/// The `ErrorInfo` reason of a call refused because ratelimit-svc could not decide.
pub const REASON_UNAVAILABLE: &str = "RATE_LIMITER_UNAVAILABLE";

/// How long a fail-closed caller is told to wait when the breaker gives no figure.
const FAIL_CLOSED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Counters of what the rate limiting layer did.
#[derive(Debug, Default)]
pub struct RateLimitStats {
    /// Calls ratelimit-svc admitted.
    pub allowed: AtomicU64,
    /// Calls ratelimit-svc refused (answered RESOURCE_EXHAUSTED, upstream not called).
    pub refused: AtomicU64,
    /// Calls admitted without a decision (fail-open).
    pub fail_open: AtomicU64,
    /// Calls refused without a decision (fail-closed).
    pub fail_closed: AtomicU64,
    /// Decisions that failed: timeouts and errors of the RLS call.
    pub errors: AtomicU64,
    /// Decisions not asked for because the breaker was open.
    pub breaker_rejections: AtomicU64,
}

impl RateLimitStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Logs the counters (at shutdown), as ratelimit-svc logs its own.
    pub fn log(&self) {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        tracing::info!(
            allowed = read(&self.allowed),
            refused = read(&self.refused),
            fail_open = read(&self.fail_open),
            fail_closed = read(&self.fail_closed),
            errors = read(&self.errors),
            breaker_rejections = read(&self.breaker_rejections),
            "gateway-svc rate limit counters at shutdown"
        );
    }
}

/// The method group of the RPC at `path`: its required scope (empty when unknown).
pub fn method_group(path: &str) -> &'static str {
    proto::policy::method_policy(path).map_or("", |policy| policy.required_scope.as_str())
}

/// The descriptors of one call: the principal's, then the principal's in `group`.
pub fn descriptors(caller: &Caller, group: &str) -> Vec<RateLimitDescriptor> {
    let entry = |key: &str, value: &str| Entry {
        key: key.to_owned(),
        value: value.to_owned(),
    };
    let principal = vec![
        entry(KEY_TIER, &caller.tier),
        entry(KEY_PRINCIPAL, &caller.principal),
    ];
    let mut in_group = principal.clone();
    in_group.push(entry(KEY_GROUP, group));
    [principal, in_group]
        .into_iter()
        .map(|entries| RateLimitDescriptor {
            entries,
            ..RateLimitDescriptor::default()
        })
        .collect()
}

/// The figures of one descriptor's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per unit.
    pub limit: u32,
    /// Requests left.
    pub remaining: u32,
    /// Until the counter resets (or, when over, until a request would pass).
    pub reset: Duration,
    /// Which descriptor it is (index into [`descriptors`]).
    pub descriptor: usize,
}

/// What ratelimit-svc answered for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; the most restrictive limit, when any descriptor had one.
    Allowed(Option<Quota>),
    /// Over the limit; the over descriptor that resets last.
    Refused(Quota),
}

/// Reads an RLS answer: the overall code decides, and among the descriptors that carry a
/// limit (no rule and unlimited carry none) the most restrictive one speaks — the one
/// with the fewest requests left, and of those the one that resets last (a refused
/// caller must wait for every over descriptor).
pub fn verdict(response: &RateLimitResponse) -> Verdict {
    let refused = response.overall_code == RlsCode::OverLimit as i32;
    let quotas = response
        .statuses
        .iter()
        .enumerate()
        .filter(|(_, status)| !refused || status.code == RlsCode::OverLimit as i32)
        .filter_map(|(index, status)| quota(index, status));
    let most_restrictive =
        quotas.min_by_key(|quota| (quota.remaining, std::cmp::Reverse(quota.reset)));
    if refused {
        // Over without a limited descriptor over (quota mode): nothing is left.
        Verdict::Refused(most_restrictive.unwrap_or(Quota {
            limit: 0,
            remaining: 0,
            reset: FAIL_CLOSED_RETRY_AFTER,
            descriptor: 0,
        }))
    } else {
        Verdict::Allowed(most_restrictive)
    }
}

fn quota(index: usize, status: &DescriptorStatus) -> Option<Quota> {
    let limit = status.current_limit.as_ref()?;
    let reset = status
        .duration_until_reset
        .as_ref()
        .map_or(Duration::ZERO, |duration| {
            Duration::new(
                u64::try_from(duration.seconds).unwrap_or(0),
                u32::try_from(duration.nanos).unwrap_or(0),
            )
        });
    Some(Quota {
        limit: limit.requests_per_unit,
        remaining: status.limit_remaining,
        reset,
        descriptor: index,
    })
}

/// `duration` in whole seconds, rounded up (a reset 0.2 s away is 1 s away).
pub fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The seconds a refused caller is told to wait: never 0 (that would invite a retry the
/// limiter refuses again).
pub fn retry_after_seconds(duration: Duration) -> u64 {
    whole_seconds(duration).max(1)
}

/// Adds the `x-ratelimit-*` headers of `quota`.
pub fn insert_quota_headers(headers: &mut HeaderMap, quota: &Quota) {
    headers.insert(HEADER_LIMIT, HeaderValue::from(quota.limit));
    headers.insert(HEADER_REMAINING, HeaderValue::from(quota.remaining));
    headers.insert(HEADER_RESET, HeaderValue::from(whole_seconds(quota.reset)));
}

/// RESOURCE_EXHAUSTED for a call over `quota`, with `QuotaFailure`, `RetryInfo`,
/// `retry-after` and the `x-ratelimit-*` metadata.
pub fn refusal(quota: &Quota, caller: &Caller, group: &str) -> Status {
    let subject = if quota.descriptor == 0 {
        format!("principal:{}", caller.principal)
    } else {
        format!("principal:{}/group:{group}", caller.principal)
    };
    let retry_after = retry_after_seconds(quota.reset);
    let mut details = ErrorDetails::new();
    details
        .add_quota_failure_violation(
            subject,
            format!(
                "rate limit of tier {} reached: {} requests per window",
                caller.tier, quota.limit
            ),
        )
        .set_retry_info(Some(Duration::from_secs(retry_after)));
    let mut status = Status::with_error_details(
        Code::ResourceExhausted,
        format!("rate limit exceeded: retry after {retry_after} s"),
        details,
    );
    let headers = status.metadata_mut().as_mut();
    insert_quota_headers(headers, quota);
    headers.insert(HEADER_RETRY_AFTER, HeaderValue::from(retry_after));
    status
}

/// UNAVAILABLE for a call refused because no decision came (fail-closed).
fn unavailable(retry_after: Duration) -> Status {
    let retry_after = retry_after.max(FAIL_CLOSED_RETRY_AFTER);
    let mut details = ErrorDetails::new();
    details
        .set_error_info(REASON_UNAVAILABLE, "paysuite.gateway", HashMap::new())
        .set_retry_info(Some(retry_after));
    let mut status = Status::with_error_details(
        Code::Unavailable,
        "rate limiter unavailable: the call was not attempted",
        details,
    );
    status.metadata_mut().as_mut().insert(
        HEADER_RETRY_AFTER,
        HeaderValue::from(retry_after_seconds(retry_after)),
    );
    status
}

/// Whether an RLS error says ratelimit-svc is in trouble (the breaker counts it) rather
/// than that the gateway asked wrongly.
fn dependency_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DataLoss
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Cancelled
    )
}

/// What the layer does with a call.
#[derive(Debug)]
enum Decision {
    /// Send it upstream, with these figures on the answer.
    Admit(Option<Quota>),
    /// Answer this instead.
    Refuse(Status),
}

/// The RLS client with its timeout, breaker and failure mode; cheap to clone.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    client: RateLimitServiceClient<Channel>,
    domain: Arc<str>,
    timeout: Duration,
    failure_mode: FailureMode,
    breaker: CircuitBreaker,
    stats: Arc<RateLimitStats>,
}

impl RateLimiter {
    /// A limiter asking the endpoints of `settings` (connected lazily, balanced), counting
    /// into `stats`. Must be called inside a Tokio runtime.
    pub fn new(settings: &RateLimiting, stats: Arc<RateLimitStats>) -> Self {
        let endpoints = settings
            .endpoints
            .iter()
            .map(|uri| tonic::transport::Endpoint::from(uri.clone()).tcp_nodelay(true));
        Self {
            client: RateLimitServiceClient::new(Channel::balance_list(endpoints)),
            domain: settings.domain.as_str().into(),
            timeout: settings.timeout,
            failure_mode: settings.failure_mode,
            breaker: CircuitBreaker::observed(
                settings.breaker.clone(),
                "ratelimit-svc",
                &settings
                    .endpoints
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            stats,
        }
    }

    async fn decide(&self, caller: &Caller, group: &str) -> Decision {
        let permit = match self.breaker.try_acquire() {
            Ok(permit) => permit,
            Err(rejected) => {
                RateLimitStats::bump(&self.stats.breaker_rejections);
                return self.undecided(rejected.retry_after);
            }
        };
        let request = RateLimitRequest {
            domain: self.domain.to_string(),
            descriptors: descriptors(caller, group),
            hits_addend: 1,
        };
        let mut request = tonic::Request::new(request);
        // ratelimit-svc's span joins the caller's trace.
        service_kit::telemetry::inject_metadata(&tracing::Span::current(), request.metadata_mut());
        let mut client = self.client.clone();
        let answer = tokio::time::timeout(self.timeout, client.should_rate_limit(request)).await;
        let response = match answer {
            Ok(Ok(response)) => {
                permit.success();
                response.into_inner()
            }
            Ok(Err(status)) => {
                if dependency_failure(status.code()) {
                    permit.failure();
                } else {
                    permit.success();
                }
                RateLimitStats::bump(&self.stats.errors);
                tracing::warn!(code = ?status.code(), message = status.message(), "rate limit decision failed");
                return self.undecided(Duration::ZERO);
            }
            Err(_) => {
                permit.failure();
                RateLimitStats::bump(&self.stats.errors);
                tracing::debug!(timeout = ?self.timeout, "rate limit decision timed out");
                return self.undecided(Duration::ZERO);
            }
        };
        match verdict(&response) {
            Verdict::Allowed(quota) => {
                RateLimitStats::bump(&self.stats.allowed);
                crate::metrics::ratelimit_decision("ok");
                Decision::Admit(quota)
            }
            Verdict::Refused(quota) => {
                RateLimitStats::bump(&self.stats.refused);
                crate::metrics::ratelimit_decision("over_limit");
                Decision::Refuse(refusal(&quota, caller, group))
            }
        }
    }

    /// The failure mode's answer.
    fn undecided(&self, retry_after: Duration) -> Decision {
        match self.failure_mode {
            FailureMode::Open => {
                RateLimitStats::bump(&self.stats.fail_open);
                crate::metrics::ratelimit_decision("fail_open");
                Decision::Admit(None)
            }
            FailureMode::Closed => {
                RateLimitStats::bump(&self.stats.fail_closed);
                crate::metrics::ratelimit_decision("fail_closed");
                Decision::Refuse(unavailable(retry_after))
            }
        }
    }
}

/// Adds [`RateLimit`] to a stack.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Option<RateLimiter>,
}

impl RateLimitLayer {
    /// Limits with `limiter`; `None` (rate limiting off) lets every call through.
    pub fn new(limiter: Option<RateLimiter>) -> Self {
        Self { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Lets a caller's call through only when ratelimit-svc admits it (or cannot decide and
/// the failure mode is open); puts the figures on whatever the call is answered.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Option<RateLimiter>,
}

impl<S> Service<Request<tonic::body::Body>> for RateLimit<S>
where
    S: Service<
            Request<tonic::body::Body>,
            Response = Response<tonic::body::Body>,
            Error = Infallible,
            Future = GrpcFuture,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GrpcFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let Some(limiter) = self.limiter.clone() else {
            return self.inner.call(request);
        };
        let Some(caller) = request.extensions().get::<Caller>().cloned() else {
            // Authenticate always runs first; without a caller nothing may go upstream.
            return Box::pin(std::future::ready(Ok(status_response(
                &Status::unauthenticated("missing API key"),
            ))));
        };
        let group = method_group(request.uri().path());
        // The service that was polled ready goes with the call; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match limiter.decide(&caller, group).await {
                Decision::Admit(quota) => {
                    let mut response = inner.call(request).await?;
                    if let Some(quota) = quota {
                        insert_quota_headers(response.headers_mut(), &quota);
                    }
                    Ok(response)
                }
                Decision::Refuse(status) => Ok(status_response(&status)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::RateLimit as PbLimit;
    use envoy_types::pb::google::protobuf::Duration as PbDuration;
    use tonic_types::StatusExt as _;

    use super::*;

    fn caller() -> Caller {
        Caller {
            principal: "acme".to_owned(),
            scopes: BTreeSet::from(["payments:read".to_owned()]),
            tier: "standard".to_owned(),
        }
    }

    fn status(code: RlsCode, limit: u32, remaining: u32, reset_millis: u64) -> DescriptorStatus {
        let reset = Duration::from_millis(reset_millis);
        DescriptorStatus {
            code: code as i32,
            current_limit: Some(PbLimit {
                name: String::new(),
                requests_per_unit: limit,
                unit: 0,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(PbDuration {
                seconds: i64::try_from(reset.as_secs()).unwrap_or(0),
                nanos: i32::try_from(reset.subsec_nanos()).unwrap_or(0),
            }),
            quota: None,
        }
    }

    fn response(overall: RlsCode, statuses: Vec<DescriptorStatus>) -> RateLimitResponse {
        RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..RateLimitResponse::default()
        }
    }

    #[test]
    fn descriptors_name_the_principal_and_its_method_group_by_tier() {
        let group = method_group("/paysuite.payments.v1.PaymentService/CreatePayment");
        assert_eq!(group, "payments:write");
        assert_eq!(
            method_group("/paysuite.payments.v1.PaymentService/WatchBalance"),
            "payments:read"
        );
        let built: Vec<Vec<(String, String)>> = descriptors(&caller(), group)
            .into_iter()
            .map(|descriptor| {
                descriptor
                    .entries
                    .into_iter()
                    .map(|entry| (entry.key, entry.value))
                    .collect()
            })
            .collect();
        let pair = |key: &str, value: &str| (key.to_owned(), value.to_owned());
        assert_eq!(
            built,
            vec![
                vec![pair("tier", "standard"), pair("principal", "acme")],
                vec![
                    pair("tier", "standard"),
                    pair("principal", "acme"),
                    pair("group", "payments:write")
                ],
            ]
        );
    }

    #[test]
    fn resets_round_up_to_whole_seconds_and_retry_after_is_never_zero() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(86_400)), 86_400);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(2500)), 3);
    }

    #[test]
    fn the_most_restrictive_descriptor_speaks() {
        // Fewest left wins; descriptors without a limit (no rule) are ignored.
        let answer = response(
            RlsCode::Ok,
            vec![
                status(RlsCode::Ok, 100, 40, 30_000),
                DescriptorStatus {
                    code: RlsCode::Ok as i32,
                    limit_remaining: u32::MAX,
                    ..DescriptorStatus::default()
                },
                status(RlsCode::Ok, 10, 3, 1_500),
            ],
        );
        assert_eq!(
            verdict(&answer),
            Verdict::Allowed(Some(Quota {
                limit: 10,
                remaining: 3,
                reset: Duration::from_millis(1_500),
                descriptor: 2,
            }))
        );
        // Equal remaining: the one resetting last.
        let answer = response(
            RlsCode::Ok,
            vec![
                status(RlsCode::Ok, 5, 2, 1_000),
                status(RlsCode::Ok, 9, 2, 9_000),
            ],
        );
        assert!(matches!(verdict(&answer), Verdict::Allowed(Some(q)) if q.descriptor == 1));
        // No rule anywhere: admitted without figures.
        let answer = response(RlsCode::Ok, vec![DescriptorStatus::default()]);
        assert_eq!(verdict(&answer), Verdict::Allowed(None));
        // Refused: only over descriptors count, the one resetting last.
        let answer = response(
            RlsCode::OverLimit,
            vec![
                status(RlsCode::Ok, 100, 0, 90_000),
                status(RlsCode::OverLimit, 3, 0, 4_200),
                status(RlsCode::OverLimit, 10, 0, 700),
            ],
        );
        assert_eq!(
            verdict(&answer),
            Verdict::Refused(Quota {
                limit: 3,
                remaining: 0,
                reset: Duration::from_millis(4_200),
                descriptor: 1,
            })
        );
    }

    #[test]
    fn headers_carry_the_figures_as_integers() {
        let mut headers = HeaderMap::new();
        insert_quota_headers(
            &mut headers,
            &Quota {
                limit: 20,
                remaining: 7,
                reset: Duration::from_millis(59_001),
                descriptor: 0,
            },
        );
        let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(value(HEADER_LIMIT), Some("20"));
        assert_eq!(value(HEADER_REMAINING), Some("7"));
        assert_eq!(value(HEADER_RESET), Some("60"));
    }

    #[test]
    fn a_refusal_is_resource_exhausted_with_quota_failure_retry_info_and_retry_after() {
        let quota = Quota {
            limit: 3,
            remaining: 0,
            reset: Duration::from_millis(1_200),
            descriptor: 1,
        };
        let status = refusal(&quota, &caller(), "payments:write");
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let violations = details
            .quota_failure()
            .map(|failure| failure.violations.clone())
            .unwrap_or_default();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].subject, "principal:acme/group:payments:write");
        assert!(violations[0].description.contains("tier standard"));
        assert_eq!(
            details.retry_info().and_then(|info| info.retry_delay),
            Some(Duration::from_secs(2))
        );
        // The metadata survives the trip into a trailers-only response.
        let response = status_response(&status);
        let value = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(value("grpc-status").as_deref(), Some("8"));
        assert_eq!(value(HEADER_RETRY_AFTER).as_deref(), Some("2"));
        assert_eq!(value(HEADER_LIMIT).as_deref(), Some("3"));
        assert_eq!(value(HEADER_REMAINING).as_deref(), Some("0"));
        assert_eq!(value(HEADER_RESET).as_deref(), Some("2"));
    }

    #[test]
    fn fail_closed_is_unavailable_with_a_reason() {
        let status = unavailable(Duration::ZERO);
        assert_eq!(status.code(), Code::Unavailable);
        let details = status.get_error_details();
        assert_eq!(
            details.error_info().map(|info| info.reason.as_str()),
            Some(REASON_UNAVAILABLE)
        );
        assert_eq!(
            details.retry_info().and_then(|info| info.retry_delay),
            Some(FAIL_CLOSED_RETRY_AFTER)
        );
    }
}
