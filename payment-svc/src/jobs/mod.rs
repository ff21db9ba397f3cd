//! The durable job queue, in the same PostgreSQL as the state it serves (DESIGN §4,
//! "what Oban gives Elixir"). Written here because it is small and money-critical: no
//! maintained crate gives transactional enqueue on sqlx 0.9 together with fencing tokens
//! and at most one live job per payment (see ARCHITECTURE.md).
//!
//! - [`enqueue`] runs inside the caller's transaction: a rolled-back state change leaves
//!   no job. A payment has at most one live job (a partial unique index); enqueueing a
//!   second one wakes the live one instead. Commit wakes workers (NOTIFY).
//! - [`claim`] takes due jobs with `FOR UPDATE SKIP LOCKED`, and executing jobs whose lease
//!   ran out (their worker died: a takeover). Each claim bumps the job's fencing token.
//! - A job's writes go through [`fence`] (in the writing transaction), and its outcome
//!   through [`finish`]: both require the token of the claim, so a worker that lost its
//!   lease can no longer change anything. Long jobs [`renew`] their lease.
//! - Outcomes: ok, retry (exponential backoff with jitter, then dead after
//!   `max_attempts`), snooze (later, without spending an attempt), cancel (a permanent
//!   outcome), discard (no longer needed). Dead jobs are listed and re-run by an admin
//!   ([`retry_dead`]). [`release`] hands a claimed job back at shutdown.
//! - `max_attempts` bounds new work, never the settling of work already sent: a job whose
//!   payment has an acquirer attempt with an open outcome (pending or unknown) is not dead
//!   when it runs out of attempts — it keeps retrying (the backoff capped) until that
//!   attempt is settled, and only then may it die. A dead job never hides a charge that
//!   may exist.

pub mod runner;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use crate::error::{Error, stored_names};

/// The channel `enqueue` notifies on commit; workers listen to it.
pub const CHANNEL: &str = "paysuite_jobs";

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Authorize (and capture) a payment accepted without an answer (ASYNC, or SYNC
    /// after a timeout or an unavailable acquirer).
    ProcessPayment,
    /// Settle an unknown outcome by looking the attempt up at the acquirer.
    ResolveUnknown,
    /// Settle a refund whose acquirer answer is unknown.
    ResolveRefund,
    /// Void an authorization left uncaptured past the configured period.
    VoidExpired,
}

stored_names!(JobKind {
    ProcessPayment => "process_payment",
    ResolveUnknown => "resolve_unknown",
    ResolveRefund => "resolve_refund",
    VoidExpired => "void_expired",
});

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Ready to be claimed.
    Available,
    /// Waiting for its time (enqueued for later, or snoozed).
    Scheduled,
    /// A worker holds its lease.
    Executing,
    /// Failed transiently; waiting for its backoff.
    Retryable,
    /// Done.
    Completed,
    /// Stopped with a permanent outcome.
    Cancelled,
    /// Dropped: no longer needed.
    Discarded,
    /// Out of attempts; waits for an admin.
    Dead,
}

stored_names!(JobState {
    Available => "available",
    Scheduled => "scheduled",
    Executing => "executing",
    Retryable => "retryable",
    Completed => "completed",
    Cancelled => "cancelled",
    Discarded => "discarded",
    Dead => "dead",
});

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its id.
    pub id: i64,
    /// What it does.
    pub kind: JobKind,
    /// The payment's owner.
    pub owner_id: String,
    /// The payment it works on.
    pub payment_id: String,
    /// Where it is.
    pub state: JobState,
    /// Attempts made (claims that were not snoozed).
    pub attempt: i32,
    /// Attempts allowed before it is dead.
    pub max_attempts: i32,
    /// The current claim's token.
    pub fencing_token: i64,
    /// The last attempt's error.
    pub last_error: String,
    /// When it may run next.
    pub schedule_at: DateTime<Utc>,
    /// Enqueued.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// The W3C `traceparent` of the request that enqueued it, when export was on.
    pub traceparent: Option<String>,
}

const JOB_COLUMNS: &str = "id, kind, owner_id, payment_id, state, attempt, max_attempts, fencing_token, \
     last_error, schedule_at, created_at, updated_at, traceparent";

