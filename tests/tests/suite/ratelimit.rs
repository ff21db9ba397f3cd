//! ratelimit-svc's own API on the embedded memory store: Check spends, Peek does not,
//! every algorithm refuses past its limit with a usable retry_after, and bad limits are
//! reported by field path.

use std::time::Duration;

use proto::ratelimit::v1 as pb;
use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use service_kit::identity::IDENTITY_HEADER;
use service_kit::validation::violated_fields;
use tonic::Code;
use tonic::transport::Channel;

pub(crate) fn request<T>(message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let token = tests::identity::token("gateway", &["ratelimit:check"], "ratelimit-svc");
    request
        .metadata_mut()
        .insert(IDENTITY_HEADER, token.parse()?);
    Ok(request)
}

pub(crate) fn limit(limit: u64, window: Duration, algorithm: pb::Algorithm) -> Option<pb::Limit> {
    Some(pb::Limit {
        limit,
        window: Some(prost_types::Duration {
            seconds: i64::try_from(window.as_secs()).unwrap_or(0),
            nanos: i32::try_from(window.subsec_nanos()).unwrap_or(0),
        }),
        algorithm: algorithm as i32,
    })
}

pub(crate) async fn check(
    client: &mut RateLimitServiceClient<Channel>,
    key: &str,
    limit: Option<pb::Limit>,
    cost: u64,
) -> anyhow::Result<pb::Decision> {
    Ok(client
        .check(request(pb::CheckRequest {
            key: key.to_owned(),
            limit,
            cost,
        })?)
        .await?
        .into_inner()
        .decision
        .unwrap_or_default())
}

#[tokio::test]
async fn each_algorithm_admits_up_to_its_limit_and_peek_spends_nothing() -> anyhow::Result<()> {
    let service = tests::services::ratelimit().await?;
    let channel = Channel::from_shared(service.endpoint())?.connect().await?;
    let mut client = RateLimitServiceClient::new(channel);
    for algorithm in [
        pb::Algorithm::SlidingWindow,
        pb::Algorithm::Gcra,
        pb::Algorithm::FixedWindow,
    ] {
        // A window long enough that the test never sees it pass.
        let three_per_hour = limit(3, Duration::from_secs(3600), algorithm);
        let key = format!("tenant-1:{algorithm:?}");
        let peek = client
            .peek(request(pb::PeekRequest {
                key: key.clone(),
                limit: three_per_hour,
            })?)
            .await?
            .into_inner()
            .decision
            .unwrap_or_default();
        assert!(
            peek.allowed && peek.remaining == 3,
            "{algorithm:?} {peek:?}"
        );
        let first = check(&mut client, &key, three_per_hour, 2).await?;
        assert!(
            first.allowed && first.remaining == 1,
            "{algorithm:?} {first:?}"
        );
        assert!(first.decide_time.is_some());
        let second = check(&mut client, &key, three_per_hour, 0).await?;
        assert!(
            second.allowed && second.remaining == 0,
            "a check spends at least one unit"
        );
        let refused = check(&mut client, &key, three_per_hour, 1).await?;
        assert!(!refused.allowed, "{algorithm:?} {refused:?}");
        let retry_after = refused.retry_after.unwrap_or_default();
        assert!(
            retry_after.seconds > 0 && retry_after.seconds <= 3600,
            "{retry_after:?}"
        );
        // Another key, or the same key under another limit, is counted apart.
        assert!(
            check(&mut client, &format!("{key}-other"), three_per_hour, 1)
                .await?
                .allowed
        );
        assert!(
            check(
                &mut client,
                &key,
                limit(4, Duration::from_secs(3600), algorithm),
                1
            )
            .await?
            .allowed
        );
    }
    service.stop().await
}

