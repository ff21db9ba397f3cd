//! The durable job queue against a real PostgreSQL: transactional enqueue, one live job
//! per payment, claims under a lease with fencing tokens, outcomes, dead jobs and their
//! retry, hand-back at shutdown.

use std::time::Duration;

use payment_svc::error::Error;
use payment_svc::jobs::{self, JobKind, JobOutcome, JobState, NewJob};
use sqlx::{Acquire as _, PgPool};
use tests::postgres::TestDatabase;

const BACKOFF: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(600));
const LEASE: Duration = Duration::from_secs(30);

async fn queue() -> anyhow::Result<(TestDatabase, PgPool)> {
    let database = TestDatabase::create().await?;
    payment_svc::db::migrate(&database.payment_config()).await?;
    let pool = PgPool::connect(&database.service_url()).await?;
    Ok((database, pool))
}

fn new_job(payment_id: &str, max_attempts: i32) -> NewJob<'_> {
    NewJob {
        kind: JobKind::ProcessPayment,
        owner_id: "alice",
        payment_id,
        max_attempts,
        delay: Duration::ZERO,
    }
}

async fn enqueue(pool: &PgPool, job: &NewJob<'_>) -> anyhow::Result<Option<i64>> {
    let mut transaction = pool.begin().await?;
    let id = jobs::enqueue(&mut transaction, job).await?;
    transaction.commit().await?;
    Ok(id)
}

async fn finish(pool: &PgPool, job: &jobs::Job, outcome: JobOutcome) -> Result<JobState, Error> {
    let mut transaction = pool.begin().await?;
    let state = jobs::finish(&mut transaction, job, &outcome, BACKOFF).await?;
    transaction.commit().await?;
    Ok(state)
}

