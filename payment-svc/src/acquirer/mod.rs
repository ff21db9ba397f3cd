//! The acquirer: the card network's side of a payment, behind a connector trait.
//!
//! Implementations: [`sandbox::Sandbox`], in-process by default (the same logic is served
//! standalone as `paysuite.acquirer.v1` by [`server`], the `sandbox-acquirer` binary, for
//! fault tests and demos), and [`remote::RemoteAcquirer`], the gRPC client behind a timeout
//! and a circuit breaker (`ACQUIRER_URL`). Every operation
//! carries the caller's `operation_id` — payment-svc's attempt id, written to the database
//! BEFORE the call — and the acquirer performs an operation id at most once, answering a
//! repeat with the first outcome. That is what makes a retry unable to charge twice.

pub mod remote;
pub mod sandbox;
pub mod server;

use std::fmt;

use crate::domain::Money;
use crate::domain::card::CardDetails;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OperationKind {
    /// Reserve an amount on a card.
    Authorize,
    /// Take (part of) an authorization.
    Capture,
    /// Release an uncaptured authorization.
    Void,
    /// Return (part of) a capture.
    Refund,
}

crate::error::stored_names!(OperationKind {
    Authorize => "authorize",
    Capture => "capture",
    Void => "void",
    Refund => "refund",
});

/// An operation's outcome, as the acquirer recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationStatus {
    /// Done.
    Approved,
    /// Refused for good; the same operation id always gets the same answer.
    Declined {
        /// e.g. `card_declined`, `insufficient_funds`.
        code: String,
    },
    /// Failed without effect (a processing error): nothing happened; a new attempt may work.
    Failed {
        /// e.g. `processing_error`.
        code: String,
    },
}

/// One operation at the acquirer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The caller's id (its idempotency key at the acquirer).
    pub operation_id: String,
    /// What it did.
    pub kind: OperationKind,
    /// Its outcome.
    pub status: OperationStatus,
    /// The amount concerned.
    pub amount: Money,
    /// For capture, void and refund: the operation they apply to.
    pub parent_operation_id: Option<String>,
    /// The caller's reference (the payment id).
    pub reference: String,
}

/// A call whose outcome is not known: it may or may not have taken effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquirerError {
    /// No answer in time: the operation may have happened (an UNKNOWN outcome).
    #[error("acquirer did not answer in time")]
    Timeout,
    /// The acquirer could not be reached or refused to work; nothing happened.
    #[error("acquirer unavailable: {0}")]
    Unavailable(String),
    /// The request itself was wrong (a bug on our side, e.g. capturing more than authorized).
    #[error("acquirer rejected the request: {0}")]
    Rejected(String),
}

/// An authorization request.
#[derive(Clone)]
pub struct AuthorizeRequest<'a> {
    /// The attempt id.
    pub operation_id: &'a str,
    /// The payment id.
    pub reference: &'a str,
    /// The amount.
    pub amount: Money,
    /// The card (PAN redacted in Debug).
    pub card: &'a CardDetails,
}

impl fmt::Debug for AuthorizeRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeRequest")
            .field("operation_id", &self.operation_id)
            .field("reference", &self.reference)
            .field("amount", &self.amount)
            .field("card", &self.card)
            .finish()
    }
}

/// The connector every acquirer implementation provides.
#[tonic::async_trait]
pub trait Acquirer: Send + Sync + fmt::Debug {
    /// Authorizes an amount on a card.
    async fn authorize(&self, request: AuthorizeRequest<'_>) -> Result<Operation, AcquirerError>;
    /// Captures `amount` of the authorization `authorization_id`.
    async fn capture(
        &self,
        operation_id: &str,
        authorization_id: &str,
        amount: Money,
    ) -> Result<Operation, AcquirerError>;
    /// Voids the authorization `authorization_id`.
    async fn void(
        &self,
        operation_id: &str,
        authorization_id: &str,
    ) -> Result<Operation, AcquirerError>;
    /// Refunds `amount` of the capture `capture_id`.
    async fn refund(
        &self,
        operation_id: &str,
        capture_id: &str,
        amount: Money,
    ) -> Result<Operation, AcquirerError>;
    /// Looks an operation up; `None` when the acquirer never received it.
    async fn get_operation(&self, operation_id: &str) -> Result<Option<Operation>, AcquirerError>;
    /// Operations in the order received, optionally of one reference, after `after`
    /// operations (offset paging), at most `limit`.
    async fn list_operations(
        &self,
        reference: Option<&str>,
        after: usize,
        limit: usize,
    ) -> Result<Vec<Operation>, AcquirerError>;
}
