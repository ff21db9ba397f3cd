//! The sandbox acquirer served standalone as `paysuite.acquirer.v1` (the
//! `sandbox-acquirer` binary): the same logic as the in-process sandbox, with its
//! switches (`SandboxControlService/SetFaults`) and per-operation counters, for fault
//! tests and demos where the acquirer must be a separate process that can be slowed,
//! failed, frozen or killed.
//!
//! It stands for the outside world, which authenticates its callers by its own means
//! (mTLS, API keys); it does not check paysuite identity tokens.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use proto::acquirer::v1 as pb;
use proto::acquirer::v1::acquirer_service_server::{AcquirerService, AcquirerServiceServer};
use proto::acquirer::v1::sandbox_control_service_server::{
    SandboxControlService, SandboxControlServiceServer,
};
use serde::{Deserialize, Serialize};
use service_kit::validation::{Violations, non_negative_duration};
use service_kit::{ConfigError, Env, ServerLimits, ServiceSet};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::sandbox::{FailureMode, Sandbox, SandboxSettings};
use super::{Acquirer, AcquirerError, AuthorizeRequest, Operation, OperationKind, OperationStatus};
use crate::domain::card::{CardDetails, Cvc, Pan};
use crate::domain::{Currency, Money};

/// The default listen address of the standalone sandbox.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50054";

/// The standalone sandbox's settings.
#[derive(Debug, Clone)]
pub struct SandboxServerConfig {
    /// `LISTEN_ADDR`.
    pub listen_addr: SocketAddr,
    /// `SANDBOX_SLOW_ANSWER`: how long the slow test card takes.
    pub slow_answer: Duration,
    /// Server hardening.
    pub limits: ServerLimits,
}

impl SandboxServerConfig {
    /// Reads `LISTEN_ADDR`, `SANDBOX_SLOW_ANSWER` and the `GRPC_*` limits.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let default_addr: SocketAddr = DEFAULT_LISTEN_ADDR
            .parse()
            .map_err(|err| ConfigError::new("LISTEN_ADDR", err))?;
        Ok(Self {
            listen_addr: env.parse_or("LISTEN_ADDR", default_addr)?,
            slow_answer: env.duration_or(
                crate::config::ENV_SANDBOX_SLOW_ANSWER,
                Duration::from_secs(30),
            )?,
            limits: ServerLimits::from_env(env)?,
        })
    }
}

/// Serves the sandbox on `listener` until `shutdown` completes.
pub async fn run<F>(
    listener: TcpListener,
    config: SandboxServerConfig,
    shutdown: F,
) -> Result<(), service_kit::ServeError>
where
    F: Future<Output = ()> + Send,
{
    let sandbox = Sandbox::new(SandboxSettings {
        slow_answer: config.slow_answer,
        ..SandboxSettings::default()
    });
    let api = SandboxApi { sandbox };
    let services = ServiceSet::new("sandbox-acquirer")
        .add_service(AcquirerServiceServer::new(api.clone()))
        .add_service(SandboxControlServiceServer::new(api));
    service_kit::serve(listener, services, &config.limits, shutdown).await
}

#[derive(Debug, Clone)]
struct SandboxApi {
    sandbox: Sandbox,
}

/// ListOperations page token: the offset of the next operation, bound to the filter.
#[derive(Serialize, Deserialize)]
struct OperationsPageToken {
    reference: String,
    offset: usize,
}

fn operation_id(violations: &mut Violations, field: &str, id: &str) {
    if id.is_empty() || id.len() > 128 {
        violations.add(field, "must be 1–128 characters");
    }
}

fn amount(violations: &mut Violations, field: &str, amount: Option<&pb::Amount>) -> Option<Money> {
    let Some(amount) = amount else {
        violations.add(field, "is required");
        return None;
    };
    let currency = violations.check(
        &format!("{field}.currency"),
        Currency::parse(&amount.currency),
    )?;
    if amount.amount_minor <= 0 {
        violations.add(format!("{field}.amount_minor"), "must be greater than zero");
        return None;
    }
    Some(Money::new(amount.amount_minor, currency))
}

/// An acquirer answer as a gRPC response: outcomes are answers; errors are statuses.
fn answer(result: Result<Operation, AcquirerError>) -> Result<pb::Operation, Status> {
    match result {
        Ok(operation) => Ok(to_pb(&operation)),
        Err(AcquirerError::Unavailable(reason)) => Err(Status::unavailable(reason)),
        Err(AcquirerError::Timeout) => Err(Status::deadline_exceeded("no answer in time")),
        Err(AcquirerError::Rejected(reason)) => Err(Status::failed_precondition(reason)),
    }
}

