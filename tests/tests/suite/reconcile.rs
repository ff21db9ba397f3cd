//! `payment-svc reconcile` logic against the sandbox acquirer the service used: a clean
//! workload reconciles with no difference; planted differences — a charge without an
//! attempt, an attempt whose outcome disagrees, a payment whose amounts disagree with the
//! ledger — are each reported.

use std::sync::Arc;
use std::time::Duration;

use payment_svc::acquirer::sandbox::{FailureMode, Sandbox, SandboxSettings};
use payment_svc::acquirer::{Acquirer, AuthorizeRequest};
use payment_svc::domain::card::{CardDetails, Pan};
use payment_svc::domain::{Currency, Money};
use payment_svc::reconcile::reconcile;
use proto::payments::v1 as pb;
use sqlx::{Connection, PgConnection, PgPool};
use tests::payments::{Tenant, brl, cards, payment_request};
use tests::postgres::TestDatabase;
use tests::services;

#[tokio::test]
async fn reconcile_finds_no_difference_after_a_clean_workload_and_every_planted_one()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = Sandbox::new(SandboxSettings::default());
    let service = services::payment_with_acquirer(
        &database,
        |config| {
            config.acquirer_timeout = Duration::from_millis(300);
            // Only what the calls did: no job adds attempts while the books are compared.
            config.jobs.enabled = false;
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

    // Every kind of outcome that settles: approved, declined, a transient error,
    // partial capture, void, partial refund, and a refund the acquirer could not make.
    let mut paid = Vec::new();
    for (key, card) in [
        ("approved", cards::CARD_APPROVED),
        ("declined", cards::CARD_DECLINED),
        ("no-funds", cards::CARD_INSUFFICIENT_FUNDS),
        ("error", cards::CARD_PROCESSING_ERROR),
    ] {
        let payment = alice
            .pay(payment_request(key, &merchant, 1_000, card))
            .await?
            .into_inner()
            .payment
            .unwrap_or_default();
        paid.push(payment.id);
    }
    let mut manual = payment_request("manual", &merchant, 2_000, cards::CARD_APPROVED);
    manual.capture_method = pb::CaptureMethod::Manual as i32;
    let manual = alice
        .pay(manual.clone())
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    alice.capture("capture", &manual.id, brl(1_500)).await?;
    alice.refund("refund", &manual.id, brl(400)).await?;
    let mut voided = payment_request("voided", &merchant, 700, cards::CARD_APPROVED);
    voided.capture_method = pb::CaptureMethod::Manual as i32;
    let voided = alice
        .pay(voided)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    alice.cancel("cancel", &voided.id).await?;
    sandbox.set_settings(SandboxSettings {
        failure_mode: FailureMode::Unavailable,
        failure_rate_ppm: 1_000_000,
        ..SandboxSettings::default()
    });
    alice.refund("refund-failed", &paid[0], brl(100)).await?;
    sandbox.set_settings(SandboxSettings::default());

    let pool = PgPool::connect(&database.service_url()).await?;
    let clean = reconcile(&pool, &sandbox).await?;
    assert!(clean.differences.is_empty(), "{:#?}", clean.differences);
    assert!(clean.operations >= 8, "{clean:?}");
    assert_eq!(clean.payments, 6);

    // 1. A charge nobody recorded.
    let brl_currency = Currency::parse("BRL")?;
    let card = CardDetails {
        pan: Pan::parse(cards::CARD_APPROVED)?,
        exp_month: 12,
        exp_year: 2034,
        cvc: None,
    };
    sandbox
        .authorize(AuthorizeRequest {
            operation_id: "att_stray",
            reference: "pay_stray",
            amount: Money::new(999, brl_currency),
            card: &card,
        })
        .await?;
    // 2. An attempt whose recorded outcome disagrees with the acquirer's.
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let capture: String = sqlx::query_scalar(
        "UPDATE attempts SET status = 'declined' WHERE id = \
         (SELECT id FROM attempts WHERE payment_id = $1 AND kind = 'capture') RETURNING id",
    )
    .bind(&manual.id)
    .fetch_one(&mut owner)
    .await?;
    // 3. A payment whose captured amount disagrees with the acquirer and the ledger.
    sqlx::query("UPDATE payments SET amount_captured = amount_captured - 1 WHERE id = $1")
        .bind(&paid[0])
        .execute(&mut owner)
        .await?;

    let planted = reconcile(&pool, &sandbox).await?;
    let differences = planted.differences.join("\n");
    assert_eq!(planted.differences.len(), 3, "{differences}");
    assert!(differences.contains("operation att_stray"), "{differences}");
    assert!(
        differences.contains(&format!(
            "operation {capture} is approved at the acquirer but declined here"
        )),
        "{differences}"
    );
    assert!(
        differences.contains(&format!(
            "payment {}: captured 1000 at the acquirer, amount_captured 999",
            paid[0]
        )),
        "{differences}"
    );
    pool.close().await;
    service.stop().await
}
