//! gateway-svc's circuit breakers end to end, with real payment-svc processes killed and
//! restarted: the breaker trips, refuses with CIRCUIT_OPEN without contacting the
//! upstream, lets exactly one probe through per backoff and closes when the upstream is
//! back; operators force it open and closed; p2c spreads calls over replicas and a killed
//! replica fails only the calls it had in flight; health follows the breakers. Counters
//! prove which path ran; every wait is a liveness bound (DESIGN §10).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use proto::gateway::v1::gateway_admin_service_client::GatewayAdminServiceClient;
use proto::gateway::v1::{BreakerOverride, BreakerState, ListUpstreamsRequest};
use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use service_kit::breaker::BreakerState as State;
use tests::gateway::{
    ADMIN_SCOPES, GatewayOptions, NOWHERE, TestGateway, WRITE_SCOPES, eventually, is_circuit_open,
    open_merchant, quick_breakers, spawn_payment_svc, with_key,
};
use tests::postgres::TestDatabase;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

const PAYMENTS: &str = gateway_svc::routes::PAYMENTS;
const PAYMENT_SERVICE: &str = "paysuite.payments.v1.PaymentService";
const RATELIMIT_SERVICE: &str = "paysuite.ratelimit.v1.RateLimitService";

/// A principal with a merchant account, reading its balance through the gateway.
#[derive(Clone)]
struct Caller {
    client: PaymentServiceClient<Channel>,
    key: String,
    account_id: String,
}

impl Caller {
    async fn open(gateway: &TestGateway, key: &str) -> anyhow::Result<Self> {
        let client = PaymentServiceClient::new(gateway.channel().await?);
        let account_id = open_merchant(gateway.channel().await?, key).await?;
        Ok(Self {
            client,
            key: key.to_owned(),
            account_id,
        })
    }

    async fn balance(&self) -> Result<(), Status> {
        let request = with_key(
            pb::GetBalanceRequest {
                account_id: self.account_id.clone(),
            },
            &self.key,
        )
        .map_err(|err| Status::internal(err.to_string()))?;
        self.client.clone().get_balance(request).await.map(drop)
    }
}