fn job_from_row(row: &PgRow) -> Result<Job, Error> {
    Ok(Job {
        id: row.try_get("id")?,
        kind: JobKind::parse(row.try_get("kind")?)?,
        owner_id: row.try_get("owner_id")?,
        payment_id: row.try_get("payment_id")?,
        state: JobState::parse(row.try_get("state")?)?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        fencing_token: row.try_get("fencing_token")?,
        last_error: row.try_get("last_error")?,
        schedule_at: row.try_get("schedule_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        traceparent: row.try_get("traceparent")?,
    })
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// What it does.
    pub kind: JobKind,
    /// The payment's owner.
    pub owner_id: &'a str,
    /// The payment.
    pub payment_id: &'a str,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// How long from now until it may run.
    pub delay: Duration,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Enqueues `job` in the caller's transaction. When the payment already has a live job,
/// that job does the work instead: if it is waiting (scheduled, or in a backoff) it is
/// woken to run within `job.delay`, and `None` is returned.
pub async fn enqueue(
    connection: &mut PgConnection,
    job: &NewJob<'_>,
) -> Result<Option<i64>, Error> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO jobs (kind, owner_id, payment_id, state, max_attempts, schedule_at, traceparent) \
         VALUES ($1, $2, $3, CASE WHEN $5 > 0 THEN 'scheduled' ELSE 'available' END, $4, \
                 now() + make_interval(secs => $5::double precision / 1000), $6) \
         ON CONFLICT (payment_id) WHERE state IN ('available', 'scheduled', 'executing', 'retryable') DO NOTHING \
         RETURNING id",
    )
    .bind(job.kind.as_str())
    .bind(job.owner_id)
    .bind(job.payment_id)
    .bind(job.max_attempts)
    .bind(millis(job.delay))
    // The job's span links to the trace that enqueued it.
    .bind(service_kit::telemetry::current_traceparent())
    .fetch_optional(&mut *connection)
    .await?;
    if id.is_none() {
        sqlx::query(
            "UPDATE jobs SET schedule_at = least(schedule_at, now() + make_interval(secs => $2::double precision / 1000)), \
             updated_at = now() WHERE payment_id = $1 AND state IN ('scheduled', 'retryable')",
        )
        .bind(job.payment_id)
        .bind(millis(job.delay))
        .execute(&mut *connection)
        .await?;
    }
    crate::notify::queue(connection, CHANNEL, "").await?;
    Ok(id)
}

/// A job a worker holds: its writes and outcome need `fencing_token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The job.
    pub job: Job,
    /// Whether an earlier claim's lease ran out mid-run (its worker died): the handler
    /// must look the earlier attempt up before making a new one.
    pub takeover: bool,
}

/// Whether the job's payment has an acquirer attempt whose outcome is open (pending:
/// sent or about to be, unanswered; unknown: no answer in time). Such a job settles it
/// before it may die, however many attempts it has spent.
const SETTLING: &str = "EXISTS (SELECT 1 FROM attempts a WHERE a.payment_id = jobs.payment_id \
                        AND a.status IN ('pending', 'unknown'))";

/// Claims up to `limit` due jobs (and jobs whose lease expired) for `worker`, holding
/// each for `lease`. Executing jobs whose lease expired after their last attempt are dead,
/// unless they are still settling an attempt: those are taken over like any other.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<Claimed>, Error> {
    let died: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET state = 'dead', locked_until = NULL, locked_by = NULL, finished_at = now(), \
         updated_at = now(), last_error = 'the lease of the last attempt expired' \
         WHERE state = 'executing' AND locked_until < now() AND attempt >= max_attempts \
           AND NOT {SETTLING} \
         RETURNING kind"
    )))
    .fetch_all(pool)
    .await?;
    for kind in died {
        crate::metrics::job_dead(JobKind::parse(&kind)?);
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH due AS ( \
           SELECT id, state = 'executing' AS takeover FROM jobs \
           WHERE (state IN ('available', 'scheduled', 'retryable') AND schedule_at <= now()) \
              OR (state = 'executing' AND locked_until < now()) \
           ORDER BY schedule_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) \
         UPDATE jobs j SET state = 'executing', attempt = j.attempt + 1, fencing_token = j.fencing_token + 1, \
           locked_until = now() + make_interval(secs => $2::double precision / 1000), locked_by = $1, \
           updated_at = now() \
         FROM due WHERE j.id = due.id \
         RETURNING due.takeover, {}",
        JOB_COLUMNS
            .split(", ")
            .map(|column| format!("j.{column}"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
    .bind(worker)
    .bind(millis(lease))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Claimed {
                takeover: row.try_get("takeover")?,
                job: job_from_row(row)?,
            })
        })
        .collect()
}

