//! ratelimit-svc when Redis misbehaves, on private redis-server processes: frozen
//! (SIGSTOP) under load, every call is answered within a liveness bound by the failure
//! mode, and the breaker trips; resumed and restarted with an empty script cache, the
//! service recovers by itself. The over-limit cache answers hot refusals without Redis.

use std::time::Duration;

use proto::ratelimit::v1 as pb;
use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use tests::redis::PrivateRedis;
use tonic::transport::Channel;

use crate::ratelimit::{check, limit};

/// The Redis deadline of these tests.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// The liveness bound of one call while Redis is frozen: 50× the deadline.
const CALL_BOUND: Duration = Duration::from_secs(5);

pub(crate) async fn client(endpoint: String) -> anyhow::Result<RateLimitServiceClient<Channel>> {
    let channel = Channel::from_shared(endpoint)?.connect().await?;
    Ok(RateLimitServiceClient::new(channel))
}

fn source(decision: &pb::Decision) -> pb::DecisionSource {
    pb::DecisionSource::try_from(decision.source).unwrap_or(pb::DecisionSource::Unspecified)
}

/// `cmdstat_evalsha` + `cmdstat_eval` calls: how many decisions reached this Redis.
async fn script_calls(redis: &PrivateRedis) -> anyhow::Result<u64> {
    let info: String = redis
        .query(::redis::cmd("INFO").arg("commandstats"))
        .await?;
    Ok(tests::redis::info_counter(&info, "cmdstat_evalsha")
        + tests::redis::info_counter(&info, "cmdstat_eval"))
}