#[tokio::test]
async fn spawned_killed_upstream_trips_answers_circuit_open_probes_once_per_backoff_and_closes_when_back()
-> anyhow::Result<()> {
    const THRESHOLD: u32 = 3;
    const BACKOFF: Duration = Duration::from_millis(300);
    const PROBES: u64 = 3;
    let database = TestDatabase::create().await?;
    let mut payment = spawn_payment_svc(&database, None).await?;
    let address = payment.addr();
    let gateway = TestGateway::start_with(
        GatewayOptions {
            payment: payment.endpoint(),
            ..Default::default()
        },
        |config| quick_breakers(config, THRESHOLD, BACKOFF),
    )
    .await?;
    let key = gateway.add_key("ops", &ADMIN_SCOPES, "standard").await?;
    let caller = Caller::open(&gateway, &key).await?;
    caller.balance().await?;
    let upstream = gateway.upstream(PAYMENTS)?;
    let endpoint = gateway.upstream_endpoint(PAYMENTS, address)?;
    let counters = endpoint.counters();

    // Killed: THRESHOLD failures in a row, each of which reached the endpoint, trip it.
    payment.signal(Signal::SIGKILL)?;
    payment.wait(tests::LIVENESS).await?;
    let before = counters.calls.load(Relaxed);
    for _ in 0..THRESHOLD {
        let failed = caller.balance().await.err().map(|s| s.code());
        assert_eq!(failed, Some(Code::Unavailable));
    }
    assert_eq!(counters.calls.load(Relaxed) - before, u64::from(THRESHOLD));
    assert_eq!(endpoint.breaker().transition_counts().opened, 1);

    // Open, under concurrent load: everything but the probes is refused with CIRCUIT_OPEN
    // without reaching the endpoint, and each backoff lets exactly one probe through.
    let calls_at_trip = counters.calls.load(Relaxed);
    let refusals_at_trip = upstream.counters().circuit_open.load(Relaxed);
    let circuit_open = Arc::new(AtomicU64::new(0));
    let other: Arc<Mutex<Vec<Status>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (caller, circuit_open, other, stop) = (
            caller.clone(),
            Arc::clone(&circuit_open),
            Arc::clone(&other),
            Arc::clone(&stop),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                match caller.balance().await {
                    Err(status) if is_circuit_open(&status) => {
                        circuit_open.fetch_add(1, Relaxed);
                    }
                    Err(status) => other.lock().map(|mut o| o.push(status)).unwrap_or(()),
                    Ok(()) => {}
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let probes = || counters.probes.load(Relaxed);
    let waited = eventually("probes after successive backoffs", || async {
        Ok(probes() >= PROBES)
    })
    .await;
    stop.store(true, Relaxed);
    for worker in workers {
        worker.await?;
    }
    waited?;
    let probes = probes();
    let transitions = endpoint.breaker().transition_counts();
    assert_eq!(
        counters.calls.load(Relaxed) - calls_at_trip,
        probes,
        "after the trip only probes reached the endpoint"
    );
    assert_eq!(transitions.half_opened, probes, "one probe per half-open");
    assert_eq!(
        transitions.opened,
        1 + probes,
        "each failed probe reopened it"
    );
    let other = other.lock().map(|o| o.clone()).unwrap_or_default();
    assert_eq!(
        other.len() as u64,
        probes,
        "only the probes' callers saw the failure"
    );
    assert!(
        other.iter().all(|s| s.code() == Code::Unavailable),
        "{other:?}"
    );
    let refused = circuit_open.load(Relaxed);
    assert!(refused > 0);
    assert_eq!(
        upstream.counters().circuit_open.load(Relaxed) - refusals_at_trip,
        refused,
        "every refusal was counted"
    );

    // Restarted on the same address: the next probe succeeds and closes the breaker.
    let _restarted = spawn_payment_svc(&database, Some(address)).await?;
    eventually("a call succeeds once payment-svc is back", || async {
        Ok(caller.balance().await.is_ok())
    })
    .await?;
    assert_eq!(endpoint.breaker().state(), State::Closed);
    assert_eq!(endpoint.breaker().transition_counts().closed, 1);

    // Operators see it and force it open (nothing reaches the endpoint) and closed.
    let mut admin = GatewayAdminServiceClient::new(gateway.channel().await?);
    let listed = admin
        .list_upstreams(with_key(ListUpstreamsRequest {}, &key)?)
        .await?
        .into_inner();
    let payments = listed
        .upstreams
        .iter()
        .find(|u| u.name == PAYMENTS)
        .context("payments not listed")?;
    assert!(payments.services.iter().any(|s| s == PAYMENT_SERVICE));
    assert_eq!(payments.endpoints.len(), 1);
    assert_eq!(payments.endpoints[0].address, address.to_string());
    assert_eq!(payments.endpoints[0].state(), BreakerState::Closed);

    let forced = gateway
        .set_breaker(&key, PAYMENTS, address, BreakerOverride::ForcedOpen)
        .await?;
    assert_eq!(forced.state(), BreakerState::Open);
    assert_eq!(forced.r#override(), BreakerOverride::ForcedOpen);
    let calls = counters.calls.load(Relaxed);
    let refused = caller.balance().await.err();
    assert!(refused.as_ref().is_some_and(is_circuit_open), "{refused:?}");
    assert_eq!(
        counters.calls.load(Relaxed),
        calls,
        "the upstream was not contacted"
    );

    let forced = gateway
        .set_breaker(&key, PAYMENTS, address, BreakerOverride::ForcedClosed)
        .await?;
    assert_eq!(forced.state(), BreakerState::Closed);
    caller.balance().await?;
    assert_eq!(counters.calls.load(Relaxed), calls + 1);
    let automatic = gateway
        .set_breaker(&key, PAYMENTS, address, BreakerOverride::Automatic)
        .await?;
    assert_eq!(automatic.r#override(), BreakerOverride::Automatic);
    assert_eq!(automatic.state(), BreakerState::Closed);

    // The admin scope is required, and a request must make sense.
    let tenant = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;
    let denied = gateway
        .set_breaker(&tenant, PAYMENTS, address, BreakerOverride::ForcedOpen)
        .await
        .err()
        .and_then(|err| err.downcast::<Status>().ok())
        .map(|s| s.code());
    assert_eq!(denied, Some(Code::PermissionDenied));
    let unknown = gateway
        .set_breaker(
            &key,
            PAYMENTS,
            "127.0.0.1:1".parse()?,
            BreakerOverride::ForcedOpen,
        )
        .await
        .err()
        .and_then(|err| err.downcast::<Status>().ok())
        .map(|s| s.code());
    assert_eq!(unknown, Some(Code::NotFound));
    let unspecified = gateway
        .set_breaker(&key, PAYMENTS, address, BreakerOverride::Unspecified)
        .await
        .err()
        .and_then(|err| err.downcast::<Status>().ok())
        .map(|s| s.code());
    assert_eq!(unspecified, Some(Code::InvalidArgument));
    gateway.stop().await
}

#[tokio::test]
async fn spawned_two_replicas_share_the_load_and_a_killed_one_fails_only_calls_in_flight()
-> anyhow::Result<()> {
    const WORKERS: usize = 8;
    let database = TestDatabase::create().await?;
    let survivor = spawn_payment_svc(&database, None).await?;
    let mut victim = spawn_payment_svc(&database, None).await?;
    let gateway = TestGateway::start_with(
        GatewayOptions {
            payment: format!("{},{}", survivor.endpoint(), victim.endpoint()),
            ..Default::default()
        },
        |config| quick_breakers(config, 3, Duration::from_millis(200)),
    )
    .await?;
    let key = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;
    let caller = Caller::open(&gateway, &key).await?;
    let survivor_endpoint = gateway.upstream_endpoint(PAYMENTS, survivor.addr())?;
    let victim_endpoint = gateway.upstream_endpoint(PAYMENTS, victim.addr())?;

    // Both replicas receive traffic.
    for _ in 0..40 {
        caller.balance().await?;
    }
    let survivor_calls = survivor_endpoint.counters().calls.load(Relaxed);
    let victim_calls = victim_endpoint.counters().calls.load(Relaxed);
    assert!(
        survivor_calls > 0 && victim_calls > 0,
        "{survivor_calls} and {victim_calls}"
    );

    // Under load, one replica is SIGKILLed.
    let succeeded = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Vec<Status>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (caller, succeeded, failed, stop) = (
            caller.clone(),
            Arc::clone(&succeeded),
            Arc::clone(&failed),
            Arc::clone(&stop),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                match caller.balance().await {
                    Ok(()) => {
                        succeeded.fetch_add(1, Relaxed);
                    }
                    Err(status) => failed.lock().map(|mut f| f.push(status)).unwrap_or(()),
                }
            }
        }));
    }
    let flowing = eventually("load flows", || async { Ok(succeeded.load(Relaxed) >= 50) }).await;
    let killed = async {
        flowing?;
        victim.signal(Signal::SIGKILL)?;
        victim.wait(tests::LIVENESS).await?;
        let at_kill = succeeded.load(Relaxed);
        let survivor_at_kill = survivor_endpoint.counters().calls.load(Relaxed);
        // The two counters move at different moments of a call (dispatch,
        // answer), so each gets its own bound rather than one being read
        // against the other.
        eventually(
            "the victim's breaker trips and the survivor takes the load",
            || async {
                Ok(victim_endpoint.breaker().state() != State::Closed
                    && succeeded.load(Relaxed) >= at_kill + 200
                    && survivor_endpoint.counters().calls.load(Relaxed) >= survivor_at_kill + 200)
            },
        )
        .await
    }
    .await;
    stop.store(true, Relaxed);
    for worker in workers {
        worker.await?;
    }
    killed?;
    let failed = failed.lock().map(|f| f.clone()).unwrap_or_default();
    assert!(
        failed.len() <= WORKERS,
        "at most the {WORKERS} calls in flight at the kill may fail: {failed:?}"
    );
    assert!(
        failed.iter().all(|s| s.code() == Code::Unavailable),
        "{failed:?}"
    );
    // Calls cut off by the kill were retried on the survivor, within the budget: 20% of
    // the calls plus the reserve of 10 per second over its 10 s window.
    let counters = gateway.upstream(PAYMENTS)?;
    let (requests, retries) = (
        counters.counters().requests.load(Relaxed),
        counters.counters().retries.load(Relaxed),
    );
    let budget = gateway_svc::retry::RetryBudgetConfig::default();
    let allowed =
        requests * u64::from(budget.percent) / 100 + u64::from(budget.min_per_second) * 10;
    assert!(
        retries <= allowed,
        "{retries} retries of {requests} calls exceed the budget of {allowed}"
    );
    assert!(
        retries <= WORKERS as u64 * 2,
        "only calls in flight at the kill are retried: {retries}"
    );
    gateway.stop().await
}