/// Extends the lease of a job still held under `job`'s token; `false` when it was lost.
pub async fn renew(pool: &PgPool, job: &Job, lease: Duration) -> Result<bool, Error> {
    let renewed = sqlx::query(
        "UPDATE jobs SET locked_until = now() + make_interval(secs => $3::double precision / 1000), \
         updated_at = now() WHERE id = $1 AND fencing_token = $2 AND state = 'executing'",
    )
    .bind(job.id)
    .bind(job.fencing_token)
    .bind(millis(lease))
    .execute(pool)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// Locks the job's row for the rest of the caller's transaction if `job`'s claim still
/// holds it; otherwise refuses with [`Error::StaleJob`], so the transaction's writes roll
/// back. Every write a job makes goes through this.
pub async fn fence(connection: &mut PgConnection, job: &Job) -> Result<(), Error> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = $1 AND fencing_token = $2 AND state = 'executing' FOR UPDATE",
    )
    .bind(job.id)
    .bind(job.fencing_token)
    .fetch_optional(&mut *connection)
    .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(Error::StaleJob(job.id)),
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Done.
    Ok,
    /// A transient failure: try again after a backoff (dead after the last attempt).
    Retry(String),
    /// Not yet: run again after `delay`, without spending an attempt.
    Snooze(Duration),
    /// A permanent outcome (e.g. insufficient funds): stop.
    Cancel(String),
    /// The work is no longer needed.
    Discard(String),
}

/// The backoff before attempt `attempt + 1`: `base · 2^(attempt−1)`, capped at `max`,
/// with ±25 % jitter so that retries of many jobs spread out.
pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(20);
    let nominal = base.saturating_mul(1 << exponent).min(max);
    // 75–125 % of the nominal backoff, in integer thousandths.
    let mut random = [0u8; 2];
    let per_mille = if getrandom::fill(&mut random).is_ok() {
        750 + u32::from(u16::from_le_bytes(random)) % 501
    } else {
        1000
    };
    nominal.saturating_mul(per_mille) / 1000
}

/// Records `outcome` for a job held under `job`'s token, in the caller's transaction
/// (refused with [`Error::StaleJob`] when the claim was lost).
pub async fn finish(
    connection: &mut PgConnection,
    job: &Job,
    outcome: &JobOutcome,
    retry_backoff: (Duration, Duration),
) -> Result<JobState, Error> {
    fence(connection, job).await?;
    let out_of_attempts = job.attempt >= job.max_attempts
        && matches!(outcome, JobOutcome::Retry(_))
        && !settling(connection, job).await?;
    let (state, error, delay, refund_attempt) = match outcome {
        JobOutcome::Ok => (JobState::Completed, String::new(), Duration::ZERO, false),
        JobOutcome::Retry(error) if out_of_attempts => {
            (JobState::Dead, error.clone(), Duration::ZERO, false)
        }
        JobOutcome::Retry(error) => (
            JobState::Retryable,
            error.clone(),
            backoff(job.attempt, retry_backoff.0, retry_backoff.1),
            false,
        ),
        JobOutcome::Snooze(delay) => (JobState::Scheduled, String::new(), *delay, true),
        JobOutcome::Cancel(reason) => (JobState::Cancelled, reason.clone(), Duration::ZERO, false),
        JobOutcome::Discard(reason) => (JobState::Discarded, reason.clone(), Duration::ZERO, false),
    };
    let finished = matches!(
        state,
        JobState::Completed | JobState::Cancelled | JobState::Discarded | JobState::Dead
    );
    sqlx::query(
        "UPDATE jobs SET state = $2, last_error = CASE WHEN $3 = '' THEN last_error ELSE $3 END, \
         schedule_at = now() + make_interval(secs => $4::double precision / 1000), \
         attempt = attempt - CASE WHEN $5 THEN 1 ELSE 0 END, \
         finished_at = CASE WHEN $6 THEN now() ELSE NULL END, \
         locked_until = NULL, locked_by = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(job.id)
    .bind(state.as_str())
    .bind(&error)
    .bind(millis(delay))
    .bind(refund_attempt)
    .bind(finished)
    .execute(&mut *connection)
    .await?;
    Ok(state)
}

/// Whether `job` is still settling an attempt (see [`SETTLING`]).
async fn settling(connection: &mut PgConnection, job: &Job) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {SETTLING} FROM jobs WHERE id = $1"
    )))
    .bind(job.id)
    .fetch_one(&mut *connection)
    .await?)
}

/// Hands a held job back (graceful shutdown): available again at once, the attempt not
/// spent. A lost claim is left alone.
pub async fn release(pool: &PgPool, job: &Job) -> Result<(), Error> {
    sqlx::query(
        "UPDATE jobs SET state = 'available', attempt = greatest(attempt - 1, 0), schedule_at = now(), \
         locked_until = NULL, locked_by = NULL, updated_at = now() \
         WHERE id = $1 AND fencing_token = $2 AND state = 'executing'",
    )
    .bind(job.id)
    .bind(job.fencing_token)
    .execute(pool)
    .await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(pool)
        .await?;
    Ok(())
}

