//! The gRPC edge of ratelimit-svc: the only module that sees protobuf types.

use std::time::Duration;

use proto::ratelimit::v1 as pb;
use proto::ratelimit::v1::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use service_kit::ServiceSet;
use service_kit::validation::{Violations, non_negative_duration};
use tonic::{Request, Response, Status};

use crate::guard::{FailureMode, Limiter, Outcome, Source};
use crate::limiter::{Algorithm, Limit};

/// The longest window a limit may have.
const MAX_WINDOW: Duration = Duration::from_secs(31 * 24 * 3600);
/// The longest key.
const MAX_KEY_BYTES: usize = 512;

/// Every service ratelimit-svc serves: ours, and Envoy's (whose descriptors are not
/// ours, so reflection does not list it).
pub(crate) fn services(
    limiter: Limiter,
    failure_mode: FailureMode,
    sliding_window_max_limit: u64,
    envoy_rules: std::sync::Arc<crate::rules::Rules>,
) -> ServiceSet {
    ServiceSet::new("ratelimit-svc")
        .add_service(RateLimitServiceServer::new(RateLimitApi {
            limiter: limiter.clone(),
            failure_mode,
            sliding_window_max_limit,
        }))
        .add_unreflected_service(crate::envoy::server(limiter, envoy_rules, failure_mode))
}

/// `paysuite.ratelimit.v1.RateLimitService`.
#[derive(Debug, Clone)]
struct RateLimitApi {
    limiter: Limiter,
    /// What a Check gets when the store cannot decide.
    failure_mode: FailureMode,
    sliding_window_max_limit: u64,
}

impl RateLimitApi {
    fn parse(
        &self,
        violations: &mut Violations,
        key: &str,
        limit: Option<&pb::Limit>,
    ) -> Option<Limit> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            violations.add("key", format!("must be 1–{MAX_KEY_BYTES} bytes"));
        }
        let Some(limit) = limit else {
            violations.add("limit", "is required");
            return None;
        };
        let algorithm = match pb::Algorithm::try_from(limit.algorithm) {
            Ok(pb::Algorithm::Unspecified | pb::Algorithm::SlidingWindow) => {
                Some(Algorithm::SlidingWindow)
            }
            Ok(pb::Algorithm::Gcra) => Some(Algorithm::Gcra),
            Ok(pb::Algorithm::FixedWindow) => Some(Algorithm::FixedWindow),
            Err(_) => {
                violations.add("limit.algorithm", "is not an algorithm");
                None
            }
        };
        if limit.limit == 0 {
            violations.add("limit.limit", "must be at least 1");
        } else if algorithm == Some(Algorithm::SlidingWindow)
            && limit.limit > self.sliding_window_max_limit
        {
            violations.add(
                "limit.limit",
                format!(
                    "the exact sliding window takes at most {} (use GCRA or a fixed window above that)",
                    self.sliding_window_max_limit
                ),
            );
        }
        let window = match limit.window.and_then(non_negative_duration) {
            Some(window) if !window.is_zero() && window <= MAX_WINDOW => Some(window),
            _ => {
                violations.add("limit.window", "must be between 1µs and 31 days");
                None
            }
        };
        Some(Limit {
            limit: limit.limit,
            window: window?,
            algorithm: algorithm?,
        })
    }
}

fn decision(outcome: &Outcome) -> pb::Decision {
    let decision = &outcome.decision;
    let proto_duration = |d: Duration| prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    };
    pb::Decision {
        allowed: decision.allowed,
        limit: decision.limit,
        remaining: decision.remaining,
        reset_after: Some(proto_duration(decision.reset_after)),
        retry_after: Some(proto_duration(decision.retry_after)),
        decide_time: Some(prost_types::Timestamp {
            seconds: decision.decided_at_micros.div_euclid(1_000_000),
            nanos: i32::try_from(decision.decided_at_micros.rem_euclid(1_000_000) * 1_000)
                .unwrap_or(0),
        }),
        source: match outcome.source {
            Source::Store => pb::DecisionSource::Store,
            Source::Cache => pb::DecisionSource::Cache,
            Source::FailOpen => pb::DecisionSource::FailOpen,
            Source::FailClosed => pb::DecisionSource::FailClosed,
        } as i32,
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitApi {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = self.parse(&mut violations, &request.key, request.limit.as_ref());
        // A check spends at least one unit; a cost of 0 is what Peek is for.
        let cost = request.cost.max(1);
        violations.into_result()?;
        let Some(limit) = limit else {
            return Err(Status::internal("validation passed without values"));
        };
        let decided = self
            .limiter
            .decide(&request.key, &limit, cost, self.failure_mode)
            .await;
        crate::metrics::decision(crate::metrics::API_DOMAIN, !decided.decision.allowed);
        Ok(Response::new(pb::CheckResponse {
            decision: Some(decision(&decided)),
        }))
    }

    async fn peek(
        &self,
        request: Request<pb::PeekRequest>,
    ) -> Result<Response<pb::PeekResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = self.parse(&mut violations, &request.key, request.limit.as_ref());
        violations.into_result()?;
        let Some(limit) = limit else {
            return Err(Status::internal("validation passed without values"));
        };
        let decided = self
            .limiter
            .decide(&request.key, &limit, 0, self.failure_mode)
            .await;
        Ok(Response::new(pb::PeekResponse {
            decision: Some(decision(&decided)),
        }))
    }
}
