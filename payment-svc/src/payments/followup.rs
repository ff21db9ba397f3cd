//! Operations on an existing payment — CapturePayment, CancelPayment (a void) and
//! RefundPayment — each in two atomic phases around one acquirer call:
//!
//! 1. `started` → `prepared`: one transaction locks the payment's row, checks the
//!    transition, writes the attempt (for a refund also the refund and the merchant's
//!    hold: merchant → `refunds_pending`, refused with INSUFFICIENT_FUNDS), marks the
//!    payment PROCESSING (capture, void), audits, and records the attempt at the key's
//!    recovery point. A refusal is stored as the key's answer instead.
//! 2. the acquirer call, with the attempt id as its idempotency key and no transaction
//!    open; then one transaction records the outcome and stores the answer.
//!
//! Outcomes:
//! - approved: the payment is SUCCEEDED (settlement → merchant) or CANCELED; the refund
//!   SUCCEEDED (its hold settles: `refunds_pending` → settlement);
//! - declined or rejected: the payment returns to REQUIRES_CAPTURE and the refusal is the
//!   stored answer; the refund FAILS and its hold returns to the merchant;
//! - failed without effect, or acquirer unavailable: for capture and void, everything is
//!   undone and the key forgotten (UNAVAILABLE: a retry runs afresh); the refund FAILS;
//! - no answer in time: the payment stays PROCESSING (the refund PENDING) — an unknown
//!   outcome, settled later by looking the attempt up at the acquirer.
//!
//! A key resumed at `prepared` whose attempt was settled meanwhile (by the job that took
//! the abandoned key over) answers the state as it stands and never sends the attempt
//! again (`answer_if_settled`). An open attempt is resent under its id, and then "nothing
//! done" (unavailable, processing error) is an unknown outcome: the process that sent it
//! first may have had it performed, and an acquirer may answer a repeat with UNAVAILABLE
//! ([`resent`]; a job resending a refund after a lookup found nothing treats UNAVAILABLE
//! so). An
//! answer that arrives after the attempt was settled otherwise (a resumed key and the
//! job that took it over both calling) is not recorded: a final answer is never
//! overwritten, and the key answers the state as it stands.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{Acquire as _, PgConnection, Row};

use super::events::{self, EventType};
use super::{
    Payment, PaymentStatus, Payments, Recorded, fresh, get, get_for_update, insert_attempt,
    record_attempt, set_status,
};
use crate::acquirer::{AcquirerError, Operation, OperationKind, OperationStatus};
use crate::audit::{self, AuditEvent};
use crate::domain::Money;
use crate::error::{Error, stored_names};
use crate::idempotency::{self, Claim, Claimed, Outcome, Stored};
use crate::jobs::JobKind;
use crate::ledger::{self, Movement, MovementKind, new_id};

/// What to do to a payment.
#[derive(Debug, Clone)]
pub enum Action {
    /// Capture `amount` (the whole authorized amount when `None`).
    Capture {
        /// The amount to capture.
        amount: Option<Money>,
    },
    /// Void the authorization (or cancel a payment the acquirer has not seen).
    Cancel,
    /// Refund `amount` (what remains refundable when `None`).
    Refund {
        /// The amount to refund.
        amount: Option<Money>,
        /// Why.
        reason: String,
    },
}

/// A validated CapturePayment, CancelPayment or RefundPayment request.
#[derive(Debug, Clone)]
pub struct FollowUp {
    /// The caller, who must own the payment.
    pub owner_id: String,
    /// The payment.
    pub payment_id: String,
    /// What to do.
    pub action: Action,
    /// The request id, for the audit trail.
    pub request_id: String,
}

/// Where a refund is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundStatus {
    /// Held from the merchant; the acquirer's answer is awaited (or unknown).
    Pending,
    /// The acquirer refunded the card.
    Succeeded,
    /// The acquirer did not; the hold went back to the merchant.
    Failed,
}

stored_names!(RefundStatus {
    Pending => "pending",
    Succeeded => "succeeded",
    Failed => "failed",
});

