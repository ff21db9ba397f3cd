//! Three ratelimit-svc processes on one Redis, hammered on one key: the limit holds
//! globally, judged on the Redis time each decision carries.

use std::time::Duration;

use nix::sys::signal::Signal;
use proto::ratelimit::v1 as pb;
use tests::process::SpawnedService;

use crate::ratelimit::{check, limit};
use crate::ratelimit_faults::client;

/// The limit: L admissions…
const LIMIT: u64 = 20;
/// …per W.
const WINDOW: Duration = Duration::from_secs(1);
/// How long the clients hammer.
const RUN: Duration = Duration::from_secs(5);

/// One admission: its Redis time (µs) and where the decision came from.
type Admission = (i64, pb::DecisionSource);

/// Starts three processes (FAILURE_MODE closed, REDIS_TIMEOUT 1s) on the shared Redis,
/// runs one client per process against one key for [`RUN`], stops them with SIGTERM and
/// returns the admissions (sorted by Redis time) and each process's `fail_open` counter.
async fn hammer(algorithm: pb::Algorithm) -> anyhow::Result<(Vec<Admission>, Vec<u64>)> {
    let redis = tests::redis::TestRedis::new()?;
    let mut processes = Vec::new();
    for _ in 0..3 {
        processes.push(
            SpawnedService::start(
                "ratelimit-svc",
                &[
                    ("REDIS_URL", redis.url().to_owned()),
                    ("REDIS_TIMEOUT", "1s".to_owned()),
                    ("FAILURE_MODE", "closed".to_owned()),
                ],
            )
            .await?,
        );
    }
    let key = format!("{}hammered:{algorithm:?}", redis.prefix());
    let the_limit = limit(LIMIT, WINDOW, algorithm);
    let mut callers = tokio::task::JoinSet::new();
    for process in &processes {
        let mut client = client(process.endpoint()).await?;
        let key = key.clone();
        callers.spawn(async move {
            let mut admissions = Vec::new();
            let mut refused = 0_u64;
            let until = tokio::time::Instant::now() + RUN;
            while tokio::time::Instant::now() < until {
                let decision = check(&mut client, &key, the_limit, 1).await?;
                let source = pb::DecisionSource::try_from(decision.source)?;
                if decision.allowed {
                    let at = decision.decide_time.unwrap_or_default();
                    admissions.push((at.seconds * 1_000_000 + i64::from(at.nanos) / 1_000, source));
                } else {
                    refused += 1;
                }
            }
            anyhow::Ok((admissions, refused))
        });
    }
    let mut admissions = Vec::new();
    let mut refused = 0;
    while let Some(result) = callers.join_next().await {
        let (mine, refusals) = result??;
        admissions.extend(mine);
        refused += refusals;
    }
    admissions.sort_unstable();
    assert!(refused > 0, "the clients pushed past the limit");

    let mut fail_open = Vec::new();
    for mut process in processes {
        process.signal(Signal::SIGTERM)?;
        let status = process.wait(tests::LIVENESS).await?;
        assert!(status.success(), "{status}: {}", process.stderr().joined());
        fail_open.push(shutdown_counter(&process, "fail_open").await?);
    }
    Ok((admissions, fail_open))
}

/// A counter from the "ratelimit-svc counters at shutdown" log line (the process has
/// exited; its last lines may still be on their way through the pipe).
pub(crate) async fn shutdown_counter(
    process: &SpawnedService,
    counter: &str,
) -> anyhow::Result<u64> {
    let read = || {
        process
            .stdout()
            .snapshot()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find_map(|line| {
                let fields = line.get("fields")?;
                (fields.get("message")?.as_str()? == "ratelimit-svc counters at shutdown")
                    .then(|| fields.get(counter)?.as_u64())
                    .flatten()
            })
    };
    let deadline = tokio::time::Instant::now() + tests::LIVENESS;
    loop {
        if let Some(value) = read() {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "no {counter} in the shutdown log line:\n{}",
                process.stdout().joined()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What every run must show: admissions only from Redis, over several windows.
fn check_run(admissions: &[Admission], fail_open: &[u64]) -> anyhow::Result<i64> {
    assert_eq!(fail_open, [0, 0, 0], "no process admitted without Redis");
    assert!(
        admissions
            .iter()
            .all(|(_, source)| *source == pb::DecisionSource::Store),
        "every admission was Redis's decision"
    );
    let (Some(first), Some(last)) = (admissions.first(), admissions.last()) else {
        anyhow::bail!("nothing was admitted");
    };
    let span = last.0 - first.0;
    let window = i64::try_from(WINDOW.as_micros())?;
    assert!(
        span >= 3 * window,
        "the run spans several windows: {span} µs"
    );
    Ok(span)
}

#[tokio::test]
async fn spawned_three_processes_hold_one_sliding_window_on_redis_time() -> anyhow::Result<()> {
    let (admissions, fail_open) = hammer(pb::Algorithm::SlidingWindow).await?;
    let span = check_run(&admissions, &fail_open)?;
    let window = i64::try_from(WINDOW.as_micros())?;
    // No trailing window (t − W, t] holds more than L admissions.
    let limit = usize::try_from(LIMIT)?;
    let mut start = 0;
    for (end, (at, _)) in admissions.iter().enumerate() {
        while admissions[start].0 <= at - window {
            start += 1;
        }
        assert!(
            end + 1 - start <= limit,
            "{} admissions in the window ending at {at}",
            end + 1 - start
        );
    }
    let total = u64::try_from(admissions.len())?;
    let bound = LIMIT * (u64::try_from(span / window)? + 1);
    assert!(
        total <= bound,
        "{total} admissions over {span} µs (bound {bound})"
    );
    // Sanity: the limit was the bottleneck, not the clients.
    assert!(total >= LIMIT * 3, "{total} admissions");
    Ok(())
}

#[tokio::test]
async fn spawned_three_processes_hold_one_gcra_limit_on_redis_time() -> anyhow::Result<()> {
    let (admissions, fail_open) = hammer(pb::Algorithm::Gcra).await?;
    let span = check_run(&admissions, &fail_open)?;
    let window = i64::try_from(WINDOW.as_micros())?;
    // GCRA admits at most L per W on average plus a burst of L: total ≤ L·T/W + L.
    let total = i64::try_from(admissions.len())?;
    let limit = i64::try_from(LIMIT)?;
    assert!(
        total * window <= limit * span + limit * window,
        "{total} admissions over {span} µs"
    );
    assert!(total >= limit * 3, "{total} admissions");
    Ok(())
}
