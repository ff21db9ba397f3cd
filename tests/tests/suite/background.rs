//! Background jobs driving payments against a real PostgreSQL and the sandbox acquirer:
//! ASYNC payments, retries until the acquirer recovers, permanent declines, dead jobs and
//! their retry by an admin, unknown outcomes settled by lookup (also past a job's last
//! attempt: a job never dies with an outcome open), and the void timer.
//!
//! The safety-net poll is set far above every bound here, so the workers are woken by
//! NOTIFY; backoffs are short. Waits are liveness bounds (`tests::LIVENESS`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use payment_svc::acquirer::OperationKind;
use payment_svc::acquirer::sandbox::{FailureMode, Sandbox, SandboxSettings};
use proto::payments::v1 as pb;
use proto::payments::v1::payment_admin_service_client::PaymentAdminServiceClient;
use service_kit::identity::IDENTITY_HEADER;
use sqlx::{Connection, PgConnection};
use tests::payments::{Tenant, brl, cards, payment_request};
use tests::postgres::TestDatabase;
use tests::services::{self, RunningService};

struct Setup {
    database: TestDatabase,
    service: RunningService,
    sandbox: Sandbox,
    alice: Tenant,
    merchant: String,
    channel: tonic::transport::Channel,
}

async fn setup(adjust: impl FnOnce(&mut payment_svc::Config)) -> anyhow::Result<Setup> {
    let database = TestDatabase::create().await?;
    let sandbox = Sandbox::new(SandboxSettings {
        slow_answer: Duration::from_millis(600),
        ..SandboxSettings::default()
    });
    let service = services::payment_with_acquirer(
        &database,
        |config| {
            config.acquirer_timeout = Duration::from_millis(300);
            config.jobs.poll_interval = Duration::from_secs(600);
            config.jobs.backoff_base = Duration::from_millis(50);
            config.jobs.backoff_max = Duration::from_millis(200);
            adjust(config);
        },
        Arc::new(sandbox.clone()),
    )
    .await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    let alice = Tenant::new("alice", channel.clone());
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    Ok(Setup {
        database,
        service,
        sandbox,
        alice,
        merchant,
        channel,
    })
}

/// Polls `check` until it returns `Some`, within the liveness bound.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    tokio::time::timeout(tests::LIVENESS, async {
        loop {
            if let Some(value) = check().await? {
                return anyhow::Ok(value);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("{what}: not within {:?}", tests::LIVENESS))?
}

impl Setup {
    fn faults(&self, failure_mode: FailureMode) {
        self.sandbox.set_settings(SandboxSettings {
            failure_mode,
            failure_rate_ppm: if failure_mode == FailureMode::None {
                0
            } else {
                1_000_000
            },
            slow_answer: Duration::from_millis(600),
            ..SandboxSettings::default()
        });
    }

    async fn pay(
        &self,
        key: &str,
        card: &str,
        mode: pb::PaymentMode,
    ) -> anyhow::Result<pb::Payment> {
        let mut request = payment_request(key, &self.merchant, 1_000, card);
        request.mode = mode as i32;
        self.alice
            .pay(request)
            .await?
            .into_inner()
            .payment
            .ok_or_else(|| anyhow::anyhow!("no payment"))
    }

    async fn reaches(
        &self,
        payment_id: &str,
        status: pb::PaymentStatus,
    ) -> anyhow::Result<pb::Payment> {
        eventually(&format!("payment {payment_id} {status:?}"), || async {
            let payment = self.alice.payment(payment_id).await?;
            Ok((payment.status == status as i32).then_some(payment))
        })
        .await
    }

