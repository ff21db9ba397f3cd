//! After authorization: CapturePayment (full and partial), CancelPayment (void) and
//! RefundPayment (partial, merchant debited first), their refusals, and what an
//! unreachable or silent acquirer leaves behind.

use std::sync::Arc;
use std::time::Duration;

use payment_svc::acquirer::OperationKind;
use payment_svc::acquirer::sandbox::{FailureMode, Sandbox, SandboxSettings};
use proto::payments::v1 as pb;
use service_kit::validation::violated_fields;
use sqlx::{Connection, PgConnection};
use tests::payments::{Tenant, brl, cards, payment_request, reason, replayed};
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
/// (the jobs that settle unknown outcomes are tested in `background`).
async fn setup() -> anyhow::Result<Setup> {
    let database = TestDatabase::create().await?;
    let sandbox = Sandbox::new(SandboxSettings::default());
    let service = services::payment_with_acquirer(
        &database,
        |config| {
            config.acquirer_timeout = Duration::from_millis(300);
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
    Ok(Setup {
        database,
        service,
        sandbox,
        alice,
        merchant,
    })
}

impl Setup {
    /// A payment of `amount` on the approved card; `manual` stops at REQUIRES_CAPTURE.
    async fn paid(&self, key: &str, amount: i64, manual: bool) -> anyhow::Result<pb::Payment> {
        let mut request = payment_request(key, &self.merchant, amount, cards::CARD_APPROVED);
        if manual {
            request.capture_method = pb::CaptureMethod::Manual as i32;
        }
        self.alice
            .pay(request)
            .await?
            .into_inner()
            .payment
            .ok_or_else(|| anyhow::anyhow!("no payment"))
    }

    fn faults(&self, failure_mode: FailureMode) {
        self.sandbox.set_settings(SandboxSettings {
            failure_mode,
            failure_rate_ppm: if failure_mode == FailureMode::None {
                0
            } else {
                1_000_000
            },
            ..SandboxSettings::default()
        });
    }

    async fn balance(&self) -> anyhow::Result<i64> {
        Ok(self.alice.balance(&self.merchant).await?.0)
    }
}

fn status(payment: Option<&pb::Payment>) -> Option<pb::PaymentStatus> {
    payment.and_then(|p| pb::PaymentStatus::try_from(p.status).ok())
}

fn minor(money: Option<&pb::Money>) -> i64 {
    money.map(|m| m.amount_minor).unwrap_or_default()
}

fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, Option<String>) {
    match result {
        Ok(answer) => panic!("expected a refusal, got {answer:?}"),
        Err(status) => (status.code(), reason(&status)),
    }
}

fn precondition(reason: &str) -> (Code, Option<String>) {
    (Code::FailedPrecondition, Some(reason.to_owned()))
}

#[tokio::test]
async fn manual_payments_capture_in_full_or_in_part_exactly_once() -> anyhow::Result<()> {
    let setup = setup().await?;
    let alice = &setup.alice;

    let partial = setup.paid("partial", 1_000, true).await?;
    assert_eq!(
        status(Some(&partial)),
        Some(pb::PaymentStatus::RequiresCapture)
    );
    assert_eq!(setup.balance().await?, 0, "authorization moves no money");
    let captured = alice
        .capture("capture-partial", &partial.id, brl(600))
        .await?;
    assert!(!replayed(&captured));
    let payment = captured.into_inner().payment;
    assert_eq!(status(payment.as_ref()), Some(pb::PaymentStatus::Succeeded));
    assert_eq!(
        minor(payment.as_ref().and_then(|p| p.amount_captured.as_ref())),
        600
    );
    assert_eq!(setup.balance().await?, 600);

    // The same key replays; another key finds nothing left to capture.
    let again = alice
        .capture("capture-partial", &partial.id, brl(600))
        .await?;
    assert!(replayed(&again));
    assert_eq!(again.into_inner().payment, payment);
    assert_eq!(
        refused(alice.capture("capture-twice", &partial.id, None).await),
        precondition("PAYMENT_NOT_CAPTURABLE")
    );
    let reused = alice
        .capture("capture-partial", &partial.id, brl(500))
        .await;
    assert_eq!(
        refused(reused),
        (
            Code::InvalidArgument,
            Some("IDEMPOTENCY_KEY_REUSED".to_owned())
        )
    );

    let full = setup.paid("full", 2_500, true).await?;
    assert_eq!(
        refused(alice.capture("too-much", &full.id, brl(2_501)).await),
        precondition("AMOUNT_EXCEEDS_AUTHORIZED")
    );
    let mut dollars = brl(100);
    if let Some(money) = dollars.as_mut() {
        money.currency = "USD".to_owned();
    }
    assert_eq!(
        refused(alice.capture("dollars", &full.id, dollars).await),
        precondition("CURRENCY_MISMATCH")
    );
    let payment = alice
        .capture("capture-full", &full.id, None)
        .await?
        .into_inner()
        .payment;
    assert_eq!(
        minor(payment.as_ref().and_then(|p| p.amount_captured.as_ref())),
        2_500
    );
    assert_eq!(setup.balance().await?, 3_100);
    assert_eq!(setup.sandbox.approved_count(OperationKind::Capture), 2);
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}

#[tokio::test]
async fn illegal_transitions_are_refused_and_cancel_voids_the_authorization() -> anyhow::Result<()>
{
    let setup = setup().await?;
    let alice = &setup.alice;

    let authorized = setup.paid("to-cancel", 800, true).await?;
    let canceled = alice
        .cancel("cancel", &authorized.id)
        .await?
        .into_inner()
        .payment;
    assert_eq!(status(canceled.as_ref()), Some(pb::PaymentStatus::Canceled));
    assert_eq!(setup.sandbox.approved_count(OperationKind::Void), 1);
    assert_eq!(
        refused(alice.cancel("cancel-again", &authorized.id).await),
        precondition("PAYMENT_NOT_CANCELABLE")
    );
    assert_eq!(
        refused(
            alice
                .capture("capture-canceled", &authorized.id, None)
                .await
        ),
        precondition("PAYMENT_NOT_CAPTURABLE")
    );

    // Cancel of a SUCCEEDED payment, capture of a FAILED one, refund of an uncaptured one.
    let succeeded = setup.paid("succeeded", 300, false).await?;
    assert_eq!(
        refused(alice.cancel("cancel-succeeded", &succeeded.id).await),
        precondition("PAYMENT_NOT_CANCELABLE")
    );
    let failed = alice
        .pay(payment_request(
            "declined",
            &setup.merchant,
            300,
            cards::CARD_DECLINED,
        ))
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    assert_eq!(status(Some(&failed)), Some(pb::PaymentStatus::Failed));
    assert_eq!(
        refused(alice.capture("capture-failed", &failed.id, None).await),
        precondition("PAYMENT_NOT_CAPTURABLE")
    );
    let uncaptured = setup.paid("uncaptured", 300, true).await?;
    assert_eq!(
        refused(
            alice
                .refund("refund-uncaptured", &uncaptured.id, None)
                .await
        ),
        precondition("PAYMENT_NOT_REFUNDABLE")
    );
    // A stored refusal replays like any answer.
    let replay = alice
        .refund("refund-uncaptured", &uncaptured.id, None)
        .await;
    assert_eq!(refused(replay), precondition("PAYMENT_NOT_REFUNDABLE"));

    // Another tenant's payment does not exist for bob, whatever he tries.
    let bob = alice.as_principal("bob");
    for result in [
        bob.capture("bob", &uncaptured.id, None).await.map(|_| ()),
        bob.cancel("bob", &uncaptured.id).await.map(|_| ()),
        bob.refund("bob", &succeeded.id, None).await.map(|_| ()),
    ] {
        assert_eq!(refused(result).0, Code::NotFound);
    }
    assert_eq!(setup.balance().await?, 300);
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}

#[tokio::test]
async fn refunds_debit_the_merchant_first_and_never_exceed_the_capture() -> anyhow::Result<()> {
    let setup = setup().await?;
    let alice = &setup.alice;
    let payment = setup.paid("refundable", 1_000, false).await?;
    assert_eq!(setup.balance().await?, 1_000);

    let first = alice
        .refund("refund-1", &payment.id, brl(300))
        .await?
        .into_inner();
    let refund = first.refund.unwrap_or_default();
    assert_eq!(refund.status, pb::RefundStatus::Succeeded as i32);
    assert_eq!(minor(refund.amount.as_ref()), 300);
    assert_eq!(
        minor(
            first
                .payment
                .as_ref()
                .and_then(|p| p.amount_refunded.as_ref())
        ),
        300
    );
    assert_eq!(setup.balance().await?, 700);
    assert_eq!(
        refused(alice.refund("refund-too-much", &payment.id, brl(701)).await),
        precondition("AMOUNT_EXCEEDS_REFUNDABLE")
    );
    // Without an amount: what remains.
    let rest = alice
        .refund("refund-rest", &payment.id, None)
        .await?
        .into_inner();
    assert_eq!(minor(rest.refund.and_then(|r| r.amount).as_ref()), 700);
    assert_eq!(
        minor(
            rest.payment
                .as_ref()
                .and_then(|p| p.amount_refunded.as_ref())
        ),
        1_000
    );
    assert_eq!(
        refused(alice.refund("refund-nothing", &payment.id, None).await),
        precondition("AMOUNT_EXCEEDS_REFUNDABLE")
    );
    assert_eq!(setup.balance().await?, 0);
    assert_eq!(setup.sandbox.approved_count(OperationKind::Refund), 2);

    // A merchant that has moved its money away cannot refund: nothing is held or sent.
    let second = setup.paid("second", 1_000, false).await?;
    let customer = alice
        .open_account(pb::AccountKind::Customer, "BRL", false)
        .await?
        .id;
    alice
        .transfer("away", &setup.merchant, &customer, 900, "BRL")
        .await?;
    assert_eq!(
        refused(alice.refund("broke", &second.id, brl(500)).await),
        precondition("INSUFFICIENT_FUNDS")
    );
    assert_eq!(setup.sandbox.approved_count(OperationKind::Refund), 2);
    let after = alice.payment(&second.id).await?;
    assert_eq!(minor(after.amount_refunded.as_ref()), 0);
    let mut owner = PgConnection::connect(&setup.database.owner_url()).await?;
    let refunds: i64 = sqlx::query_scalar("SELECT count(*) FROM refunds WHERE payment_id = $1")
        .bind(&second.id)
        .fetch_one(&mut owner)
        .await?;
    assert_eq!(refunds, 0);
    assert_eq!(setup.balance().await?, 100);
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}

#[tokio::test]
async fn an_unreachable_acquirer_changes_nothing_and_a_silent_one_leaves_the_outcome_open()
-> anyhow::Result<()> {
    let setup = setup().await?;
    let alice = &setup.alice;
    let authorized = setup.paid("authorized", 1_000, true).await?;
    let captured = setup.paid("captured", 1_000, false).await?;

    // Unavailable: nothing happened. Capture and cancel are undone and their keys
    // forgotten, so the same key works once the acquirer is back.
    setup.faults(FailureMode::Unavailable);
    assert_eq!(
        refused(alice.capture("capture", &authorized.id, None).await).0,
        Code::Unavailable
    );
    assert_eq!(
        status(Some(&alice.payment(&authorized.id).await?)),
        Some(pb::PaymentStatus::RequiresCapture)
    );
    // A refund is its own object: it FAILS, and the merchant gets the hold back.
    let failed = alice
        .refund("refund-unavailable", &captured.id, brl(400))
        .await?
        .into_inner()
        .refund
        .unwrap_or_default();
    assert_eq!(failed.status, pb::RefundStatus::Failed as i32);
    assert_eq!(failed.failure_code, "acquirer_unavailable");
    assert_eq!(setup.balance().await?, 1_000);

    setup.faults(FailureMode::None);
    let payment = alice
        .capture("capture", &authorized.id, None)
        .await?
        .into_inner()
        .payment;
    assert_eq!(status(payment.as_ref()), Some(pb::PaymentStatus::Succeeded));
    assert_eq!(setup.balance().await?, 2_000);

    // No answer in time (the acquirer did it, then went silent): the refund stays
    // PENDING with the merchant's money held; the stored answer says so.
    setup.faults(FailureMode::Timeout);
    let pending = alice
        .refund("refund-silent", &captured.id, brl(250))
        .await?
        .into_inner();
    assert_eq!(
        pending.refund.as_ref().map(|r| r.status),
        Some(pb::RefundStatus::Pending as i32)
    );
    assert_eq!(
        minor(
            pending
                .payment
                .as_ref()
                .and_then(|p| p.amount_refunded.as_ref())
        ),
        0
    );
    assert_eq!(setup.balance().await?, 1_750);
    // The pending refund counts against what remains refundable.
    assert_eq!(
        refused(alice.refund("refund-more", &captured.id, brl(751)).await),
        precondition("AMOUNT_EXCEEDS_REFUNDABLE")
    );
    setup.faults(FailureMode::None);
    let manual = setup.paid("silent-capture", 500, true).await?;
    setup.faults(FailureMode::Timeout);
    let processing = alice
        .capture("capture-silent", &manual.id, None)
        .await?
        .into_inner()
        .payment;
    assert_eq!(
        status(processing.as_ref()),
        Some(pb::PaymentStatus::Processing)
    );
    assert_eq!(setup.sandbox.approved_count(OperationKind::Capture), 3);
    assert_eq!(setup.database.books_sum().await?, 0);
    setup.service.stop().await
}

#[tokio::test]
async fn invalid_follow_up_fields_are_reported_by_path() -> anyhow::Result<()> {
    let setup = setup().await?;
    let mut client = setup.alice.client();
    let fields = |result: Result<(), tonic::Status>| {
        result
            .err()
            .map(|status| (status.code(), violated_fields(&status)))
    };
    let capture = |key: &str, payment_id: &str, amount: Option<pb::Money>| {
        setup.alice.request(pb::CapturePaymentRequest {
            idempotency_key: key.to_owned(),
            payment_id: payment_id.to_owned(),
            amount,
        })
    };
    let cases = [
        (capture("", "pay_1", None), "idempotency_key"),
        (capture("k", "", None), "payment_id"),
        (capture("k", "pay/1", None), "payment_id"),
        (capture("k", "pay_1", brl(0)), "amount.amount_minor"),
        (capture("k", "pay_1", brl(-5)), "amount.amount_minor"),
        (
            capture(
                "k",
                "pay_1",
                Some(pb::Money {
                    amount_minor: 5,
                    currency: "XYZ".to_owned(),
                }),
            ),
            "amount.currency",
        ),
    ];
    for (request, field) in cases {
        let result = client.capture_payment(request).await.map(|_| ());
        assert_eq!(
            fields(result),
            Some((Code::InvalidArgument, vec![field.to_owned()])),
            "{field}"
        );
    }
    let cancel = client
        .cancel_payment(setup.alice.request(pb::CancelPaymentRequest {
            idempotency_key: "k".to_owned(),
            payment_id: String::new(),
        }))
        .await
        .map(|_| ());
    assert_eq!(
        fields(cancel),
        Some((Code::InvalidArgument, vec!["payment_id".to_owned()]))
    );
    let refund = client
        .refund_payment(setup.alice.request(pb::RefundPaymentRequest {
            idempotency_key: "k".to_owned(),
            payment_id: "pay_1".to_owned(),
            amount: None,
            reason: "x".repeat(501),
        }))
        .await
        .map(|_| ());
    assert_eq!(
        fields(refund),
        Some((Code::InvalidArgument, vec!["reason".to_owned()]))
    );
    setup.service.stop().await
}

#[tokio::test]
async fn every_follow_up_leaves_its_audit_rows() -> anyhow::Result<()> {
    let setup = setup().await?;
    let alice = &setup.alice;
    let captured = setup.paid("captured", 1_000, true).await?;
    alice.capture("capture", &captured.id, None).await?;
    alice.refund("refund", &captured.id, brl(100)).await?;
    let canceled = setup.paid("canceled", 1_000, true).await?;
    alice.cancel("cancel", &canceled.id).await?;

    let mut owner = PgConnection::connect(&setup.database.owner_url()).await?;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT entity_id, action FROM audit_log WHERE entity_type IN ('payment', 'refund') ORDER BY id",
    )
    .fetch_all(&mut owner)
    .await?;
    let actions = |id: &str| -> Vec<&str> {
        rows.iter()
            .filter(|(entity, _)| entity == id)
            .map(|(_, action)| action.as_str())
            .collect()
    };
    assert_eq!(
        actions(&captured.id),
        [
            "payment.create",
            "payment.status",
            "payment.status",
            "payment.capture"
        ]
    );
    assert_eq!(
        actions(&canceled.id),
        [
            "payment.create",
            "payment.status",
            "payment.status",
            "payment.status"
        ]
    );
    let refunds: Vec<&str> = rows
        .iter()
        .filter(|(entity, _)| entity.starts_with("re_"))
        .map(|(_, action)| action.as_str())
        .collect();
    assert_eq!(refunds, ["refund.create", "refund.status"]);
    setup.service.stop().await
}