/// A refund as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// `re_…`.
    pub id: String,
    /// The refunded payment.
    pub payment_id: String,
    /// The amount.
    pub amount: Money,
    /// Where it is.
    pub status: RefundStatus,
    /// Why the caller refunded.
    pub reason: String,
    /// Why it failed.
    pub failure_code: String,
    /// Why it failed, in words.
    pub failure_message: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// How a finished follow-up becomes the stored response: the payment, and the refund for
/// RefundPayment.
pub type EncodeFollowUp = Arc<dyn Fn(&Payment, Option<&Refund>) -> Vec<u8> + Send + Sync>;

/// The recovery point after the first phase.
const PREPARED: &str = "prepared";

/// The attempt the first phase wrote.
struct Attempt {
    id: String,
    payment_id: String,
    kind: OperationKind,
    amount: Money,
    parent_id: String,
    refund_id: Option<String>,
}

/// How the acquirer's answer settles the operation.
pub(super) enum Verdict {
    Approved,
    /// Refused for good (declined, or the acquirer rejected the request).
    Refused {
        code: String,
        message: String,
    },
    /// Nothing happened (a processing error, or the acquirer could not be reached).
    NothingDone {
        code: String,
    },
    /// No answer in time: it may have happened.
    Unknown,
}

pub(super) fn verdict(result: &Result<Operation, AcquirerError>) -> Verdict {
    match result {
        Ok(op) => match &op.status {
            OperationStatus::Approved => Verdict::Approved,
            OperationStatus::Declined { code } => Verdict::Refused {
                code: code.clone(),
                message: format!("the acquirer declined the {}: {code}", op.kind.as_str()),
            },
            OperationStatus::Failed { code } => Verdict::NothingDone { code: code.clone() },
        },
        Err(AcquirerError::Timeout) => Verdict::Unknown,
        Err(AcquirerError::Unavailable(_)) => Verdict::NothingDone {
            code: "acquirer_unavailable".to_owned(),
        },
        Err(AcquirerError::Rejected(reason)) => Verdict::Refused {
            code: "acquirer_rejected".to_owned(),
            message: format!("the acquirer rejected the request: {reason}"),
        },
    }
}

impl Payments {
    /// Runs a capture, cancel or refund under `claim` to an answer (see the module docs).
    pub async fn follow_up(
        &self,
        claim: &Claim<'_>,
        request: FollowUp,
        encode: EncodeFollowUp,
    ) -> Result<Outcome, Error> {
        let (recovery_point, mut attempt_id) =
            match idempotency::claim_leased(&self.pool, claim, self.lease).await? {
                Claimed::Done(outcome) => return Ok(outcome),
                Claimed::New => ("started".to_owned(), None),
                Claimed::Resume {
                    recovery_point,
                    resource_id,
                } => (recovery_point, resource_id),
            };
        let result = self
            .follow_up_phases(claim, &request, &encode, &recovery_point, &mut attempt_id)
            .await;
        match result {
            Ok(stored) => Ok(fresh(stored)),
            Err(err) => {
                if attempt_id.is_none() {
                    idempotency::release(&self.pool, claim).await?;
                } else {
                    idempotency::unlock(&self.pool, claim).await?;
                }
                Err(err)
            }
        }
    }

    async fn follow_up_phases(
        &self,
        claim: &Claim<'_>,
        request: &FollowUp,
        encode: &EncodeFollowUp,
        recovery_point: &str,
        attempt_id: &mut Option<String>,
    ) -> Result<Stored, Error> {
        let (id, sending) = match (recovery_point, attempt_id.clone()) {
            ("started", _) => match self.prepare(claim, request, encode).await? {
                Prepared::Attempt(id) => {
                    *attempt_id = Some(id.clone());
                    (id, Sending::First)
                }
                Prepared::Finished(stored) => return Ok(stored),
            },
            (PREPARED, Some(id)) => {
                if let Some(stored) = self.answer_if_settled(claim, &id, encode).await? {
                    return Ok(stored);
                }
                (id, Sending::Again)
            }
            (point, _) => {
                return Err(Error::Internal(format!("unknown recovery point {point:?}")));
            }
        };
        self.carry_out(claim, request, &id, sending, encode).await
    }

