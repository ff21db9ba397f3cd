//! Graceful shutdown of the real binaries: on SIGTERM, health turns NOT_SERVING first,
//! calls drain within a bound, and the process exits 0.

use std::time::Duration;

use nix::sys::signal::Signal;
use tests::postgres::TestDatabase;
use tests::process::SpawnedService;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The drain timeout given to the services under test.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

async fn sigterm_turns_not_serving_then_exits_zero(
    binary: &str,
    envs: Vec<(&str, String)>,
) -> anyhow::Result<()> {
    let mut envs = envs;
    envs.push(("SHUTDOWN_DRAIN_TIMEOUT", "500ms".to_owned()));
    let mut service = SpawnedService::start(binary, &envs).await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "readiness".to_owned(),
        })
        .await?
        .into_inner();
    let first = watch.message().await?.map(|m| m.status);
    assert_eq!(first, Some(ServingStatus::Serving as i32));

    service.signal(Signal::SIGTERM)?;
    let next = tokio::time::timeout(tests::LIVENESS, watch.message())
        .await??
        .map(|m| m.status);
    assert_eq!(
        next,
        Some(ServingStatus::NotServing as i32),
        "{binary}: health must flip first"
    );

    // Liveness bound: far above the drain timeout (DESIGN §10).
    let status = service.wait(DRAIN_TIMEOUT * 40).await?;
    assert!(
        status.success(),
        "{binary} exited with {status}: {}",
        service.stderr().joined()
    );
    // The log proves the graceful path ran: NOT_SERVING, drain, stop.
    let logs = service.stdout().joined();
    assert!(
        logs.contains("shutting down: draining connections"),
        "{logs}"
    );
    assert!(logs.contains("\"stopped\""), "{logs}");
    Ok(())
}

#[tokio::test]
async fn spawned_ratelimit_svc_shuts_down_gracefully_on_sigterm() -> anyhow::Result<()> {
    sigterm_turns_not_serving_then_exits_zero("ratelimit-svc", Vec::new()).await
}

#[tokio::test]
async fn spawned_gateway_svc_shuts_down_gracefully_on_sigterm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let envs = tests::gateway::spawned_env(dir.path())?;
    sigterm_turns_not_serving_then_exits_zero("gateway-svc", envs).await
}

#[tokio::test]
async fn spawned_payment_svc_shuts_down_gracefully_on_sigterm() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    sigterm_turns_not_serving_then_exits_zero(
        "payment-svc",
        vec![
            ("DATABASE_URL", database.service_url()),
            ("DATABASE_MIGRATION_URL", database.owner_url()),
        ],
    )
    .await
}
