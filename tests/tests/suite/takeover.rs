//! Real payment-svc processes dying or stopping mid-work, with the standalone sandbox
//! acquirer: a worker aborted mid-job is taken over by another replica after its lease; a
//! request abandoned mid-phase is finished by the completer without any client retry; a
//! SIGTERM during processing loses nothing. Every case charges exactly once.

use std::time::Duration;

use nix::sys::signal::Signal;
use proto::acquirer::v1 as acq;
use proto::payments::v1 as pb;
use sqlx::{Connection, PgConnection};
use tests::acquirer::{approved, operations, spawn_sandbox};
use tests::payments::{Tenant, cards, payment_request, replayed};
use tests::postgres::TestDatabase;
use tests::process::SpawnedService;

/// payment-svc as a process with jobs on, short leases, and the remote acquirer.
async fn replica(
    database: &TestDatabase,
    acquirer_url: &str,
    extra: &[(&'static str, &str)],
) -> anyhow::Result<(SpawnedService, Tenant)> {
    let mut envs = vec![
        ("DATABASE_URL", database.service_url()),
        ("DATABASE_MIGRATION_URL", database.owner_url()),
        ("ACQUIRER_URL", acquirer_url.to_owned()),
        ("IDEMPOTENCY_LEASE", "500ms".to_owned()),
        ("JOB_LEASE", "1s".to_owned()),
        ("JOB_BACKOFF_BASE", "50ms".to_owned()),
        ("JOB_BACKOFF_MAX", "200ms".to_owned()),
        ("JOB_MAINTENANCE_INTERVAL", "200ms".to_owned()),
        ("SHUTDOWN_DRAIN_TIMEOUT", "2s".to_owned()),
    ];
    envs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let service = SpawnedService::start("payment-svc", &envs).await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    Ok((service, Tenant::new("alice", channel)))
}

async fn until_final(tenant: &Tenant, payment_id: &str) -> anyhow::Result<pb::Payment> {
    tokio::time::timeout(tests::LIVENESS, async {
        loop {
            let payment = tenant.payment(payment_id).await?;
            let final_states = [
                pb::PaymentStatus::Succeeded as i32,
                pb::PaymentStatus::Failed as i32,
                pb::PaymentStatus::Canceled as i32,
            ];
            if final_states.contains(&payment.status) {
                return anyhow::Ok(payment);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?
}

#[tokio::test]
async fn spawned_worker_aborted_mid_job_is_taken_over_and_charges_once() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    // One attempt per job: the takeover runs past the job's last attempt, which it may
    // only because the attempt it takes over is still open (pending) — a job never dies
    // with a charge that may exist.
    let (mut doomed, alice) = replica(
        &database,
        &sandbox.endpoint(),
        &[
            ("PAYSUITE_FAILPOINT", "job_after_acquirer"),
            ("JOB_MAX_ATTEMPTS", "1"),
        ],
    )
    .await?;
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let mut request = payment_request("async", &merchant, 2_500, cards::CARD_APPROVED);
    request.mode = pb::PaymentMode::Async as i32;
    let payment = alice
        .pay(request)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    assert_eq!(payment.status, pb::PaymentStatus::Pending as i32);
    // Its worker authorizes, then dies before recording the answer.
    let status = doomed.wait(tests::LIVENESS).await?;
    assert!(!status.success());
    assert!(
        doomed
            .stderr()
            .joined()
            .contains("failpoint job_after_acquirer reached")
    );

    // Another replica takes the job over once its lease (1 s) ran out, looks the
    // authorization up instead of making a new one, and finishes.
    let (_survivor, alice) =
        replica(&database, &sandbox.endpoint(), &[("JOB_MAX_ATTEMPTS", "1")]).await?;
    let done = until_final(&alice, &payment.id).await?;
    assert_eq!(done.status, pb::PaymentStatus::Succeeded as i32);
    let operations = operations(&sandbox.endpoint(), &payment.id, 100).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Authorize),
        1,
        "{operations:?}"
    );
    assert_eq!(approved(&operations, acq::OperationKind::Capture), 1);
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let (state, attempt, token): (String, i32, i64) =
        sqlx::query_as("SELECT state, attempt, fencing_token FROM jobs WHERE payment_id = $1")
            .bind(&payment.id)
            .fetch_one(&mut owner)
            .await?;
    assert_eq!(state, "completed");
    assert!(
        attempt >= 2 && token >= 2,
        "the job was claimed again: attempt {attempt}, token {token}"
    );
    Ok(())
}

#[tokio::test]
async fn spawned_request_abandoned_mid_phase_is_finished_by_the_completer() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    let (mut doomed, alice) = replica(
        &database,
        &sandbox.endpoint(),
        &[("PAYSUITE_FAILPOINT", "after_acquirer_approve")],
    )
    .await?;
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let request = payment_request("abandoned", &merchant, 4_000, cards::CARD_APPROVED);
    assert!(alice.pay(request.clone()).await.is_err());
    assert!(!doomed.wait(tests::LIVENESS).await?.success());
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let payment_id: String =
        sqlx::query_scalar("SELECT resource_id FROM idempotency_keys WHERE key = 'abandoned'")
            .fetch_one(&mut owner)
            .await?;

    // No client comes back; the completer hands the payment to a job.
    let (_survivor, alice) = replica(&database, &sandbox.endpoint(), &[]).await?;
    let done = until_final(&alice, &payment_id).await?;
    assert_eq!(done.status, pb::PaymentStatus::Succeeded as i32);
    // A late retry gets the payment as the job left it; nothing is charged again.
    let late = alice.pay(request).await?;
    assert!(
        !replayed(&late),
        "the key's request is finished now, by this retry"
    );
    assert_eq!(
        late.into_inner().payment.map(|p| (p.id, p.status)),
        Some((payment_id.clone(), pb::PaymentStatus::Succeeded as i32))
    );
    let operations = operations(&sandbox.endpoint(), &payment_id, 100).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Authorize),
        1,
        "{operations:?}"
    );
    assert_eq!(approved(&operations, acq::OperationKind::Capture), 1);
    assert_eq!(alice.balance(&merchant).await?.0, 4_000);
    Ok(())
}

