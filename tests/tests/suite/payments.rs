//! Card payments through payment-svc with the sandbox acquirer: outcomes per test card,
//! exactly-once charging under concurrent and abandoned retries, and no PAN at rest.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use payment_svc::acquirer::OperationKind;
use payment_svc::acquirer::sandbox::{Sandbox, SandboxSettings};
use proto::payments::v1 as pb;
use rand::Rng;
use service_kit::validation::violated_fields;
use sqlx::{Connection, PgConnection, Row};
use tests::payments::{Tenant, cards, payment_request, reason, replayed};
use tests::postgres::TestDatabase;
use tests::services::{self, RunningService};
use tonic::Code;

struct Setup {
    database: TestDatabase,
    service: RunningService,
    sandbox: Sandbox,
    alice: Tenant,
    merchant: String,
}

/// payment-svc without background workers: these tests look at what the calls alone do
/// (the jobs that finish PROCESSING payments are tested in `background`).
async fn setup(adjust: impl FnOnce(&mut payment_svc::Config)) -> anyhow::Result<Setup> {
    let database = TestDatabase::create().await?;
    let sandbox = Sandbox::new(SandboxSettings::default());
    let service = services::payment_with_acquirer(
        &database,
        |config| {
            config.jobs.enabled = false;
            adjust(config);
        },
        Arc::new(sandbox.clone()),
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
    Ok(Setup {
        database,
        service,
        sandbox,
        alice,
        merchant,
    })
}

fn status_of(response: &pb::CreatePaymentResponse) -> Option<pb::PaymentStatus> {
    response
        .payment
        .as_ref()
        .and_then(|p| pb::PaymentStatus::try_from(p.status).ok())
}

#[tokio::test]
async fn each_test_card_yields_its_documented_outcome() -> anyhow::Result<()> {
    let setup = setup(|config| config.acquirer_timeout = Duration::from_millis(300)).await?;
    let alice = &setup.alice;
    let expectations = [
        (cards::CARD_APPROVED, pb::PaymentStatus::Succeeded, ""),
        (
            cards::CARD_DECLINED,
            pb::PaymentStatus::Failed,
            "card_declined",
        ),
        (
            cards::CARD_INSUFFICIENT_FUNDS,
            pb::PaymentStatus::Failed,
            "insufficient_funds",
        ),
        // A processing error and a late answer both leave the outcome to be settled
        // later: the SYNC answer is PROCESSING.
        (
            cards::CARD_PROCESSING_ERROR,
            pb::PaymentStatus::Processing,
            "",
        ),
        (cards::CARD_SLOW_APPROVED, pb::PaymentStatus::Processing, ""),
    ];
    for (card, expected, failure_code) in expectations {
        let response = alice
            .pay(payment_request(
                &format!("card-{card}"),
                &setup.merchant,
                1_000,
                card,
            ))
            .await?;
        let response = response.into_inner();
        assert_eq!(status_of(&response), Some(expected), "card {card}");
        let payment = response.payment.unwrap_or_default();
        assert_eq!(payment.failure_code, failure_code, "card {card}");
        assert_eq!(
            payment.card.as_ref().map(|c| c.last4.as_str()),
            Some(&card[12..])
        );
    }
    // Only the approved card moved money; the slow card's charge exists at the acquirer
    // although the payment is PROCESSING (an unknown outcome, settled by a later job).
    assert_eq!(alice.balance(&setup.merchant).await?.0, 1_000);
    assert_eq!(setup.sandbox.approved_count(OperationKind::Authorize), 2);
    assert_eq!(setup.sandbox.approved_count(OperationKind::Capture), 1);
    assert_eq!(setup.database.books_sum().await?, 0);

    // Manual capture stops at REQUIRES_CAPTURE.
    let mut manual = payment_request("manual", &setup.merchant, 500, cards::CARD_APPROVED);
    manual.capture_method = pb::CaptureMethod::Manual as i32;
    let response = alice.pay(manual).await?.into_inner();
    assert_eq!(
        status_of(&response),
        Some(pb::PaymentStatus::RequiresCapture)
    );
    assert_eq!(alice.balance(&setup.merchant).await?.0, 1_000);
    setup.service.stop().await
}

#[tokio::test]
async fn fifty_concurrent_calls_with_one_key_charge_once() -> anyhow::Result<()> {
    let setup = setup(|_| {}).await?;
    let mut calls = Vec::new();
    for _ in 0..50 {
        let alice = setup.alice.clone();
        let request = payment_request("one-key", &setup.merchant, 4_200, cards::CARD_APPROVED);
        calls.push(tokio::spawn(async move { alice.pay(request).await }));
    }
    let mut ids = BTreeSet::new();
    let mut in_use = 0;
    for call in calls {
        match call.await? {
            Ok(response) => {
                ids.insert(
                    response
                        .into_inner()
                        .payment
                        .map(|p| p.id)
                        .unwrap_or_default(),
                );
            }
            Err(status) if status.code() == Code::Aborted => {
                assert_eq!(reason(&status).as_deref(), Some("IDEMPOTENCY_KEY_IN_USE"));
                in_use += 1;
            }
            Err(status) => anyhow::bail!("unexpected answer: {status}"),
        }
    }
    assert_eq!(ids.len(), 1, "every answer is the same payment: {ids:?}");
    assert!(in_use < 50);
    assert_eq!(
        setup.sandbox.approved_count(OperationKind::Authorize),
        1,
        "exactly one charge"
    );
    assert_eq!(setup.alice.balance(&setup.merchant).await?.0, 4_200);

    // A later retry replays the stored answer.
    let again = setup
        .alice
        .pay(payment_request(
            "one-key",
            &setup.merchant,
            4_200,
            cards::CARD_APPROVED,
        ))
        .await?;
    assert!(replayed(&again));
    // The same key with another amount is refused and writes nothing.
    let reused = setup
        .alice
        .pay(payment_request(
            "one-key",
            &setup.merchant,
            4_201,
            cards::CARD_APPROVED,
        ))
        .await
        .err();
    assert_eq!(
        reused.as_ref().and_then(reason).as_deref(),
        Some("IDEMPOTENCY_KEY_REUSED")
    );
    let mut owner = PgConnection::connect(&setup.database.owner_url()).await?;
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(&mut owner)
        .await?;
    assert_eq!(payments, 1);
    setup.service.stop().await
}

#[tokio::test]
async fn callers_that_give_up_and_retry_are_charged_once_per_key() -> anyhow::Result<()> {
    const KEYS: usize = 20;
    let setup = setup(|_| {}).await?;
    setup.sandbox.set_settings(SandboxSettings {
        added_latency: Duration::from_millis(20),
        ..SandboxSettings::default()
    });
    // First wave: every call is abandoned at a random point (deadline or dropped future).
    let mut abandoned = Vec::new();
    for n in 0..KEYS {
        let alice = setup.alice.clone();
        let mut request = alice.request(payment_request(
            &format!("gave-up-{n}"),
            &setup.merchant,
            100,
            cards::CARD_APPROVED,
        ));
        let give_up_after = Duration::from_millis(rand::rng().random_range(1..60));
        request.set_timeout(give_up_after);
        abandoned.push(tokio::spawn(async move {
            let _ =
                tokio::time::timeout(give_up_after, alice.client().create_payment(request)).await;
        }));
    }
    for call in abandoned {
        call.await?;
    }
    // Then each caller retries with its key until it gets an answer.
    let mut succeeded = BTreeSet::new();
    for n in 0..KEYS {
        let key = format!("gave-up-{n}");
        let deadline = tokio::time::Instant::now() + tests::LIVENESS;
        loop {
            match setup
                .alice
                .pay(payment_request(
                    &key,
                    &setup.merchant,
                    100,
                    cards::CARD_APPROVED,
                ))
                .await
            {
                Ok(response) => {
                    let response = response.into_inner();
                    assert_eq!(
                        status_of(&response),
                        Some(pb::PaymentStatus::Succeeded),
                        "{key}"
                    );
                    succeeded.insert(response.payment.map(|p| p.id).unwrap_or_default());
                    break;
                }
                Err(status) if matches!(status.code(), Code::Aborted | Code::Unavailable) => {
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "{key}: still {status}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => anyhow::bail!("{key}: {status}"),
            }
        }
    }
    assert_eq!(succeeded.len(), KEYS);
    assert_eq!(
        setup.sandbox.approved_count(OperationKind::Authorize),
        KEYS,
        "one charge per key"
    );
    assert_eq!(
        setup.alice.balance(&setup.merchant).await?.0,
        100 * KEYS as i64
    );
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}

#[tokio::test]
async fn payments_are_private_listed_by_status_and_never_store_a_pan() -> anyhow::Result<()> {
    let setup = setup(|_| {}).await?;
    let alice = &setup.alice;
    let mut ids = Vec::new();
    for (n, card) in [
        cards::CARD_APPROVED,
        cards::CARD_DECLINED,
        cards::CARD_APPROVED,
    ]
    .iter()
    .enumerate()
    {
        let response = alice
            .pay(payment_request(
                &format!("p{n}"),
                &setup.merchant,
                250,
                card,
            ))
            .await?;
        ids.push(
            response
                .into_inner()
                .payment
                .map(|p| p.id)
                .unwrap_or_default(),
        );
    }
    let succeeded = alice
        .client()
        .list_payments(alice.request(pb::ListPaymentsRequest {
            status: pb::PaymentStatus::Succeeded as i32,
            page_size: 1,
            page_token: String::new(),
        }))
        .await?
        .into_inner();
    assert_eq!(succeeded.payments.len(), 1);
    // The page token is bound to its filter.
    let wrong_filter = alice
        .client()
        .list_payments(alice.request(pb::ListPaymentsRequest {
            status: pb::PaymentStatus::Failed as i32,
            page_size: 1,
            page_token: succeeded.next_page_token.clone(),
        }))
        .await
        .err();
    assert_eq!(
        wrong_filter.as_ref().map(violated_fields),
        Some(vec!["page_token".to_owned()])
    );
    let rest = alice
        .client()
        .list_payments(alice.request(pb::ListPaymentsRequest {
            status: pb::PaymentStatus::Succeeded as i32,
            page_size: 1,
            page_token: succeeded.next_page_token,
        }))
        .await?
        .into_inner();
    assert_eq!(rest.payments.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // Bob cannot see alice's payments.
    let bob = alice.as_principal("bob");
    let hidden = bob
        .client()
        .get_payment(bob.request(pb::GetPaymentRequest {
            payment_id: ids[0].clone(),
        }))
        .await
        .err();
    assert_eq!(hidden.map(|s| s.code()), Some(Code::NotFound));

    // At rest: no table holds a test card number in clear.
    let mut owner = PgConnection::connect(&setup.database.owner_url()).await?;
    for table in [
        "cards",
        "payments",
        "attempts",
        "audit_log",
        "idempotency_keys",
    ] {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT t::text AS row FROM {table} t"
        )))
        .fetch_all(&mut owner)
        .await?;
        for row in rows {
            let text: String = row.try_get("row")?;
            for card in cards::ALL {
                assert!(!text.contains(card), "{table} holds a PAN in clear");
                assert!(!text.contains(&hex(card)), "{table} holds a PAN as hex");
            }
        }
    }
    setup.service.stop().await
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn invalid_payment_fields_are_reported_by_path() -> anyhow::Result<()> {
    let setup = setup(|_| {}).await?;
    let alice = &setup.alice;
    let mut bad_card = payment_request("k", &setup.merchant, 100, "4242424242424241");
    if let Some(card) = bad_card.card.as_mut() {
        card.exp_year = 2020;
        card.cvc = "12".to_owned();
    }
    let mut no_card = payment_request("k", &setup.merchant, 0, cards::CARD_APPROVED);
    no_card.card = None;
    no_card.capture_method = 9;
    for (request, expected) in [
        (bad_card, vec!["card.number", "card.exp_month", "card.cvc"]),
        (
            no_card,
            vec!["amount.amount_minor", "card", "capture_method"],
        ),
    ] {
        let status = alice.pay(request).await.err();
        assert_eq!(
            status.as_ref().map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            status.as_ref().map(violated_fields).unwrap_or_default(),
            expected
        );
        assert!(
            status.is_some_and(|s| !s.message().contains("4242424242424241")),
            "no PAN in errors"
        );
    }
    // A customer account cannot take payments.
    let customer = alice
        .open_account(pb::AccountKind::Customer, "BRL", false)
        .await?;
    let refused = alice
        .pay(payment_request(
            "to-customer",
            &customer.id,
            100,
            cards::CARD_APPROVED,
        ))
        .await
        .err();
    assert_eq!(
        refused.as_ref().and_then(reason).as_deref(),
        Some("NOT_A_MERCHANT_ACCOUNT")
    );
    setup.service.stop().await
}

#[tokio::test]
async fn every_change_leaves_an_audit_row_that_only_admins_read() -> anyhow::Result<()> {
    use proto::payments::v1::payment_admin_service_client::PaymentAdminServiceClient;
    use service_kit::identity::IDENTITY_HEADER;

    let setup = setup(|_| {}).await?;
    let paid = setup
        .alice
        .pay(payment_request(
            "audited",
            &setup.merchant,
            700,
            cards::CARD_APPROVED,
        ))
        .await?
        .into_inner()
        .payment
        .map(|p| p.id)
        .unwrap_or_default();
    let channel = tonic::transport::Channel::from_shared(setup.service.endpoint())?
        .connect()
        .await?;
    let mut admin = PaymentAdminServiceClient::new(channel);
    let trail_request =
        |scopes: &[&str]| -> anyhow::Result<tonic::Request<pb::GetAuditTrailRequest>> {
            let mut request = tonic::Request::new(pb::GetAuditTrailRequest {
                entity_type: "payment".to_owned(),
                entity_id: paid.clone(),
                ..Default::default()
            });
            let token = tests::identity::token("operator", scopes, "payment-svc");
            request
                .metadata_mut()
                .insert(IDENTITY_HEADER, token.parse()?);
            Ok(request)
        };
    let denied = admin
        .get_audit_trail(trail_request(&["payments:read"])?)
        .await
        .err();
    assert_eq!(denied.map(|s| s.code()), Some(Code::PermissionDenied));
    let trail = admin
        .get_audit_trail(trail_request(&["admin"])?)
        .await?
        .into_inner();
    let actions: Vec<&str> = trail.records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["payment.create", "payment.capture"]);
    assert!(trail.records.iter().all(|r| r.principal == "alice"));
    let after = trail.records.get(1).and_then(|r| r.after.as_ref());
    let status = after
        .and_then(|s| s.fields.get("status"))
        .and_then(|v| v.kind.clone());
    assert_eq!(
        status,
        Some(prost_types::value::Kind::StringValue(
            "succeeded".to_owned()
        ))
    );

    // Every mutating call of this test left its row: the account and the payment.
    let mut owner = PgConnection::connect(&setup.database.owner_url()).await?;
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_log ORDER BY id")
        .fetch_all(&mut owner)
        .await?;
    assert_eq!(
        actions,
        ["account.create", "payment.create", "payment.capture"]
    );
    setup.service.stop().await
}

