//! Envoy's rate limit service, `envoy.service.ratelimit.v3.RateLimitService`: the edge
//! between Envoy's protobuf types and [`crate::rules`] + [`crate::guard`].
//!
//! `ShouldRateLimit` answers one status per descriptor, in request order:
//! - no rule (unknown domain, no match, or a rule replaced by another matched rule): OK
//!   without a limit, as envoyproxy/ratelimit does;
//! - `unlimited`: OK with `limit_remaining` = u32::MAX, nothing counted;
//! - a limit: the descriptor's hits are spent in its counter (per-descriptor
//!   `hits_addend` when set, 0 meaning a peek; else the request's, 0 counting as 1). Once
//!   one descriptor is over its limit, later descriptors are only peeked, so a refused
//!   request spends nothing more. `shadow_mode` descriptors are counted and reported but
//!   answer OK; `quota_mode` descriptors make the request over only when all of them are.
//!
//! A peek (hits 0) reports OVER_LIMIT when not even one more request would be admitted.
//! Envoy's `is_negative_hits` (refilling a counter) is not supported: such a descriptor
//! is only peeked, it never spends.
//!
//! This service carries no paysuite identity: Envoy and Istio call it as they call
//! envoyproxy/ratelimit (the identity check applies only to paysuite RPCs).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as PbUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit as PbRateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use service_kit::validation::Violations;
use tonic::{Request, Response, Status};

use crate::guard::{FailureMode, Limiter};
use crate::limiter::{Algorithm, Limit};
use crate::rules::{Domain, Quota, Rules, Unit};

/// The gRPC server of Envoy's rate limit service.
pub(crate) fn server(
    limiter: Limiter,
    rules: Arc<Rules>,
    failure_mode: FailureMode,
) -> RateLimitServiceServer<EnvoyRateLimit> {
    RateLimitServiceServer::new(EnvoyRateLimit {
        limiter,
        rules,
        failure_mode,
    })
}

/// `envoy.service.ratelimit.v3.RateLimitService`.
#[derive(Debug, Clone)]
pub(crate) struct EnvoyRateLimit {
    limiter: Limiter,
    rules: Arc<Rules>,
    /// For domains that set no `failure_mode`.
    failure_mode: FailureMode,
}

/// What one descriptor asks for.
#[derive(Debug)]
enum Plan {
    /// No rule applies.
    NoLimit,
    /// An unlimited rule, and the names it replaces.
    Unlimited(Vec<String>),
    /// A limit to check.
    Limited(Check),
}

#[derive(Debug)]
struct Check {
    /// The limit as the response reports it.
    reported: PbRateLimit,
    /// What the store enforces; `None`: nothing is ever admitted.
    limit: Option<Limit>,
    unit: Unit,
    counter_key: String,
    /// The hits this descriptor spends (0 peeks).
    hits: u64,
    shadow_mode: bool,
    quota_mode: bool,
    /// The rule's name and the names it replaces (empty for limit overrides).
    name: String,
    replaces: Vec<String>,
}

