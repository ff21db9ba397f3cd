//! The remote acquirer: the standalone sandbox as a real process, the gRPC connector with
//! its timeout and circuit breaker, a crash of payment-svc right after the acquirer
//! approved (failpoint), and `payment-svc reconcile` against the remote acquirer.

use std::sync::Arc;
use std::time::Duration;

use payment_svc::acquirer::remote::RemoteAcquirer;
use payment_svc::acquirer::sandbox::CARD_APPROVED;
use payment_svc::acquirer::{Acquirer, AcquirerError, AuthorizeRequest, OperationStatus};
use payment_svc::domain::card::{CardDetails, Pan};
use payment_svc::domain::{Currency, Money};
use proto::acquirer::v1 as acq;
use proto::payments::v1 as pb;
use service_kit::breaker::{BreakerConfig, BreakerState};
use tests::acquirer::{approved, counters, operations, set_faults, spawn_sandbox, total_calls};
use tests::payments::{Tenant, brl, cards, payment_request};
use tests::postgres::TestDatabase;
use tests::process::{SpawnedService, run_to_exit};
use tonic::Code;

fn card(number: &str) -> anyhow::Result<CardDetails> {
    Ok(CardDetails {
        pan: Pan::parse(number)?,
        exp_month: 12,
        exp_year: 2034,
        cvc: None,
    })
}

fn brl_money(amount: i64) -> anyhow::Result<Money> {
    Ok(Money::new(amount, Currency::parse("BRL")?))
}

async fn authorize(
    acquirer: &RemoteAcquirer,
    operation_id: &str,
    number: &str,
) -> anyhow::Result<Result<payment_svc::acquirer::Operation, AcquirerError>> {
    let card = card(number)?;
    Ok(acquirer
        .authorize(AuthorizeRequest {
            operation_id,
            reference: "pay_test",
            amount: brl_money(1_000)?,
            card: &card,
        })
        .await)
}

fn remote(
    endpoint: &str,
    timeout: Duration,
    breaker: BreakerConfig,
) -> anyhow::Result<RemoteAcquirer> {
    Ok(RemoteAcquirer::new(
        endpoint,
        Duration::from_secs(2),
        timeout,
        breaker,
    )?)
}

