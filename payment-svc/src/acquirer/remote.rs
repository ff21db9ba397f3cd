//! The acquirer over gRPC (`paysuite.acquirer.v1`), behind a timeout and a circuit breaker.
//! Each call has a client span (`acquirer.authorize`, …, with the attempt id) whose W3C
//! trace context goes to the acquirer in the request metadata.
//!
//! How answers map, with money safety first — a call that may have reached the acquirer
//! is never reported as "nothing happened" (that would let a retry use a new attempt id
//! and charge twice):
//! - an outcome (approved, declined, failed) is an answer; the breaker counts a success;
//! - the breaker is open, the connection was refused, or the acquirer itself answered
//!   UNAVAILABLE → [`AcquirerError::Unavailable`]: nothing happened;
//! - no answer within the timeout, DEADLINE_EXCEEDED, a connection lost mid-call, or an
//!   internal error → [`AcquirerError::Timeout`]: an unknown outcome, looked up later;
//! - INVALID_ARGUMENT, FAILED_PRECONDITION → [`AcquirerError::Rejected`] (a bug of ours;
//!   the acquirer is healthy, so the breaker counts a success).

use std::error::Error as _;
use std::future::Future;
use std::time::Duration;

use proto::acquirer::v1 as pb;
use proto::acquirer::v1::acquirer_service_client::AcquirerServiceClient;
use service_kit::breaker::{BreakerConfig, CircuitBreaker};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument as _;

use super::{Acquirer, AcquirerError, AuthorizeRequest, Operation, OperationKind, OperationStatus};
use crate::domain::{Currency, Money};

/// The remote connector.
#[derive(Debug, Clone)]
pub struct RemoteAcquirer {
    client: AcquirerServiceClient<Channel>,
    timeout: Duration,
    breaker: CircuitBreaker,
}

/// A connector that could not be built.
#[derive(Debug, thiserror::Error)]
#[error("ACQUIRER_URL is not a usable gRPC endpoint: {0}")]
pub struct RemoteError(String);

impl RemoteAcquirer {
    /// A connector to `url` (connected lazily), each call bounded by `timeout`.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        timeout: Duration,
        breaker: BreakerConfig,
    ) -> Result<Self, RemoteError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|err| RemoteError(err.to_string()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        // Host and port only: a URL's user info or query could hold a credential.
        let uri = endpoint.uri();
        let address = match (uri.host(), uri.port_u16()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => String::new(),
        };
        let breaker = CircuitBreaker::observed(breaker, "acquirer", &address);
        Ok(Self {
            client: AcquirerServiceClient::new(endpoint.connect_lazy()),
            timeout,
            breaker,
        })
    }

    /// The breaker in front of the acquirer (state, transitions, overrides).
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// One call to the acquirer, in a client span naming the operation and the attempt
    /// id it is for; the span's trace context travels in the request's metadata.
    async fn call<M, T, F, Fut>(
        &self,
        operation: &'static str,
        attempt_id: &str,
        message: M,
        call: F,
    ) -> Result<T, AcquirerError>
    where
        F: FnOnce(AcquirerServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let span = tracing::info_span!(
            "acquirer",
            otel.name = operation,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            acquirer.operation = operation,
            acquirer.attempt_id = attempt_id,
            acquirer.outcome = tracing::field::Empty,
        );
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        service_kit::telemetry::inject_metadata(&span, request.metadata_mut());
        let result = self
            .guarded(call(self.client.clone(), request))
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(_) => "answered",
            Err(AcquirerError::Unavailable(_)) => "unavailable",
            Err(AcquirerError::Timeout) => "unknown",
            Err(AcquirerError::Rejected(_)) => "rejected",
        };
        span.record("acquirer.outcome", outcome);
        if matches!(
            result,
            Err(AcquirerError::Unavailable(_) | AcquirerError::Timeout)
        ) {
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    /// The call behind the breaker and the timeout (see the module docs for the mapping).
    async fn guarded<T, Fut>(&self, call: Fut) -> Result<T, AcquirerError>
    where
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let permit = self
            .breaker
            .try_acquire()
            .map_err(|_| AcquirerError::Unavailable("circuit open".to_owned()))?;
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => {
                permit.failure();
                Err(AcquirerError::Timeout)
            }
            Ok(Ok(response)) => {
                permit.success();
                Ok(response.into_inner())
            }
            Ok(Err(status)) => {
                let error = classify(&status);
                if matches!(error, AcquirerError::Rejected(_)) {
                    permit.success();
                } else {
                    permit.failure();
                }
                Err(error)
            }
        }
    }
}