impl EnvoyRateLimit {
    /// Validates the request and resolves every descriptor's rule.
    fn plan(&self, request: &RateLimitRequest) -> Result<Vec<Plan>, Status> {
        let mut violations = Violations::new();
        if request.domain.is_empty() {
            violations.add("domain", "is required");
        }
        if request.descriptors.is_empty() {
            violations.add("descriptors", "must hold at least one descriptor");
        }
        for (index, descriptor) in request.descriptors.iter().enumerate() {
            if descriptor.entries.is_empty() {
                violations.add(
                    format!("descriptors[{index}].entries"),
                    "must hold at least one entry",
                );
            }
            for (entry_index, entry) in descriptor.entries.iter().enumerate() {
                if entry.key.is_empty() {
                    violations.add(
                        format!("descriptors[{index}].entries[{entry_index}].key"),
                        "is required",
                    );
                }
            }
            if let Some(limit) = &descriptor.limit
                && override_unit(limit.unit).is_none()
            {
                violations.add(
                    format!("descriptors[{index}].limit.unit"),
                    "must be SECOND, MINUTE, HOUR, DAY, WEEK, MONTH or YEAR",
                );
            }
        }
        violations.into_result()?;
        let Some(domain) = self.rules.domain(&request.domain) else {
            return Ok(request.descriptors.iter().map(|_| Plan::NoLimit).collect());
        };
        let mut plans: Vec<Plan> = request
            .descriptors
            .iter()
            .map(|descriptor| plan_descriptor(domain, descriptor, request.hits_addend))
            .collect();
        // A matched rule that names others makes them not apply (even when it is
        // unlimited or replaced itself, as in envoyproxy/ratelimit).
        let replaced: Vec<String> = plans
            .iter()
            .flat_map(|plan| match plan {
                Plan::Limited(check) => check.replaces.as_slice(),
                Plan::Unlimited(replaces) => replaces.as_slice(),
                Plan::NoLimit => &[],
            })
            .cloned()
            .collect();
        for plan in &mut plans {
            if let Plan::Limited(check) = plan
                && !check.name.is_empty()
                && replaced.contains(&check.name)
            {
                *plan = Plan::NoLimit;
            }
        }
        Ok(plans)
    }
}

fn entries(descriptor: &RateLimitDescriptor) -> Vec<(&str, &str)> {
    descriptor
        .entries
        .iter()
        .map(|entry| (entry.key.as_str(), entry.value.as_str()))
        .collect()
}

/// The hits a descriptor spends: its own `hits_addend` when set (0 peeks), else the
/// request's (0 counts as 1). Capped at u32::MAX, above any limit (requests_per_unit is
/// a u32), so the algorithms' sums never overflow.
fn hits(descriptor: &RateLimitDescriptor, request_hits: u32) -> u64 {
    if descriptor.is_negative_hits {
        return 0;
    }
    match &descriptor.hits_addend {
        Some(hits) => hits.value.min(u64::from(u32::MAX)),
        None => u64::from(request_hits.max(1)),
    }
}

fn plan_descriptor(domain: &Domain, descriptor: &RateLimitDescriptor, request_hits: u32) -> Plan {
    let entries = entries(descriptor);
    let hits = hits(descriptor, request_hits);
    // Envoy's limit override replaces the configured rule, and is never in shadow mode.
    if let Some(limit) = &descriptor.limit {
        let Some(unit) = override_unit(limit.unit) else {
            return Plan::NoLimit;
        };
        return Plan::Limited(Check {
            reported: PbRateLimit {
                name: String::new(),
                requests_per_unit: limit.requests_per_unit,
                unit: pb_unit(unit) as i32,
            },
            limit: (limit.requests_per_unit > 0).then(|| Limit {
                limit: u64::from(limit.requests_per_unit),
                window: unit.window(),
                algorithm: Algorithm::FixedWindow,
            }),
            unit,
            counter_key: domain.override_counter_key(&entries),
            hits,
            shadow_mode: false,
            quota_mode: false,
            name: String::new(),
            replaces: Vec::new(),
        });
    }
    let Some(matched) = domain.find(&entries) else {
        return Plan::NoLimit;
    };
    let rule = matched.rule;
    match rule.quota {
        Quota::Unlimited => Plan::Unlimited(rule.replaces.clone()),
        Quota::PerUnit {
            requests_per_unit,
            unit,
            ..
        } => Plan::Limited(Check {
            reported: PbRateLimit {
                name: rule.name.clone(),
                requests_per_unit,
                unit: pb_unit(unit) as i32,
            },
            limit: rule.limit(),
            unit,
            counter_key: matched.counter_key,
            hits,
            shadow_mode: rule.shadow_mode,
            quota_mode: rule.quota_mode,
            name: rule.name.clone(),
            replaces: rule.replaces.clone(),
        }),
    }
}

