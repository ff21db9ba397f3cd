//! Card payments: CreatePayment in atomic phases with recovery points, and reads.
//!
//! CreatePayment (SYNC) runs as:
//! 1. claim the idempotency key with a lease (or resume an abandoned request, or replay);
//! 2. `started` → one transaction: check the merchant account, vault the card, insert the
//!    payment (PROCESSING) and the authorization attempt, audit → `payment_created`;
//! 3. call the acquirer with the attempt id as its idempotency key — never inside a
//!    database transaction;
//! 4. one transaction records the outcome: approved (manual capture → REQUIRES_CAPTURE,
//!    finished; automatic → a capture attempt → `authorized`), declined → FAILED, no answer
//!    or unavailable → PROCESSING (the SYNC fallback: that answer is stored and replayed);
//! 5. `authorized` → capture at the acquirer, then one transaction moves the money
//!    (acquirer settlement → merchant) and marks the payment SUCCEEDED.
//!
//! A request that dies between phases leaves its key at the last recovery point; once the
//! lease expires, a retry with the same key resumes there, and the attempt ids make the
//! acquirer answer repeats with the first outcome, so nothing is charged twice. Status
//! changes are conditional UPDATEs, so two resumers can never both move the money.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Acquire as _, PgConnection, PgPool, Row};
use tracing::Instrument as _;

pub mod events;
mod followup;
mod processing;

pub use followup::{Action, EncodeFollowUp, FollowUp, Refund, RefundStatus, get_refund};

use crate::acquirer::{
    Acquirer, AcquirerError, AuthorizeRequest, Operation, OperationKind, OperationStatus,
};
use crate::audit::{self, AuditEvent};
use crate::config::JobsConfig;
use crate::db;
use crate::domain::Money;
use crate::domain::card::CardDetails;
use crate::error::{Error, stored_names};
use crate::idempotency::{self, Claim, Claimed, Outcome, Stored};
use crate::jobs::{self, JobKind};
use crate::ledger::{self, new_id};
use crate::vault::{Sealed, Vault};

/// Where a payment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Accepted; no acquirer call yet.
    Pending,
    /// Waiting for, or unsure of, the acquirer's answer.
    Processing,
    /// Authorized; waiting for CapturePayment.
    RequiresCapture,
    /// Captured.
    Succeeded,
    /// Declined or failed; no charge exists.
    Failed,
    /// Canceled before capture.
    Canceled,
}

stored_names!(PaymentStatus {
    Pending => "pending",
    Processing => "processing",
    RequiresCapture => "requires_capture",
    Succeeded => "succeeded",
    Failed => "failed",
    Canceled => "canceled",
});

/// When the authorized amount is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMethod {
    /// Right after authorization.
    Automatic,
    /// By CapturePayment.
    Manual,
}

stored_names!(CaptureMethod {
    Automatic => "automatic",
    Manual => "manual",
});

/// How CreatePayment waits for the acquirer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentMode {
    /// Within the call; a job finishes what the call could not.
    Sync,
    /// PENDING at once; a job does the work.
    Async,
}

stored_names!(PaymentMode {
    Sync => "sync",
    Async => "async",
});

/// A payment as stored, with its card summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// `pay_…`.
    pub id: String,
    /// The owning principal.
    pub owner_id: String,
    /// The merchant account credited on capture.
    pub merchant_account_id: String,
    /// The authorized amount.
    pub amount: Money,
    /// Captured so far.
    pub amount_captured: Money,
    /// Refunded so far.
    pub amount_refunded: Money,
    /// Where it is.
    pub status: PaymentStatus,
    /// Automatic or manual capture.
    pub capture_method: CaptureMethod,
    /// SYNC or ASYNC.
    pub mode: PaymentMode,
    /// Card brand.
    pub card_brand: String,
    /// Card last four digits.
    pub card_last4: String,
    /// Card expiry month.
    pub card_exp_month: i16,
    /// Card expiry year.
    pub card_exp_year: i16,
    /// Why it failed.
    pub failure_code: String,
    /// Why it failed, in words.
    pub failure_message: String,
    /// Free text.
    pub description: String,
    /// Caller metadata.
    pub metadata: BTreeMap<String, String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// A validated CreatePayment request.
