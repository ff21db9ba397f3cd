//! Where a cluster's endpoints come from: a configured endpoint whose host is an IP
//! address is one endpoint for good; one whose host is a DNS name (a Kubernetes headless
//! Service) stands for every address the name resolves to, re-resolved periodically so
//! replicas that come and go are added and removed.
//!
//! A failed or empty resolution keeps the name's current endpoints: a DNS hiccup must not
//! empty a cluster (endpoints that are really gone trip their breakers instead).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use crate::balance::Upstream;
use crate::proxy::{ConnectSettings, Endpoint};

/// One configured endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `ip:port`: itself.
    Static(SocketAddr),
    /// `name:port`: what the name resolves to.
    Dns {
        /// The DNS name.
        host: String,
        /// The port of every resolved address.
        port: u16,
    },
}

impl Source {
    /// The source of an `http://host:port` endpoint (the route table checked its shape).
    pub fn from_uri(uri: &Uri) -> Option<Self> {
        let host = uri.host()?;
        let port = uri.port_u16()?;
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        Some(match literal.parse::<IpAddr>() {
            Ok(ip) => Self::Static(SocketAddr::new(ip, port)),
            Err(_) => Self::Dns {
                host: host.to_owned(),
                port,
            },
        })
    }
}

/// What a resolution of every source found: `None` for a source whose resolution failed.
pub type Resolved = Vec<Option<BTreeSet<SocketAddr>>>;

/// The endpoints wanted after a resolution: each source's addresses, or — when its
/// resolution failed or came back empty — the addresses it has now. Pure, so tested alone.
pub fn wanted(current: &[(String, usize)], resolved: &Resolved) -> Vec<(String, usize)> {
    let mut wanted = Vec::new();
    let mut seen = BTreeSet::new();
    for (source, addresses) in resolved.iter().enumerate() {
        match addresses {
            Some(addresses) if !addresses.is_empty() => {
                for address in addresses {
                    let address = address.to_string();
                    if seen.insert(address.clone()) {
                        wanted.push((address, source));
                    }
                }
            }
            _ => {
                for (address, from) in current {
                    if *from == source && seen.insert(address.clone()) {
                        wanted.push((address.clone(), source));
                    }
                }
            }
        }
    }
    wanted
}

/// Resolves every source once.
pub async fn resolve(sources: &[Source]) -> Resolved {
    let mut resolved = Vec::with_capacity(sources.len());
    for source in sources {
        resolved.push(match source {
            Source::Static(address) => Some(BTreeSet::from([*address])),
            Source::Dns { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addresses) => Some(addresses.collect()),
                    Err(err) => {
                        tracing::warn!(%host, error = %err, "cannot resolve upstream endpoint");
                        None
                    }
                }
            }
        });
    }
    resolved
}

/// Resolves `sources` and updates `upstream`'s endpoints.
pub async fn refresh(upstream: &Upstream, sources: &[Source], connect: ConnectSettings) {
    let resolved = resolve(sources).await;
    let current: Vec<(String, usize)> = upstream
        .endpoints()
        .iter()
        .map(|endpoint| (endpoint.address().to_owned(), endpoint.source))
        .collect();
    let wanted = wanted(&current, &resolved);
    if wanted == current {
        return;
    }
    upstream.set_endpoints(&wanted, |address| {
        let uri: Uri = format!("http://{address}").parse().ok()?;
        Endpoint::new(&uri, connect)
    });
}

/// Re-resolves `sources` every `interval` until dropped; nothing to do when all are
/// static.
pub async fn watch(
    upstream: Arc<Upstream>,
    sources: Vec<Source>,
    connect: ConnectSettings,
    interval: Duration,
) {
    if sources
        .iter()
        .all(|source| matches!(source, Source::Static(_)))
    {
        return;
    }
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        refresh(&upstream, &sources, connect).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(list: &[&str]) -> Option<BTreeSet<SocketAddr>> {
        list.iter().map(|a| a.parse().ok()).collect()
    }

    fn endpoints(list: &[(&str, usize)]) -> Vec<(String, usize)> {
        list.iter().map(|(a, s)| ((*a).to_owned(), *s)).collect()
    }

    #[test]
    fn ip_hosts_are_static_and_names_are_resolved() {
        let source = |text: &str| text.parse::<Uri>().ok().as_ref().and_then(Source::from_uri);
        assert_eq!(
            source("http://10.0.0.1:50052"),
            "10.0.0.1:50052".parse().ok().map(Source::Static)
        );
        assert_eq!(
            source("http://[::1]:50052"),
            "[::1]:50052".parse().ok().map(Source::Static)
        );
        assert_eq!(
            source("http://payment-svc.paysuite.svc:50052"),
            Some(Source::Dns {
                host: "payment-svc.paysuite.svc".to_owned(),
                port: 50052
            })
        );
    }

    #[test]
    fn new_addresses_are_added_and_vanished_ones_removed() {
        let current = endpoints(&[("10.0.0.1:1", 0), ("10.0.0.2:1", 0), ("10.9.9.9:1", 1)]);
        let resolved = vec![
            addresses(&["10.0.0.2:1", "10.0.0.3:1"]),
            addresses(&["10.9.9.9:1"]),
        ];
        assert_eq!(
            wanted(&current, &resolved),
            endpoints(&[("10.0.0.2:1", 0), ("10.0.0.3:1", 0), ("10.9.9.9:1", 1)])
        );
    }

    #[test]
    fn a_failed_or_empty_resolution_keeps_the_names_endpoints() {
        let current = endpoints(&[("10.0.0.1:1", 0), ("10.0.0.5:1", 1)]);
        for failed in [None, Some(BTreeSet::new())] {
            let resolved = vec![failed, addresses(&["10.0.0.6:1"])];
            assert_eq!(
                wanted(&current, &resolved),
                endpoints(&[("10.0.0.1:1", 0), ("10.0.0.6:1", 1)])
            );
        }
    }

    #[test]
    fn an_address_two_names_share_is_one_endpoint() {
        let resolved = vec![addresses(&["10.0.0.1:1"]), addresses(&["10.0.0.1:1"])];
        assert_eq!(wanted(&[], &resolved), endpoints(&[("10.0.0.1:1", 0)]));
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback_endpoints() {
        let resolved = resolve(&[Source::Dns {
            host: "localhost".to_owned(),
            port: 50052,
        }])
        .await;
        let found = resolved.into_iter().next().flatten().unwrap_or_default();
        assert!(!found.is_empty());
        assert!(
            found
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 50052)
        );
    }
}