    /// On resuming a key at `prepared`: when something else already settled its attempt
    /// (the job that took over an abandoned key recorded the acquirer's answer — for a
    /// refund the acquirer could not perform, FAILED with its hold returned; a capture
    /// attempt replaced by a new one), the key is finished with the state as it stands
    /// and the attempt is never sent again. Resending it could make the acquirer perform
    /// an operation the books have closed: a refund paid out to the card that no
    /// ledger entry records (found by the bank soak, seed 3619290255415874214).
    async fn answer_if_settled(
        &self,
        claim: &Claim<'_>,
        attempt_id: &str,
        encode: &EncodeFollowUp,
    ) -> Result<Option<Stored>, Error> {
        let mut transaction = self.pool.begin().await?;
        let attempt = load_attempt(&mut transaction, attempt_id).await?;
        // The payment's lock orders this check after any settlement in flight (each
        // settles under it).
        get_for_update(&mut transaction, claim.owner_id, &attempt.payment_id).await?;
        let status: String = sqlx::query_scalar("SELECT status FROM attempts WHERE id = $1")
            .bind(attempt_id)
            .fetch_one(&mut *transaction)
            .await?;
        if matches!(status.as_str(), "pending" | "unknown") {
            return Ok(None);
        }
        tracing::info!(
            attempt_id,
            status,
            "resumed key's attempt already settled: answering the current state, not resending"
        );
        self.finish_as_it_stands(transaction, claim, &attempt, encode)
            .await
            .map(Some)
    }

    /// Finishes the key with the payment (and the attempt's refund) as they stand, and
    /// commits.
    async fn finish_as_it_stands(
        &self,
        mut transaction: sqlx::Transaction<'static, sqlx::Postgres>,
        claim: &Claim<'_>,
        attempt: &Attempt,
        encode: &EncodeFollowUp,
    ) -> Result<Stored, Error> {
        let payment = get(&mut transaction, claim.owner_id, &attempt.payment_id).await?;
        let refund = match attempt.refund_id.as_deref() {
            Some(refund_id) => Some(get_refund(&mut transaction, refund_id).await?),
            None => None,
        };
        let stored = Stored::Response(encode(&payment, refund.as_ref()));
        idempotency::finish(&mut transaction, claim, &stored).await?;
        transaction.commit().await?;
        Ok(stored)
    }

    /// `started` → `prepared` (or a stored refusal).
    async fn prepare(
        &self,
        claim: &Claim<'_>,
        request: &FollowUp,
        encode: &EncodeFollowUp,
    ) -> Result<Prepared, Error> {
        let mut transaction = self.pool.begin().await?;
        let mut savepoint = transaction.begin().await?;
        let prepared = prepare_in(&mut savepoint, request).await;
        let stored = match prepared {
            Ok(Some(attempt_id)) => {
                savepoint.commit().await?;
                idempotency::advance(&mut transaction, claim, PREPARED, Some(&attempt_id)).await?;
                transaction.commit().await?;
                return Ok(Prepared::Attempt(attempt_id));
            }
            Ok(None) => {
                // Done without the acquirer (a payment it never saw was canceled).
                savepoint.commit().await?;
                let payment = get(&mut transaction, claim.owner_id, &request.payment_id).await?;
                Stored::Response(encode(&payment, None))
            }
            Err(err) if err.is_business_outcome() => {
                savepoint.rollback().await?;
                idempotency::refusal(err)
            }
            Err(err) => return Err(err),
        };
        idempotency::finish(&mut transaction, claim, &stored).await?;
        transaction.commit().await?;
        Ok(Prepared::Finished(stored))
    }