#[derive(Debug, Clone)]
pub struct NewPayment {
    /// The caller.
    pub owner_id: String,
    /// The merchant account to credit.
    pub merchant_account_id: String,
    /// The amount.
    pub amount: Money,
    /// The card (never logged: its Debug is redacted).
    pub card: CardDetails,
    /// When to capture.
    pub capture_method: CaptureMethod,
    /// SYNC or ASYNC.
    pub mode: PaymentMode,
    /// Free text.
    pub description: String,
    /// Caller metadata.
    pub metadata: BTreeMap<String, String>,
    /// The request id, for the audit trail.
    pub request_id: String,
}

/// What the payment flow needs.
#[derive(Debug, Clone)]
pub struct Payments {
    /// The database.
    pub pool: PgPool,
    /// The acquirer connector.
    pub acquirer: Arc<dyn Acquirer>,
    /// The card vault.
    pub vault: Arc<Vault>,
    /// Bound on each acquirer call; beyond it the outcome is unknown.
    pub acquirer_timeout: Duration,
    /// How long a request holds its idempotency key between phases.
    pub lease: Duration,
    /// Background jobs (attempts, backoff, the void timer).
    pub jobs: JobsConfig,
}

/// The job handler: each job drives its payment (see `processing`).
#[derive(Debug, Clone)]
pub struct PaymentJobs {
    payments: Payments,
    void_after: Duration,
}

impl PaymentJobs {
    /// Jobs over `payments`, voiding authorizations uncaptured after `void_after`.
    pub fn new(payments: Payments, void_after: Duration) -> Self {
        Self {
            payments,
            void_after,
        }
    }
}

#[tonic::async_trait]
impl jobs::runner::Handler for PaymentJobs {
    async fn perform(&self, claimed: &jobs::Claimed) -> jobs::JobOutcome {
        self.payments.drive(claimed, self.void_after).await
    }

    async fn maintain(&self) {
        // Abandoned requests get a job once their lease has been gone for another lease.
        match self.payments.complete_abandoned(self.payments.lease).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "abandoned requests handed to jobs"),
            Err(err) => tracing::warn!(error = %err, "completing abandoned requests failed"),
        }
        match idempotency::reap(
            &self.payments.pool,
            self.payments.jobs.idempotency_retention,
        )
        .await
        {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "expired idempotency keys reaped"),
            Err(err) => tracing::warn!(error = %err, "reaping idempotency keys failed"),
        }
    }
}

impl Payments {
    /// Gives `payment_id` a job (or wakes its live one) in the caller's transaction.
    async fn enqueue(
        &self,
        connection: &mut PgConnection,
        owner_id: &str,
        payment_id: &str,
        kind: JobKind,
        delay: Duration,
    ) -> Result<(), Error> {
        jobs::enqueue(
            connection,
            &jobs::NewJob {
                kind,
                owner_id,
                payment_id,
                max_attempts: self.jobs.max_attempts,
                delay,
            },
        )
        .await?;
        Ok(())
    }
}

const PAYMENT_SELECT: &str = "SELECT p.id, p.owner_id, p.merchant_account_id, p.currency, p.amount, p.amount_captured, \
     p.amount_refunded, p.status, p.capture_method, p.mode, p.failure_code, p.failure_message, p.description, \
     p.metadata, p.created_at, p.updated_at, c.brand, c.last4, c.exp_month, c.exp_year \
     FROM payments p JOIN cards c ON c.id = p.card_id";