/// What a failed call means (see the module docs).
pub fn classify(status: &Status) -> AcquirerError {
    match status.code() {
        Code::Unavailable if status.source().is_none() || refused(status) => {
            AcquirerError::Unavailable(status.message().to_owned())
        }
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::OutOfRange => {
            AcquirerError::Rejected(status.message().to_owned())
        }
        _ => AcquirerError::Timeout,
    }
}

/// Whether the call failed because the connection was refused (it never left).
fn refused(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = err.source();
    }
    false
}

fn amount(money: Money) -> pb::Amount {
    pb::Amount {
        amount_minor: money.amount_minor(),
        currency: money.currency().code().to_owned(),
    }
}

fn operation(wire: Option<pb::Operation>) -> Result<Operation, AcquirerError> {
    let wire = wire.ok_or(AcquirerError::Timeout)?;
    let kind = match pb::OperationKind::try_from(wire.kind) {
        Ok(pb::OperationKind::Authorize) => OperationKind::Authorize,
        Ok(pb::OperationKind::Capture) => OperationKind::Capture,
        Ok(pb::OperationKind::Void) => OperationKind::Void,
        Ok(pb::OperationKind::Refund) => OperationKind::Refund,
        _ => return Err(AcquirerError::Rejected("unknown operation kind".to_owned())),
    };
    let status = match pb::OperationStatus::try_from(wire.status) {
        Ok(pb::OperationStatus::Approved) => OperationStatus::Approved,
        Ok(pb::OperationStatus::Declined) => OperationStatus::Declined {
            code: wire.decline_code.clone(),
        },
        Ok(pb::OperationStatus::Failed) => OperationStatus::Failed {
            code: wire.decline_code.clone(),
        },
        _ => {
            return Err(AcquirerError::Rejected(
                "unknown operation status".to_owned(),
            ));
        }
    };
    let wire_amount = wire.amount.unwrap_or_default();
    let currency = Currency::parse(&wire_amount.currency)
        .map_err(|err| AcquirerError::Rejected(err.to_string()))?;
    Ok(Operation {
        operation_id: wire.operation_id,
        kind,
        status,
        amount: Money::new(wire_amount.amount_minor, currency),
        parent_operation_id: (!wire.parent_operation_id.is_empty())
            .then_some(wire.parent_operation_id),
        reference: wire.reference,
    })
}

#[tonic::async_trait]
impl Acquirer for RemoteAcquirer {
    async fn authorize(&self, request: AuthorizeRequest<'_>) -> Result<Operation, AcquirerError> {
        let message = pb::AuthorizeRequest {
            operation_id: request.operation_id.to_owned(),
            reference: request.reference.to_owned(),
            amount: Some(amount(request.amount)),
            card: Some(pb::Card {
                number: request.card.pan.expose_secret().to_owned(),
                exp_month: i32::from(request.card.exp_month),
                exp_year: i32::from(request.card.exp_year),
                cvc: request
                    .card
                    .cvc
                    .as_ref()
                    .map(|cvc| cvc.expose_secret().to_owned())
                    .unwrap_or_default(),
            }),
        };
        let response = self
            .call(
                "acquirer.authorize",
                request.operation_id,
                message,
                |mut client, request| async move { client.authorize(request).await },
            )
            .await?;
        operation(response.operation)
    }