#[tokio::test]
async fn spawned_sandbox_acquirer_answers_each_test_card_through_the_remote_connector()
-> anyhow::Result<()> {
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    let acquirer = remote(
        &sandbox.endpoint(),
        Duration::from_secs(5),
        BreakerConfig::default(),
    )?;
    let expectations = [
        (cards::CARD_APPROVED, OperationStatus::Approved),
        (
            cards::CARD_DECLINED,
            OperationStatus::Declined {
                code: "card_declined".into(),
            },
        ),
        (
            cards::CARD_INSUFFICIENT_FUNDS,
            OperationStatus::Declined {
                code: "insufficient_funds".into(),
            },
        ),
        (
            cards::CARD_PROCESSING_ERROR,
            OperationStatus::Failed {
                code: "processing_error".into(),
            },
        ),
    ];
    for (n, (number, expected)) in expectations.into_iter().enumerate() {
        let answer = authorize(&acquirer, &format!("att_{n}"), number).await??;
        assert_eq!(answer.status, expected, "card {}…", &number[..4]);
    }
    // An operation id is performed at most once; a repeat gets the first answer.
    let again = authorize(&acquirer, "att_0", cards::CARD_DECLINED).await??;
    assert_eq!(again.status, OperationStatus::Approved);
    assert_eq!(
        counters(&sandbox.endpoint()).await?["att_0"]["authorize"],
        2
    );
    // Capture, refund and void of the approved authorization.
    let capture = acquirer.capture("cap_0", "att_0", brl_money(600)?).await?;
    assert_eq!(capture.status, OperationStatus::Approved);
    let refund = acquirer.refund("ref_0", "cap_0", brl_money(100)?).await?;
    assert_eq!(refund.status, OperationStatus::Approved);
    let void = acquirer.void("void_0", "att_0").await?;
    assert_eq!(
        void.status,
        OperationStatus::Declined {
            code: "already_captured".into()
        }
    );
    // A capture of something that was never authorized is our bug, not an outage.
    let rejected = acquirer
        .capture("cap_x", "att_missing", brl_money(1)?)
        .await;
    assert!(
        matches!(rejected, Err(AcquirerError::Rejected(_))),
        "{rejected:?}"
    );
    assert_eq!(acquirer.breaker().state(), BreakerState::Closed);
    // Lookups and pages.
    assert!(acquirer.get_operation("att_never").await?.is_none());
    assert_eq!(
        acquirer.get_operation("cap_0").await?.map(|op| op.status),
        Some(OperationStatus::Approved)
    );
    let listed = operations(&sandbox.endpoint(), "", 2).await?;
    assert_eq!(
        listed.len(),
        6,
        "the processing error leaves no operation: {listed:?}"
    );
    assert_eq!(acquirer.list_operations(None, 1, 3).await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn spawned_acquirer_outage_opens_the_breaker_and_one_probe_closes_it() -> anyhow::Result<()> {
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    let endpoint = sandbox.endpoint();
    let acquirer = remote(
        &endpoint,
        Duration::from_secs(5),
        BreakerConfig {
            consecutive_failures: 3,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_millis(400),
            ..BreakerConfig::default()
        },
    )?;
    set_faults(&endpoint, acq::FailureMode::Unavailable, 1_000_000).await?;
    for n in 0..3 {
        let answer = authorize(&acquirer, &format!("down_{n}"), CARD_APPROVED).await?;
        assert!(
            matches!(answer, Err(AcquirerError::Unavailable(_))),
            "{answer:?}"
        );
    }
    assert_eq!(acquirer.breaker().state(), BreakerState::Open);
    let before = total_calls(&endpoint).await?;
    let refused = authorize(&acquirer, "refused", CARD_APPROVED).await?;
    assert_eq!(
        refused,
        Err(AcquirerError::Unavailable("circuit open".to_owned()))
    );
    assert_eq!(
        total_calls(&endpoint).await?,
        before,
        "an open breaker does not call"
    );

    // Back up: after the backoff (200–400 ms; bound 30 s) one probe goes through and closes it.
    set_faults(&endpoint, acq::FailureMode::None, 0).await?;
    let probe = tokio::time::timeout(tests::LIVENESS, async {
        let mut n = 0;
        loop {
            n += 1;
            match authorize(&acquirer, &format!("probe_{n}"), CARD_APPROVED).await? {
                Ok(operation) => return anyhow::Ok(operation),
                Err(AcquirerError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(other) => anyhow::bail!("unexpected {other:?}"),
            }
        }
    })
    .await??;
    assert_eq!(probe.status, OperationStatus::Approved);
    assert_eq!(
        total_calls(&endpoint).await?,
        before + 1,
        "exactly one probe reached the acquirer"
    );
    assert_eq!(acquirer.breaker().state(), BreakerState::Closed);
    Ok(())
}

#[tokio::test]
async fn spawned_frozen_acquirer_is_an_unknown_outcome_settled_by_lookup() -> anyhow::Result<()> {
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    let acquirer = remote(
        &sandbox.endpoint(),
        Duration::from_millis(300),
        BreakerConfig::default(),
    )?;
    // Warm the connection, then freeze the acquirer: the call cannot be answered.
    authorize(&acquirer, "warm", CARD_APPROVED).await??;
    sandbox.freeze().await?;
    let frozen = tokio::time::timeout(
        tests::LIVENESS,
        authorize(&acquirer, "frozen", CARD_APPROVED),
    )
    .await??;
    assert_eq!(
        frozen,
        Err(AcquirerError::Timeout),
        "no answer in 300 ms is an unknown outcome"
    );
    sandbox.resume()?;
    // Once thawed, the acquirer may or may not perform the request: the client gave up at
    // its timeout and reset the stream, and whether the server reads the reset before it
    // runs the call is a race — the unknown outcome itself. A lookup settles it either way,
    // as payment-svc does: performed → its answer; never received → sent again under the
    // SAME id. Either way the card is authorized exactly once.
    let settled = tokio::time::timeout(tests::LIVENESS, async {
        loop {
            match acquirer.get_operation("frozen").await {
                Ok(Some(operation)) => return operation,
                Ok(None) => {
                    if let Ok(Ok(operation)) = authorize(&acquirer, "frozen", CARD_APPROVED).await {
                        return operation;
                    }
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    assert_eq!(settled.status, OperationStatus::Approved);
    let operations = operations(&sandbox.endpoint(), "pay_test", 100).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Authorize),
        2,
        "warm and frozen, once each: {operations:?}"
    );
    Ok(())
}

/// payment-svc as a process on `database`, with the remote acquirer at `acquirer_url`.
async fn spawn_payment(
    database: &TestDatabase,
    acquirer_url: &str,
    extra: &[(&'static str, &str)],
) -> anyhow::Result<SpawnedService> {
    let mut envs = vec![
        ("DATABASE_URL", database.service_url()),
        ("DATABASE_MIGRATION_URL", database.owner_url()),
        ("ACQUIRER_URL", acquirer_url.to_owned()),
        ("IDEMPOTENCY_LEASE", "1s".to_owned()),
        ("JOBS_ENABLED", "false".to_owned()),
    ];
    envs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    SpawnedService::start("payment-svc", &envs).await
}

#[tokio::test]
async fn spawned_payment_svc_aborted_after_the_approval_charges_once_when_retried()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    let mut doomed = spawn_payment(
        &database,
        &sandbox.endpoint(),
        &[("PAYSUITE_FAILPOINT", "after_acquirer_approve")],
    )
    .await?;
    let channel = tonic::transport::Channel::from_shared(doomed.endpoint())?
        .connect()
        .await?;
    let alice = Tenant::new("alice", channel);
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let request = payment_request("crash-once", &merchant, 7_500, cards::CARD_APPROVED);
    let lost = alice.pay(request.clone()).await;
    assert!(lost.is_err(), "the process died before answering");
    let status = doomed.wait(tests::LIVENESS).await?;
    assert!(!status.success(), "{status:?}");
    assert!(
        doomed
            .stderr()
            .joined()
            .contains("failpoint after_acquirer_approve reached"),
        "{}",
        doomed.stderr().joined()
    );

    // The client retries with the same key against a fresh process: once the dead
    // request's lease (1 s) expires, the retry resumes it.
    let revived = spawn_payment(&database, &sandbox.endpoint(), &[]).await?;
    let channel = tonic::transport::Channel::from_shared(revived.endpoint())?
        .connect()
        .await?;
    let alice = Tenant::new("alice", channel);
    let payment = tokio::time::timeout(tests::LIVENESS, async {
        loop {
            match alice.pay(request.clone()).await {
                Ok(response) => {
                    return anyhow::Ok(response.into_inner().payment.unwrap_or_default());
                }
                Err(status) if status.code() == Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => anyhow::bail!("unexpected answer: {status}"),
            }
        }
    })
    .await??;
    assert_eq!(payment.status, pb::PaymentStatus::Succeeded as i32);
    assert_eq!(payment.amount_captured.map(|m| m.amount_minor), Some(7_500));
    let operations = operations(&sandbox.endpoint(), &payment.id, 100).await?;
    assert_eq!(
        approved(&operations, acq::OperationKind::Authorize),
        1,
        "one charge: {operations:?}"
    );
    assert_eq!(approved(&operations, acq::OperationKind::Capture), 1);
    // Both authorize calls (the dead request's and the retry's) used one operation id.
    let calls = counters(&sandbox.endpoint()).await?;
    let authorizing: Vec<_> = calls
        .iter()
        .filter(|(_, by_kind)| by_kind.contains_key("authorize"))
        .collect();
    assert_eq!(authorizing.len(), 1, "{calls:?}");
    assert_eq!(authorizing[0].1["authorize"], 2);
    assert_eq!(alice.balance(&merchant).await?.0, 7_500);
    Ok(())
}

#[tokio::test]
async fn spawned_reconcile_reports_nothing_after_a_workload_and_a_planted_charge()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = spawn_sandbox(Duration::from_secs(30)).await?;
    let acquirer = Arc::new(remote(
        &sandbox.endpoint(),
        Duration::from_secs(5),
        BreakerConfig::default(),
    )?);
    let service = tests::services::payment_with_acquirer(
        &database,
        |config| config.jobs.enabled = false,
        acquirer.clone(),
    )
    .await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    let alice = Tenant::new("alice", channel);
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let paid = alice
        .pay(payment_request(
            "paid",
            &merchant,
            3_000,
            cards::CARD_APPROVED,
        ))
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    alice.refund("refund", &paid.id, brl(1_000)).await?;
    alice
        .pay(payment_request(
            "declined",
            &merchant,
            3_000,
            cards::CARD_DECLINED,
        ))
        .await?;
    let mut manual = payment_request("manual", &merchant, 2_000, cards::CARD_APPROVED);
    manual.capture_method = pb::CaptureMethod::Manual as i32;
    let manual = alice
        .pay(manual)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    alice.capture("capture", &manual.id, brl(1_500)).await?;

    let env = [
        ("DATABASE_URL", database.service_url()),
        ("ACQUIRER_URL", sandbox.endpoint()),
    ];
    let clean = run_to_exit("payment-svc", &env, &["reconcile"]).await?;
    assert!(clean.status.success(), "{}\n{}", clean.stdout, clean.stderr);
    assert!(clean.stdout.contains("0 difference(s)"), "{}", clean.stdout);

    // A charge payment-svc never asked for.
    authorize(&acquirer, "att_planted", CARD_APPROVED).await??;
    let planted = run_to_exit("payment-svc", &env, &["reconcile"]).await?;
    assert!(!planted.status.success());
    assert!(
        planted.stdout.contains("operation att_planted"),
        "{}",
        planted.stdout
    );
    assert!(
        planted.stdout.contains("1 difference(s)"),
        "{}",
        planted.stdout
    );
    service.stop().await
}