fn payment_from_row(row: &sqlx::postgres::PgRow) -> Result<Payment, Error> {
    let currency = ledger::stored_currency(row)?;
    let metadata: sqlx::types::Json<BTreeMap<String, String>> = row.try_get("metadata")?;
    Ok(Payment {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        merchant_account_id: row.try_get("merchant_account_id")?,
        amount: Money::new(row.try_get("amount")?, currency),
        amount_captured: Money::new(row.try_get("amount_captured")?, currency),
        amount_refunded: Money::new(row.try_get("amount_refunded")?, currency),
        status: PaymentStatus::parse(row.try_get("status")?)?,
        capture_method: CaptureMethod::parse(row.try_get("capture_method")?)?,
        mode: PaymentMode::parse(row.try_get("mode")?)?,
        card_brand: row.try_get("brand")?,
        card_last4: row.try_get("last4")?,
        card_exp_month: row.try_get("exp_month")?,
        card_exp_year: row.try_get("exp_year")?,
        failure_code: row.try_get("failure_code")?,
        failure_message: row.try_get("failure_message")?,
        description: row.try_get("description")?,
        metadata: metadata.0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// One of `owner_id`'s payments.
pub async fn get(
    connection: &mut PgConnection,
    owner_id: &str,
    payment_id: &str,
) -> Result<Payment, Error> {
    fetch(connection, owner_id, payment_id, "").await
}

/// One of `owner_id`'s payments, its row locked until the transaction ends.
async fn get_for_update(
    connection: &mut PgConnection,
    owner_id: &str,
    payment_id: &str,
) -> Result<Payment, Error> {
    fetch(connection, owner_id, payment_id, " FOR UPDATE OF p").await
}

async fn fetch(
    connection: &mut PgConnection,
    owner_id: &str,
    payment_id: &str,
    lock: &'static str,
) -> Result<Payment, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{PAYMENT_SELECT} WHERE p.id = $1 AND p.owner_id = $2{lock}"
    )))
    .bind(payment_id)
    .bind(owner_id)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or(Error::NotFound("payment"))?;
    payment_from_row(&row)
}

/// A page of `owner_id`'s payments, newest first, optionally in one status.
pub async fn list(
    connection: &mut PgConnection,
    owner_id: &str,
    status: Option<PaymentStatus>,
    after: Option<&(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<Payment>, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{PAYMENT_SELECT} WHERE p.owner_id = $1 AND ($2::text IS NULL OR p.status = $2) \
         AND ($3::timestamptz IS NULL OR (p.created_at, p.id) < ($3, $4)) \
         ORDER BY p.created_at DESC, p.id DESC LIMIT $5"
    )))
    .bind(owner_id)
    .bind(status.map(PaymentStatus::as_str))
    .bind(after.map(|(at, _)| *at))
    .bind(after.map(|(_, id)| id.as_str()).unwrap_or(""))
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter().map(payment_from_row).collect()
}

/// The job that settles a call without a final answer: an unknown outcome is looked up;
/// anything else (nothing happened) is tried again.
fn settling_job(result: &Result<Operation, AcquirerError>) -> JobKind {
    if matches!(result, Err(AcquirerError::Timeout)) {
        JobKind::ResolveUnknown
    } else {
        JobKind::ProcessPayment
    }
}

/// Where a new payment starts.
fn initial_status(mode: PaymentMode) -> PaymentStatus {
    match mode {
        PaymentMode::Sync => PaymentStatus::Processing,
        PaymentMode::Async => PaymentStatus::Pending,
    }
}

/// How a finished CreatePayment's payment becomes the stored response.
pub type Encode = Arc<dyn Fn(&Payment) -> Vec<u8> + Send + Sync>;

impl Payments {
    /// Runs CreatePayment under `claim` to an answer (see the module docs).
    pub async fn create(
        &self,
        claim: &Claim<'_>,
        new: NewPayment,
        encode: Encode,
    ) -> Result<Outcome, Error> {
        let (mut recovery_point, mut payment_id) =
            match idempotency::claim_leased(&self.pool, claim, self.lease).await? {
                Claimed::Done(outcome) => return Ok(outcome),
                Claimed::New => ("started".to_owned(), None),
                Claimed::Resume {
                    recovery_point,
                    resource_id,
                } => (recovery_point, resource_id),
            };
        let result = self
            .run_phases(claim, &new, &encode, &mut recovery_point, &mut payment_id)
            .await;
        match result {
            Ok(outcome) => Ok(outcome),
            Err(err) => {
                if payment_id.is_none() {
                    // Nothing was created: the key is not stored (e.g. NOT_FOUND).
                    idempotency::release(&self.pool, claim).await?;
                } else {
                    // Keep the recovery point; let a retry resume at once.
                    idempotency::unlock(&self.pool, claim).await?;
                }
                Err(err)
            }
        }
    }