fn override_unit(unit: i32) -> Option<Unit> {
    Some(match PbUnit::try_from(unit).ok()? {
        PbUnit::Unknown => return None,
        PbUnit::Second => Unit::Second,
        PbUnit::Minute => Unit::Minute,
        PbUnit::Hour => Unit::Hour,
        PbUnit::Day => Unit::Day,
        PbUnit::Week => Unit::Week,
        PbUnit::Month => Unit::Month,
        PbUnit::Year => Unit::Year,
    })
}

fn pb_unit(unit: Unit) -> PbUnit {
    match unit {
        Unit::Second => PbUnit::Second,
        Unit::Minute => PbUnit::Minute,
        Unit::Hour => PbUnit::Hour,
        Unit::Day => PbUnit::Day,
        Unit::Week => PbUnit::Week,
        Unit::Month => PbUnit::Month,
        Unit::Year => PbUnit::Year,
    }
}

fn pb_duration(duration: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// Until the current fixed window of `unit` ends, on this host's clock (for limits that
/// refuse everything and so never ask the store).
fn until_window_end(unit: Unit) -> Duration {
    let window = unit.window().as_micros();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    let left = window - now % window;
    Duration::from_micros(u64::try_from(left).unwrap_or(u64::MAX))
}

#[tonic::async_trait]
impl RateLimitService for EnvoyRateLimit {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        let plans = self.plan(&request)?;
        let failure_mode = self
            .rules
            .domain(&request.domain)
            .and_then(|domain| domain.failure_mode)
            .unwrap_or(self.failure_mode);
        let mut statuses = Vec::with_capacity(plans.len());
        // Once a descriptor is over, the request is refused: later ones only peek.
        let mut refused = false;
        let mut over = 0;
        let mut quota_descriptors = 0;
        let mut quota_over = 0;
        for plan in plans {
            let check = match plan {
                Plan::NoLimit => {
                    statuses.push(DescriptorStatus {
                        code: Code::Ok as i32,
                        ..DescriptorStatus::default()
                    });
                    continue;
                }
                Plan::Unlimited(_) => {
                    statuses.push(DescriptorStatus {
                        code: Code::Ok as i32,
                        limit_remaining: u32::MAX,
                        ..DescriptorStatus::default()
                    });
                    continue;
                }
                Plan::Limited(check) => check,
            };
            let (is_over, remaining, until_reset) = match &check.limit {
                None => (true, 0, until_window_end(check.unit)),
                Some(limit) => {
                    let peek_only = refused && check.hits > 0;
                    let spend = if peek_only { 0 } else { check.hits };
                    let decision = self
                        .limiter
                        .decide(&check.counter_key, limit, spend, failure_mode)
                        .await
                        .decision;
                    let is_over = if peek_only {
                        decision.remaining < check.hits
                    } else {
                        !decision.allowed
                    };
                    let until_reset = if is_over {
                        decision.retry_after
                    } else {
                        decision.reset_after
                    };
                    (is_over, decision.remaining, until_reset)
                }
            };
            if check.quota_mode {
                quota_descriptors += 1;
            }
            let code = if is_over && !check.shadow_mode {
                if check.quota_mode {
                    quota_over += 1;
                } else {
                    over += 1;
                    refused = true;
                }
                Code::OverLimit
            } else {
                Code::Ok
            };
            statuses.push(DescriptorStatus {
                code: code as i32,
                current_limit: Some(check.reported),
                limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                duration_until_reset: Some(pb_duration(until_reset)),
                quota: None,
            });
        }
        let overall = if over > 0 || (quota_descriptors > 0 && quota_over == quota_descriptors) {
            Code::OverLimit
        } else {
            Code::Ok
        };
        // Only configured domains become labels.
        let domain = if self.rules.domain(&request.domain).is_some() {
            request.domain.as_str()
        } else {
            crate::metrics::UNKNOWN_DOMAIN
        };
        crate::metrics::decision(domain, overall == Code::OverLimit);
        Ok(Response::new(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..RateLimitResponse::default()
        }))
    }
}
