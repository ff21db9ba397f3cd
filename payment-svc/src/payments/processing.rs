//! The background side of payments: one job drives a payment to where it should be.
//!
//! A payment has at most one live job; whatever it was enqueued for (an ASYNC payment, a
//! SYNC payment whose acquirer did not answer, an unknown capture, void or refund, the
//! void timer of an authorization), the job looks at the payment and its attempts and
//! takes the next step, one acquirer call at a time:
//!
//! 1. a refund whose outcome is open → look its attempt up;
//! 2. PENDING → PROCESSING;
//! 3. PROCESSING → by its newest attempt: open (pending, unknown) → look it up at the
//!    acquirer, and only if the acquirer never received it, send it again under the SAME
//!    id (a takeover can never charge twice); failed without effect → a new attempt;
//!    approved → the next step (capture, settle, cancel); declined → FAILED; past the
//!    job's last attempt (it runs on only to settle an open attempt) nothing new is sent;
//! 4. REQUIRES_CAPTURE past `void_after` → void (then CANCELED); before → sleep until then;
//! 5. final → done.
//!
//! Every write runs in a transaction fenced by the job's token ([`jobs::fence`]), so a
//! worker that lost its lease changes nothing. A payment becomes FAILED only on the
//! acquirer's decline of the authorization — never while a charge may exist.

use std::time::Duration;

use chrono::Utc;
use sqlx::{PgConnection, Row};

use super::followup::{self, Verdict, verdict};
use super::{
    CaptureMethod, Payment, PaymentStatus, Payments, Recorded, get_for_update, insert_attempt,
    record_attempt, set_status,
};
use crate::acquirer::{AcquirerError, AuthorizeRequest, Operation, OperationKind};
use crate::domain::Money;
use crate::error::Error;
use crate::jobs::{self, Claimed, Job, JobOutcome};
use crate::ledger;

/// Acquirer calls one job attempt makes at most (authorize, capture, and lookups).
const MAX_STEPS: usize = 6;

/// An attempt as the job sees it.
#[derive(Debug, Clone)]
struct OpenAttempt {
    id: String,
    kind: OperationKind,
    status: String,
    amount: Money,
    parent_id: Option<String>,
    refund_id: Option<String>,
}

/// What to do next.
enum Step {
    /// Finished this attempt of the job with this outcome.
    Done(JobOutcome),
    /// Ask the acquirer about this attempt first.
    LookUp(OpenAttempt),
    /// Send this attempt.
    Send(OpenAttempt),
}

impl Payments {
    /// Drives the job's payment (see the module docs).
    pub async fn drive(&self, claimed: &Claimed, void_after: Duration) -> JobOutcome {
        match self.drive_steps(&claimed.job, void_after).await {
            Ok(outcome) => outcome,
            Err(err @ Error::StaleJob(_)) => JobOutcome::Retry(err.to_string()),
            Err(err) => JobOutcome::Retry(format!("{err}")),
        }
    }

    async fn drive_steps(&self, job: &Job, void_after: Duration) -> Result<JobOutcome, Error> {
        for _ in 0..MAX_STEPS {
            let step = {
                let mut transaction = self.pool.begin().await?;
                jobs::fence(&mut transaction, job).await?;
                let step = next_step(&mut transaction, job, void_after).await?;
                transaction.commit().await?;
                step
            };
            let (attempt, result) = match step {
                Step::Done(outcome) => return Ok(outcome),
                Step::LookUp(attempt) => {
                    let found = tokio::time::timeout(
                        self.acquirer_timeout,
                        self.acquirer.get_operation(&attempt.id),
                    )
                    .await
                    .unwrap_or(Err(AcquirerError::Timeout));
                    match found {
                        Ok(Some(operation)) => (attempt, Ok(operation)),
                        // Never received: send it (again), under the same id.
                        Ok(None) => {
                            let result = self.send(job, &attempt).await?;
                            // A refund attempt is always first sent by its request, so
                            // here it is a resend, and that sending may still land.
                            let result = if attempt.kind == OperationKind::Refund {
                                followup::resent(&attempt.id, result)
                            } else {
                                result
                            };
                            (attempt, result)
                        }
                        Err(err) => {
                            return Ok(JobOutcome::Retry(format!(
                                "looking up attempt {}: {err}",
                                attempt.id
                            )));
                        }
                    }
                }
                Step::Send(attempt) => {
                    let result = self.send(job, &attempt).await?;
                    (attempt, result)
                }
            };
            crate::failpoint::hit("job_after_acquirer");
            let mut transaction = self.pool.begin().await?;
            jobs::fence(&mut transaction, job).await?;
            let outcome = apply(&mut transaction, job, &attempt, &result).await?;
            transaction.commit().await?;
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
        }
        Ok(JobOutcome::Snooze(Duration::ZERO))
    }

