//! payment-svc's one error type and its one mapping to a gRPC status (DESIGN §3 error
//! model). Internal causes are logged with a request id; the caller gets only the id.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// Everything that can go wrong in payment-svc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The entity does not exist, or belongs to another principal (never revealed).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A debit would take a non-negative account below zero.
    #[error("insufficient funds in account {0}")]
    InsufficientFunds(String),
    /// The accounts or amounts are in different currencies.
    #[error("currency mismatch: {0}")]
    CurrencyMismatch(String),
    /// Any other business refusal: an illegal state transition, a wrong kind of account.
    #[error("{message}")]
    Precondition {
        /// The `ErrorInfo.reason`, e.g. `ILLEGAL_TRANSITION`.
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The idempotency key was used before with a different request.
    #[error("idempotency key was already used with a different request")]
    IdempotencyKeyReused,
    /// A request with this idempotency key is still being processed.
    #[error("a request with this idempotency key is in progress")]
    IdempotencyKeyInUse,
    /// A dependency (the acquirer) could not do the work; nothing was done.
    #[error("{0}")]
    Unavailable(String),
    /// A job's claim was lost (its lease ran out and another worker took it): its writes
    /// are refused.
    #[error("job {0} is no longer held by this worker")]
    StaleJob(i64),
    /// Every pooled connection is busy.
    #[error("database busy: no connection available")]
    PoolExhausted,
    /// The connection to PostgreSQL was lost (its backend was terminated, the server
    /// restarts, the network broke): the database is down for this call, not broken. The
    /// outcome of a write in flight is unknown to us too; a retry with the same
    /// idempotency key settles it.
    #[error("database unavailable: the connection was lost")]
    DatabaseUnavailable(#[source] sqlx::Error),
    /// The database gave up on a lock, a statement or a transaction that a retry may get
    /// through (lock or statement timeout, serialization failure, deadlock).
    #[error("database busy: {message}")]
    Contention {
        /// The SQLSTATE.
        sqlstate: String,
        /// PostgreSQL's message.
        message: String,
    },
    /// A database failure the caller cannot act on.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// Any other internal failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the error is a business outcome that an idempotency key stores and replays
    /// (DESIGN §4): refusals are answers, not failures.
    pub fn is_business_outcome(&self) -> bool {
        matches!(
            self,
            Self::InsufficientFunds(_) | Self::CurrencyMismatch(_) | Self::Precondition { .. }
        )
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut => Self::PoolExhausted,
            sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                Self::DatabaseUnavailable(err)
            }
            sqlx::Error::Database(ref db)
                if db
                    .code()
                    .is_some_and(|code| pg_code::is_connection_lost(&code)) =>
            {
                Self::DatabaseUnavailable(err)
            }
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|code| pg_code::TRANSIENT.contains(&code.as_ref())) =>
            {
                Self::Contention {
                    sqlstate: db.code().map(|code| code.into_owned()).unwrap_or_default(),
                    message: db.message().to_owned(),
                }
            }
            other => Self::Database(other),
        }
    }
}