    async fn capture(
        &self,
        operation_id: &str,
        authorization_id: &str,
        money: Money,
    ) -> Result<Operation, AcquirerError> {
        let message = pb::CaptureRequest {
            operation_id: operation_id.to_owned(),
            authorization_id: authorization_id.to_owned(),
            amount: Some(amount(money)),
        };
        let response = self
            .call(
                "acquirer.capture",
                operation_id,
                message,
                |mut client, request| async move { client.capture(request).await },
            )
            .await?;
        operation(response.operation)
    }

    async fn void(
        &self,
        operation_id: &str,
        authorization_id: &str,
    ) -> Result<Operation, AcquirerError> {
        let message = pb::VoidRequest {
            operation_id: operation_id.to_owned(),
            authorization_id: authorization_id.to_owned(),
        };
        let response = self
            .call(
                "acquirer.void",
                operation_id,
                message,
                |mut client, request| async move { client.void(request).await },
            )
            .await?;
        operation(response.operation)
    }

    async fn refund(
        &self,
        operation_id: &str,
        capture_id: &str,
        money: Money,
    ) -> Result<Operation, AcquirerError> {
        let message = pb::RefundRequest {
            operation_id: operation_id.to_owned(),
            capture_id: capture_id.to_owned(),
            amount: Some(amount(money)),
        };
        let response = self
            .call(
                "acquirer.refund",
                operation_id,
                message,
                |mut client, request| async move { client.refund(request).await },
            )
            .await?;
        operation(response.operation)
    }

    async fn get_operation(&self, operation_id: &str) -> Result<Option<Operation>, AcquirerError> {
        let message = pb::GetOperationRequest {
            operation_id: operation_id.to_owned(),
        };
        match self
            .call(
                "acquirer.get_operation",
                operation_id,
                message,
                |mut client, request| async move { client.get_operation(request).await },
            )
            .await
        {
            Ok(response) => operation(response.operation).map(Some),
            // NOT_FOUND is the acquirer's answer: it never received the operation.
            Err(AcquirerError::Rejected(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn list_operations(
        &self,
        reference: Option<&str>,
        after: usize,
        limit: usize,
    ) -> Result<Vec<Operation>, AcquirerError> {
        // The acquirer pages with its own tokens: walk them up to `after + limit`.
        let mut found = Vec::new();
        let mut page_token = String::new();
        loop {
            let message = pb::ListOperationsRequest {
                reference: reference.unwrap_or_default().to_owned(),
                page_size: 1000,
                page_token: page_token.clone(),
            };
            let response = self
                .call(
                    "acquirer.list_operations",
                    "",
                    message,
                    |mut client, request| async move { client.list_operations(request).await },
                )
                .await?;
            for wire in response.operations {
                found.push(operation(Some(wire))?);
            }
            if response.next_page_token.is_empty() || found.len() >= after + limit {
                break;
            }
            page_token = response.next_page_token;
        }
        Ok(found.into_iter().skip(after).take(limit).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_what_they_mean_for_money() {
        // The acquirer said so: nothing happened.
        assert!(matches!(
            classify(&Status::unavailable("maintenance")),
            AcquirerError::Unavailable(_)
        ));
        // Our own request was wrong.
        assert!(matches!(
            classify(&Status::invalid_argument("bad amount")),
            AcquirerError::Rejected(_)
        ));
        assert!(matches!(
            classify(&Status::failed_precondition("already captured")),
            AcquirerError::Rejected(_)
        ));
        // It may have happened: unknown.
        for status in [
            Status::deadline_exceeded("late"),
            Status::cancelled("gone"),
            Status::internal("bug"),
            Status::unknown("?"),
        ] {
            assert_eq!(classify(&status), AcquirerError::Timeout, "{status:?}");
        }
    }
}
