//! gateway-svc rate limiting end to end: a gateway in front of a real payment-svc asks a
//! real ratelimit-svc (Envoy RLS v3, the shipped `ratelimit-svc/rules/gateway.yaml` on
//! Redis) about every call — figures on every answer, errors included; a tier exceeded
//! is refused before the upstream sees the call; a frozen ratelimit-svc fails open by
//! default and closed when configured, each proven by the gateway's counters.
//!
//! Keys are of the `trial` tier (3 writes, 100 reads, 200 calls per day, sliding window:
//! nothing leaves the window during a test), with a principal of each test's own so
//! tests sharing the Redis never share counters.

use std::sync::atomic::Ordering::Relaxed;

use gateway_svc::config::FailureMode;
use gateway_svc::ratelimit::{
    HEADER_LIMIT, HEADER_REMAINING, HEADER_RESET, HEADER_RETRY_AFTER, REASON_UNAVAILABLE,
};
use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use tests::gateway::{TestGateway, WRITE_SCOPES, rate_limited, with_key};
use tests::postgres::TestDatabase;
use tests::redis::TestRedis;
use tests::services::{self, RunningService};
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

/// The tier every key here gets, and its figures in the rules file.
const TIER: &str = "trial";
const TRIAL_WRITES: u64 = 3;
const TRIAL_READS: u64 = 100;
const DAY_SECONDS: u64 = 24 * 3600;

/// payment-svc on its own database (kept alive with it).
struct Upstream {
    payment: RunningService,
    _database: TestDatabase,
}

async fn upstream() -> anyhow::Result<Upstream> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    Ok(Upstream {
        payment,
        _database: database,
    })
}

/// A gateway whose decisions may take as long as the machine needs: these tests are
/// about what a decision says, not about its timeout.
async fn patient_gateway(
    upstream: &Upstream,
    ratelimit: &RunningService,
) -> anyhow::Result<TestGateway> {
    rate_limited(
        &upstream.payment.endpoint(),
        &ratelimit.endpoint(),
        |settings| {
            settings.timeout = tests::LIVENESS;
        },
    )
    .await
}