/// `FAILED_PRECONDITION` with an `ErrorInfo{reason}`.
fn failed_precondition(reason: &str, message: String) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason,
        "paysuite.payments",
        std::collections::HashMap::new(),
    );
    Status::with_error_details(Code::FailedPrecondition, message, details)
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::NotFound(_) => Status::not_found(err.to_string()),
            Error::InsufficientFunds(_) => {
                failed_precondition("INSUFFICIENT_FUNDS", err.to_string())
            }
            Error::CurrencyMismatch(_) => failed_precondition("CURRENCY_MISMATCH", err.to_string()),
            Error::Precondition { reason, message } => failed_precondition(reason, message),
            Error::IdempotencyKeyReused => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "IDEMPOTENCY_KEY_REUSED",
                    "paysuite.payments",
                    std::collections::HashMap::new(),
                );
                Status::with_error_details(Code::InvalidArgument, err.to_string(), details)
            }
            Error::IdempotencyKeyInUse => {
                let mut details = ErrorDetails::new();
                details
                    .set_error_info(
                        "IDEMPOTENCY_KEY_IN_USE",
                        "paysuite.payments",
                        std::collections::HashMap::new(),
                    )
                    .set_retry_info(Some(std::time::Duration::from_millis(500)));
                Status::with_error_details(Code::Aborted, err.to_string(), details)
            }
            Error::Unavailable(_) | Error::PoolExhausted | Error::Contention { .. } => {
                Status::unavailable(err.to_string())
            }
            Error::DatabaseUnavailable(ref cause) => {
                tracing::warn!(error = %cause, "database connection lost");
                Status::unavailable(err.to_string())
            }
            Error::StaleJob(_) => Status::aborted(err.to_string()),
            Error::Database(_) | Error::Internal(_) => {
                let request_id = uuid::Uuid::new_v4();
                tracing::error!(%request_id, error = %err, "internal error");
                Status::internal(format!("internal error (request id {request_id})"))
            }
        }
    }
}

/// `as_str` and `parse` for an enum stored in the database by name, from one table of
/// names (an unknown stored name is an internal error: only this service writes them).
macro_rules! stored_names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }

            /// Parses a stored name.
            pub fn parse(text: &str) -> Result<Self, $crate::error::Error> {
                match text {
                    $($name => Ok(Self::$variant),)+
                    other => Err($crate::error::Error::Internal(format!(
                        concat!("unknown ", stringify!($ty), " {:?} in the database"),
                        other
                    ))),
                }
            }
        }
    };
}
pub(crate) use stored_names;

/// PostgreSQL error codes the service reacts to.
pub mod pg_code {
    /// A CHECK constraint refused the row (e.g. a balance below zero).
    pub const CHECK_VIOLATION: &str = "23514";
    /// Serialization failure: retry the transaction.
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// Deadlock detected: retry the transaction.
    pub const DEADLOCK_DETECTED: &str = "40P01";
    /// `lock_timeout` passed.
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// `statement_timeout` passed (or the statement was cancelled).
    pub const QUERY_CANCELED: &str = "57014";
    /// The server ends the session: `pg_terminate_backend` (57P01), a crash restart
    /// (57P02), a server still starting (57P03), or any connection exception (class 08).
    pub fn is_connection_lost(sqlstate: &str) -> bool {
        sqlstate.starts_with("08") || matches!(sqlstate, "57P01" | "57P02" | "57P03")
    }

    /// Failures a later attempt may get through: answered UNAVAILABLE.
    pub const TRANSIENT: [&str; 4] = [
        SERIALIZATION_FAILURE,
        DEADLOCK_DETECTED,
        LOCK_NOT_AVAILABLE,
        QUERY_CANCELED,
    ];
}

/// Whether the transaction should be retried inside the service (serialization failure
/// or deadlock: PostgreSQL rolled it back and asks for a retry).
pub fn is_retryable_conflict(err: &Error) -> bool {
    matches!(err, Error::Contention { sqlstate, .. }
        if sqlstate == pg_code::SERIALIZATION_FAILURE || sqlstate == pg_code::DEADLOCK_DETECTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_database_connection_is_unavailable_not_internal() {
        let lost = [
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
        ];
        for err in lost {
            let status = Status::from(Error::from(err));
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(
                status.message(),
                "database unavailable: the connection was lost"
            );
        }
        let status = Status::from(Error::from(sqlx::Error::RowNotFound));
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn sessions_ended_by_the_server_are_connection_losses() {
        for sqlstate in ["57P01", "57P02", "57P03", "08000", "08006", "08003"] {
            assert!(pg_code::is_connection_lost(sqlstate), "{sqlstate}");
        }
        for sqlstate in ["57014", "40001", "23514", "55P03"] {
            assert!(!pg_code::is_connection_lost(sqlstate), "{sqlstate}");
        }
    }
}