    async fn run_phases(
        &self,
        claim: &Claim<'_>,
        new: &NewPayment,
        encode: &Encode,
        recovery_point: &mut String,
        payment_id: &mut Option<String>,
    ) -> Result<Outcome, Error> {
        loop {
            let next = match (recovery_point.as_str(), payment_id.as_deref()) {
                ("started", _) => match self
                    .phase_create(claim, new, encode)
                    .instrument(db::span("payment.create"))
                    .await?
                {
                    PhaseResult::Next(id) => {
                        *payment_id = Some(id);
                        "payment_created"
                    }
                    PhaseResult::Finished(stored) => return Ok(fresh(stored)),
                },
                // A resumed request whose payment a job already moved on answers with
                // the payment as it is: the acquirer is not asked again.
                ("payment_created" | "authorized", Some(id))
                    if self.moved_on(claim.owner_id, id).await? =>
                {
                    let transaction = self.pool.begin().await?;
                    match self.finish(transaction, claim, id, encode).await? {
                        PhaseResult::Finished(stored) => return Ok(fresh(stored)),
                        PhaseResult::Next(_) => {
                            return Err(Error::Internal("finish has no next phase".to_owned()));
                        }
                    }
                }
                ("payment_created", Some(id)) => {
                    match self.phase_authorize(claim, id, new, encode).await? {
                        PhaseResult::Next(_) => "authorized",
                        PhaseResult::Finished(stored) => return Ok(fresh(stored)),
                    }
                }
                ("authorized", Some(id)) => match self.phase_capture(claim, id, new, encode).await?
                {
                    PhaseResult::Finished(stored) => return Ok(fresh(stored)),
                    PhaseResult::Next(_) => {
                        return Err(Error::Internal("capture has no next phase".to_owned()));
                    }
                },
                (point, _) => {
                    return Err(Error::Internal(format!("unknown recovery point {point:?}")));
                }
            };
            *recovery_point = next.to_owned();
        }
    }

    /// Whether a job moved the payment on (it is no longer PROCESSING).
    async fn moved_on(&self, owner_id: &str, payment_id: &str) -> Result<bool, Error> {
        let mut connection = self.pool.acquire().await?;
        let payment = get(&mut connection, owner_id, payment_id).await?;
        Ok(payment.status != PaymentStatus::Processing)
    }

