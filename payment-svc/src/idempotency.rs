//! Idempotency keys (DESIGN §4; Stripe's semantics on Brandur Leach's PostgreSQL design).
//!
//! Scope: (principal, RPC method, key). The fingerprint is SHA-256 of the request after
//! defaults are applied, with the key cleared. A key is claimed atomically with
//! `INSERT … ON CONFLICT DO NOTHING` — never select-then-insert.
//!
//! [`run_atomic`] is for operations made of database work only: claim, work, and the
//! stored response commit in ONE transaction, so there is no recovery point in between.
//! A concurrent request with the same key waits on the claim's row lock until the first
//! commits, then replays its answer. Multi-phase operations (those calling the acquirer)
//! use recovery points and leases instead (payments).
//!
//! Stored and replayed: successes and business outcomes (refusals). Not stored (the key
//! is released by rolling back): NOT_FOUND and every transient or internal failure, so a
//! retry runs afresh.

use std::future::Future;
use std::pin::Pin;

use sha2::{Digest, Sha256};
use sqlx::{Acquire as _, PgConnection, PgPool, Row};
use tonic::Code;
use tracing::Instrument as _;

use crate::domain::IdempotencyKey;
use crate::error::{Error, is_retryable_conflict};

/// Response metadata marking a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// How many times a transaction is retried on serialization failures and deadlocks.
const MAX_ATTEMPTS: u32 = 5;

/// The request's identity for idempotency purposes.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    /// The principal.
    pub owner_id: &'a str,
    /// The RPC's full path.
    pub method: &'a str,
    /// The client's key.
    pub key: &'a IdempotencyKey,
    /// SHA-256 of the normalized request without its key.
    pub fingerprint: [u8; 32],
}

/// SHA-256 of an encoded request.
pub fn fingerprint(encoded_request: &[u8]) -> [u8; 32] {
    Sha256::digest(encoded_request).into()
}

/// A stored answer: the encoded response, or a stored refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// The encoded response message.
    Response(Vec<u8>),
    /// A business refusal: code, message and encoded error details.
    Refusal {
        /// gRPC status code.
        code: i32,
        /// Status message.
        message: String,
        /// `grpc-status-details-bin`.
        details: Vec<u8>,
    },
}

/// The outcome of an idempotent call.
#[derive(Debug)]
pub struct Outcome {
    /// The answer.
    pub stored: Stored,
    /// Whether it was replayed from an earlier call.
    pub replayed: bool,
}

/// Boxed work run inside the claim's transaction.
pub type Work<'c> = Pin<Box<dyn Future<Output = Result<Vec<u8>, Error>> + Send + 'c>>;

/// Runs `work` at most once per claim, in the claim's transaction; replays otherwise.
/// `work` gets the transaction's connection and returns the encoded response.
pub async fn run_atomic<F>(pool: &PgPool, claim: &Claim<'_>, mut work: F) -> Result<Outcome, Error>
where
    F: for<'c> FnMut(&'c mut PgConnection) -> Work<'c>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Metrics of an attempt count only once its transaction commits.
        match crate::metrics::deferred(try_atomic(pool, claim, &mut work))
            .instrument(crate::db::span("idempotency.atomic"))
            .await
        {
            Err(err) if attempt < MAX_ATTEMPTS && is_retryable_conflict(&err) => {
                tracing::debug!(attempt, error = %err, "retrying transaction");
            }
            result => {
                match &result {
                    Ok(outcome) if outcome.replayed => {
                        crate::metrics::idempotent_replay(claim.method)
                    }
                    Err(err) => count_conflict(claim, err),
                    Ok(_) => {}
                }
                return result;
            }
        }
    }
}

/// Counts a refusal over the idempotency key itself.
fn count_conflict(claim: &Claim<'_>, err: &Error) {
    match err {
        Error::IdempotencyKeyReused => crate::metrics::idempotency_conflict(claim.method, "reused"),
        Error::IdempotencyKeyInUse => crate::metrics::idempotency_conflict(claim.method, "in_use"),
        _ => {}
    }
}