#[tokio::test]
async fn health_reports_payments_not_serving_while_all_its_endpoints_are_tripped()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = tests::services::payment(&database).await?;
    let address = payment.addr();
    let gateway = TestGateway::start_with(
        GatewayOptions {
            payment: format!("{},{NOWHERE}", payment.endpoint()),
            ..Default::default()
        },
        // Long backoffs: tripped endpoints stay tripped for the test.
        |config| quick_breakers(config, 2, Duration::from_secs(600)),
    )
    .await?;
    let key = gateway.add_key("ops", &ADMIN_SCOPES, "standard").await?;
    let caller = Caller::open(&gateway, &key).await?;
    let nowhere = gateway.upstream_endpoint(PAYMENTS, "127.0.0.1:9".parse()?)?;
    let live = gateway.upstream_endpoint(PAYMENTS, address)?;
    assert_eq!(
        gateway.health(PAYMENT_SERVICE).await?,
        ServingStatus::Serving
    );

    // The unreachable endpoint trips; calls it was chosen for go to the live one, unsent.
    eventually("the unreachable endpoint trips", || async {
        caller.balance().await?;
        Ok(nowhere.breaker().state() == State::Open)
    })
    .await?;
    assert!(nowhere.counters().unsent.load(Relaxed) >= 2);
    assert_eq!(
        gateway.health(PAYMENT_SERVICE).await?,
        ServingStatus::Serving
    );

    // The live one stops too: all tripped → NOT_SERVING, for payments only.
    payment.stop().await?;
    eventually("the other endpoint trips", || async {
        let _ = caller.balance().await;
        Ok(live.breaker().state() == State::Open)
    })
    .await?;
    eventually("payments reported NOT_SERVING", || async {
        Ok(gateway.health(PAYMENT_SERVICE).await? == ServingStatus::NotServing)
    })
    .await?;
    assert_eq!(
        gateway.health(RATELIMIT_SERVICE).await?,
        ServingStatus::Serving
    );
    let refused = caller.balance().await.err();
    assert!(refused.as_ref().is_some_and(is_circuit_open), "{refused:?}");

    // An operator forcing one closed makes payments SERVING again.
    gateway
        .set_breaker(&key, PAYMENTS, address, BreakerOverride::ForcedClosed)
        .await?;
    eventually("payments reported SERVING", || async {
        Ok(gateway.health(PAYMENT_SERVICE).await? == ServingStatus::Serving)
    })
    .await?;
    gateway.stop().await
}