    /// The completer: gives every request abandoned mid-phase (its idempotency lease ran
    /// out more than `grace` ago and nobody resumed it) a job that finishes its payment. A
    /// client that retries later gets the payment as the job left it. A key whose work is
    /// done (its attempt settled, its payment past processing) is left for that retry:
    /// handing it out again would enqueue a job with nothing to do on every pass.
    pub async fn complete_abandoned(&self, grace: Duration) -> Result<u64, Error> {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let abandoned: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT k.owner_id, coalesce(a.payment_id, k.resource_id), \
               CASE WHEN a.kind = 'refund' THEN 'resolve_refund' WHEN a.id IS NOT NULL THEN 'resolve_unknown' \
                    ELSE 'process_payment' END \
             FROM idempotency_keys k LEFT JOIN attempts a ON a.id = k.resource_id \
               JOIN payments p ON p.id = coalesce(a.payment_id, k.resource_id) \
             WHERE k.recovery_point NOT IN ('started', 'finished') AND k.resource_id IS NOT NULL \
               AND CASE WHEN a.id IS NOT NULL THEN a.status IN ('pending', 'unknown') \
                        ELSE p.status IN ('pending', 'processing') END \
               AND k.locked_until < now() - make_interval(secs => $1::double precision / 1000) \
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.payment_id = coalesce(a.payment_id, k.resource_id) \
                 AND j.state IN ('available', 'scheduled', 'executing', 'retryable') AND j.schedule_at <= now())",
        )
        .bind(grace_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut enqueued = 0;
        for (owner_id, payment_id, kind) in abandoned {
            let mut transaction = self.pool.begin().await?;
            self.enqueue(
                &mut transaction,
                &owner_id,
                &payment_id,
                JobKind::parse(&kind)?,
                Duration::ZERO,
            )
            .await?;
            transaction.commit().await?;
            enqueued += 1;
        }
        Ok(enqueued)
    }

    /// `started` → `payment_created`.
    async fn phase_create(
        &self,
        claim: &Claim<'_>,
        new: &NewPayment,
        encode: &Encode,
    ) -> Result<PhaseResult, Error> {
        let mut transaction = self.pool.begin().await?;
        let mut savepoint = transaction.begin().await?;
        let created = self.insert_payment(&mut savepoint, new).await;
        match created {
            Ok(payment_id) if new.mode == PaymentMode::Async => {
                // PENDING at once; a job does the work.
                savepoint.commit().await?;
                self.enqueue(
                    &mut transaction,
                    &new.owner_id,
                    &payment_id,
                    JobKind::ProcessPayment,
                    Duration::ZERO,
                )
                .await?;
                self.finish(transaction, claim, &payment_id, encode).await
            }
            Ok(payment_id) => {
                savepoint.commit().await?;
                idempotency::advance(
                    &mut transaction,
                    claim,
                    "payment_created",
                    Some(&payment_id),
                )
                .await?;
                transaction.commit().await?;
                Ok(PhaseResult::Next(payment_id))
            }
            Err(err) if err.is_business_outcome() => {
                savepoint.rollback().await?;
                let stored = idempotency::refusal(err);
                idempotency::finish(&mut transaction, claim, &stored).await?;
                transaction.commit().await?;
                Ok(PhaseResult::Finished(stored))
            }
            Err(err) => Err(err),
        }
    }

    async fn insert_payment(
        &self,
        connection: &mut PgConnection,
        new: &NewPayment,
    ) -> Result<String, Error> {
        let merchant =
            ledger::get_account(connection, &new.owner_id, &new.merchant_account_id).await?;
        if merchant.kind != ledger::AccountKind::Merchant {
            return Err(Error::Precondition {
                reason: "NOT_A_MERCHANT_ACCOUNT",
                message: format!("account {} is not a merchant account", merchant.id),
            });
        }
        if merchant.currency != new.amount.currency() {
            return Err(Error::CurrencyMismatch(format!(
                "merchant account {} holds {}, the payment is in {}",
                merchant.id,
                merchant.currency,
                new.amount.currency()
            )));
        }
        let card_id = new_id("card");
        let sealed = self
            .vault
            .seal(&card_id, &new.card.pan)
            .map_err(|e| Error::Internal(e.to_string()))?;
        sqlx::query(
            "INSERT INTO cards (id, owner_id, key_id, nonce, ciphertext, fingerprint, last4, brand, exp_month, exp_year) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&card_id)
        .bind(&new.owner_id)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(self.vault.fingerprint(&new.card.pan))
        .bind(new.card.pan.last4())
        .bind(new.card.pan.brand())
        .bind(i16::from(new.card.exp_month))
        .bind(i16::try_from(new.card.exp_year).unwrap_or(i16::MAX))
        .execute(&mut *connection)
        .await?;
        let payment_id = new_id("pay");
        sqlx::query(
            "INSERT INTO payments (id, owner_id, merchant_account_id, currency, amount, status, capture_method, mode, \
             card_id, description, metadata) VALUES ($1, $2, $3, $4, $5, $10, $6, $11, $7, $8, $9)",
        )
        .bind(&payment_id)
        .bind(&new.owner_id)
        .bind(&new.merchant_account_id)
        .bind(new.amount.currency().code())
        .bind(new.amount.amount_minor())
        .bind(new.capture_method.as_str())
        .bind(&card_id)
        .bind(&new.description)
        .bind(sqlx::types::Json(&new.metadata))
        .bind(initial_status(new.mode).as_str())
        .bind(new.mode.as_str())
        .execute(&mut *connection)
        .await?;
        insert_attempt(
            connection,
            &new.owner_id,
            &payment_id,
            OperationKind::Authorize,
            new.amount,
            None,
            None,
        )
        .await?;
        events::payment_changed(connection, &payment_id, events::EventType::PaymentCreated).await?;
        crate::metrics::payment_transition(initial_status(new.mode), new.amount.currency().code());
        audit::record(
            connection,
            AuditEvent {
                owner_id: &new.owner_id,
                principal: &new.owner_id,
                action: "payment.create",
                entity_type: "payment",
                entity_id: &payment_id,
                before: None,
                after: Some(serde_json::json!({
                    "status": initial_status(new.mode).as_str(),
                    "mode": new.mode.as_str(),
                    "amount_minor": new.amount.amount_minor(),
                    "currency": new.amount.currency().code(),
                    "merchant_account_id": new.merchant_account_id,
                    "card_last4": new.card.pan.last4(),
                })),
                request_id: &new.request_id,
            },
        )
        .await?;
        Ok(payment_id)
    }

    /// `payment_created` → `authorized` (or finished).
    async fn phase_authorize(
        &self,
        claim: &Claim<'_>,
        payment_id: &str,
        new: &NewPayment,
        encode: &Encode,
    ) -> Result<PhaseResult, Error> {
        let (attempt_id, amount, card) = async {
            let mut connection = self.pool.acquire().await?;
            let attempt = pending_attempt(&mut connection, payment_id, "authorize").await?;
            let card = self
                .stored_card(&mut connection, payment_id, Some(new))
                .await?;
            Ok::<_, Error>((attempt.0, attempt.1, card))
        }
        .instrument(db::span("attempt.load"))
        .await?;
        let result = tokio::time::timeout(
            self.acquirer_timeout,
            self.acquirer.authorize(AuthorizeRequest {
                operation_id: &attempt_id,
                reference: payment_id,
                amount,
                card: &card,
            }),
        )
        .await
        .unwrap_or(Err(AcquirerError::Timeout));
        if matches!(&result, Ok(op) if op.status == OperationStatus::Approved) {
            crate::failpoint::hit("after_acquirer_approve");
        }
        self.record_authorization(claim, payment_id, &attempt_id, &result, encode)
            .instrument(db::span("attempt.record"))
            .await
    }

    /// Stores what the acquirer answered to the authorization `attempt_id` and moves the
    /// payment on.
    async fn record_authorization(
        &self,
        claim: &Claim<'_>,
        payment_id: &str,
        attempt_id: &str,
        result: &Result<Operation, AcquirerError>,
        encode: &Encode,
    ) -> Result<PhaseResult, Error> {
        let attempt_id = attempt_id.to_owned();
        let mut transaction = self.pool.begin().await?;
        if record_attempt(&mut transaction, &attempt_id, result).await? == Recorded::Settled {
            // A job that took this request over settled the authorization: the key
            // answers the payment as it stands.
            return self.finish(transaction, claim, payment_id, encode).await;
        }
        let payment = get(&mut transaction, claim.owner_id, payment_id).await?;
        match result {
            Ok(op) if op.status == OperationStatus::Approved => {
                sqlx::query(
                    "UPDATE payments SET authorization_id = $2, updated_at = now() WHERE id = $1",
                )
                .bind(payment_id)
                .bind(&attempt_id)
                .execute(&mut *transaction)
                .await?;
                if payment.capture_method == CaptureMethod::Manual {
                    set_status(
                        &mut transaction,
                        &payment,
                        PaymentStatus::RequiresCapture,
                        "",
                        "",
                    )
                    .await?;
                    // The void timer: uncaptured authorizations do not stay forever.
                    self.enqueue(
                        &mut transaction,
                        &payment.owner_id,
                        payment_id,
                        JobKind::VoidExpired,
                        self.jobs.void_after,
                    )
                    .await?;
                    return self.finish(transaction, claim, payment_id, encode).await;
                }
                insert_attempt(
                    &mut transaction,
                    &payment.owner_id,
                    payment_id,
                    OperationKind::Capture,
                    payment.amount,
                    Some(&attempt_id),
                    None,
                )
                .await?;
                idempotency::advance(&mut transaction, claim, "authorized", None).await?;
                transaction.commit().await?;
                Ok(PhaseResult::Next(payment_id.to_owned()))
            }
            Ok(Operation {
                status: OperationStatus::Declined { code },
                ..
            }) => {
                let message = match code.as_str() {
                    "insufficient_funds" => "the card has insufficient funds",
                    _ => "the card was declined",
                };
                set_status(
                    &mut transaction,
                    &payment,
                    PaymentStatus::Failed,
                    code,
                    message,
                )
                .await?;
                self.finish(transaction, claim, payment_id, encode).await
            }
            // Not settled (processing error, timeout, unavailable): the payment stays
            // PROCESSING, which is the SYNC answer, and a job takes over — looking the
            // attempt up first when its outcome is unknown.
            _ => {
                self.enqueue(
                    &mut transaction,
                    &payment.owner_id,
                    payment_id,
                    settling_job(result),
                    self.jobs.backoff_base,
                )
                .await?;
                self.finish(transaction, claim, payment_id, encode).await
            }
        }
    }

    /// `authorized` → finished.
    async fn phase_capture(
        &self,
        claim: &Claim<'_>,
        payment_id: &str,
        _new: &NewPayment,
        encode: &Encode,
    ) -> Result<PhaseResult, Error> {
        let (attempt_id, amount, authorization_id) = async {
            let mut connection = self.pool.acquire().await?;
            let (attempt_id, amount) =
                pending_attempt(&mut connection, payment_id, "capture").await?;
            let authorization_id = followup::authorization_id(&mut connection, payment_id).await?;
            Ok::<_, Error>((attempt_id, amount, authorization_id))
        }
        .instrument(db::span("attempt.load"))
        .await?;
        let result = tokio::time::timeout(
            self.acquirer_timeout,
            self.acquirer
                .capture(&attempt_id, &authorization_id, amount),
        )
        .await
        .unwrap_or(Err(AcquirerError::Timeout));
        crate::failpoint::hit("before_finalize");

        async {
            let mut transaction = self.pool.begin().await?;
            if record_attempt(&mut transaction, &attempt_id, &result).await? == Recorded::Settled {
                return self.finish(transaction, claim, payment_id, encode).await;
            }
            let payment = get(&mut transaction, claim.owner_id, payment_id).await?;
            if matches!(&result, Ok(op) if op.status == OperationStatus::Approved) {
                followup::capture_settled(&mut transaction, &payment, amount, "").await?;
            } else {
                // Not captured yet (or not known to be): a job settles it.
                self.enqueue(
                    &mut transaction,
                    &payment.owner_id,
                    payment_id,
                    settling_job(&result),
                    self.jobs.backoff_base,
                )
                .await?;
            }
            self.finish(transaction, claim, payment_id, encode).await
        }
        .instrument(db::span("attempt.record"))
        .await
    }

    /// Stores the payment as it now stands as the key's answer, and commits.
    async fn finish(
        &self,
        mut transaction: sqlx::Transaction<'static, sqlx::Postgres>,
        claim: &Claim<'_>,
        payment_id: &str,
        encode: &Encode,
    ) -> Result<PhaseResult, Error> {
        let payment = get(&mut transaction, claim.owner_id, payment_id).await?;
        let stored = Stored::Response(encode(&payment));
        idempotency::finish(&mut transaction, claim, &stored).await?;
        transaction.commit().await?;
        Ok(PhaseResult::Finished(stored))
    }

    /// The card of a payment: decrypted from the vault (the CVC only exists in the
    /// request that brought it, never in the database).
    async fn stored_card(
        &self,
        connection: &mut PgConnection,
        payment_id: &str,
        new: Option<&NewPayment>,
    ) -> Result<CardDetails, Error> {
        let row = sqlx::query(
            "SELECT c.id, c.key_id, c.nonce, c.ciphertext, c.exp_month, c.exp_year \
             FROM payments p JOIN cards c ON c.id = p.card_id WHERE p.id = $1",
        )
        .bind(payment_id)
        .fetch_one(&mut *connection)
        .await?;
        let card_id: String = row.try_get("id")?;
        let sealed = Sealed {
            key_id: row.try_get("key_id")?,
            nonce: row.try_get("nonce")?,
            ciphertext: row.try_get("ciphertext")?,
        };
        let pan = self
            .vault
            .open(&card_id, &sealed)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let cvc = new
            .filter(|new| new.card.pan == pan)
            .and_then(|new| new.card.cvc.clone());
        Ok(CardDetails {
            pan,
            exp_month: u8::try_from(row.try_get::<i16, _>("exp_month")?).unwrap_or(0),
            exp_year: u16::try_from(row.try_get::<i16, _>("exp_year")?).unwrap_or(0),
            cvc,
        })
    }
}