    /// `prepared` → finished: the acquirer call and its outcome.
    async fn carry_out(
        &self,
        claim: &Claim<'_>,
        request: &FollowUp,
        attempt_id: &str,
        sending: Sending,
        encode: &EncodeFollowUp,
    ) -> Result<Stored, Error> {
        let attempt = {
            let mut connection = self.pool.acquire().await?;
            load_attempt(&mut connection, attempt_id).await?
        };
        let call = async {
            match attempt.kind {
                OperationKind::Capture => {
                    self.acquirer
                        .capture(&attempt.id, &attempt.parent_id, attempt.amount)
                        .await
                }
                OperationKind::Void => self.acquirer.void(&attempt.id, &attempt.parent_id).await,
                OperationKind::Refund => {
                    self.acquirer
                        .refund(&attempt.id, &attempt.parent_id, attempt.amount)
                        .await
                }
                OperationKind::Authorize => Err(AcquirerError::Rejected(
                    "an authorization is not a follow-up".to_owned(),
                )),
            }
        };
        let result = tokio::time::timeout(self.acquirer_timeout, call)
            .await
            .unwrap_or(Err(AcquirerError::Timeout));
        let result = match (sending, result) {
            (Sending::First, result) => result,
            // A processing error on a resumed request's resend is unknown too (an
            // acquirer may answer a repeat so); the job that settles it sends once more
            // after its lookup, and takes that answer as it comes.
            (Sending::Again, Ok(operation))
                if matches!(operation.status, OperationStatus::Failed { .. }) =>
            {
                tracing::warn!(
                    attempt_id,
                    "a resent attempt failed at the acquirer: recorded as an unknown outcome"
                );
                Err(AcquirerError::Timeout)
            }
            (Sending::Again, result) => resent(attempt_id, result),
        };
        crate::failpoint::hit("before_finalize");

        let mut transaction = self.pool.begin().await?;
        if record_attempt(&mut transaction, &attempt.id, &result).await? == Recorded::Settled {
            // The job that took this key over while the call was out settled the attempt.
            return self
                .finish_as_it_stands(transaction, claim, &attempt, encode)
                .await;
        }
        let payment = get_for_update(&mut transaction, claim.owner_id, &attempt.payment_id).await?;
        let verdict = verdict(&result);
        let request_id = request.request_id.as_str();
        match attempt.kind {
            OperationKind::Refund => {
                let refund_id = attempt.refund_id.as_deref().ok_or_else(|| {
                    Error::Internal(format!("refund attempt {} without a refund", attempt.id))
                })?;
                settle_refund(&mut transaction, &payment, refund_id, &verdict, request_id).await?;
                if matches!(verdict, Verdict::Unknown) {
                    self.enqueue(
                        &mut transaction,
                        &payment.owner_id,
                        &payment.id,
                        JobKind::ResolveRefund,
                        self.jobs.backoff_base,
                    )
                    .await?;
                }
                let payment = get(&mut transaction, claim.owner_id, &attempt.payment_id).await?;
                let refund = get_refund(&mut transaction, refund_id).await?;
                let stored = Stored::Response(encode(&payment, Some(&refund)));
                idempotency::finish(&mut transaction, claim, &stored).await?;
                transaction.commit().await?;
                return Ok(stored);
            }
            OperationKind::Capture | OperationKind::Void => {}
            OperationKind::Authorize => {
                return Err(Error::Internal(format!(
                    "attempt {} is not a follow-up",
                    attempt.id
                )));
            }
        }
        match verdict {
            Verdict::Approved if attempt.kind == OperationKind::Capture => {
                capture_settled(&mut transaction, &payment, attempt.amount, request_id).await?;
            }
            Verdict::Approved => {
                set_status(&mut transaction, &payment, PaymentStatus::Canceled, "", "").await?;
            }
            Verdict::Refused { message, .. } => {
                set_status(
                    &mut transaction,
                    &payment,
                    PaymentStatus::RequiresCapture,
                    "",
                    "",
                )
                .await?;
                let stored = idempotency::refusal(Error::Precondition {
                    reason: "ACQUIRER_DECLINED",
                    message,
                });
                idempotency::finish(&mut transaction, claim, &stored).await?;
                transaction.commit().await?;
                return Ok(stored);
            }
            Verdict::NothingDone { code } => {
                // Nothing happened anywhere: undo, forget the key, let the caller retry.
                set_status(
                    &mut transaction,
                    &payment,
                    PaymentStatus::RequiresCapture,
                    "",
                    "",
                )
                .await?;
                idempotency::forget(&mut transaction, claim).await?;
                transaction.commit().await?;
                return Err(Error::Unavailable(format!(
                    "the acquirer could not {} the payment ({code}); nothing was done, retry later",
                    attempt.kind.as_str()
                )));
            }
            // It may have happened: the payment stays PROCESSING until a job looks the
            // attempt up.
            Verdict::Unknown => {
                self.enqueue(
                    &mut transaction,
                    &payment.owner_id,
                    &payment.id,
                    JobKind::ResolveUnknown,
                    self.jobs.backoff_base,
                )
                .await?;
            }
        }
        let payment = get(&mut transaction, claim.owner_id, &attempt.payment_id).await?;
        let stored = Stored::Response(encode(&payment, None));
        idempotency::finish(&mut transaction, claim, &stored).await?;
        transaction.commit().await?;
        Ok(stored)
    }
}