#[tokio::test]
async fn storm_of_1000_concurrent_payments_into_one_merchant_all_succeed() -> anyhow::Result<()> {
    const PAYMENTS: usize = 1_000;
    const CHANNELS: usize = 8;
    // A lock timeout this short fails at once if payments queued on the merchant's row.
    // The pool wait is long instead: 1,000 callers share 16 connections by design.
    let setup = setup(|config| {
        config.database.lock_timeout = Duration::from_millis(50);
        config.database.acquire_timeout = Duration::from_secs(120);
        config.limits.max_unary_per_connection = PAYMENTS;
    })
    .await?;
    let mut tenants = Vec::new();
    for _ in 0..CHANNELS {
        let channel = tonic::transport::Channel::from_shared(setup.service.endpoint())?
            .connect()
            .await?;
        tenants.push(Tenant::new("alice", channel));
    }
    let start = Arc::new(tokio::sync::Barrier::new(PAYMENTS));
    let mut calls = Vec::new();
    let mut expected = 0;
    for n in 0..PAYMENTS {
        let tenant = tenants[n % CHANNELS].clone();
        let amount = 100 + i64::try_from(n)?;
        expected += amount;
        let request = payment_request(
            &format!("hot-{n}"),
            &setup.merchant,
            amount,
            cards::CARD_APPROVED,
        );
        let start = Arc::clone(&start);
        calls.push(tokio::spawn(async move {
            start.wait().await;
            tenant.pay(request).await
        }));
    }
    let mut failures = Vec::new();
    for call in calls {
        match call.await? {
            Ok(response) => {
                let status = status_of(response.get_ref());
                if status != Some(pb::PaymentStatus::Succeeded) {
                    failures.push(format!("{status:?}"));
                }
            }
            Err(status) => failures.push(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {PAYMENTS} failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(setup.alice.balance(&setup.merchant).await?.0, expected);
    assert_eq!(
        setup.sandbox.approved_count(OperationKind::Capture),
        PAYMENTS
    );
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}