/// The wire form of an operation.
pub fn to_pb(operation: &Operation) -> pb::Operation {
    let (status, decline_code) = match &operation.status {
        OperationStatus::Approved => (pb::OperationStatus::Approved, String::new()),
        OperationStatus::Declined { code } => (pb::OperationStatus::Declined, code.clone()),
        OperationStatus::Failed { code } => (pb::OperationStatus::Failed, code.clone()),
    };
    pb::Operation {
        operation_id: operation.operation_id.clone(),
        kind: kind_to_pb(operation.kind) as i32,
        status: status as i32,
        amount: Some(pb::Amount {
            amount_minor: operation.amount.amount_minor(),
            currency: operation.amount.currency().code().to_owned(),
        }),
        parent_operation_id: operation.parent_operation_id.clone().unwrap_or_default(),
        reference: operation.reference.clone(),
        decline_code,
        create_time: None,
    }
}

fn kind_to_pb(kind: OperationKind) -> pb::OperationKind {
    match kind {
        OperationKind::Authorize => pb::OperationKind::Authorize,
        OperationKind::Capture => pb::OperationKind::Capture,
        OperationKind::Void => pb::OperationKind::Void,
        OperationKind::Refund => pb::OperationKind::Refund,
    }
}

#[tonic::async_trait]
impl AcquirerService for SandboxApi {
    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        operation_id(&mut violations, "operation_id", &request.operation_id);
        let money = amount(&mut violations, "amount", request.amount.as_ref());
        let card = match request.card.as_ref() {
            None => {
                violations.add("card", "is required");
                None
            }
            Some(card) => {
                let pan = violations.check("card.number", Pan::parse(&card.number));
                let cvc = if card.cvc.is_empty() {
                    None
                } else {
                    violations.check("card.cvc", Cvc::parse(&card.cvc))
                };
                pan.map(|pan| CardDetails {
                    pan,
                    exp_month: u8::try_from(card.exp_month).unwrap_or(0),
                    exp_year: u16::try_from(card.exp_year).unwrap_or(0),
                    cvc,
                })
            }
        };
        violations.into_result()?;
        let (Some(money), Some(card)) = (money, card) else {
            return Err(Status::internal("validation passed without values"));
        };
        let result = self
            .sandbox
            .authorize(AuthorizeRequest {
                operation_id: &request.operation_id,
                reference: &request.reference,
                amount: money,
                card: &card,
            })
            .await;
        Ok(Response::new(pb::AuthorizeResponse {
            operation: Some(answer(result)?),
        }))
    }

    async fn capture(
        &self,
        request: Request<pb::CaptureRequest>,
    ) -> Result<Response<pb::CaptureResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        operation_id(&mut violations, "operation_id", &request.operation_id);
        operation_id(
            &mut violations,
            "authorization_id",
            &request.authorization_id,
        );
        let money = amount(&mut violations, "amount", request.amount.as_ref());
        violations.into_result()?;
        let Some(money) = money else {
            return Err(Status::internal("validation passed without values"));
        };
        let result = self
            .sandbox
            .capture(&request.operation_id, &request.authorization_id, money)
            .await;
        Ok(Response::new(pb::CaptureResponse {
            operation: Some(answer(result)?),
        }))
    }

    async fn void(
        &self,
        request: Request<pb::VoidRequest>,
    ) -> Result<Response<pb::VoidResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        operation_id(&mut violations, "operation_id", &request.operation_id);
        operation_id(
            &mut violations,
            "authorization_id",
            &request.authorization_id,
        );
        violations.into_result()?;
        let result = self
            .sandbox
            .void(&request.operation_id, &request.authorization_id)
            .await;
        Ok(Response::new(pb::VoidResponse {
            operation: Some(answer(result)?),
        }))
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        operation_id(&mut violations, "operation_id", &request.operation_id);
        operation_id(&mut violations, "capture_id", &request.capture_id);
        let money = amount(&mut violations, "amount", request.amount.as_ref());
        violations.into_result()?;
        let Some(money) = money else {
            return Err(Status::internal("validation passed without values"));
        };
        let result = self
            .sandbox
            .refund(&request.operation_id, &request.capture_id, money)
            .await;
        Ok(Response::new(pb::RefundResponse {
            operation: Some(answer(result)?),
        }))
    }

    async fn get_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::GetOperationResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        operation_id(&mut violations, "operation_id", &request.operation_id);
        violations.into_result()?;
        match self.sandbox.get_operation(&request.operation_id).await {
            Ok(Some(operation)) => Ok(Response::new(pb::GetOperationResponse {
                operation: Some(to_pb(&operation)),
            })),
            Ok(None) => Err(Status::not_found(format!(
                "no operation {}",
                request.operation_id
            ))),
            Err(err) => Err(answer(Err(err))
                .err()
                .unwrap_or_else(|| Status::internal("lookup failed"))),
        }
    }

    async fn list_operations(
        &self,
        request: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = match request.page_size {
            0 => 100,
            size @ 1..=1000 => usize::try_from(size).unwrap_or(100),
            _ => {
                violations.add("page_size", "must be between 0 and 1000");
                100
            }
        };
        let offset = if request.page_token.is_empty() {
            0
        } else {
            match decode_token(&request.page_token) {
                Some(token) if token.reference == request.reference => token.offset,
                _ => {
                    violations.add("page_token", "is not a page token of this request");
                    0
                }
            }
        };
        violations.into_result()?;
        let reference = (!request.reference.is_empty()).then_some(request.reference.as_str());
        let mut operations = self
            .sandbox
            .list_operations(reference, offset, limit + 1)
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        let more = operations.len() > limit;
        operations.truncate(limit);
        let next_page_token = if more {
            encode_token(&OperationsPageToken {
                reference: request.reference.clone(),
                offset: offset + limit,
            })
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListOperationsResponse {
            operations: operations.iter().map(to_pb).collect(),
            next_page_token,
        }))
    }
}