/// The answer to an attempt sent again — by a resumed request, or a refund by a job after
/// a lookup found nothing — as it may be recorded. UNAVAILABLE speaks for this call only: the
/// earlier sending (by a process that died before recording its answer, or one still in
/// flight at a slow acquirer) may have been performed, or may yet be, and an acquirer may
/// answer a repeat with UNAVAILABLE. So it is an unknown outcome, which a job settles by
/// looking the attempt up — never a failure that returns a refund's hold, or lets a new
/// authorization (a second charge) replace the attempt.
pub(super) fn resent(
    attempt_id: &str,
    result: Result<Operation, AcquirerError>,
) -> Result<Operation, AcquirerError> {
    match result {
        Err(AcquirerError::Unavailable(reason)) => {
            tracing::warn!(
                attempt_id,
                %reason,
                "a resent attempt found the acquirer unavailable: recorded as an unknown outcome"
            );
            Err(AcquirerError::Timeout)
        }
        result => result,
    }
}

/// Whether an attempt goes to the acquirer for the first time, or again after a process
/// that sent it died before recording the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    First,
    Again,
}

enum Prepared {
    Attempt(String),
    Finished(Stored),
}

fn refuse(reason: &'static str, message: String) -> Error {
    Error::Precondition { reason, message }
}

fn same_currency(amount: Money, payment: &Payment) -> Result<(), Error> {
    if amount.currency() == payment.amount.currency() {
        Ok(())
    } else {
        Err(Error::CurrencyMismatch(format!(
            "payment {} is in {}, the amount in {}",
            payment.id,
            payment.amount.currency(),
            amount.currency()
        )))
    }
}