async fn try_atomic<F>(pool: &PgPool, claim: &Claim<'_>, work: &mut F) -> Result<Outcome, Error>
where
    F: for<'c> FnMut(&'c mut PgConnection) -> Work<'c>,
{
    let mut transaction = pool.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (owner_id, method, key, fingerprint) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .bind(claim.fingerprint.as_slice())
    .execute(&mut *transaction)
    .await?
    .rows_affected()
        == 1;
    if !claimed {
        let existing = load(&mut transaction, claim).await?;
        transaction.rollback().await?;
        return existing;
    }

    // The work runs in a savepoint: a business refusal undoes the work but keeps the
    // claim, which then stores the refusal.
    let mut savepoint = transaction.begin().await?;
    let result = work(&mut savepoint).await;
    let stored = match result {
        Ok(response) => {
            savepoint.commit().await?;
            Stored::Response(response)
        }
        Err(err) if err.is_business_outcome() => {
            savepoint.rollback().await?;
            crate::metrics::discard();
            refusal(err)
        }
        Err(err) => {
            // Not stored: dropping the transaction rolls back the claim too.
            return Err(err);
        }
    };
    finish(&mut transaction, claim, &stored).await?;
    transaction.commit().await?;
    crate::metrics::commit();
    Ok(Outcome {
        stored,
        replayed: false,
    })
}

