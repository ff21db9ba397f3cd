//! gateway-svc's retries end to end, with real payment-svc replicas: calls in flight on a
//! replica that is SIGKILLed (held there deterministically: the other replica's breaker is
//! forced open and the victim is frozen) are retried on the other replica — each payment
//! then exists exactly once — while a budget of zero refuses every retry and the callers
//! get the failure; the counters prove which path ran (DESIGN §10).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use nix::sys::signal::Signal;
use proto::gateway::v1::BreakerOverride;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use tests::gateway::{
    ADMIN_SCOPES, GatewayOptions, TestGateway, WRITE_SCOPES, eventually, open_merchant,
    spawn_payment_svc, with_key,
};
use tests::payments::{cards, payment_request};
use tests::postgres::TestDatabase;
use tonic::Code;

const PAYMENTS: &str = gateway_svc::routes::PAYMENTS;
/// Calls held in flight on the victim when it is killed.
const IN_FLIGHT: usize = 4;

/// What became of the calls held on a replica that was then killed.
struct Outcome {
    /// Each call's answer: the payment id, or the status code.
    answers: Vec<Result<String, Code>>,
    /// Payments stored for the merchant, read from the database.
    stored: i64,
    retries: u64,
    retries_over_budget: u64,
}

/// Two replicas; every call goes to the victim (the survivor's breaker forced open) and
/// hangs there (frozen); the survivor is released, the victim SIGKILLed.
async fn kill_with_calls_in_flight(
    budget: gateway_svc::retry::RetryBudgetConfig,
) -> anyhow::Result<Outcome> {
    let database = TestDatabase::create().await?;
    let survivor = spawn_payment_svc(&database, None).await?;
    let mut victim = spawn_payment_svc(&database, None).await?;
    let gateway = TestGateway::start_with(
        GatewayOptions {
            payment: format!("{},{}", survivor.endpoint(), victim.endpoint()),
            ..Default::default()
        },
        |config| config.upstream_retry_budget = budget,
    )
    .await?;
    let key = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;
    let admin = gateway.add_key("ops", &ADMIN_SCOPES, "internal").await?;
    let client = PaymentServiceClient::new(gateway.channel().await?);
    let merchant = open_merchant(gateway.channel().await?, &key).await?;

    gateway
        .set_breaker(
            &admin,
            PAYMENTS,
            survivor.addr(),
            BreakerOverride::ForcedOpen,
        )
        .await?;
    victim.freeze().await?;
    let victim_endpoint = gateway.upstream_endpoint(PAYMENTS, victim.addr())?;
    let mut calls = Vec::new();
    for n in 0..IN_FLIGHT {
        let mut client = client.clone();
        let mut request = with_key(
            payment_request(
                &uuid::Uuid::new_v4().to_string(),
                &merchant,
                1_000 + n as i64,
                cards::CARD_APPROVED,
            ),
            &key,
        )?;
        request.set_timeout(Duration::from_secs(50));
        calls.push(tokio::spawn(async move {
            client
                .create_payment(request)
                .await
                .map(|response| response.into_inner().payment.unwrap_or_default().id)
                .map_err(|status| status.code())
        }));
    }
    eventually("every call is in flight on the frozen victim", || async {
        Ok(victim_endpoint.in_flight() == IN_FLIGHT)
    })
    .await?;
    gateway
        .set_breaker(
            &admin,
            PAYMENTS,
            survivor.addr(),
            BreakerOverride::Automatic,
        )
        .await?;
    victim.signal(Signal::SIGKILL)?;
    victim.wait(tests::LIVENESS).await?;
    let mut answers = Vec::new();
    for call in calls {
        answers.push(tokio::time::timeout(tests::LIVENESS, call).await??);
    }
    let mut owner =
        <sqlx::PgConnection as sqlx::Connection>::connect(&database.owner_url()).await?;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments WHERE merchant_account_id = $1")
            .bind(&merchant)
            .fetch_one(&mut owner)
            .await?;
    let upstream = gateway.upstream(PAYMENTS)?;
    let outcome = Outcome {
        answers,
        stored,
        retries: upstream.counters().retries.load(Relaxed),
        retries_over_budget: upstream.counters().retries_over_budget.load(Relaxed),
    };
    gateway.stop().await?;
    Ok(outcome)
}

#[tokio::test]
async fn spawned_calls_in_flight_on_a_killed_replica_are_retried_once_each_on_the_other()
-> anyhow::Result<()> {
    let outcome = kill_with_calls_in_flight(Default::default()).await?;
    assert!(
        outcome.answers.iter().all(Result::is_ok),
        "every call was retried and answered: {:?}",
        outcome.answers
    );
    assert_eq!(outcome.retries, IN_FLIGHT as u64, "one retry per call");
    assert_eq!(outcome.retries_over_budget, 0);
    // The victim never processed them (it was frozen): each payment exists once.
    assert_eq!(outcome.stored, IN_FLIGHT as i64);
    Ok(())
}

#[tokio::test]
async fn spawned_an_empty_retry_budget_refuses_every_retry_and_the_failure_returns()
-> anyhow::Result<()> {
    let outcome = kill_with_calls_in_flight(gateway_svc::retry::RetryBudgetConfig {
        percent: 0,
        min_per_second: 0,
    })
    .await?;
    assert!(
        outcome
            .answers
            .iter()
            .all(|answer| *answer == Err(Code::Unavailable)),
        "{:?}",
        outcome.answers
    );
    assert_eq!(outcome.retries, 0);
    assert_eq!(outcome.retries_over_budget, IN_FLIGHT as u64);
    assert_eq!(outcome.stored, 0, "nothing was performed");
    Ok(())
}