/// The first phase's work, in a savepoint: `Some(attempt id)` when the acquirer is to be
/// called, `None` when the request is done.
async fn prepare_in(
    connection: &mut PgConnection,
    request: &FollowUp,
) -> Result<Option<String>, Error> {
    let payment = get_for_update(connection, &request.owner_id, &request.payment_id).await?;
    let status = payment.status.as_str();
    match &request.action {
        Action::Capture { amount } => {
            if payment.status != PaymentStatus::RequiresCapture {
                return Err(refuse(
                    "PAYMENT_NOT_CAPTURABLE",
                    format!(
                        "payment {} is {status}; only a payment that requires capture can be captured",
                        payment.id
                    ),
                ));
            }
            let amount = amount.unwrap_or(payment.amount);
            same_currency(amount, &payment)?;
            if amount.amount_minor() > payment.amount.amount_minor() {
                return Err(refuse(
                    "AMOUNT_EXCEEDS_AUTHORIZED",
                    format!(
                        "cannot capture {amount}: payment {} authorized {}",
                        payment.id, payment.amount
                    ),
                ));
            }
            let authorization = authorization_id(connection, &payment.id).await?;
            let attempt = insert_attempt(
                connection,
                &payment.owner_id,
                &payment.id,
                OperationKind::Capture,
                amount,
                Some(&authorization),
                None,
            )
            .await?;
            set_status(connection, &payment, PaymentStatus::Processing, "", "").await?;
            Ok(Some(attempt))
        }
        Action::Cancel => match payment.status {
            PaymentStatus::RequiresCapture => {
                let authorization = authorization_id(connection, &payment.id).await?;
                let attempt = insert_attempt(
                    connection,
                    &payment.owner_id,
                    &payment.id,
                    OperationKind::Void,
                    payment.amount,
                    Some(&authorization),
                    None,
                )
                .await?;
                set_status(connection, &payment, PaymentStatus::Processing, "", "").await?;
                Ok(Some(attempt))
            }
            // The acquirer has not seen it: nothing to void.
            PaymentStatus::Pending => {
                set_status(connection, &payment, PaymentStatus::Canceled, "", "").await?;
                Ok(None)
            }
            _ => Err(refuse(
                "PAYMENT_NOT_CANCELABLE",
                format!(
                    "payment {} is {status}; only a payment that is pending or requires capture can be canceled",
                    payment.id
                ),
            )),
        },
        Action::Refund { amount, reason } => {
            if payment.status != PaymentStatus::Succeeded {
                return Err(refuse(
                    "PAYMENT_NOT_REFUNDABLE",
                    format!(
                        "payment {} is {status}; only a succeeded payment can be refunded",
                        payment.id
                    ),
                ));
            }
            let pending: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(amount), 0)::bigint FROM refunds WHERE payment_id = $1 AND status = 'pending'",
            )
            .bind(&payment.id)
            .fetch_one(&mut *connection)
            .await?;
            let refundable = payment.amount_captured.amount_minor()
                - payment.amount_refunded.amount_minor()
                - pending;
            let currency = payment.amount.currency();
            let amount = amount.unwrap_or(Money::new(refundable, currency));
            same_currency(amount, &payment)?;
            if refundable <= 0 || amount.amount_minor() > refundable {
                return Err(refuse(
                    "AMOUNT_EXCEEDS_REFUNDABLE",
                    format!(
                        "cannot refund {amount}: {} of payment {} remains refundable",
                        Money::new(refundable.max(0), currency),
                        payment.id
                    ),
                ));
            }
            let capture: String = sqlx::query_scalar(
                "SELECT id FROM attempts WHERE payment_id = $1 AND kind = 'capture' AND status = 'approved' \
                 ORDER BY created_at LIMIT 1",
            )
            .bind(&payment.id)
            .fetch_optional(&mut *connection)
            .await?
            .ok_or_else(|| {
                Error::Internal(format!("succeeded payment {} without a capture", payment.id))
            })?;
            let refund_id = new_id("re");
            sqlx::query(
                "INSERT INTO refunds (id, owner_id, payment_id, currency, amount, status, reason) \
                 VALUES ($1, $2, $3, $4, $5, 'pending', $6)",
            )
            .bind(&refund_id)
            .bind(&payment.owner_id)
            .bind(&payment.id)
            .bind(currency.code())
            .bind(amount.amount_minor())
            .bind(reason)
            .execute(&mut *connection)
            .await?;
            // The merchant pays first: a refund the merchant cannot cover is refused.
            let pending_account =
                ledger::system_account(connection, "refunds_pending", currency).await?;
            ledger::post(
                connection,
                &Movement {
                    owner_id: payment.owner_id.clone(),
                    kind: MovementKind::RefundHold,
                    reference_id: refund_id.clone(),
                    from_account_id: payment.merchant_account_id.clone(),
                    to_account_id: pending_account,
                    amount,
                    description: String::new(),
                },
            )
            .await?;
            let attempt = insert_attempt(
                connection,
                &payment.owner_id,
                &payment.id,
                OperationKind::Refund,
                amount,
                Some(&capture),
                Some(&refund_id),
            )
            .await?;
            events::refund_changed(
                connection,
                &payment.id,
                &refund_id,
                EventType::RefundCreated,
            )
            .await?;
            audit::record(
                connection,
                AuditEvent {
                    owner_id: &payment.owner_id,
                    principal: &request.owner_id,
                    action: "refund.create",
                    entity_type: "refund",
                    entity_id: &refund_id,
                    before: None,
                    after: Some(serde_json::json!({
                        "payment_id": payment.id,
                        "status": "pending",
                        "amount_minor": amount.amount_minor(),
                        "currency": currency.code(),
                    })),
                    request_id: &request.request_id,
                },
            )
            .await?;
            Ok(Some(attempt))
        }
    }
}