/// Reads through `client` until one is decided by ratelimit-svc (its answer carries the
/// figures): the first decisions may outlast a short timeout while the connection to
/// ratelimit-svc is set up, or while it resumes.
async fn until_decided(
    client: &mut PaymentServiceClient<Channel>,
    key: &str,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        let answer = client.list_accounts(list_accounts(key)?).await;
        if answer.is_ok_and(|answer| figures(answer.metadata()).is_some()) {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < tests::LIVENESS,
            "no call decided by ratelimit-svc within {:?}",
            tests::LIVENESS
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A `trial` key of a principal no other test uses, and a client through `gateway`.
async fn trial_client(
    gateway: &TestGateway,
) -> anyhow::Result<(String, PaymentServiceClient<Channel>)> {
    let principal = format!("rl-{}", uuid::Uuid::new_v4().simple());
    let key = gateway.add_key(&principal, &WRITE_SCOPES, TIER).await?;
    Ok((key, PaymentServiceClient::new(gateway.channel().await?)))
}

/// `(limit, remaining, reset)` from an answer's metadata, when all three are there.
fn figures(metadata: &MetadataMap) -> Option<(u64, u64, u64)> {
    let read = |name: &str| metadata.get(name)?.to_str().ok()?.parse::<u64>().ok();
    Some((
        read(HEADER_LIMIT)?,
        read(HEADER_REMAINING)?,
        read(HEADER_RESET)?,
    ))
}

fn create_account(
    key: &str,
    idempotency_key: &str,
) -> anyhow::Result<tonic::Request<pb::CreateAccountRequest>> {
    with_key(
        pb::CreateAccountRequest {
            idempotency_key: idempotency_key.to_owned(),
            currency: "BRL".to_owned(),
            kind: pb::AccountKind::Merchant as i32,
            ..Default::default()
        },
        key,
    )
}

fn list_accounts(key: &str) -> anyhow::Result<tonic::Request<pb::ListAccountsRequest>> {
    with_key(pb::ListAccountsRequest::default(), key)
}

#[tokio::test]
async fn answers_and_errors_carry_the_figures_of_the_most_restrictive_limit() -> anyhow::Result<()>
{
    let redis = TestRedis::new()?;
    let ratelimit = tests::gateway::ratelimit_with_gateway_rules(redis.url()).await?;
    let upstream = upstream().await?;
    let gateway = patient_gateway(&upstream, &ratelimit).await?;
    let (key, mut client) = trial_client(&gateway).await?;

    // A write: the write group (3 a day) is tighter than the principal's 200.
    let created = client.create_account(create_account(&key, "a-1")?).await?;
    let (limit, remaining, reset) = figures(created.metadata()).unwrap_or_default();
    assert_eq!((limit, remaining), (TRIAL_WRITES, TRIAL_WRITES - 1));
    assert!(reset > 0 && reset <= DAY_SECONDS, "reset {reset}");

    // Reads count in their own group, and remaining goes down call by call.
    let first = client.list_accounts(list_accounts(&key)?).await?;
    let second = client.list_accounts(list_accounts(&key)?).await?;
    let read_figures = |metadata: &MetadataMap| figures(metadata).map(|(l, r, _)| (l, r));
    assert_eq!(
        read_figures(first.metadata()),
        Some((TRIAL_READS, TRIAL_READS - 1))
    );
    assert_eq!(
        read_figures(second.metadata()),
        Some((TRIAL_READS, TRIAL_READS - 2))
    );
    assert_eq!(second.into_inner().accounts.len(), 1);

    // An upstream error (payment-svc's trailers-only INVALID_ARGUMENT) carries them too.
    let refused = client
        .get_account(with_key(
            pb::GetAccountRequest {
                account_id: "not an account id".to_owned(),
            },
            &key,
        )?)
        .await
        .err()
        .unwrap_or_else(|| tonic::Status::ok("unexpectedly found"));
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(
        read_figures(refused.metadata()),
        Some((TRIAL_READS, TRIAL_READS - 3))
    );

    let stats = &gateway.stats().ratelimit;
    assert_eq!(stats.allowed.load(Relaxed), 4);
    assert_eq!(stats.refused.load(Relaxed), 0);
    assert_eq!(stats.fail_open.load(Relaxed), 0);
    assert_eq!(stats.errors.load(Relaxed), 0);
    gateway.stop().await?;
    upstream.payment.stop().await?;
    ratelimit.stop().await
}

#[tokio::test]
async fn a_tier_exceeded_is_refused_with_retry_info_and_quota_failure_before_the_upstream()
-> anyhow::Result<()> {
    let redis = TestRedis::new()?;
    let ratelimit = tests::gateway::ratelimit_with_gateway_rules(redis.url()).await?;
    let upstream = upstream().await?;
    let gateway = patient_gateway(&upstream, &ratelimit).await?;
    let (key, mut client) = trial_client(&gateway).await?;

    let mut remaining = Vec::new();
    for index in 0..TRIAL_WRITES {
        let created = client
            .create_account(create_account(&key, &format!("a-{index}"))?)
            .await?;
        remaining.push(figures(created.metadata()).map(|(_, r, _)| r));
    }
    assert_eq!(remaining, [Some(2), Some(1), Some(0)]);

    // The fourth write: refused by the gateway. Every unary call that goes on past the
    // rate limit gets a deadline (the caller set none), so the deadline counter not
    // moving shows the call stopped here.
    let deadlines_before = gateway.stats().deadlines.defaulted.load(Relaxed);
    let refused = client
        .create_account(create_account(&key, "a-over")?)
        .await
        .err()
        .unwrap_or_else(|| tonic::Status::ok("unexpectedly admitted"));
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let details = refused.get_error_details();
    let violations = details
        .quota_failure()
        .map(|failure| failure.violations.clone())
        .unwrap_or_default();
    assert_eq!(violations.len(), 1, "{refused:?}");
    assert!(
        violations[0].subject.ends_with("/group:payments:write"),
        "{violations:?}"
    );
    let retry_delay = details
        .retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_default();
    let retry_after: u64 = refused
        .metadata()
        .get(HEADER_RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or_default();
    assert!(
        (1..=DAY_SECONDS).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(retry_delay.as_secs(), retry_after);
    let (limit, left, reset) = figures(refused.metadata()).unwrap_or_default();
    assert_eq!((limit, left), (TRIAL_WRITES, 0));
    assert!(reset >= 1 && reset <= retry_after, "reset {reset}");
    let stats = &gateway.stats().ratelimit;
    assert_eq!(stats.refused.load(Relaxed), 1);
    assert_eq!(
        gateway.stats().deadlines.defaulted.load(Relaxed),
        deadlines_before
    );

    // payment-svc never ran it: reads (their own group) still pass and list three
    // accounts, not four.
    let listed = client
        .list_accounts(list_accounts(&key)?)
        .await?
        .into_inner();
    assert_eq!(listed.accounts.len(), 3);
    assert_eq!(stats.allowed.load(Relaxed), TRIAL_WRITES + 1);
    gateway.stop().await?;
    upstream.payment.stop().await?;
    ratelimit.stop().await
}

#[tokio::test]
async fn spawned_frozen_ratelimit_svc_fails_open_by_default_and_closed_when_configured()
-> anyhow::Result<()> {
    let redis = TestRedis::new()?;
    let ratelimit = tests::process::SpawnedService::start(
        "ratelimit-svc",
        &tests::gateway::ratelimit_rules_env(redis.url()),
    )
    .await?;
    let upstream = upstream().await?;
    let payment = upstream.payment.endpoint();
    // The default: fail-open, RATELIMIT_TIMEOUT 50 ms.
    let open = rate_limited(&payment, &ratelimit.endpoint(), |_| {}).await?;
    let closed = rate_limited(&payment, &ratelimit.endpoint(), |settings| {
        settings.failure_mode = FailureMode::Closed;
    })
    .await?;
    let (open_key, mut open_client) = trial_client(&open).await?;
    let (closed_key, mut closed_client) = trial_client(&closed).await?;

    // Both decide normally while ratelimit-svc answers (and hold a connection to it).
    until_decided(&mut open_client, &open_key).await?;
    until_decided(&mut closed_client, &closed_key).await?;
    let open_stats = &open.stats().ratelimit;
    let closed_stats = &closed.stats().ratelimit;
    let read = |counter: &std::sync::atomic::AtomicU64| counter.load(Relaxed);
    let open_before = (
        read(&open_stats.fail_open),
        read(&open_stats.errors) + read(&open_stats.breaker_rejections),
        read(&open_stats.breaker_rejections),
        read(&open_stats.allowed),
    );
    let closed_before = (
        read(&closed_stats.fail_closed),
        read(&closed_stats.fail_open),
    );

    // Frozen: connections stay open and nothing is answered, so every decision ends at
    // the timeout (or at once, once the breaker is open).
    ratelimit.freeze().await?;
    const CALLS: u64 = 8;
    for _ in 0..CALLS {
        let started = tokio::time::Instant::now();
        let admitted = tokio::time::timeout(
            tests::LIVENESS,
            open_client.list_accounts(list_accounts(&open_key)?),
        )
        .await??;
        assert!(started.elapsed() < tests::LIVENESS);
        // Admitted undecided: no figures to give.
        assert_eq!(figures(admitted.metadata()), None);
    }
    assert_eq!(read(&open_stats.fail_open) - open_before.0, CALLS);
    assert_eq!(
        read(&open_stats.errors) + read(&open_stats.breaker_rejections) - open_before.1,
        CALLS
    );
    // Five timeouts in a row open the breaker: later calls do not wait for ratelimit-svc.
    assert!(read(&open_stats.breaker_rejections) > open_before.2);
    assert_eq!(read(&open_stats.allowed), open_before.3);

    let started = tokio::time::Instant::now();
    let refused = tokio::time::timeout(
        tests::LIVENESS,
        closed_client.list_accounts(list_accounts(&closed_key)?),
    )
    .await?
    .err()
    .unwrap_or_else(|| tonic::Status::ok("unexpectedly admitted"));
    assert!(started.elapsed() < tests::LIVENESS);
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused
            .get_error_details()
            .error_info()
            .map(|info| info.reason.clone())
            .as_deref(),
        Some(REASON_UNAVAILABLE)
    );
    assert_eq!(
        (
            read(&closed_stats.fail_closed),
            read(&closed_stats.fail_open)
        ),
        (closed_before.0 + 1, closed_before.1)
    );

    // Resumed: the breaker's probe finds it answering, and calls are decided again.
    ratelimit.resume()?;
    until_decided(&mut open_client, &open_key).await?;
    assert!(read(&open_stats.allowed) > open_before.3);
    open.stop().await?;
    closed.stop().await?;
    upstream.payment.stop().await
}