    async fn send(
        &self,
        job: &Job,
        attempt: &OpenAttempt,
    ) -> Result<Result<Operation, AcquirerError>, Error> {
        let parent = attempt.parent_id.as_deref().unwrap_or_default();
        let call = async {
            let answer: Result<Result<Operation, AcquirerError>, Error> = match attempt.kind {
                OperationKind::Authorize => {
                    let card = {
                        let mut connection = self.pool.acquire().await?;
                        self.stored_card(&mut connection, &job.payment_id, None)
                            .await?
                    };
                    Ok(self
                        .acquirer
                        .authorize(AuthorizeRequest {
                            operation_id: &attempt.id,
                            reference: &job.payment_id,
                            amount: attempt.amount,
                            card: &card,
                        })
                        .await)
                }
                OperationKind::Capture => Ok(self
                    .acquirer
                    .capture(&attempt.id, parent, attempt.amount)
                    .await),
                OperationKind::Void => Ok(self.acquirer.void(&attempt.id, parent).await),
                OperationKind::Refund => Ok(self
                    .acquirer
                    .refund(&attempt.id, parent, attempt.amount)
                    .await),
            };
            answer
        };
        tokio::time::timeout(self.acquirer_timeout, call)
            .await
            .unwrap_or(Ok(Err(AcquirerError::Timeout)))
    }
}

