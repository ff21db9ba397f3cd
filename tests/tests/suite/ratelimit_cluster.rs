//! ratelimit-svc on a Redis Cluster of three masters (private processes): hash-tagged
//! keys of every algorithm live on their slot's master, a slot moved to another master
//! is followed (MOVED) with its state, scripts survive a master's restart (NOSCRIPT), and a
//! frozen master costs its callers only the deadline.

use std::time::Duration;

use proto::ratelimit::v1 as pb;
use tests::redis::{PrivateRedis, RedisCluster};

use crate::ratelimit::{check, limit};
use crate::ratelimit_faults::client;

const ALGORITHMS: [pb::Algorithm; 3] = [
    pb::Algorithm::SlidingWindow,
    pb::Algorithm::Gcra,
    pb::Algorithm::FixedWindow,
];

fn source(decision: &pb::Decision) -> pb::DecisionSource {
    pb::DecisionSource::try_from(decision.source).unwrap_or(pb::DecisionSource::Unspecified)
}

/// The limiter keys (`rl:{key}:…`) a node holds for `key`.
pub(crate) async fn keys_on(node: &PrivateRedis, key: &str) -> anyhow::Result<Vec<String>> {
    node.query(::redis::cmd("KEYS").arg(format!("rl:{{{key}}}:*")))
        .await
}

/// Caller keys (`<prefix>-<n>`) with the node their slot lives on, `per_node` of them
/// for each node.
pub(crate) async fn keys_per_node(
    cluster: &RedisCluster,
    prefix: &str,
    per_node: usize,
) -> anyhow::Result<Vec<(String, usize)>> {
    let mut chosen: Vec<(String, usize)> = Vec::new();
    for n in 0..1_000 {
        let key = format!("{prefix}-{n}");
        // The hash tag makes the slot the caller key's own.
        let owner = cluster
            .owner_of(cluster.slot_of(&format!("rl:{{{key}}}:x")).await?)
            .await?;
        if chosen.iter().filter(|(_, node)| *node == owner).count() < per_node {
            chosen.push((key, owner));
        }
        if chosen.len() == per_node * cluster.nodes().len() {
            return Ok(chosen);
        }
    }
    anyhow::bail!("no keys found for every node: {chosen:?}")
}

async fn cluster_service(
    cluster: &RedisCluster,
) -> anyhow::Result<(
    tests::services::RunningService,
    std::sync::Arc<ratelimit_svc::guard::Counters>,
)> {
    let urls = cluster.urls();
    tests::services::ratelimit_counted(move |config| {
        config.redis_url = Some(urls);
        config.redis_cluster = true;
        config.redis_timeout = Duration::from_secs(1);
        config.redis_breaker.max_backoff = Duration::from_secs(1);
    })
    .await
}

#[tokio::test]
async fn spawned_cluster_keeps_each_key_on_its_master_and_follows_a_moved_slot()
-> anyhow::Result<()> {
    let cluster = RedisCluster::start().await?;
    let (service, counters) = cluster_service(&cluster).await?;
    let mut client = client(service.endpoint()).await?;
    let three_per_hour = |algorithm| limit(3, Duration::from_secs(3600), algorithm);

    for algorithm in ALGORITHMS {
        for (key, owner) in &keys_per_node(&cluster, &format!("{algorithm:?}"), 2).await? {
            for n in 0..3 {
                let decision = check(&mut client, key, three_per_hour(algorithm), 1).await?;
                assert!(
                    decision.allowed && source(&decision) == pb::DecisionSource::Store,
                    "{key} #{n}: {decision:?}"
                );
            }
            let refused = check(&mut client, key, three_per_hour(algorithm), 1).await?;
            assert_eq!(
                (refused.allowed, source(&refused)),
                (false, pb::DecisionSource::Store),
                "{key}"
            );
            for (index, node) in cluster.nodes().iter().enumerate() {
                let held = keys_on(node, key).await?;
                assert_eq!(
                    held.len(),
                    usize::from(index == *owner),
                    "{key} lives on node {owner} only; node {index} holds {held:?}"
                );
            }
        }
    }
    assert_eq!(counters.values().store_errors, 0);

    // A key with state (two of three spent) whose slot then moves to another master.
    let (key, owner) = keys_per_node(&cluster, "moved", 1).await?.swap_remove(0);
    let the_limit = three_per_hour(pb::Algorithm::SlidingWindow);
    for _ in 0..2 {
        assert!(check(&mut client, &key, the_limit, 1).await?.allowed);
    }
    let slot = cluster.slot_of(&format!("rl:{{{key}}}:x")).await?;
    let target = (owner + 1) % cluster.nodes().len();
    let moved_before = cluster.nodes()[owner]
        .info_counter("errorstats", "errorstat_MOVED")
        .await?;
    cluster.move_slot(slot, target).await?;
    assert_eq!(keys_on(&cluster.nodes()[target], &key).await?.len(), 1);

    let last = check(&mut client, &key, the_limit, 1).await?;
    assert_eq!(
        (last.allowed, last.remaining, source(&last)),
        (true, 0, pb::DecisionSource::Store),
        "the state moved with the slot: {last:?}"
    );
    let refused = check(&mut client, &key, the_limit, 1).await?;
    assert_eq!(
        (refused.allowed, source(&refused)),
        (false, pb::DecisionSource::Store),
        "the limit still holds after the move"
    );
    let moved_after = cluster.nodes()[owner]
        .info_counter("errorstats", "errorstat_MOVED")
        .await?;
    assert!(
        moved_after > moved_before,
        "the old owner redirected the client (MOVED {moved_before} → {moved_after})"
    );
    assert_eq!(counters.values().store_errors, 0);
    service.stop().await
}