enum PhaseResult {
    Next(String),
    Finished(Stored),
}

fn fresh(stored: Stored) -> Outcome {
    Outcome {
        stored,
        replayed: false,
    }
}

/// Writes an attempt BEFORE its acquirer call; its id is the acquirer's operation id.
/// `parent` is the operation it applies to (capture, void: the authorization; refund:
/// the capture).
async fn insert_attempt(
    connection: &mut PgConnection,
    owner_id: &str,
    payment_id: &str,
    kind: OperationKind,
    amount: Money,
    parent: Option<&str>,
    refund_id: Option<&str>,
) -> Result<String, Error> {
    let attempt_id = new_id("att");
    sqlx::query(
        "INSERT INTO attempts (id, owner_id, payment_id, kind, currency, amount, status, parent_id, refund_id) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)",
    )
    .bind(&attempt_id)
    .bind(owner_id)
    .bind(payment_id)
    .bind(kind.as_str())
    .bind(amount.currency().code())
    .bind(amount.amount_minor())
    .bind(parent)
    .bind(refund_id)
    .execute(connection)
    .await?;
    Ok(attempt_id)
}

/// The newest attempt of `kind` still waiting for (or unsure of) its answer.
async fn pending_attempt(
    connection: &mut PgConnection,
    payment_id: &str,
    kind: &str,
) -> Result<(String, Money), Error> {
    let row = sqlx::query(
        "SELECT id, currency, amount FROM attempts WHERE payment_id = $1 AND kind = $2 \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(payment_id)
    .bind(kind)
    .fetch_one(&mut *connection)
    .await?;
    let currency = ledger::stored_currency(&row)?;
    Ok((
        row.try_get("id")?,
        Money::new(row.try_get("amount")?, currency),
    ))
}

/// What became of an acquirer's answer for an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Recorded {
    /// Stored: the attempt was open (pending, unknown) or already held this answer. The
    /// caller acts on it.
    Stored,
    /// Not stored: the attempt already holds a different final answer, recorded and
    /// acted on by someone else (a job that took the attempt over, or the request it was
    /// taken from). That answer stands; the caller acts on nothing.
    Settled,
}

