//! ratelimit-svc reaching Redis over TLS (`rediss://`), standalone and Cluster, trusting
//! a private CA through `REDIS_TLS_CA_FILE`; without it the server is not trusted.

use std::time::Duration;

use proto::ratelimit::v1 as pb;
use tests::redis::{PrivateRedis, RedisCluster};

use crate::ratelimit::{check, limit};
use crate::ratelimit_cluster::{keys_on, keys_per_node};
use crate::ratelimit_faults::client;

fn source(decision: &pb::Decision) -> pb::DecisionSource {
    pb::DecisionSource::try_from(decision.source).unwrap_or(pb::DecisionSource::Unspecified)
}

#[tokio::test]
async fn spawned_redis_over_tls_with_a_private_ca() -> anyhow::Result<()> {
    let redis = PrivateRedis::start_tls().await?;
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let ca_file = redis.ca_file();
    let (service, counters) = tests::services::ratelimit_counted(move |config| {
        config.redis_url = Some(url);
        config.redis_tls_ca_file = ca_file;
    })
    .await?;
    let mut client = client(service.endpoint()).await?;
    let two_per_hour = limit(2, Duration::from_secs(3600), pb::Algorithm::SlidingWindow);
    for allowed in [true, true, false] {
        let decision = check(&mut client, "over-tls", two_per_hour, 1).await?;
        assert_eq!(
            (decision.allowed, source(&decision)),
            (allowed, pb::DecisionSource::Store)
        );
    }
    let keys: Vec<String> = redis
        .query(::redis::cmd("KEYS").arg("rl:{over-tls}:*"))
        .await?;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(counters.values().store_errors, 0);
    service.stop().await?;

    // Without the CA the server's certificate is not trusted: the binary stops at start
    // with one line naming the variable.
    let refused = tests::process::run_to_exit(
        "ratelimit-svc",
        &[
            ("REDIS_URL", redis.url()),
            ("REDIS_TIMEOUT", "250ms".to_owned()),
        ],
        &[],
    )
    .await?;
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = refused.stderr.trim();
    assert!(
        stderr.starts_with("ratelimit-svc: REDIS_URL:") && stderr.lines().count() == 1,
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn spawned_cluster_over_tls_with_a_private_ca() -> anyhow::Result<()> {
    let cluster = RedisCluster::start_tls().await?;
    let urls = cluster.urls();
    assert!(urls.starts_with("rediss://"), "{urls}");
    let ca_file = cluster.ca_file();
    let (service, counters) = tests::services::ratelimit_counted(move |config| {
        config.redis_url = Some(urls);
        config.redis_cluster = true;
        config.redis_tls_ca_file = ca_file;
        config.redis_timeout = Duration::from_secs(1);
    })
    .await?;
    let mut client = client(service.endpoint()).await?;
    let one_per_hour = limit(1, Duration::from_secs(3600), pb::Algorithm::Gcra);
    for (key, owner) in keys_per_node(&cluster, "tls", 1).await? {
        for allowed in [true, false] {
            let decision = check(&mut client, &key, one_per_hour, 1).await?;
            assert_eq!(
                (decision.allowed, source(&decision)),
                (allowed, pb::DecisionSource::Store),
                "{key}"
            );
        }
        assert_eq!(keys_on(&cluster.nodes()[owner], &key).await?.len(), 1);
    }
    assert_eq!(counters.values().store_errors, 0);
    service.stop().await
}