    /// `(state, attempt)` of the payment's newest job.
    async fn job_of(&self, payment_id: &str) -> anyhow::Result<(String, i32)> {
        let mut owner = PgConnection::connect(&self.database.owner_url()).await?;
        Ok(sqlx::query_as(
            "SELECT state, attempt FROM jobs WHERE payment_id = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(payment_id)
        .fetch_one(&mut owner)
        .await?)
    }

    /// The payment's event types, in delivery order.
    async fn events_of(&self, payment_id: &str) -> anyhow::Result<Vec<String>> {
        let mut owner = PgConnection::connect(&self.database.owner_url()).await?;
        Ok(sqlx::query_scalar(
            "SELECT type FROM payment_events WHERE payment_id = $1 ORDER BY xid, id",
        )
        .bind(payment_id)
        .fetch_all(&mut owner)
        .await?)
    }

    fn admin(&self) -> PaymentAdminServiceClient<tonic::transport::Channel> {
        PaymentAdminServiceClient::new(self.channel.clone())
    }
}

fn as_admin<T>(message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let token = tests::identity::token("operator", &["admin"], "payment-svc");
    request
        .metadata_mut()
        .insert(IDENTITY_HEADER, token.parse()?);
    Ok(request)
}

#[tokio::test]
async fn an_async_payment_is_pending_at_once_then_retried_until_the_acquirer_recovers()
-> anyhow::Result<()> {
    let setup = setup(|_| {}).await?;
    // Transient processing errors (nothing done) until the acquirer recovers.
    setup.faults(FailureMode::Error);
    let payment = setup
        .pay("async", cards::CARD_APPROVED, pb::PaymentMode::Async)
        .await?;
    assert_eq!(payment.status, pb::PaymentStatus::Pending as i32);
    assert_eq!(payment.mode, pb::PaymentMode::Async as i32);
    // The job retries with backoff while the acquirer is down…
    eventually("three attempts", || async {
        let (state, attempt) = setup.job_of(&payment.id).await?;
        Ok((attempt >= 3 && state != "dead").then_some(()))
    })
    .await?;
    assert_eq!(
        setup.alice.payment(&payment.id).await?.status,
        pb::PaymentStatus::Processing as i32
    );
    // …and succeeds once it is back.
    setup.faults(FailureMode::None);
    let done = setup
        .reaches(&payment.id, pb::PaymentStatus::Succeeded)
        .await?;
    assert_eq!(done.amount_captured.map(|m| m.amount_minor), Some(1_000));
    assert_eq!(setup.job_of(&payment.id).await?.0, "completed");
    assert_eq!(setup.alice.balance(&setup.merchant).await?.0, 1_000);
    assert_eq!(setup.sandbox.approved_count(OperationKind::Authorize), 1);
    assert_eq!(setup.sandbox.approved_count(OperationKind::Capture), 1);
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}

#[tokio::test]
async fn a_permanent_decline_cancels_the_job_and_fails_the_payment() -> anyhow::Result<()> {
    let setup = setup(|_| {}).await?;
    let payment = setup
        .pay(
            "no-funds",
            cards::CARD_INSUFFICIENT_FUNDS,
            pb::PaymentMode::Async,
        )
        .await?;
    let failed = setup
        .reaches(&payment.id, pb::PaymentStatus::Failed)
        .await?;
    assert_eq!(failed.failure_code, "insufficient_funds");
    assert_eq!(
        setup.job_of(&payment.id).await?,
        ("cancelled".to_owned(), 1)
    );
    assert_eq!(
        setup.events_of(&payment.id).await?,
        ["payment.created", "payment.processing", "payment.failed"]
    );
    setup.service.stop().await
}

#[tokio::test]
async fn a_job_out_of_attempts_is_dead_listed_and_retried_by_an_admin() -> anyhow::Result<()> {
    let setup = setup(|config| config.jobs.max_attempts = 2).await?;
    setup.faults(FailureMode::Unavailable);
    let payment = setup
        .pay("doomed", cards::CARD_APPROVED, pb::PaymentMode::Async)
        .await?;
    eventually("a dead job", || async {
        Ok((setup.job_of(&payment.id).await?.0 == "dead").then_some(()))
    })
    .await?;
    let mut admin = setup.admin();
    let dead = admin
        .list_jobs(as_admin(pb::ListJobsRequest {
            state: pb::JobState::Dead as i32,
            ..Default::default()
        })?)
        .await?
        .into_inner()
        .jobs;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payment_id, payment.id);
    assert_eq!((dead[0].attempt, dead[0].max_attempts), (2, 2));
    assert!(!dead[0].last_error.is_empty());
    // Not for tenants.
    let denied = setup
        .admin()
        .list_jobs(setup.alice.request(pb::ListJobsRequest::default()))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(denied, Some(tonic::Code::PermissionDenied));