async fn state_of(pool: &PgPool, id: i64) -> anyhow::Result<(String, i32)> {
    Ok(
        sqlx::query_as("SELECT state, attempt FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test]
async fn enqueue_is_transactional_and_one_job_lives_per_payment() -> anyhow::Result<()> {
    let (_database, pool) = queue().await?;
    // Rolled back with the state change that needed it: no job.
    let mut transaction = pool.begin().await?;
    jobs::enqueue(&mut transaction, &new_job("pay_rolled_back", 3)).await?;
    transaction.rollback().await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await?;
    assert_eq!(count, 0);

    let first = enqueue(&pool, &new_job("pay_1", 3)).await?;
    assert!(first.is_some());
    assert_eq!(
        enqueue(&pool, &new_job("pay_1", 3)).await?,
        None,
        "one live job per payment"
    );
    let claimed = jobs::claim(&pool, "w1", LEASE, 10).await?;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        enqueue(&pool, &new_job("pay_1", 3)).await?,
        None,
        "executing counts as live"
    );
    finish(&pool, &claimed[0].job, JobOutcome::Ok).await?;
    assert!(
        enqueue(&pool, &new_job("pay_1", 3)).await?.is_some(),
        "a finished job is not live"
    );
    Ok(())
}

#[tokio::test]
async fn claims_skip_held_jobs_and_outcomes_move_jobs_along() -> anyhow::Result<()> {
    let (_database, pool) = queue().await?;
    for n in 0..3 {
        enqueue(&pool, &new_job(&format!("pay_{n}"), 2)).await?;
    }
    let first = jobs::claim(&pool, "w1", LEASE, 2).await?;
    let second = jobs::claim(&pool, "w2", LEASE, 10).await?;
    assert_eq!((first.len(), second.len()), (2, 1), "held jobs are skipped");
    assert!(jobs::claim(&pool, "w3", LEASE, 10).await?.is_empty());
    assert!(
        first
            .iter()
            .chain(&second)
            .all(|c| c.job.attempt == 1 && c.job.fencing_token == 1 && !c.takeover)
    );

    // Snooze: later, and the attempt is not spent.
    let snoozed = &first[0].job;
    assert_eq!(
        finish(
            &pool,
            snoozed,
            JobOutcome::Snooze(Duration::from_secs(3600))
        )
        .await?,
        JobState::Scheduled
    );
    assert_eq!(
        state_of(&pool, snoozed.id).await?,
        ("scheduled".to_owned(), 0)
    );
    // Retry: waits for a backoff; out of attempts it is dead.
    let retried = &first[1].job;
    assert_eq!(
        finish(&pool, retried, JobOutcome::Retry("acquirer down".into())).await?,
        JobState::Retryable
    );
    let waiting: bool = sqlx::query_scalar(
        "SELECT schedule_at > now() + interval '30 seconds' FROM jobs WHERE id = $1",
    )
    .bind(retried.id)
    .fetch_one(&pool)
    .await?;
    assert!(
        waiting,
        "the backoff (60 s ± 25 %) pushes the next attempt out"
    );
    assert!(jobs::claim(&pool, "w1", LEASE, 10).await?.is_empty());
    sqlx::query("UPDATE jobs SET schedule_at = now() WHERE id = $1")
        .bind(retried.id)
        .execute(&pool)
        .await?;
    let again = jobs::claim(&pool, "w1", LEASE, 10).await?;
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].job.attempt, again[0].job.fencing_token), (2, 2));
    assert_eq!(
        finish(&pool, &again[0].job, JobOutcome::Retry("still down".into())).await?,
        JobState::Dead
    );

    // Cancel is final.
    assert_eq!(
        finish(
            &pool,
            &second[0].job,
            JobOutcome::Cancel("insufficient_funds".into())
        )
        .await?,
        JobState::Cancelled
    );

    let mut connection = pool.acquire().await?;
    let dead = jobs::list(&mut connection, Some(JobState::Dead), 0, 10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error, "still down");
    // Only a dead job is retried; it comes back with fresh attempts.
    let refused = jobs::retry_dead(&mut connection, second[0].job.id).await;
    assert!(
        matches!(
            refused,
            Err(Error::Precondition {
                reason: "JOB_NOT_DEAD",
                ..
            })
        ),
        "{refused:?}"
    );
    let revived = jobs::retry_dead(&mut connection, dead[0].id).await?;
    assert_eq!((revived.state, revived.attempt), (JobState::Available, 0));
    let claimed = jobs::claim(&pool, "w1", LEASE, 10).await?;
    assert_eq!(
        claimed.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        [revived.id]
    );
    let stats = jobs::stats(&pool).await?;
    assert_eq!((stats.executing, stats.dead, stats.waiting), (1, 0, 1));
    Ok(())
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_can_no_longer_write() -> anyhow::Result<()> {
    let (_database, pool) = queue().await?;
    let id = enqueue(&pool, &new_job("pay_fenced", 5)).await?;
    let stale = jobs::claim(&pool, "slow-worker", Duration::from_millis(100), 1).await?;
    assert_eq!(stale.len(), 1);
    // The lease runs out (100 ms; bound 30 s); another worker takes the job over.
    let taken = tokio::time::timeout(tests::LIVENESS, async {
        loop {
            let claimed = jobs::claim(&pool, "fresh-worker", LEASE, 1).await?;
            if let Some(claimed) = claimed.into_iter().next() {
                return anyhow::Ok(claimed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    assert_eq!(Some(taken.job.id), id);
    assert!(taken.takeover);
    assert_eq!(taken.job.fencing_token, stale[0].job.fencing_token + 1);

    // The stale worker's writes are refused, in the same transaction as its own changes.
    let stale_job = &stale[0].job;
    assert!(!jobs::renew(&pool, stale_job, LEASE).await?);
    let mut transaction = pool.begin().await?;
    let mut savepoint = transaction.begin().await?;
    sqlx::query(
        "INSERT INTO audit_log (owner_id, principal, action, entity_type, entity_id, request_id) \
                 VALUES ('alice', 'job', 'stale.write', 'payment', 'pay_fenced', '')",
    )
    .execute(&mut *savepoint)
    .await?;
    let fenced = jobs::fence(&mut savepoint, stale_job).await;
    assert!(matches!(fenced, Err(Error::StaleJob(_))), "{fenced:?}");
    savepoint.rollback().await?;
    transaction.commit().await?;
    let written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'stale.write'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(written, 0);
    let late = finish(&pool, stale_job, JobOutcome::Ok).await;
    assert!(matches!(late, Err(Error::StaleJob(_))), "{late:?}");
    // The current holder finishes normally.
    assert_eq!(
        finish(&pool, &taken.job, JobOutcome::Ok).await?,
        JobState::Completed
    );
    Ok(())
}

#[tokio::test]
async fn released_jobs_come_back_and_expired_last_attempts_die() -> anyhow::Result<()> {
    let (_database, pool) = queue().await?;
    let id = enqueue(&pool, &new_job("pay_released", 3))
        .await?
        .unwrap_or_default();
    let claimed = jobs::claim(&pool, "w1", LEASE, 1).await?;
    jobs::release(&pool, &claimed[0].job).await?;
    assert_eq!(state_of(&pool, id).await?, ("available".to_owned(), 0));

    let last = enqueue(&pool, &new_job("pay_last", 1))
        .await?
        .unwrap_or_default();
    let claimed = jobs::claim(&pool, "w1", Duration::from_millis(1), 10).await?;
    assert_eq!(claimed.len(), 2);
    // Both leases (1 ms) run out; the next claim round buries the job whose only attempt
    // it was and leaves the other for a takeover.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(jobs::claim(&pool, "w2", LEASE, 0).await?.is_empty());
    assert_eq!(state_of(&pool, last).await?.0, "dead");
    assert_eq!(state_of(&pool, id).await?, ("executing".to_owned(), 1));
    Ok(())
}

/// Holds the job's row lock (a fenced transaction) across several renewal periods, the
/// way a handler's write transaction does, then finishes once a renewal went through.
struct HoldsItsRowLock {
    pool: PgPool,
    hold: Duration,
    counters: std::sync::Arc<jobs::runner::RunnerCounters>,
}

#[tonic::async_trait]
impl jobs::runner::Handler for HoldsItsRowLock {
    async fn perform(&self, claimed: &jobs::Claimed) -> JobOutcome {
        let held = async {
            let mut transaction = self.pool.begin().await?;
            jobs::fence(&mut transaction, &claimed.job).await?;
            tokio::time::sleep(self.hold).await;
            transaction.commit().await?;
            // The renewal that waited for the lock goes through now.
            tokio::time::timeout(tests::LIVENESS, async {
                while self
                    .counters
                    .renewals
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await?;
            anyhow::Ok(())
        };
        match held.await {
            Ok(()) => JobOutcome::Ok,
            Err(err) => JobOutcome::Retry(err.to_string()),
        }
    }
}

#[tokio::test]
async fn a_renewal_waiting_for_the_jobs_own_row_lock_does_not_stall_the_job() -> anyhow::Result<()>
{
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;

    let (database, _) = queue().await?;
    // The service's own pool settings, with a lock timeout 10× the hold: a renewal that
    // waited for the handler to commit succeeds; one that stalled the handler times out.
    let mut config = database.payment_config();
    config.lock_timeout = Duration::from_secs(5);
    let pool = payment_svc::db::connect(&config).await?;
    let lease = Duration::from_millis(600);
    let id = enqueue(&pool, &new_job("pay_long_write", 3))
        .await?
        .unwrap_or_default();
    let counters = Arc::new(jobs::runner::RunnerCounters::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(jobs::runner::run(
        pool.clone(),
        payment_svc::db::listener_pool(&config)?,
        // Held for more than two renewal periods (lease / 3), so renewals fall inside.
        Arc::new(HoldsItsRowLock {
            pool: pool.clone(),
            hold: lease * 5 / 6,
            counters: Arc::clone(&counters),
        }),
        jobs::runner::RunnerConfig {
            worker_id: "w1".to_owned(),
            concurrency: 1,
            lease,
            poll_interval: Duration::from_millis(100),
            backoff: BACKOFF,
            drain_timeout: Duration::from_secs(1),
            retention: Duration::from_secs(3600),
            maintenance_interval: Duration::from_secs(3600),
        },
        Arc::clone(&counters),
        stopped,
    ));
    tokio::time::timeout(tests::LIVENESS, async {
        while counters.finished.load(Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    stop.send(true)?;
    runner.await?;
    assert_eq!(state_of(&pool, id).await?.0, "completed");
    // The renewal waited for the commit instead of stalling the handler until its lock
    // timeout.
    assert_eq!(counters.renewal_failures.load(Relaxed), 0);
    assert_eq!(counters.stale.load(Relaxed), 0);
    Ok(())
}