fn encode_token(token: &OperationsPageToken) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(token).unwrap_or_default())
}

fn decode_token(token: &str) -> Option<OperationsPageToken> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[tonic::async_trait]
impl SandboxControlService for SandboxApi {
    async fn set_faults(
        &self,
        request: Request<pb::SetFaultsRequest>,
    ) -> Result<Response<pb::SetFaultsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let failure_mode = match pb::FailureMode::try_from(request.failure_mode) {
            Ok(pb::FailureMode::Unspecified | pb::FailureMode::None) => FailureMode::None,
            Ok(pb::FailureMode::Unavailable) => FailureMode::Unavailable,
            Ok(pb::FailureMode::Timeout) => FailureMode::Timeout,
            Ok(pb::FailureMode::Error) => FailureMode::Error,
            Err(_) => {
                violations.add("failure_mode", "is not a failure mode");
                FailureMode::None
            }
        };
        if request.failure_rate_ppm > 1_000_000 {
            violations.add("failure_rate_ppm", "must be at most 1000000");
        }
        let added_latency = match request.added_latency {
            None => Duration::ZERO,
            Some(latency) => match non_negative_duration(latency) {
                Some(latency) if latency <= Duration::from_secs(600) => latency,
                _ => {
                    violations.add("added_latency", "must be between 0 and 600s");
                    Duration::ZERO
                }
            },
        };
        violations.into_result()?;
        let current = self.sandbox.settings();
        self.sandbox.set_settings(SandboxSettings {
            added_latency,
            failure_mode,
            failure_rate_ppm: request.failure_rate_ppm,
            slow_answer: current.slow_answer,
        });
        tracing::info!(
            ?failure_mode,
            failure_rate_ppm = request.failure_rate_ppm,
            ?added_latency,
            "sandbox faults set"
        );
        Ok(Response::new(pb::SetFaultsResponse {}))
    }

    async fn get_operation_counters(
        &self,
        request: Request<pb::GetOperationCountersRequest>,
    ) -> Result<Response<pb::GetOperationCountersResponse>, Status> {
        let request = request.into_inner();
        let counters = self
            .sandbox
            .counters()
            .into_iter()
            .filter(|(id, _)| request.operation_id.is_empty() || *id == request.operation_id)
            .map(|(operation_id, calls)| pb::OperationCounter {
                operation_id,
                calls: calls
                    .into_iter()
                    .map(|(kind, count)| (kind.to_owned(), count))
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::GetOperationCountersResponse { counters }))
    }
}