    setup.faults(FailureMode::None);
    let revived = admin
        .retry_job(as_admin(pb::RetryJobRequest {
            idempotency_key: "revive".to_owned(),
            job_id: dead[0].id,
        })?)
        .await?
        .into_inner()
        .job
        .unwrap_or_default();
    assert_eq!(revived.state, pb::JobState::Available as i32);
    setup
        .reaches(&payment.id, pb::PaymentStatus::Succeeded)
        .await?;
    // Retrying a job that is not dead is refused.
    let refused = admin
        .retry_job(as_admin(pb::RetryJobRequest {
            idempotency_key: "again".to_owned(),
            job_id: dead[0].id,
        })?)
        .await
        .err();
    assert_eq!(
        refused
            .as_ref()
            .and_then(tests::payments::reason)
            .as_deref(),
        Some("JOB_NOT_DEAD")
    );
    setup.service.stop().await
}

/// `(kind, status)` of every acquirer attempt of the payment, oldest first.
async fn attempts_of(setup: &Setup, payment_id: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut owner = PgConnection::connect(&setup.database.owner_url()).await?;
    Ok(sqlx::query_as(
        "SELECT kind, status FROM attempts WHERE payment_id = $1 ORDER BY created_at, id",
    )
    .bind(payment_id)
    .fetch_all(&mut owner)
    .await?)
}

/// Acquirer operation ids the sandbox saw an authorize call for.
fn authorize_ids(setup: &Setup) -> usize {
    setup
        .sandbox
        .counters()
        .values()
        .filter(|by_kind| by_kind.contains_key("authorize"))
        .count()
}

#[tokio::test]
async fn a_job_out_of_attempts_settles_its_unknown_authorization_instead_of_dying()
-> anyhow::Result<()> {
    // One attempt: the authorization is approved at the acquirer, but its answer comes
    // after our timeout. Out of attempts with that outcome open, the job must not die.
    let setup = setup(|config| config.jobs.max_attempts = 1).await?;
    let payment = setup
        .pay("slow", cards::CARD_SLOW_APPROVED, pb::PaymentMode::Async)
        .await?;
    let done = setup
        .reaches(&payment.id, pb::PaymentStatus::Succeeded)
        .await?;
    assert_eq!(done.amount_captured.map(|m| m.amount_minor), Some(1_000));
    let (state, attempt) = setup.job_of(&payment.id).await?;
    assert_eq!(state, "completed");
    assert!(attempt >= 2, "settled past the last attempt: {attempt}");
    // Looked up, never sent again under a new id: one charge.
    assert_eq!(authorize_ids(&setup), 1);
    assert_eq!(setup.sandbox.approved_count(OperationKind::Authorize), 1);
    let pool = sqlx::PgPool::connect(&setup.database.service_url()).await?;
    let report = payment_svc::reconcile::reconcile(&pool, &setup.sandbox).await?;
    assert!(report.differences.is_empty(), "{:#?}", report.differences);
    setup.service.stop().await
}

#[tokio::test]
async fn a_job_out_of_attempts_dies_only_once_its_unknown_attempt_is_settled_and_sends_nothing_new()
-> anyhow::Result<()> {
    let setup = setup(|config| config.jobs.max_attempts = 1).await?;
    // Its one authorization happens (a processing error: nothing charged), but the
    // answer never comes.
    setup.faults(FailureMode::Timeout);
    let payment = setup
        .pay("lost", cards::CARD_PROCESSING_ERROR, pb::PaymentMode::Async)
        .await?;
    // Out of attempts with the outcome unknown, the job keeps running: the lookup finds
    // nothing (a processing error leaves no trace at the acquirer), so the attempt is
    // sent again under the same id, and its answer is lost again.
    eventually("the job retries past its last attempt", || async {
        let (state, attempt) = setup.job_of(&payment.id).await?;
        anyhow::ensure!(state != "dead", "died with its authorization unknown");
        Ok((attempt >= 3).then_some(()))
    })
    .await?;
    assert_eq!(
        attempts_of(&setup, &payment.id).await?,
        [("authorize".to_owned(), "unknown".to_owned())]
    );
    // The acquirer answers again: the attempt is settled as failed (nothing charged), and
    // only then is the job dead — without a new authorization.
    setup.faults(FailureMode::None);
    eventually("a dead job", || async {
        Ok((setup.job_of(&payment.id).await?.0 == "dead").then_some(()))
    })
    .await?;
    assert_eq!(
        attempts_of(&setup, &payment.id).await?,
        [("authorize".to_owned(), "failed".to_owned())]
    );
    assert_eq!(authorize_ids(&setup), 1);
    let pool = sqlx::PgPool::connect(&setup.database.service_url()).await?;
    let report = payment_svc::reconcile::reconcile(&pool, &setup.sandbox).await?;
    assert!(report.differences.is_empty(), "{:#?}", report.differences);
    setup.service.stop().await
}

