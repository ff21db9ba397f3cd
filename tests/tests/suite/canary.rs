//! The PAN canary: payment-svc with every log at TRACE runs a workload over every test
//! card (payments, captures, refunds, and requests refused for a bad card field), and
//! nothing it wrote — nor any error it answered — contains a test card's number, in
//! digits, as bytes, or as hex. The scanners are shared with the telemetry canary
//! (`telemetry.rs`), which also scans exported spans and metrics.

use nix::sys::signal::Signal;
use proto::payments::v1 as pb;
use tests::payments::{Tenant, brl, cards, payment_request};
use tests::postgres::TestDatabase;
use tests::process::SpawnedService;

/// Maximal runs of 13–19 digits that pass the Luhn check.
pub(crate) fn luhn_valid_numbers(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for run in text.split(|c: char| !c.is_ascii_digit()) {
        if (13..=19).contains(&run.len()) && luhn(run) {
            found.push(run.to_owned());
        }
    }
    found
}

fn luhn(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The forms in which a number could leak: digits, a Debug'd byte list, hex.
pub(crate) fn leaked_forms(card: &str) -> [String; 3] {
    let bytes: Vec<String> = card.bytes().map(|b| b.to_string()).collect();
    let hex: String = card.bytes().map(|b| format!("{b:02x}")).collect();
    [card.to_owned(), bytes.join(", "), hex]
}

#[test]
fn the_scanner_finds_what_it_looks_for() {
    assert!(luhn(cards::CARD_APPROVED));
    assert!(!luhn("4242424242424241"));
    let line = format!("{{\"card\":\"{}\",\"n\":42}}", cards::CARD_DECLINED);
    assert_eq!(luhn_valid_numbers(&line), [cards::CARD_DECLINED]);
    // Runs shorter than 13 digits or longer than 19 are not card numbers.
    assert!(luhn_valid_numbers("424242424242 42424242424242424242").is_empty());
}

#[tokio::test]
async fn spawned_payment_svc_at_trace_never_logs_a_card_number() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut service = SpawnedService::start(
        "payment-svc",
        &[
            ("DATABASE_URL", database.service_url()),
            ("DATABASE_MIGRATION_URL", database.owner_url()),
            ("RUST_LOG", "trace".to_owned()),
            ("ACQUIRER_TIMEOUT", "300ms".to_owned()),
            ("SANDBOX_SLOW_ANSWER", "600ms".to_owned()),
            ("SHUTDOWN_DRAIN_TIMEOUT", "2s".to_owned()),
        ],
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
    let mut answers = Vec::new();
    for (n, card) in cards::ALL.iter().enumerate() {
        match alice
            .pay(payment_request(
                &format!("auto-{n}"),
                &merchant,
                1_000,
                card,
            ))
            .await
        {
            Ok(response) => answers.push(format!("{:?}", response.into_inner())),
            Err(status) => answers.push(format!("{status:?}")),
        }
        let mut manual = payment_request(&format!("manual-{n}"), &merchant, 2_000, card);
        manual.capture_method = pb::CaptureMethod::Manual as i32;
        if let Ok(response) = alice.pay(manual).await {
            let id = response
                .into_inner()
                .payment
                .map(|p| p.id)
                .unwrap_or_default();
            let captured = alice
                .capture(&format!("capture-{n}"), &id, brl(1_500))
                .await;
            answers.push(format!("{captured:?}"));
            let refunded = alice.refund(&format!("refund-{n}"), &id, brl(500)).await;
            answers.push(format!("{refunded:?}"));
        }
        // Refused requests that carry a valid number: a bad expiry, a bad CVC.
        let mut expired = payment_request(&format!("expired-{n}"), &merchant, 100, card);
        if let Some(card) = expired.card.as_mut() {
            card.exp_month = 13;
            card.cvc = "12x".to_owned();
        }
        answers.push(format!("{:?}", alice.pay(expired).await.err()));
        // A number that fails Luhn by one digit is refused without being echoed.
        let mut wrong = payment_request(&format!("wrong-{n}"), &merchant, 100, card);
        if let Some(card) = wrong.card.as_mut() {
            card.number.pop();
            card.number.push('9');
        }
        answers.push(format!("{:?}", alice.pay(wrong).await.err()));
    }

    service.signal(Signal::SIGTERM)?;
    let status = service.wait(tests::LIVENESS).await?;
    assert!(status.success(), "{status:?}");
    let logs = format!(
        "{}\n{}",
        service.stdout().joined(),
        service.stderr().joined()
    );
    // The workload really ran at TRACE (the scan covers something).
    assert!(
        logs.lines().count() > 1_000 && logs.contains("\"level\":\"TRACE\""),
        "expected a TRACE log, got {} lines",
        logs.lines().count()
    );
    let answers = answers.join("\n");
    for card in cards::ALL {
        for form in leaked_forms(card) {
            assert!(!logs.contains(&form), "the log holds card {}…", &card[..4]);
            assert!(
                !answers.contains(&form),
                "an answer holds card {}…",
                &card[..4]
            );
        }
    }
    let leaked: Vec<String> = luhn_valid_numbers(&logs)
        .into_iter()
        .filter(|number| cards::ALL.contains(&number.as_str()))
        .collect();
    assert!(
        leaked.is_empty(),
        "{} test card number(s) in the log",
        leaked.len()
    );
    Ok(())
}