/// The approved authorization (attempt id) of a payment.
pub(super) async fn authorization_id(
    connection: &mut PgConnection,
    payment_id: &str,
) -> Result<String, Error> {
    let authorization: Option<String> =
        sqlx::query_scalar("SELECT authorization_id FROM payments WHERE id = $1")
            .bind(payment_id)
            .fetch_one(&mut *connection)
            .await?;
    authorization
        .ok_or_else(|| Error::Internal(format!("payment {payment_id} has no authorization")))
}

async fn load_attempt(connection: &mut PgConnection, attempt_id: &str) -> Result<Attempt, Error> {
    let row = sqlx::query(
        "SELECT id, payment_id, kind, currency, amount, parent_id, refund_id FROM attempts WHERE id = $1",
    )
    .bind(attempt_id)
    .fetch_one(&mut *connection)
    .await?;
    let currency = ledger::stored_currency(&row)?;
    let kind = OperationKind::parse(row.try_get("kind")?)?;
    if kind == OperationKind::Authorize {
        return Err(Error::Internal(format!(
            "attempt {attempt_id} is an authorization, not a follow-up"
        )));
    }
    Ok(Attempt {
        id: row.try_get("id")?,
        payment_id: row.try_get("payment_id")?,
        kind,
        amount: Money::new(row.try_get("amount")?, currency),
        parent_id: row
            .try_get::<Option<String>, _>("parent_id")?
            .ok_or_else(|| Error::Internal(format!("attempt {attempt_id} has no parent")))?,
        refund_id: row.try_get("refund_id")?,
    })
}

/// An approved capture: the payment SUCCEEDED and the money moves to the merchant.
pub(super) async fn capture_settled(
    connection: &mut PgConnection,
    payment: &Payment,
    amount: Money,
    request_id: &str,
) -> Result<(), Error> {
    let moved = sqlx::query(
        "UPDATE payments SET status = 'succeeded', amount_captured = $2, updated_at = now() \
         WHERE id = $1 AND status = 'processing'",
    )
    .bind(&payment.id)
    .bind(amount.amount_minor())
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if moved == 0 {
        return Ok(());
    }
    crate::metrics::payment_transition(PaymentStatus::Succeeded, amount.currency().code());
    let settlement =
        ledger::system_account(connection, "acquirer_settlement", amount.currency()).await?;
    ledger::post(
        connection,
        &Movement {
            owner_id: payment.owner_id.clone(),
            kind: MovementKind::Capture,
            reference_id: payment.id.clone(),
            from_account_id: settlement,
            to_account_id: payment.merchant_account_id.clone(),
            amount,
            description: String::new(),
        },
    )
    .await?;
    events::payment_changed(connection, &payment.id, EventType::PaymentSucceeded).await?;
    audit::record(
        connection,
        AuditEvent {
            owner_id: &payment.owner_id,
            principal: &payment.owner_id,
            action: "payment.capture",
            entity_type: "payment",
            entity_id: &payment.id,
            before: Some(serde_json::json!({ "status": payment.status.as_str() })),
            after: Some(serde_json::json!({
                "status": "succeeded",
                "amount_captured_minor": amount.amount_minor(),
            })),
            request_id,
        },
    )
    .await
}