#[tokio::test]
async fn spawned_sigterm_during_processing_loses_nothing() -> anyhow::Result<()> {
    const PAYMENTS: usize = 6;
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    tests::acquirer::set_latency(&sandbox.endpoint(), Duration::from_millis(300)).await?;
    let (mut first, alice) =
        replica(&database, &sandbox.endpoint(), &[("JOB_CONCURRENCY", "2")]).await?;
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let mut ids = Vec::new();
    for n in 0..PAYMENTS {
        let mut request = payment_request(
            &format!("async-{n}"),
            &merchant,
            1_000,
            cards::CARD_APPROVED,
        );
        request.mode = pb::PaymentMode::Async as i32;
        ids.push(
            alice
                .pay(request)
                .await?
                .into_inner()
                .payment
                .unwrap_or_default()
                .id,
        );
    }
    // Stop while jobs are executing.
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    tokio::time::timeout(tests::LIVENESS, async {
        loop {
            let executing: i64 =
                sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'executing'")
                    .fetch_one(&mut owner)
                    .await?;
            if executing > 0 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await??;
    first.signal(Signal::SIGTERM)?;
    assert!(first.wait(tests::LIVENESS).await?.success());
    // Nothing it held stays executing: each job finished or was handed back.
    let stuck: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'executing'")
        .fetch_one(&mut owner)
        .await?;
    assert_eq!(stuck, 0);

    let (second, alice) = replica(&database, &sandbox.endpoint(), &[]).await?;
    for id in &ids {
        let payment = match until_final(&alice, id).await {
            Ok(payment) => payment,
            Err(err) => {
                let jobs: Vec<(i64, String, String, i32, String)> = sqlx::query_as(
                    "SELECT id, payment_id, state, attempt, last_error FROM jobs ORDER BY id",
                )
                .fetch_all(&mut owner)
                .await?;
                let payments: Vec<(String, String)> =
                    sqlx::query_as("SELECT id, status FROM payments ORDER BY id")
                        .fetch_all(&mut owner)
                        .await?;
                let attempts: Vec<(String, String, String, String)> = sqlx::query_as(
                    "SELECT payment_id, kind, status, result_code FROM attempts ORDER BY created_at",
                )
                .fetch_all(&mut owner)
                .await?;
                anyhow::bail!(
                    "{id} not final: {err}\njobs {jobs:#?}\npayments {payments:#?}\nattempts {attempts:#?}\nfirst:\n{}\n{}\nsecond:\n{}\n{}",
                    first.stdout().joined(),
                    first.stderr().joined(),
                    second.stdout().joined(),
                    second.stderr().joined()
                );
            }
        };
        assert_eq!(payment.status, pb::PaymentStatus::Succeeded as i32);
    }
    let operations = operations(&sandbox.endpoint(), "", 1000).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Authorize),
        PAYMENTS
    );
    assert_eq!(approved(&operations, acq::OperationKind::Capture), PAYMENTS);
    assert_eq!(alice.balance(&merchant).await?.0, 1_000 * PAYMENTS as i64);
    Ok(())
}

/// A SYNC payment of `amount` to a new merchant account, captured.
async fn captured_payment(alice: &Tenant, amount: i64) -> anyhow::Result<(String, pb::Payment)> {
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let payment = alice
        .pay(payment_request(
            "paid",
            &merchant,
            amount,
            cards::CARD_APPROVED,
        ))
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    assert_eq!(payment.status, pb::PaymentStatus::Succeeded as i32);
    Ok((merchant, payment))
}

/// The status of the payment's one refund once it is no longer pending.
async fn until_refund_left_pending(
    database: &TestDatabase,
    payment_id: &str,
) -> anyhow::Result<String> {
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    tokio::time::timeout(tests::LIVENESS, async {
        loop {
            let status: String =
                sqlx::query_scalar("SELECT status FROM refunds WHERE payment_id = $1")
                    .bind(payment_id)
                    .fetch_one(&mut owner)
                    .await?;
            if status != "pending" {
                return anyhow::Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?
}

/// How many calls of `kind` the sandbox received for `operation_id`.
async fn calls(endpoint: &str, operation_id: &str, kind: &str) -> anyhow::Result<u64> {
    let counters = tests::acquirer::counters(endpoint).await?;
    Ok(counters
        .get(operation_id)
        .and_then(|by_kind| by_kind.get(kind))
        .copied()
        .unwrap_or(0))
}

/// Waits until the sandbox received at least `at_least` calls of `kind` for `operation_id`.
async fn until_calls(
    endpoint: &str,
    operation_id: &str,
    kind: &str,
    at_least: u64,
) -> anyhow::Result<()> {
    tokio::time::timeout(tests::LIVENESS, async {
        while calls(endpoint, operation_id, kind).await? < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    })
    .await?
}

/// The id of the payment's one refund attempt.
async fn refund_attempt(database: &TestDatabase, payment_id: &str) -> anyhow::Result<String> {
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    Ok(
        sqlx::query_scalar("SELECT id FROM attempts WHERE payment_id = $1 AND kind = 'refund'")
            .bind(payment_id)
            .fetch_one(&mut owner)
            .await?,
    )
}

/// The bank soak's over-refund (seed 3619290255415874214), deterministically: a refund
/// abandoned mid-call is taken over by a job while the acquirer answers every call
/// UNAVAILABLE. The job's lookup finds nothing and its resend is answered UNAVAILABLE —
/// which says nothing of the first sending, so the refund stays PENDING (before, the job
/// FAILED it and returned the hold, and the client's retry later resent it and had it
/// paid out). Once the acquirer works the job performs it; the client's retry answers
/// that without sending it again, and no job is enqueued for the finished work.
#[tokio::test]
async fn spawned_refund_taken_over_while_the_acquirer_is_down_is_performed_once_it_is_back()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    // The survivor creates the payment and runs the completer and the jobs.
    let (_survivor, alice) = replica(&database, &sandbox.endpoint(), &[]).await?;
    let (merchant, payment) = captured_payment(&alice, 100).await?;

    // Every acquirer call now does nothing and answers UNAVAILABLE.
    tests::acquirer::set_faults(
        &sandbox.endpoint(),
        acq::FailureMode::Unavailable,
        1_000_000,
    )
    .await?;
    // The doomed replica holds 30 from the merchant, writes the attempt, calls the
    // acquirer in vain and dies before recording anything: the key stays `prepared`.
    let (mut doomed, doomed_alice) = replica(
        &database,
        &sandbox.endpoint(),
        &[("PAYSUITE_FAILPOINT", "before_finalize")],
    )
    .await?;
    assert!(
        doomed_alice
            .refund("refund-key", &payment.id, tests::payments::brl(30))
            .await
            .is_err()
    );
    assert!(!doomed.wait(tests::LIVENESS).await?.success());
    let attempt_id = refund_attempt(&database, &payment.id).await?;

    // The completer hands the abandoned key to a job, which resends the attempt: the
    // doomed replica's call and two of the job's, all answered UNAVAILABLE.
    until_calls(&sandbox.endpoint(), &attempt_id, "refund", 3).await?;
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let status: String = sqlx::query_scalar("SELECT status FROM refunds WHERE payment_id = $1")
        .bind(&payment.id)
        .fetch_one(&mut owner)
        .await?;
    assert_eq!(
        status, "pending",
        "a resend's UNAVAILABLE failed the refund"
    );

    // The acquirer works again: the job's next resend is performed.
    tests::acquirer::set_faults(&sandbox.endpoint(), acq::FailureMode::None, 0).await?;
    assert_eq!(
        until_refund_left_pending(&database, &payment.id).await?,
        "succeeded"
    );
    let sent = calls(&sandbox.endpoint(), &attempt_id, "refund").await?;

    // The key stays abandoned until the client retries; the completer has nothing more to
    // hand out for it (five maintenance passes).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE payment_id = $1 AND kind = 'resolve_refund'",
    )
    .bind(&payment.id)
    .fetch_one(&mut owner)
    .await?;
    assert_eq!(jobs, 1, "the completer re-enqueued finished work");

    // The client retries its unknown outcome with the key: the state as the job left it.
    let answer = alice
        .refund("refund-key", &payment.id, tests::payments::brl(30))
        .await?
        .into_inner();
    assert_eq!(
        answer.refund.map(|refund| refund.status),
        Some(pb::RefundStatus::Succeeded as i32),
        "the retry answers the refund as the job left it"
    );
    assert_eq!(
        calls(&sandbox.endpoint(), &attempt_id, "refund").await?,
        sent,
        "the retry sent a settled attempt again"
    );
    let operations = operations(&sandbox.endpoint(), &payment.id, 100).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Refund),
        1,
        "{operations:?}"
    );
    let payment = alice.payment(&payment.id).await?;
    assert_eq!(payment.amount_refunded.map(|m| m.amount_minor), Some(30));
    assert_eq!(alice.balance(&merchant).await?.0, 70);
    Ok(())
}

/// How long the sandbox holds the client's resend in the race below: far beyond the
/// ~1 s the job needs to take the key over and settle the attempt.
const RESEND_LATENCY: Duration = Duration::from_secs(20);

/// The bank soak's relabelled approval (seed 17303545554639702866): a resumed key resends
/// its refund and, while that call is out, the job that took the key over looks the
/// attempt up and settles it approved. The resend's later UNAVAILABLE must not overwrite
/// the approval (before, the attempt read `unknown` although its money was booked, and
/// reconcile reported it); the retry answers the refund as the job settled it.
#[tokio::test]
async fn spawned_a_late_answer_does_not_overwrite_an_attempt_a_job_settled() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    // The client's replica: no completer, and room for the slow resend.
    let (_client_side, alice) = replica(
        &database,
        &sandbox.endpoint(),
        &[
            ("JOB_MAINTENANCE_INTERVAL", "1h"),
            ("ACQUIRER_TIMEOUT", "60s"),
        ],
    )
    .await?;
    let (merchant, payment) = captured_payment(&alice, 100).await?;

    // The doomed replica's refund is approved by the acquirer; it dies before recording.
    let (mut doomed, doomed_alice) = replica(
        &database,
        &sandbox.endpoint(),
        &[
            ("PAYSUITE_FAILPOINT", "before_finalize"),
            ("JOB_MAINTENANCE_INTERVAL", "1h"),
        ],
    )
    .await?;
    assert!(
        doomed_alice
            .refund("refund-key", &payment.id, tests::payments::brl(30))
            .await
            .is_err()
    );
    assert!(!doomed.wait(tests::LIVENESS).await?.success());
    let attempt_id = refund_attempt(&database, &payment.id).await?;

    // After the key's lease (500 ms) the client retries: its resend is held by the
    // sandbox for RESEND_LATENCY and then answered UNAVAILABLE.
    tests::acquirer::set_switches(
        &sandbox.endpoint(),
        RESEND_LATENCY,
        acq::FailureMode::Unavailable,
        1_000_000,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = tokio::spawn({
        let alice = alice.clone();
        let payment_id = payment.id.clone();
        async move {
            alice
                .refund("refund-key", &payment_id, tests::payments::brl(30))
                .await
        }
    });
    until_calls(&sandbox.endpoint(), &attempt_id, "refund", 2).await?;

    // Meanwhile a replica with a completer hands the key (its lease gone) to a job, which
    // looks the attempt up and settles the refund approved.
    tests::acquirer::set_faults(&sandbox.endpoint(), acq::FailureMode::None, 0).await?;
    let (_completer, _) = replica(&database, &sandbox.endpoint(), &[]).await?;
    assert_eq!(
        until_refund_left_pending(&database, &payment.id).await?,
        "succeeded"
    );
    assert!(
        !retry.is_finished(),
        "the resend was answered before the job settled the attempt: the race did not happen"
    );

    let answer = retry.await??.into_inner();
    assert_eq!(
        answer.refund.map(|refund| refund.status),
        Some(pb::RefundStatus::Succeeded as i32)
    );
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let status: String = sqlx::query_scalar("SELECT status FROM attempts WHERE id = $1")
        .bind(&attempt_id)
        .fetch_one(&mut owner)
        .await?;
    assert_eq!(
        status, "approved",
        "a late answer relabelled a settled attempt"
    );
    let operations = operations(&sandbox.endpoint(), &payment.id, 100).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Refund),
        1,
        "{operations:?}"
    );
    let payment = alice.payment(&payment.id).await?;
    assert_eq!(payment.amount_refunded.map(|m| m.amount_minor), Some(30));
    assert_eq!(alice.balance(&merchant).await?.0, 70);
    Ok(())
}

