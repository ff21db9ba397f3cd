//! The standalone sandbox acquirer as a real process, and clients to drive and inspect it.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::acquirer::v1 as pb;
use proto::acquirer::v1::acquirer_service_client::AcquirerServiceClient;
use proto::acquirer::v1::sandbox_control_service_client::SandboxControlServiceClient;
use tonic::transport::Channel;

use crate::process::SpawnedService;

/// Starts the `sandbox-acquirer` binary; `slow_answer` is its slow test card's delay.
pub async fn spawn_sandbox(slow_answer: Duration) -> anyhow::Result<SpawnedService> {
    SpawnedService::start(
        "sandbox-acquirer",
        &[(
            "SANDBOX_SLOW_ANSWER",
            format!("{}ms", slow_answer.as_millis()),
        )],
    )
    .await
}

async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(endpoint.to_owned())?.connect().await?)
}

/// Sets the sandbox's fault switches.
pub async fn set_faults(
    endpoint: &str,
    mode: pb::FailureMode,
    failure_rate_ppm: u32,
) -> anyhow::Result<()> {
    set_switches(endpoint, Duration::ZERO, mode, failure_rate_ppm).await
}

/// Sets every switch of the sandbox: `latency` added to every call (taken when the call
/// arrives), then `mode` for `failure_rate_ppm` of the calls.
pub async fn set_switches(
    endpoint: &str,
    latency: Duration,
    mode: pb::FailureMode,
    failure_rate_ppm: u32,
) -> anyhow::Result<()> {
    SandboxControlServiceClient::new(channel(endpoint).await?)
        .set_faults(pb::SetFaultsRequest {
            added_latency: Some(prost_types::Duration {
                seconds: i64::try_from(latency.as_secs())?,
                nanos: i32::try_from(latency.subsec_nanos())?,
            }),
            failure_mode: mode as i32,
            failure_rate_ppm,
        })
        .await?;
    Ok(())
}

/// Calls received per operation id, by kind.
pub async fn counters(endpoint: &str) -> anyhow::Result<BTreeMap<String, BTreeMap<String, u64>>> {
    let counters = SandboxControlServiceClient::new(channel(endpoint).await?)
        .get_operation_counters(pb::GetOperationCountersRequest::default())
        .await?
        .into_inner()
        .counters;
    Ok(counters
        .into_iter()
        .map(|c| (c.operation_id, c.calls.into_iter().collect()))
        .collect())
}

/// Every call the sandbox received.
pub async fn total_calls(endpoint: &str) -> anyhow::Result<u64> {
    Ok(counters(endpoint)
        .await?
        .values()
        .flat_map(|by_kind| by_kind.values())
        .sum())
}

/// Every operation (of `reference`, when given), through ListOperations' pages of `page_size`.
pub async fn operations(
    endpoint: &str,
    reference: &str,
    page_size: i32,
) -> anyhow::Result<Vec<pb::Operation>> {
    let mut client = AcquirerServiceClient::new(channel(endpoint).await?);
    let mut found = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_operations(pb::ListOperationsRequest {
                reference: reference.to_owned(),
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        found.extend(page.operations);
        if page.next_page_token.is_empty() {
            return Ok(found);
        }
        page_token = page.next_page_token;
    }
}

/// How many operations of `kind` were approved.
pub fn approved(operations: &[pb::Operation], kind: pb::OperationKind) -> usize {
    operations
        .iter()
        .filter(|op| op.kind == kind as i32 && op.status == pb::OperationStatus::Approved as i32)
        .count()
}

/// Adds `latency` to every call of the sandbox (no failures).
pub async fn set_latency(endpoint: &str, latency: Duration) -> anyhow::Result<()> {
    set_switches(endpoint, latency, pb::FailureMode::None, 0).await
}