/// Records a refund's outcome: settled, returned to the merchant, or still pending.
pub(super) async fn settle_refund(
    connection: &mut PgConnection,
    payment: &Payment,
    refund_id: &str,
    verdict: &Verdict,
    request_id: &str,
) -> Result<(), Error> {
    let (status, code, message) = match verdict {
        Verdict::Unknown => return Ok(()),
        Verdict::Approved => ("succeeded", String::new(), String::new()),
        Verdict::Refused { code, message } => ("failed", code.clone(), message.clone()),
        Verdict::NothingDone { code } => (
            "failed",
            code.clone(),
            "the acquirer could not refund the card; nothing was refunded".to_owned(),
        ),
    };
    let amount: Option<i64> = sqlx::query_scalar(
        "UPDATE refunds SET status = $2, failure_code = $3, failure_message = $4, updated_at = now() \
         WHERE id = $1 AND status = 'pending' RETURNING amount",
    )
    .bind(refund_id)
    .bind(status)
    .bind(&code)
    .bind(&message)
    .fetch_optional(&mut *connection)
    .await?;
    let Some(amount) = amount else {
        if matches!(verdict, Verdict::Approved) {
            // The refund was closed before this approval arrived: the acquirer paid out
            // what the books say it did not. Never silent — reconcile reports it too.
            tracing::error!(
                refund_id,
                payment_id = %payment.id,
                "an approval arrived for a refund that is no longer pending"
            );
        }
        return Ok(());
    };
    let currency = payment.amount.currency();
    let amount = Money::new(amount, currency);
    let pending_account = ledger::system_account(connection, "refunds_pending", currency).await?;
    let movement = if status == "succeeded" {
        sqlx::query(
            "UPDATE payments SET amount_refunded = amount_refunded + $2, updated_at = now() WHERE id = $1",
        )
        .bind(&payment.id)
        .bind(amount.amount_minor())
        .execute(&mut *connection)
        .await?;
        Movement {
            owner_id: payment.owner_id.clone(),
            kind: MovementKind::RefundSettle,
            reference_id: refund_id.to_owned(),
            from_account_id: pending_account,
            to_account_id: ledger::system_account(connection, "acquirer_settlement", currency)
                .await?,
            amount,
            description: String::new(),
        }
    } else {
        Movement {
            owner_id: payment.owner_id.clone(),
            kind: MovementKind::RefundReverse,
            reference_id: refund_id.to_owned(),
            from_account_id: pending_account,
            to_account_id: payment.merchant_account_id.clone(),
            amount,
            description: String::new(),
        }
    };
    ledger::post(connection, &movement).await?;
    let event_type = if status == "succeeded" {
        EventType::RefundSucceeded
    } else {
        EventType::RefundFailed
    };
    events::refund_changed(connection, &payment.id, refund_id, event_type).await?;
    audit::record(
        connection,
        AuditEvent {
            owner_id: &payment.owner_id,
            principal: &payment.owner_id,
            action: "refund.status",
            entity_type: "refund",
            entity_id: refund_id,
            before: Some(serde_json::json!({ "status": "pending" })),
            after: Some(serde_json::json!({ "status": status, "failure_code": code })),
            request_id,
        },
    )
    .await
}

/// One refund.
pub async fn get_refund(connection: &mut PgConnection, refund_id: &str) -> Result<Refund, Error> {
    let row = sqlx::query(
        "SELECT id, payment_id, currency, amount, status, reason, failure_code, failure_message, \
         created_at, updated_at FROM refunds WHERE id = $1",
    )
    .bind(refund_id)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or(Error::NotFound("refund"))?;
    let currency = ledger::stored_currency(&row)?;
    Ok(Refund {
        id: row.try_get("id")?,
        payment_id: row.try_get("payment_id")?,
        amount: Money::new(row.try_get("amount")?, currency),
        status: RefundStatus::parse(row.try_get("status")?)?,
        reason: row.try_get("reason")?,
        failure_code: row.try_get("failure_code")?,
        failure_message: row.try_get("failure_message")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