#[tokio::test]
async fn spawned_frozen_redis_answers_by_failure_mode_and_recovers_after_restart()
-> anyhow::Result<()> {
    let mut redis = PrivateRedis::start().await?;
    let mut services = Vec::new();
    for mode in [
        ratelimit_svc::guard::FailureMode::Open,
        ratelimit_svc::guard::FailureMode::Closed,
    ] {
        let url = redis.url();
        let (service, counters) = tests::services::ratelimit_counted(move |config| {
            config.redis_url = Some(url);
            config.redis_timeout = REDIS_TIMEOUT;
            config.failure_mode = mode;
            // Probes after a restart come back quickly (the default caps backoff at 30 s).
            config.redis_breaker.max_backoff = Duration::from_secs(1);
        })
        .await?;
        let client = client(service.endpoint()).await?;
        services.push((mode, service, counters, client));
    }
    let hour = Duration::from_secs(3600);
    let a_lot = limit(1_000, hour, pb::Algorithm::SlidingWindow);
    for (mode, _, _, client) in &mut services {
        let decision = check(client, &format!("{mode:?}:warm"), a_lot, 1).await?;
        assert_eq!(source(&decision), pb::DecisionSource::Store, "{decision:?}");
    }

    redis.freeze().await?;
    // Load: eight callers per service, each several calls in a row.
    let mut load = tokio::task::JoinSet::new();
    for (mode, _, _, client) in &services {
        for caller in 0..8 {
            let mut client = client.clone();
            let mode = *mode;
            load.spawn(async move {
                let mut answers = Vec::new();
                for call in 0..10 {
                    let key = format!("{mode:?}:{caller}:{call}");
                    let started = tokio::time::Instant::now();
                    let decision =
                        tokio::time::timeout(CALL_BOUND, check(&mut client, &key, a_lot, 1))
                            .await
                            .map_err(|_| {
                                anyhow::anyhow!("{mode:?}: no answer in {CALL_BOUND:?}")
                            })??;
                    answers.push((mode, started.elapsed(), decision));
                }
                anyhow::Ok(answers)
            });
        }
    }
    let mut answered = 0;
    while let Some(answers) = load.join_next().await {
        for (mode, elapsed, decision) in answers?? {
            assert!(elapsed < CALL_BOUND, "{mode:?}: {elapsed:?}");
            let expected = match mode {
                ratelimit_svc::guard::FailureMode::Open => (true, pb::DecisionSource::FailOpen),
                ratelimit_svc::guard::FailureMode::Closed => {
                    (false, pb::DecisionSource::FailClosed)
                }
            };
            assert_eq!((decision.allowed, source(&decision)), expected, "{mode:?}");
            answered += 1;
        }
    }
    assert_eq!(answered, 2 * 8 * 10);
    for (mode, _, counters, _) in &services {
        let counted = counters.values();
        assert!(counted.store_errors > 0, "{mode:?}: {counted:?}");
        assert!(
            counted.breaker_rejections > 0,
            "{mode:?}: the breaker tripped: {counted:?}"
        );
        match mode {
            ratelimit_svc::guard::FailureMode::Open => {
                assert!(
                    counted.fail_open > 0 && counted.fail_closed == 0,
                    "{counted:?}"
                );
            }
            ratelimit_svc::guard::FailureMode::Closed => {
                assert!(
                    counted.fail_closed > 0 && counted.fail_open == 0,
                    "{counted:?}"
                );
            }
        }
        assert_eq!(
            counted.fail_open + counted.fail_closed,
            80,
            "{mode:?}: every frozen call went to the failure mode: {counted:?}"
        );
    }

    // Back, then restarted: the new process has no scripts and no connections.
    redis.resume()?;
    redis.restart().await?;
    for (mode, _, counters, client) in &mut services {
        let before = counters.values();
        let recovered = tokio::time::timeout(tests::LIVENESS, async {
            loop {
                let decision = check(client, &format!("{mode:?}:after"), a_lot, 1).await?;
                if source(&decision) == pb::DecisionSource::Store {
                    return anyhow::Ok(decision);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!("{mode:?}: no store decision within {:?}", tests::LIVENESS)
        })??;
        assert!(recovered.allowed, "{mode:?}: {recovered:?}");
        assert_eq!(counters.values().cache_hits, before.cache_hits);
    }
    // The restarted server answered NOSCRIPT once per algorithm used and got EVAL instead.
    let errors: String = redis.query(::redis::cmd("INFO").arg("errorstats")).await?;
    assert!(
        tests::redis::info_counter(&errors, "errorstat_NOSCRIPT") >= 1,
        "{errors}"
    );
    let commands: String = redis
        .query(::redis::cmd("INFO").arg("commandstats"))
        .await?;
    assert!(
        tests::redis::info_counter(&commands, "cmdstat_eval") >= 1,
        "{commands}"
    );
    for (_, service, _, _) in services {
        service.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn spawned_over_limit_cache_answers_large_costs_without_redis_until_retry_after()
-> anyhow::Result<()> {
    let redis = PrivateRedis::start().await?;
    let url = redis.url();
    let (service, counters) = tests::services::ratelimit_counted(move |config| {
        config.redis_url = Some(url);
        config.redis_timeout = REDIS_TIMEOUT;
    })
    .await?;
    let mut client = client(service.endpoint()).await?;
    let three_per_hour = limit(3, Duration::from_secs(3600), pb::Algorithm::SlidingWindow);

    let first = check(&mut client, "hot", three_per_hour, 2).await?;
    assert!(first.allowed && source(&first) == pb::DecisionSource::Store);
    let refused = check(&mut client, "hot", three_per_hour, 2).await?;
    assert_eq!(
        (refused.allowed, source(&refused)),
        (false, pb::DecisionSource::Store)
    );

    // Costs at least as large as the refused one: answered here, Redis never asked.
    let calls_before = script_calls(&redis).await?;
    for cost in [2, 3, 50] {
        let cached = check(&mut client, "hot", three_per_hour, cost).await?;
        assert_eq!(
            (cached.allowed, source(&cached)),
            (false, pb::DecisionSource::Cache),
            "cost {cost}"
        );
        assert!(cached.retry_after.unwrap_or_default().seconds > 0);
    }
    assert_eq!(script_calls(&redis).await?, calls_before);
    assert_eq!(counters.values().cache_hits, 3);
    // The same key under another limit is another key.
    let other = check(
        &mut client,
        "hot",
        limit(4, Duration::from_secs(3600), pb::Algorithm::SlidingWindow),
        2,
    )
    .await?;
    assert_eq!(source(&other), pb::DecisionSource::Store);
    // A smaller cost goes to the store (and fits).
    let smaller = check(&mut client, "hot", three_per_hour, 1).await?;
    assert_eq!(
        (smaller.allowed, source(&smaller)),
        (true, pb::DecisionSource::Store)
    );
    assert_eq!(script_calls(&redis).await?, calls_before + 2);

    // With Redis frozen the cached refusal still comes back, at once; a cost below it
    // must ask Redis, which times out into the failure mode (open by default).
    redis.freeze().await?;
    let cached =
        tokio::time::timeout(CALL_BOUND, check(&mut client, "hot", three_per_hour, 2)).await??;
    assert_eq!(source(&cached), pb::DecisionSource::Cache);
    let asked =
        tokio::time::timeout(CALL_BOUND, check(&mut client, "hot", three_per_hour, 1)).await??;
    assert_eq!(source(&asked), pb::DecisionSource::FailOpen);
    assert_eq!(counters.values().store_errors, 1);
    redis.resume()?;

    // The cache holds a refusal only until its retry_after: then the store decides again.
    // (A machine stalling for a whole window between two calls sees no refusal to cache;
    // a fresh key is tried then.)
    let one_per_second = limit(1, Duration::from_secs(1), pb::Algorithm::SlidingWindow);
    let mut expired = false;
    for attempt in 0..10 {
        let key = format!("brief:{attempt}");
        let admitted = check(&mut client, &key, one_per_second, 1).await?;
        assert!(admitted.allowed, "{admitted:?}");
        let refused = check(&mut client, &key, one_per_second, 1).await?;
        if refused.allowed {
            continue;
        }
        assert_eq!(source(&refused), pb::DecisionSource::Store);
        let retry_after = refused.retry_after.unwrap_or_default();
        let retry_after = Duration::new(
            u64::try_from(retry_after.seconds)?,
            u32::try_from(retry_after.nanos)?,
        );
        let hits = counters.values().cache_hits;
        tokio::time::sleep(retry_after + Duration::from_millis(50)).await;
        let after = check(&mut client, &key, one_per_second, 1).await?;
        assert_eq!(
            (after.allowed, source(&after)),
            (true, pb::DecisionSource::Store),
            "{after:?}"
        );
        assert_eq!(counters.values().cache_hits, hits);
        expired = true;
        break;
    }
    assert!(
        expired,
        "never saw a refusal within one second of an admission"
    );
    service.stop().await
}
