//! The `ratelimit-check` workload, shared by the scenarios whose call is
//! `paysuite.ratelimit.v1.RateLimitService/Check` (`limiter`: ratelimit-svc and the no-op
//! service; `gateway`: the no-op service directly, through gateway-svc and through nginx).
//!
//! Every call is a Check with cost 1 on a key drawn from [`KEY_SPACE`] keys under a
//! sliding window of [`LIMIT`] per [`WINDOW`]. Every answer is checked: a decision must
//! be present, admit the call and echo the limit asked for (so a proxy that answered on
//! its own, or mangled the message, counts as an error); `expect=store` also requires the
//! decision to come from the store (ratelimit-svc).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use proto::ratelimit::v1 as pb;
use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::load::{CallFuture, Workload};

/// The workload's name (see [`super::workload`]).
pub const CHECK_WORKLOAD: &str = "ratelimit-check";

/// Keys are drawn from this many (as redis-benchmark's `-r`).
pub const KEY_SPACE: u64 = 1_000_000;
/// The sliding-window limit per key: far above what a key sees, so calls are admitted.
pub const LIMIT: u64 = 1_000;
/// The sliding window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The environment variable carrying an identity token to the generator (sent as
/// `x-paysuite-identity`, for a service called directly).
pub const ENV_TOKEN: &str = "BENCH_IDENTITY_TOKEN";
/// The environment variable carrying an API key to the generator (sent as
/// `authorization: Bearer …`, for the gateway).
pub const ENV_API_KEY: &str = "BENCH_API_KEY";

/// The generator's side: Check calls over several connections.
#[derive(Debug)]
pub struct CheckWorkload {
    channels: Vec<Channel>,
    token: Option<MetadataValue<Ascii>>,
    authorization: Option<MetadataValue<Ascii>>,
    /// Whether the answer must come from the store (ratelimit-svc) or may be any
    /// admitting answer (the no-op).
    expect_store: bool,
}

impl CheckWorkload {
    /// Parameters: `expect=store|any`; the identity token comes from
    /// `BENCH_IDENTITY_TOKEN`, the API key from `BENCH_API_KEY` (kept out of `ps`).
    pub fn from_params(params: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let expect_store = match params.get("expect").map(String::as_str) {
            Some("store") => true,
            Some("any") | None => false,
            Some(other) => bail!("expect={other}: takes store or any"),
        };
        let header = |variable: &str, prefix: &str| -> anyhow::Result<_> {
            match std::env::var(variable) {
                Ok(value) if !value.is_empty() => {
                    Ok(Some(format!("{prefix}{value}").parse().map_err(|_| {
                        anyhow::anyhow!("{variable} is not a valid header value")
                    })?))
                }
                _ => Ok(None),
            }
        };
        Ok(Self {
            channels: Vec::new(),
            token: header(ENV_TOKEN, "")?,
            authorization: header(ENV_API_KEY, "Bearer ")?,
            expect_store,
        })
    }

    fn request(&self, sequence: u64) -> tonic::Request<pb::CheckRequest> {
        let mut request = tonic::Request::new(pb::CheckRequest {
            key: format!("bench-{}", spread_key(sequence) % KEY_SPACE),
            limit: Some(pb::Limit {
                limit: LIMIT,
                window: Some(prost_types::Duration {
                    seconds: i64::try_from(WINDOW.as_secs()).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                algorithm: pb::Algorithm::SlidingWindow.into(),
            }),
            cost: 1,
        });
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert(service_kit::identity::IDENTITY_HEADER, token.clone());
        }
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        request
    }
}

/// A well-mixed 64-bit value of `sequence` (SplitMix64's finaliser): consecutive calls
/// land on unrelated keys.
pub fn spread_key(sequence: u64) -> u64 {
    let mut z = sequence.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Workload for CheckWorkload {
    fn connect(&mut self, address: &str, connections: usize) -> CallFuture {
        let endpoint = Endpoint::from_shared(address.to_owned()).map(|endpoint| {
            endpoint
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
        });
        // Each `connect_lazy` is its own HTTP/2 connection.
        match endpoint {
            Ok(endpoint) => {
                self.channels = (0..connections).map(|_| endpoint.connect_lazy()).collect();
                Box::pin(async { Ok(()) })
            }
            Err(err) => {
                let err = err.to_string();
                Box::pin(async move { Err(err) })
            }
        }
    }

    fn call(&self, sequence: u64) -> CallFuture {
        let Some(channel) = self
            .channels
            .get(usize::try_from(sequence).unwrap_or(0) % self.channels.len().max(1))
            .cloned()
        else {
            return Box::pin(async { Err("not connected".to_owned()) });
        };
        let request = self.request(sequence);
        let expect_store = self.expect_store;
        Box::pin(async move {
            let response = RateLimitServiceClient::new(channel)
                .check(request)
                .await
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
            let decision = response
                .into_inner()
                .decision
                .ok_or_else(|| "an answer without a decision".to_owned())?;
            if !decision.allowed {
                return Err("refused".to_owned());
            }
            if decision.limit != LIMIT {
                return Err(format!(
                    "a decision for a limit of {}, not {LIMIT}",
                    decision.limit
                ));
            }
            if expect_store && decision.source != i32::from(pb::DecisionSource::Store) {
                return Err(format!(
                    "decided by {:?}, not the store",
                    pb::DecisionSource::try_from(decision.source)
                ));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_the_key_space() {
        let keys: std::collections::BTreeSet<u64> =
            (0..10_000).map(|n| spread_key(n) % KEY_SPACE).collect();
        // 10,000 draws from a million keys: collisions are rare, never most of them.
        assert!(keys.len() > 9_900, "only {} distinct keys", keys.len());
    }
}