/// A refund the acquirer performed before its process died is resent by the client's
/// retry and the acquirer answers the repeat with UNAVAILABLE: that speaks for the call,
/// not for the refund, so the refund stays pending until a job looks it up — it must not
/// FAIL (returning the merchant's hold) while the card was refunded.
#[tokio::test]
async fn spawned_a_resent_refund_answered_unavailable_is_looked_up_not_failed() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    // No completer during the test: only the client's retry touches the key.
    let (_survivor, alice) = replica(
        &database,
        &sandbox.endpoint(),
        &[("JOB_MAINTENANCE_INTERVAL", "1h")],
    )
    .await?;
    let (merchant, payment) = captured_payment(&alice, 100).await?;

    // The doomed replica's refund is approved by the acquirer; it dies before recording.
    let (mut doomed, doomed_alice) = replica(
        &database,
        &sandbox.endpoint(),
        &[
            ("PAYSUITE_FAILPOINT", "before_finalize"),
            ("JOB_MAINTENANCE_INTERVAL", "1h"),
        ],
    )
    .await?;
    assert!(
        doomed_alice
            .refund("refund-key", &payment.id, tests::payments::brl(30))
            .await
            .is_err()
    );
    assert!(!doomed.wait(tests::LIVENESS).await?.success());
    let operations_before = operations(&sandbox.endpoint(), &payment.id, 100).await?;
    assert_eq!(approved(&operations_before, acq::OperationKind::Refund), 1);

    // The acquirer now answers every call UNAVAILABLE; after the key's lease (500 ms) the
    // client retries, which resends the attempt.
    tests::acquirer::set_faults(
        &sandbox.endpoint(),
        acq::FailureMode::Unavailable,
        1_000_000,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retried = alice
        .refund("refund-key", &payment.id, tests::payments::brl(30))
        .await?
        .into_inner();
    assert_eq!(
        retried.refund.map(|refund| refund.status),
        Some(pb::RefundStatus::Pending as i32),
        "an unavailable acquirer on a resend is an unknown outcome"
    );

    // The acquirer recovers; the job looks the refund up and settles what it finds.
    tests::acquirer::set_faults(&sandbox.endpoint(), acq::FailureMode::None, 0).await?;
    let status = until_refund_left_pending(&database, &payment.id).await?;
    assert_eq!(status, "succeeded");
    let operations = operations(&sandbox.endpoint(), &payment.id, 100).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Refund),
        1,
        "{operations:?}"
    );
    let payment = alice.payment(&payment.id).await?;
    assert_eq!(payment.amount_refunded.map(|m| m.amount_minor), Some(30));
    assert_eq!(alice.balance(&merchant).await?.0, 70);
    Ok(())
}