/// Records the acquirer's answer for `attempt_id`. A final answer (approved, declined,
/// failed) is never overwritten by a different one: two holders of one attempt — a
/// resumed request and the job that took it over — can both be calling the acquirer,
/// and the later answer ("unavailable" on a resend, say) must not relabel an approval
/// whose money the first already booked (bank soak, seed 17303545554639702866).
async fn record_attempt(
    connection: &mut PgConnection,
    attempt_id: &str,
    result: &Result<Operation, AcquirerError>,
) -> Result<Recorded, Error> {
    let (status, code) = match result {
        Ok(op) => match &op.status {
            OperationStatus::Approved => ("approved", String::new()),
            OperationStatus::Declined { code } => ("declined", code.clone()),
            OperationStatus::Failed { code } => ("failed", code.clone()),
        },
        Err(AcquirerError::Timeout) => ("unknown", "timeout".to_owned()),
        Err(AcquirerError::Unavailable(_)) => ("failed", "unavailable".to_owned()),
        Err(AcquirerError::Rejected(reason)) => ("failed", format!("rejected: {reason}")),
    };
    let stored = sqlx::query(
        "UPDATE attempts SET status = $2, result_code = $3, updated_at = now() \
         WHERE id = $1 AND (status IN ('pending', 'unknown') OR status = $2)",
    )
    .bind(attempt_id)
    .bind(status)
    .bind(code)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if stored == 1 {
        return Ok(Recorded::Stored);
    }
    let settled: String = sqlx::query_scalar("SELECT status FROM attempts WHERE id = $1")
        .bind(attempt_id)
        .fetch_one(&mut *connection)
        .await?;
    if status == "approved" {
        // The acquirer performed an operation the books settled otherwise: never
        // silent (reconcile reports it too).
        tracing::error!(
            attempt_id,
            settled = %settled,
            "the acquirer approved an attempt already settled otherwise"
        );
    } else {
        tracing::info!(
            attempt_id,
            settled = %settled,
            answer = status,
            "attempt already settled: this later answer is not recorded"
        );
    }
    Ok(Recorded::Settled)
}

async fn set_status(
    connection: &mut PgConnection,
    payment: &Payment,
    status: PaymentStatus,
    failure_code: &str,
    failure_message: &str,
) -> Result<(), Error> {
    let moved = sqlx::query(
        "UPDATE payments SET status = $2, failure_code = $3, failure_message = $4, updated_at = now() \
         WHERE id = $1 AND status = $5",
    )
    .bind(&payment.id)
    .bind(status.as_str())
    .bind(failure_code)
    .bind(failure_message)
    .bind(payment.status.as_str())
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if moved == 1 {
        crate::metrics::payment_transition(status, payment.amount.currency().code());
        if let Some(event_type) = events::EventType::of_status(status) {
            events::payment_changed(connection, &payment.id, event_type).await?;
        }
        audit::record(
            connection,
            AuditEvent {
                owner_id: &payment.owner_id,
                principal: &payment.owner_id,
                action: "payment.status",
                entity_type: "payment",
                entity_id: &payment.id,
                before: Some(serde_json::json!({ "status": payment.status.as_str() })),
                after: Some(
                    serde_json::json!({ "status": status.as_str(), "failure_code": failure_code }),
                ),
                request_id: "",
            },
        )
        .await?;
    }
    Ok(())
}