/// Answers a request whose key was already claimed.
async fn load(
    connection: &mut PgConnection,
    claim: &Claim<'_>,
) -> Result<Result<Outcome, Error>, Error> {
    let row = sqlx::query(
        "SELECT fingerprint, recovery_point, response_code, response_body, response_details \
         FROM idempotency_keys WHERE owner_id = $1 AND method = $2 AND key = $3",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .fetch_optional(&mut *connection)
    .await?;
    let Some(row) = row else {
        // Claimed and released (rolled back) between our insert and this read: the
        // caller retries, like any transient conflict.
        return Ok(Err(Error::IdempotencyKeyInUse));
    };
    let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
    if fingerprint != claim.fingerprint {
        return Ok(Err(Error::IdempotencyKeyReused));
    }
    let recovery_point: String = row.try_get("recovery_point")?;
    if recovery_point != "finished" {
        return Ok(Err(Error::IdempotencyKeyInUse));
    }
    let code: i32 = row.try_get("response_code")?;
    let body: Vec<u8> = row.try_get("response_body")?;
    let stored = if code == Code::Ok as i32 {
        Stored::Response(body)
    } else {
        Stored::Refusal {
            code,
            message: String::from_utf8_lossy(&body).into_owned(),
            details: row
                .try_get::<Option<Vec<u8>>, _>("response_details")?
                .unwrap_or_default(),
        }
    };
    Ok(Ok(Outcome {
        stored,
        replayed: true,
    }))
}

/// Where a leased (multi-phase) request starts.
#[derive(Debug)]
pub enum Claimed {
    /// The key is new: start from the beginning.
    New,
    /// An earlier request stopped at `recovery_point` (its lease expired): resume there.
    Resume {
        /// The last completed phase.
        recovery_point: String,
        /// What that request created (a payment, an attempt), if it got that far.
        resource_id: Option<String>,
    },
    /// The request finished before: replay its answer.
    Done(Outcome),
}

/// Claims `claim` for a multi-phase request, holding it for `lease`. A key whose lease
/// expired (its request died between phases) is taken over and resumed; a key whose lease
/// holds is IN_USE.
pub async fn claim_leased(
    pool: &PgPool,
    claim: &Claim<'_>,
    lease: std::time::Duration,
) -> Result<Claimed, Error> {
    let claimed = claim_leased_in_transaction(pool, claim, lease)
        .instrument(crate::db::span("idempotency.claim"))
        .await;
    match &claimed {
        Ok(Claimed::Done(_)) => crate::metrics::idempotent_replay(claim.method),
        Err(err) => count_conflict(claim, err),
        Ok(_) => {}
    }
    claimed
}

async fn claim_leased_in_transaction(
    pool: &PgPool,
    claim: &Claim<'_>,
    lease: std::time::Duration,
) -> Result<Claimed, Error> {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut transaction = pool.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (owner_id, method, key, fingerprint, locked_until) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::double precision / 1000)) ON CONFLICT DO NOTHING",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .bind(claim.fingerprint.as_slice())
    .bind(lease_ms)
    .execute(&mut *transaction)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        transaction.commit().await?;
        return Ok(Claimed::New);
    }
    let row = sqlx::query(
        "SELECT fingerprint, recovery_point, resource_id, coalesce(locked_until > now(), false) AS locked \
         FROM idempotency_keys WHERE owner_id = $1 AND method = $2 AND key = $3 FOR UPDATE",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .fetch_optional(&mut *transaction)
    .await?;
    let Some(row) = row else {
        // Released between our insert and this read (the request holding it failed before
        // it changed anything, while we waited for its row lock): IN_USE, which the
        // caller retries and then claims afresh — never INTERNAL.
        return Err(Error::IdempotencyKeyInUse);
    };
    let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
    if fingerprint != claim.fingerprint {
        return Err(Error::IdempotencyKeyReused);
    }
    let recovery_point: String = row.try_get("recovery_point")?;
    if recovery_point == "finished" {
        let outcome = load(&mut transaction, claim).await??;
        transaction.rollback().await?;
        return Ok(Claimed::Done(outcome));
    }
    if row.try_get::<bool, _>("locked")? {
        return Err(Error::IdempotencyKeyInUse);
    }
    sqlx::query(
        "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $4::double precision / 1000), \
         updated_at = now() WHERE owner_id = $1 AND method = $2 AND key = $3",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .bind(lease_ms)
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    Ok(Claimed::Resume {
        recovery_point,
        resource_id: row.try_get("resource_id")?,
    })
}

/// Records a completed phase, in that phase's transaction.
pub async fn advance(
    connection: &mut PgConnection,
    claim: &Claim<'_>,
    recovery_point: &str,
    resource_id: Option<&str>,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET recovery_point = $4, resource_id = coalesce($5, resource_id), updated_at = now() \
         WHERE owner_id = $1 AND method = $2 AND key = $3",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .bind(recovery_point)
    .bind(resource_id)
    .execute(connection)
    .await?;
    Ok(())
}

/// Stores the final answer, in the last phase's transaction.
pub async fn finish(
    connection: &mut PgConnection,
    claim: &Claim<'_>,
    stored: &Stored,
) -> Result<(), Error> {
    let (code, body, details): (i32, &[u8], Option<&[u8]>) = match stored {
        Stored::Response(body) => (Code::Ok as i32, body, None),
        Stored::Refusal {
            code,
            message,
            details,
        } => (*code, message.as_bytes(), Some(details)),
    };
    sqlx::query(
        "UPDATE idempotency_keys SET recovery_point = 'finished', response_code = $4, response_body = $5, \
         response_details = $6, locked_until = NULL, updated_at = now() \
         WHERE owner_id = $1 AND method = $2 AND key = $3",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .bind(code)
    .bind(body)
    .bind(details)
    .execute(connection)
    .await?;
    Ok(())
}

/// After a transient failure: keep the recovery point, drop the lease, so a retry
/// resumes at once.
pub async fn unlock(pool: &PgPool, claim: &Claim<'_>) -> Result<(), Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET locked_until = NULL, updated_at = now() \
         WHERE owner_id = $1 AND method = $2 AND key = $3 AND recovery_point <> 'finished'",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets a key whose request created nothing (e.g. NOT_FOUND): not stored.
pub async fn release(pool: &PgPool, claim: &Claim<'_>) -> Result<(), Error> {
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE owner_id = $1 AND method = $2 AND key = $3 \
         AND recovery_point = 'started'",
    )
    .bind(claim.owner_id)
    .bind(claim.method)
    .bind(claim.key.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets a key in the transaction that undid its request's effects (the acquirer did
/// nothing and the request's state changes were reverted): a retry runs afresh.
pub async fn forget(connection: &mut PgConnection, claim: &Claim<'_>) -> Result<(), Error> {
    sqlx::query("DELETE FROM idempotency_keys WHERE owner_id = $1 AND method = $2 AND key = $3")
        .bind(claim.owner_id)
        .bind(claim.method)
        .bind(claim.key.as_str())
        .execute(connection)
        .await?;
    Ok(())
}

/// Deletes keys older than `retention` that are finished (their answer is no longer
/// replayed) or never got past their start; returns how many.
pub async fn reap(pool: &PgPool, retention: std::time::Duration) -> Result<u64, Error> {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE recovery_point IN ('finished', 'started') \
         AND updated_at < now() - make_interval(secs => $1::double precision / 1000)",
    )
    .bind(retention_ms)
    .execute(pool)
    .await?
    .rows_affected())
}

/// The stored form of a business refusal.
pub fn refusal(err: Error) -> Stored {
    let status = tonic::Status::from(err);
    Stored::Refusal {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: status.details().to_vec(),
    }
}