async fn next_step(
    connection: &mut PgConnection,
    job: &Job,
    void_after: Duration,
) -> Result<Step, Error> {
    let payment = get_for_update(connection, &job.owner_id, &job.payment_id).await?;
    if let Some(refund) = open_refund_attempt(connection, &payment.id).await? {
        return Ok(Step::LookUp(refund));
    }
    let payment = if payment.status == PaymentStatus::Pending {
        set_status(connection, &payment, PaymentStatus::Processing, "", "").await?;
        get_for_update(connection, &job.owner_id, &job.payment_id).await?
    } else {
        payment
    };
    match payment.status {
        PaymentStatus::Processing => processing_step(connection, job, &payment).await,
        PaymentStatus::RequiresCapture => {
            let due = authorized_at(connection, &payment.id).await?
                + chrono::Duration::from_std(void_after).unwrap_or(chrono::Duration::MAX);
            let now = Utc::now();
            if due > now {
                let wait = (due - now).to_std().unwrap_or(Duration::ZERO);
                return Ok(Step::Done(JobOutcome::Snooze(wait)));
            }
            // Uncaptured for too long: void the authorization.
            let authorization = followup::authorization_id(connection, &payment.id).await?;
            insert_attempt(
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
            let attempt = newest_attempt(connection, &payment.id).await?;
            Ok(Step::Send(attempt))
        }
        PaymentStatus::Pending
        | PaymentStatus::Succeeded
        | PaymentStatus::Failed
        | PaymentStatus::Canceled => Ok(Step::Done(JobOutcome::Ok)),
    }
}

/// The next step of a PROCESSING payment, from its newest attempt.
async fn processing_step(
    connection: &mut PgConnection,
    job: &Job,
    payment: &Payment,
) -> Result<Step, Error> {
    let attempt = newest_attempt(connection, &payment.id).await?;
    match attempt.status.as_str() {
        "pending" | "unknown" => Ok(Step::LookUp(attempt)),
        // Past its last attempt a job only settles what it already sent (see `jobs`):
        // nothing new is sent.
        "failed" if job.attempt > job.max_attempts => Ok(Step::Done(JobOutcome::Retry(format!(
            "{} attempt {} failed; out of attempts",
            attempt.kind.as_str(),
            attempt.id
        )))),
        // Nothing happened: a new attempt (a new id) of the same operation.
        "failed" => {
            insert_attempt(
                connection,
                &payment.owner_id,
                &payment.id,
                attempt.kind,
                attempt.amount,
                attempt.parent_id.as_deref(),
                None,
            )
            .await?;
            Ok(Step::Send(newest_attempt(connection, &payment.id).await?))
        }
        // The last answer is in but the payment did not move on (a worker died right
        // after recording it): apply it again, idempotently.
        _ => Ok(Step::LookUp(attempt)),
    }
}

/// Records the acquirer's answer for `attempt` and moves the payment on; `Some` when the
/// job's attempt is over.
async fn apply(
    connection: &mut PgConnection,
    job: &Job,
    attempt: &OpenAttempt,
    result: &Result<Operation, AcquirerError>,
) -> Result<Option<JobOutcome>, Error> {
    if record_attempt(connection, &attempt.id, result).await? == Recorded::Settled {
        // Settled by the request this job took over, meanwhile: go on from there.
        return Ok(None);
    }
    let payment = get_for_update(connection, &job.owner_id, &job.payment_id).await?;
    let verdict = verdict(result);
    if attempt.kind == OperationKind::Refund {
        let refund_id = attempt.refund_id.as_deref().ok_or_else(|| {
            Error::Internal(format!("refund attempt {} without a refund", attempt.id))
        })?;
        if matches!(verdict, Verdict::Unknown) {
            return Ok(Some(JobOutcome::Retry(format!(
                "refund attempt {}: no answer",
                attempt.id
            ))));
        }
        followup::settle_refund(connection, &payment, refund_id, &verdict, "").await?;
        return Ok(None);
    }
    if payment.status != PaymentStatus::Processing {
        return Ok(None);
    }
    match (attempt.kind, verdict) {
        (_, Verdict::Unknown) => Ok(Some(JobOutcome::Retry(format!(
            "{} attempt {}: no answer; it will be looked up",
            attempt.kind.as_str(),
            attempt.id
        )))),
        (_, Verdict::NothingDone { code }) => Ok(Some(JobOutcome::Retry(format!(
            "{} attempt {}: {code}",
            attempt.kind.as_str(),
            attempt.id
        )))),
        (OperationKind::Authorize, Verdict::Approved) => {
            sqlx::query(
                "UPDATE payments SET authorization_id = $2, updated_at = now() WHERE id = $1",
            )
            .bind(&payment.id)
            .bind(&attempt.id)
            .execute(&mut *connection)
            .await?;
            if payment.capture_method == CaptureMethod::Manual {
                set_status(connection, &payment, PaymentStatus::RequiresCapture, "", "").await?;
                // The job stays with the payment as its void timer.
                return Ok(None);
            }
            insert_attempt(
                connection,
                &payment.owner_id,
                &payment.id,
                OperationKind::Capture,
                payment.amount,
                Some(&attempt.id),
                None,
            )
            .await?;
            Ok(None)
        }
        (OperationKind::Authorize, Verdict::Refused { code, .. }) => {
            let message = match code.as_str() {
                "insufficient_funds" => "the card has insufficient funds",
                _ => "the card was declined",
            };
            set_status(connection, &payment, PaymentStatus::Failed, &code, message).await?;
            Ok(Some(JobOutcome::Cancel(code)))
        }
        (OperationKind::Capture, Verdict::Approved) => {
            followup::capture_settled(connection, &payment, attempt.amount, "").await?;
            Ok(Some(JobOutcome::Ok))
        }
        (OperationKind::Void, Verdict::Approved) => {
            set_status(connection, &payment, PaymentStatus::Canceled, "", "").await?;
            Ok(Some(JobOutcome::Ok))
        }
        // A refused capture or void leaves the authorization standing.
        (OperationKind::Capture | OperationKind::Void, Verdict::Refused { message, .. }) => {
            set_status(connection, &payment, PaymentStatus::RequiresCapture, "", "").await?;
            Ok(Some(JobOutcome::Retry(message)))
        }
        (OperationKind::Refund, _) => Ok(None),
    }
}

fn attempt_from_row(row: &sqlx::postgres::PgRow) -> Result<OpenAttempt, Error> {
    let currency = ledger::stored_currency(row)?;
    let kind = OperationKind::parse(row.try_get("kind")?)?;
    Ok(OpenAttempt {
        id: row.try_get("id")?,
        kind,
        status: row.try_get("status")?,
        amount: Money::new(row.try_get("amount")?, currency),
        parent_id: row.try_get("parent_id")?,
        refund_id: row.try_get("refund_id")?,
    })
}

const ATTEMPT_COLUMNS: &str =
    "a.id, a.kind, a.status, a.amount, a.currency, a.parent_id, a.refund_id";

async fn newest_attempt(
    connection: &mut PgConnection,
    payment_id: &str,
) -> Result<OpenAttempt, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts a WHERE a.payment_id = $1 AND a.kind <> 'refund' \
         ORDER BY a.created_at DESC, a.id DESC LIMIT 1"
    )))
    .bind(payment_id)
    .fetch_one(&mut *connection)
    .await?;
    attempt_from_row(&row)
}

async fn open_refund_attempt(
    connection: &mut PgConnection,
    payment_id: &str,
) -> Result<Option<OpenAttempt>, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts a JOIN refunds r ON r.id = a.refund_id \
         WHERE r.payment_id = $1 AND r.status = 'pending' ORDER BY a.created_at LIMIT 1"
    )))
    .bind(payment_id)
    .fetch_optional(&mut *connection)
    .await?;
    row.as_ref().map(attempt_from_row).transpose()
}

/// When the acquirer approved the payment's authorization.
async fn authorized_at(
    connection: &mut PgConnection,
    payment_id: &str,
) -> Result<chrono::DateTime<Utc>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT a.updated_at FROM payments p JOIN attempts a ON a.id = p.authorization_id WHERE p.id = $1",
    )
    .bind(payment_id)
    .fetch_one(&mut *connection)
    .await?)
}