#[tokio::test]
async fn bad_limits_are_reported_by_field_and_the_scope_is_enforced() -> anyhow::Result<()> {
    let service = tests::services::ratelimit().await?;
    let channel = Channel::from_shared(service.endpoint())?.connect().await?;
    let mut client = RateLimitServiceClient::new(channel);
    let minute = Duration::from_secs(60);
    let cases = [
        ("", limit(5, minute, pb::Algorithm::Gcra), "key"),
        ("k", None, "limit"),
        ("k", limit(0, minute, pb::Algorithm::Gcra), "limit.limit"),
        (
            "k",
            limit(1_001, minute, pb::Algorithm::SlidingWindow),
            "limit.limit",
        ),
        (
            "k",
            limit(5, Duration::ZERO, pb::Algorithm::Gcra),
            "limit.window",
        ),
    ];
    for (key, limit, field) in cases {
        let status = client
            .check(request(pb::CheckRequest {
                key: key.to_owned(),
                limit,
                cost: 1,
            })?)
            .await
            .err();
        assert_eq!(
            status.as_ref().map(|s| (s.code(), violated_fields(s))),
            Some((Code::InvalidArgument, vec![field.to_owned()])),
            "{field}"
        );
    }
    // Large limits are fine for the O(1) algorithms.
    assert!(
        check(
            &mut client,
            "big",
            limit(1_000_000, minute, pb::Algorithm::Gcra),
            1
        )
        .await?
        .allowed
    );
    // The RPC's scope is required.
    let mut denied = tonic::Request::new(pb::CheckRequest::default());
    let token = tests::identity::token("gateway", &["payments:read"], "ratelimit-svc");
    denied
        .metadata_mut()
        .insert(IDENTITY_HEADER, token.parse()?);
    assert_eq!(
        client.check(denied).await.err().map(|s| s.code()),
        Some(Code::PermissionDenied)
    );
    service.stop().await
}

#[tokio::test]
async fn replicas_sharing_redis_enforce_one_limit_on_redis_time() -> anyhow::Result<()> {
    let redis = tests::redis::TestRedis::new()?;
    let mut clients = Vec::new();
    let mut services = Vec::new();
    for _ in 0..2 {
        let url = redis.url().to_owned();
        let service = tests::services::ratelimit_with(move |config| {
            config.redis_url = Some(url);
        })
        .await?;
        let channel = Channel::from_shared(service.endpoint())?.connect().await?;
        clients.push(RateLimitServiceClient::new(channel));
        services.push(service);
    }
    for algorithm in [
        pb::Algorithm::SlidingWindow,
        pb::Algorithm::Gcra,
        pb::Algorithm::FixedWindow,
    ] {
        let five_per_hour = limit(5, Duration::from_secs(3600), algorithm);
        let key = format!("{}shared:{algorithm:?}", redis.prefix());
        let mut allowed = 0;
        let mut cached = 0;
        let mut times = Vec::new();
        for n in 0..10 {
            let decision = check(&mut clients[n % 2], &key, five_per_hour, 1).await?;
            allowed += usize::from(decision.allowed);
            // A replica answers a refusal it already got from Redis from its own cache,
            // stamped with its own clock; only Redis's answers are on Redis's clock.
            if decision.source() == pb::DecisionSource::Cache {
                cached += 1;
                assert!(!decision.allowed, "only refusals are cached");
                continue;
            }
            assert_eq!(decision.source(), pb::DecisionSource::Store);
            let at = decision.decide_time.unwrap_or_default();
            times.push((at.seconds, at.nanos));
        }
        assert_eq!(allowed, 5, "{algorithm:?}: one limit across both replicas");
        // Each replica asks Redis once after the limit is reached, then answers itself.
        assert_eq!(cached, 3, "{algorithm:?}");
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "decisions on Redis's clock: {times:?}"
        );
        // The state lives in Redis under a hash-tagged key with a TTL.
        let mut connection = redis.connection().await?;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("rl:{{{key}}}:*"))
            .query_async(&mut connection)
            .await?;
        assert_eq!(keys.len(), 1, "{keys:?}");
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(&keys[0])
            .query_async(&mut connection)
            .await?;
        assert!(ttl > 0, "keys expire on their own: {ttl}");
    }
    // After Redis forgets the scripts, the next call loads them again (NOSCRIPT fallback).
    let mut connection = redis.connection().await?;
    let () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut connection)
        .await?;
    let key = format!("{}after-flush", redis.prefix());
    let decision = check(
        &mut clients[0],
        &key,
        limit(1, Duration::from_secs(60), pb::Algorithm::SlidingWindow),
        1,
    )
    .await?;
    assert!(decision.allowed);
    for service in services {
        service.stop().await?;
    }
    Ok(())
}