/// A page of jobs by id, optionally in one state.
pub async fn list(
    connection: &mut PgConnection,
    state: Option<JobState>,
    after: i64,
    limit: i64,
) -> Result<Vec<Job>, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::text IS NULL OR state = $1) AND id > $2 \
         ORDER BY id LIMIT $3"
    )))
    .bind(state.map(JobState::as_str))
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter().map(job_from_row).collect()
}

/// Makes a dead job available again with a fresh set of attempts.
pub async fn retry_dead(connection: &mut PgConnection, id: i64) -> Result<Job, Error> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *connection)
            .await?;
    match state.as_deref() {
        None => return Err(Error::NotFound("job")),
        Some("dead") => {}
        Some(other) => {
            return Err(Error::Precondition {
                reason: "JOB_NOT_DEAD",
                message: format!("job {id} is {other}; only a dead job can be retried"),
            });
        }
    }
    let live: Option<i64> = sqlx::query_scalar(
        "SELECT l.id FROM jobs l JOIN jobs d ON d.payment_id = l.payment_id \
         WHERE d.id = $1 AND l.state IN ('available', 'scheduled', 'executing', 'retryable')",
    )
    .bind(id)
    .fetch_optional(&mut *connection)
    .await?;
    if let Some(live) = live {
        return Err(Error::Precondition {
            reason: "PAYMENT_HAS_LIVE_JOB",
            message: format!("job {live} already works on this payment"),
        });
    }
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET state = 'available', attempt = 0, schedule_at = now(), finished_at = NULL, \
         updated_at = now() WHERE id = $1 RETURNING {JOB_COLUMNS}"
    )))
    .bind(id)
    .fetch_one(&mut *connection)
    .await?;
    crate::notify::queue(connection, CHANNEL, "").await?;
    job_from_row(&row)
}

/// Deletes finished jobs older than `retention`; returns how many.
pub async fn reap(pool: &PgPool, retention: Duration) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM jobs WHERE state IN ('completed', 'cancelled', 'discarded') \
         AND finished_at < now() - make_interval(secs => $1::double precision / 1000)",
    )
    .bind(millis(retention))
    .execute(pool)
    .await?
    .rows_affected())
}

/// How long until the next job falls due (a scheduled or retryable job's time, or an
/// executing job's lease running out); `None` when nothing is waiting.
pub async fn next_due(pool: &PgPool) -> Result<Option<Duration>, Error> {
    let millis: Option<i64> = sqlx::query_scalar(
        "SELECT greatest(0, ceil(extract(epoch FROM least( \
           (SELECT min(schedule_at) FROM jobs WHERE state IN ('available', 'scheduled', 'retryable')), \
           (SELECT min(locked_until) FROM jobs WHERE state = 'executing')) - now()) * 1000))::bigint",
    )
    .fetch_one(pool)
    .await?;
    Ok(millis.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
}

/// The queue at a glance (metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Due and waiting for a worker.
    pub ready: i64,
    /// Held by workers.
    pub executing: i64,
    /// Waiting for a backoff or a scheduled time.
    pub waiting: i64,
    /// Out of attempts.
    pub dead: i64,
    /// Age of the oldest due job, in milliseconds (0 when none).
    pub oldest_ready_ms: i64,
}

/// Counts jobs by condition.
pub async fn stats(pool: &PgPool) -> Result<QueueStats, Error> {
    let row = sqlx::query(
        "SELECT \
           count(*) FILTER (WHERE state IN ('available', 'scheduled', 'retryable') AND schedule_at <= now()) AS ready, \
           count(*) FILTER (WHERE state = 'executing') AS executing, \
           count(*) FILTER (WHERE state IN ('scheduled', 'retryable') AND schedule_at > now()) AS waiting, \
           count(*) FILTER (WHERE state = 'dead') AS dead, \
           coalesce((extract(epoch FROM now() - min(schedule_at) FILTER (WHERE state IN ('available', 'scheduled', 'retryable') \
             AND schedule_at <= now())) * 1000)::bigint, 0) AS oldest_ready_ms \
         FROM jobs",
    )
    .fetch_one(pool)
    .await?;
    Ok(QueueStats {
        ready: row.try_get("ready")?,
        executing: row.try_get("executing")?,
        waiting: row.try_get("waiting")?,
        dead: row.try_get("dead")?,
        oldest_ready_ms: row.try_get("oldest_ready_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_attempt_within_its_jitter_and_cap() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 1..=12 {
            let nominal = base.saturating_mul(1 << (attempt - 1)).min(max);
            for _ in 0..50 {
                let wait = backoff(attempt, base, max);
                assert!(
                    wait >= nominal * 3 / 4 && wait <= nominal * 5 / 4,
                    "{attempt}: {wait:?}"
                );
            }
        }
    }
}