#[tokio::test]
async fn an_unknown_outcome_stays_processing_until_the_lookup_settles_it() -> anyhow::Result<()> {
    let setup = setup(|_| {}).await?;
    // Approved at the acquirer, but the answer comes after our timeout.
    let payment = setup
        .pay("slow", cards::CARD_SLOW_APPROVED, pb::PaymentMode::Sync)
        .await?;
    assert_eq!(payment.status, pb::PaymentStatus::Processing as i32);
    let done = setup
        .reaches(&payment.id, pb::PaymentStatus::Succeeded)
        .await?;
    assert_eq!(done.failure_code, "");
    assert_eq!(
        setup.sandbox.approved_count(OperationKind::Authorize),
        1,
        "one charge"
    );
    assert_eq!(setup.sandbox.approved_count(OperationKind::Capture), 1);
    // The lookup path ran: the authorization was never sent twice.
    let calls = setup.sandbox.counters();
    let authorize_calls: u64 = calls
        .values()
        .filter_map(|by_kind| by_kind.get("authorize"))
        .sum();
    assert_eq!(authorize_calls, 1);

    // A capture and a refund whose answers never come are settled the same way.
    let mut manual = payment_request("manual", &setup.merchant, 2_000, cards::CARD_APPROVED);
    manual.capture_method = pb::CaptureMethod::Manual as i32;
    let manual = setup
        .alice
        .pay(manual)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    setup.faults(FailureMode::Timeout);
    let capturing = setup
        .alice
        .capture("capture", &manual.id, None)
        .await?
        .into_inner()
        .payment;
    assert_eq!(
        capturing.map(|p| p.status),
        Some(pb::PaymentStatus::Processing as i32)
    );
    setup
        .reaches(&manual.id, pb::PaymentStatus::Succeeded)
        .await?;
    let refund = setup
        .alice
        .refund("refund", &manual.id, brl(500))
        .await?
        .into_inner()
        .refund
        .unwrap_or_default();
    assert_eq!(refund.status, pb::RefundStatus::Pending as i32);
    let refunded = eventually("the refund settles", || async {
        let payment = setup.alice.payment(&manual.id).await?;
        Ok(
            (payment.amount_refunded.as_ref().map(|m| m.amount_minor) == Some(500))
                .then_some(payment),
        )
    })
    .await?;
    assert_eq!(refunded.status, pb::PaymentStatus::Succeeded as i32);
    assert_eq!(setup.alice.balance(&setup.merchant).await?.0, 1_000 + 1_500);
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}

#[tokio::test]
async fn an_authorization_left_uncaptured_is_voided() -> anyhow::Result<()> {
    let setup = setup(|config| config.jobs.void_after = Duration::from_millis(300)).await?;
    let mut manual = payment_request("forgotten", &setup.merchant, 900, cards::CARD_APPROVED);
    manual.capture_method = pb::CaptureMethod::Manual as i32;
    let payment = setup
        .alice
        .pay(manual)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    assert_eq!(payment.status, pb::PaymentStatus::RequiresCapture as i32);
    setup
        .reaches(&payment.id, pb::PaymentStatus::Canceled)
        .await?;
    assert_eq!(setup.sandbox.approved_count(OperationKind::Void), 1);
    assert_eq!(setup.alice.balance(&setup.merchant).await?.0, 0);
    assert_eq!(
        setup.events_of(&payment.id).await?,
        [
            "payment.created",
            "payment.requires_capture",
            "payment.processing",
            "payment.canceled"
        ]
    );
    setup.service.stop().await
}