#[tokio::test]
async fn spawned_cluster_reloads_scripts_after_a_master_restart_and_a_flush() -> anyhow::Result<()>
{
    let mut cluster = RedisCluster::start().await?;
    let (service, counters) = cluster_service(&cluster).await?;
    let mut client = client(service.endpoint()).await?;
    let keys = keys_per_node(&cluster, "tenant", 1).await?;
    let a_lot = |algorithm| limit(100, Duration::from_secs(3600), algorithm);
    for algorithm in ALGORITHMS {
        for (key, _) in &keys {
            let decision = check(&mut client, key, a_lot(algorithm), 1).await?;
            assert_eq!(source(&decision), pb::DecisionSource::Store);
        }
    }

    // A master restarts: same port, same slots (nodes.conf), no scripts, no data.
    let (key, restarted) = keys[1].clone();
    cluster.node_mut(restarted).restart().await?;
    cluster.wait_until_ok().await.map_err(|err| {
        anyhow::anyhow!(
            "{err}\n--- node {restarted} log ---\n{}",
            cluster.log_of(restarted)
        )
    })?;
    for algorithm in ALGORITHMS {
        // The same caller key: its slot is the restarted master's.
        let decision = tokio::time::timeout(tests::LIVENESS, async {
            loop {
                let decision = check(&mut client, &key, a_lot(algorithm), 1).await?;
                if source(&decision) == pb::DecisionSource::Store {
                    return anyhow::Ok(decision);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("{key}: no store decision within {:?}", tests::LIVENESS))??;
        assert!(decision.allowed, "{decision:?}");
    }
    let node = &cluster.nodes()[restarted];
    assert!(
        node.info_counter("errorstats", "errorstat_NOSCRIPT")
            .await?
            >= 3
    );
    assert!(node.info_counter("commandstats", "cmdstat_eval").await? >= 3);

    // Every node forgets every script: the next decisions load them again.
    let mut noscript_before = Vec::new();
    for node in cluster.nodes() {
        noscript_before.push(
            node.info_counter("errorstats", "errorstat_NOSCRIPT")
                .await?,
        );
        let () = node.query(::redis::cmd("SCRIPT").arg("FLUSH")).await?;
    }
    let errors_before = counters.values().store_errors;
    for algorithm in ALGORITHMS {
        for (key, _) in &keys {
            let decision = check(&mut client, key, a_lot(algorithm), 1).await?;
            assert_eq!(
                (decision.allowed, source(&decision)),
                (true, pb::DecisionSource::Store)
            );
        }
    }
    assert_eq!(counters.values().store_errors, errors_before);
    for (node, before) in cluster.nodes().iter().zip(noscript_before) {
        let after = node
            .info_counter("errorstats", "errorstat_NOSCRIPT")
            .await?;
        assert_eq!(
            after,
            before + 3,
            "one NOSCRIPT per script on {}",
            node.address()
        );
    }
    service.stop().await
}

#[tokio::test]
async fn spawned_cluster_frozen_master_answers_by_failure_mode_and_recovers() -> anyhow::Result<()>
{
    let cluster = RedisCluster::start().await?;
    let urls = cluster.urls();
    let (service, counters) = tests::services::ratelimit_counted(move |config| {
        config.redis_url = Some(urls);
        config.redis_cluster = true;
        config.redis_timeout = Duration::from_millis(100);
        config.failure_mode = ratelimit_svc::guard::FailureMode::Closed;
        config.redis_breaker.max_backoff = Duration::from_secs(1);
    })
    .await?;
    let mut client = client(service.endpoint()).await?;
    let a_lot = limit(1_000, Duration::from_secs(3600), pb::Algorithm::Gcra);
    let keys = keys_per_node(&cluster, "frozen", 1).await?;
    for (key, _) in &keys {
        let decision = check(&mut client, key, a_lot, 1).await?;
        assert_eq!(source(&decision), pb::DecisionSource::Store, "{key}");
    }

    // One master stops answering: calls on its slots end at the deadline, refused.
    let (key, frozen) = keys[0].clone();
    cluster.nodes()[frozen].freeze().await?;
    let bound = Duration::from_secs(5);
    for _ in 0..10 {
        let decision = tokio::time::timeout(bound, check(&mut client, &key, a_lot, 1))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {bound:?}"))??;
        assert_eq!(
            (decision.allowed, source(&decision)),
            (false, pb::DecisionSource::FailClosed)
        );
    }
    let counted = counters.values();
    assert!(
        counted.store_errors > 0 && counted.fail_closed == 10 && counted.fail_open == 0,
        "{counted:?}"
    );

    cluster.nodes()[frozen].resume()?;
    for (key, _) in &keys {
        let decision = tokio::time::timeout(tests::LIVENESS, async {
            loop {
                let decision = check(&mut client, key, a_lot, 1).await?;
                if source(&decision) == pb::DecisionSource::Store {
                    return anyhow::Ok(decision);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("{key}: no store decision within {:?}", tests::LIVENESS))??;
        assert!(decision.allowed, "{key}: {decision:?}");
    }
    service.stop().await
}
